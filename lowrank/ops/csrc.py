"""The "csrc" backend: the C++ CPU kernels and CUDA kernels of lowrank._C (csrc/, docs/csrc.md).

Importing this module registers them in the backend table when lowrank._C was built. Without
it (built with LOWRANK_NO_EXT=1, a failed build, or LOWRANK_NO_EXT=1 now) it logs one line and
registers nothing, and every op runs on the Triton / reference backends.

    op                      kernel                                   otherwise
    nf4_dequantize          CPU, CUDA: every shape and dtype         reference (other devices)
    nf4_linear              CPU GEMV: 1 <= M <= 16, K % 32 == 0 and  csrc dequantize in x.dtype, then
                            K % blocksize == 0 (M = x.numel() / K);  F.linear (the reference's own math)
                            else, K % blocksize == 0: W dequantized
                            8 MiB at a time (csrc/nf4_cpu_chunks.cpp)
                            CUDA: K % 32 == 0 and 1 <= M <= 32 for
                            float16 / bfloat16 (tensor cores), 16
                            for float32
    nf4_linear_grad_input   csrc dequantize in grad_y.dtype, then grad_y @ W
    nf4_experts_linear      the rows sorted by expert, nf4_linear or   reference, also on a CUDA stream
                            nf4_linear_grad_input per expert           being captured (experts_ops.py)

LOWRANK_CPU_ISA=scalar|avx2|avx512|avx512bf16 caps the instruction set of the CPU kernels (tests,
benchmarks); by default they use the widest one this CPU has.
LOWRANK_CUDA_GEMV=mma|mma-staged|mma-staged2|mma-lut|mma-lut-deep picks the tensor-core GEMV that float16 /
bfloat16 calls run on CUDA (default mma-lut; csrc/nf4_cuda_gemv.cu, Note: LOWRANK_CUDA_GEMV), read once
a process by lowrank._C and checked here on import.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from . import backends

log = logging.getLogger("lowrank")

_C = None
if os.environ.get("LOWRANK_NO_EXT", "0") == "1":
    log.info("lowrank: LOWRANK_NO_EXT=1, lowrank._C not loaded; the csrc backend is off")
else:
    try:
        from .. import _C
    except (ImportError, OSError) as e:  # not built, or built for another torch: the other backends cover every op
        log.info("lowrank: lowrank._C is not built (%s); the csrc backend is off", e)

CPP_AUTOGRAD = False  # True once lowrank._C's autograd is registered for the ops (below)

CUDA_GEMV_KERNELS = ("mma", "mma-staged", "mma-staged2", "mma-lut", "mma-lut-deep")  # csrc/nf4_cuda_gemv.cu auto_half_kernel


def cuda_gemv_kernel(environ=os.environ) -> str:
    """The CUDA GEMV LOWRANK_CUDA_GEMV names (default "mma-lut"); a ValueError for any other name, which
    lowrank._C would refuse at every call."""
    name = environ.get("LOWRANK_CUDA_GEMV", "")
    if name and name not in CUDA_GEMV_KERNELS:
        raise ValueError(f"LOWRANK_CUDA_GEMV must be one of {CUDA_GEMV_KERNELS} or unset, got {name!r}")
    return name or "mma-lut"


cuda_gemv_kernel()  # a bad name fails here, on import, not at the first GEMV on a GPU

GEMV_MAX_ROWS = 16  # csrc/nf4_cpu.h kGemvMaxRows
# Note: GEMV or dequantize + cuBLAS on CUDA. The kernels take up to 64 rows of float16 / bfloat16
# and 16 of float32 (csrc/nf4_cuda.h); the op runs the GEMV up to 32 rows of float16 / bfloat16 and
# 16 of float32, and above them dequantizes W once and calls cuBLAS. On the H200 (2026-11-30,
# docs/benchmarks.md) the default GEMV, mma-lut, took 0.55-0.76x the time of csrc dequantize + bf16
# F.linear (the two kernels' times added) at 32 rows over the six Llama shapes; at 64 rows 0.80-1.22x,
# so 64 rows stay on cuBLAS.
# The limit itself is csrc/nf4_cuda.h kCudaGemvOpMaxRows (32), which the op's C++ kernel routes by too.
CUDA_GEMV_MAX_ROWS = getattr(_C, "cuda_gemv_op_max_rows", 0)  # 0: no CUDA kernels in this build
CUDA_SIMT_MAX_ROWS = getattr(_C, "cuda_simt_max_rows", 0)  # float32 x: the CUDA-core GEMV's most rows


def _kernel(name: str, device: torch.device):
    """lowrank._C's function `name`_cpu / `name`_cuda for `device`, or None."""
    if device.type == "cuda" and not _C.with_cuda:
        return None
    return getattr(_C, f"{name}_{device.type}", None)


