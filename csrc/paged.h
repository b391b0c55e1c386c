// Unified (managed) memory for optimizer states that may page out to the host under memory
// pressure (lowrank.optim.PagedAdamW; QLoRA, Dettmers et al. 2023, section 3, "paged optimizers").
// No torch headers: paged.cu compiles with nvcc alone (make cuda-objects).
//
//   lowrank_managed_alloc / lowrank_managed_free: the two functions
//       torch.cuda.memory.CUDAPluggableAllocator loads by name from lowrank._C, so a
//       torch.cuda.MemPool hands out managed memory inside `torch.cuda.use_mem_pool(pool)` only;
//   managed_prefetch: move pages to `device` ahead of use, on `stream`.
#pragma once

#include <cuda_runtime.h>
#include <sys/types.h>

#include <cstddef>

extern "C" {
void* lowrank_managed_alloc(ssize_t size, int device, cudaStream_t stream);
void lowrank_managed_free(void* ptr, ssize_t size, int device, cudaStream_t stream);
}

namespace lowrank {

cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream);

}  // namespace lowrank
