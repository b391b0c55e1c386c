#pragma once
// A stand-in for the CUDA library header of the same name, which nvcc alone does not install: only the
// handle and status types torch's ATen/cuda headers name (tests/csrc/test_bindings_cuda.py).
typedef struct cublasContext* cublasHandle_t;
typedef int cublasStatus_t;