def nf4_dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, dtype):
    kernel = _kernel("nf4_dequantize", packed.device)
    if kernel is None:
        reference = backends.implementation("nf4_dequantize", "reference")
        return reference(packed, absmax, nested_absmax, offset, shape, blocksize, dtype)
    return kernel(*backends.contiguous_fields(packed, absmax, nested_absmax, offset), list(shape), blocksize, dtype)


def _gemv_covers(x: torch.Tensor, shape, blocksize: int) -> bool:
    k = shape[-1]
    if len(shape) != 2 or k <= 0 or k % 32 != 0:
        return False
    if x.device.type == "cuda":  # any blocksize: a lane's 32 weights always lie in one block
        most = CUDA_SIMT_MAX_ROWS if x.dtype == torch.float32 else CUDA_GEMV_MAX_ROWS
        return 1 <= x.numel() // k <= most  # (packed 16-byte aligned: see nf4_linear)
    return k % blocksize == 0 and 1 <= x.numel() // k <= GEMV_MAX_ROWS


def nf4_linear(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias):
    kernel = _kernel("nf4_linear", x.device)
    if kernel is not None and _gemv_covers(x, shape, blocksize):
        weight = backends.contiguous_fields(packed, absmax, nested_absmax, offset)
        if weight[0].device.type == "cuda" and weight[0].data_ptr() % 16:  # a view at an odd offset: 128-bit loads need 16
            weight = (weight[0].clone(), *weight[1:])
        return kernel(x, *weight, list(shape), blocksize, bias)
    if kernel is not None and x.device.type == "cpu" and _chunks_cover(x, shape, blocksize):
        # where the GEMV does not go: W a chunk at a time (csrc/nf4_cpu_chunks.cpp), as the C++ kernel does
        fields = backends.contiguous_fields(packed, absmax, nested_absmax, offset)
        return _C.nf4_linear_cpu_chunks(x, *fields, list(shape), blocksize, bias)
    w = nf4_dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, x.dtype)  # (N, K), bit-exact
    return F.linear(x, w, bias)  # (..., K) @ (K, N) -> (..., N), as the reference


def _chunks_cover(x: torch.Tensor, shape, blocksize: int) -> bool:
    """csrc/bindings.cpp's cpu_gemv where the GEMV does not go: W [N, K], K a multiple of blocksize, x of a
    dtype the kernels write, not empty."""
    return (len(shape) == 2 and shape[0] > 0 and shape[1] > 0 and shape[1] % blocksize == 0 and x.numel() > 0
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16))


def nf4_linear_grad_input(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize):
    w = nf4_dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, grad_y.dtype)  # (N, K)
    return grad_y @ w  # (..., N) @ (N, K) -> (..., K), as the reference


if _C is not None:
    isa = os.environ.get("LOWRANK_CPU_ISA", "").strip().lower()
    if isa:
        try:
            if not _C.set_cpu_isa(isa):
                log.warning("lowrank: LOWRANK_CPU_ISA=%s but this CPU has at most %s; using that", isa, _C.best_cpu_isa())
        except ValueError as e:
            log.warning("lowrank: ignoring LOWRANK_CPU_ISA: %s", e)
    from . import library

    # See Note: the ops in C++ (csrc/dispatch.h): loading _C registered its CPU (and CUDA) kernels
    # for the ops; these are the Python kernels they hand the calls they do not take back to.
    _C.set_python_kernels(library.dequantize_kernel, library.linear_kernel, library.grad_input_kernel)
    # See Note: autograd in C++ (csrc/autograd.cpp): the ops' autograd without Python, unless
    # LOWRANK_PYTHON_OPS=1 asks for the Python kernels (then library.py's autograd, the A/B).
    CPP_AUTOGRAD = os.environ.get("LOWRANK_PYTHON_OPS", "") != "1"
    if CPP_AUTOGRAD:
        _C.register_autograd()
        from . import lora_ops

        lora_ops._C_DROPOUT_PARTS = _C.dropout_parts  # the LoRA ops' dropout draws in one call (lora_ops.py)
    for _op, _fn in (
        ("nf4_dequantize", nf4_dequantize),
        ("nf4_linear", nf4_linear),
        ("nf4_linear_grad_input", nf4_linear_grad_input),
    ):
        backends.register(_op, "csrc")(_fn)
    from . import experts_ops

    backends.register(experts_ops.OP, "csrc")(experts_ops.per_expert)  # its experts through the ops above
    log.info(
        "lowrank: lowrank._C loaded (CPU kernels: %s%s)", _C.cpu_isa(), ", CUDA kernels" if _C.with_cuda else ", no CUDA"
    )
