// Managed memory for paged optimizer states; the contract is in paged.h.
//
// A page of managed memory lives on the GPU while there is room (preferred location: the
// device) and the driver moves it to host memory when the GPU runs short, instead of failing
// the allocation that needed the room; touching it again brings it back. So a spike in
// activation memory evicts optimizer states for a while rather than ending the run.
#include "paged.h"

namespace {

// CUDA 13 names a memory location with a struct where CUDA 12 took a device ordinal.
#if CUDART_VERSION >= 13000
cudaMemLocation on_device(int device) {
  cudaMemLocation location{};
  location.type = cudaMemLocationTypeDevice;
  location.id = device;
  return location;
}
#endif

}  // namespace

extern "C" void* lowrank_managed_alloc(ssize_t size, int device, cudaStream_t stream) {
  (void)stream;  // managed memory is not stream-ordered
  void* ptr = nullptr;
  if (size <= 0 || cudaMallocManaged(&ptr, static_cast<size_t>(size), cudaMemAttachGlobal) != cudaSuccess) {
    cudaGetLastError();  // clear it: the caching allocator reports the failure as out of memory
    return nullptr;
  }
#if CUDART_VERSION >= 13000
  cudaMemAdvise(ptr, static_cast<size_t>(size), cudaMemAdviseSetPreferredLocation, on_device(device));
#else
  cudaMemAdvise(ptr, static_cast<size_t>(size), cudaMemAdviseSetPreferredLocation, device);
#endif
  cudaGetLastError();  // an advice the system does not take (no concurrent managed access) is only a hint
  return ptr;
}

extern "C" void lowrank_managed_free(void* ptr, ssize_t size, int device, cudaStream_t stream) {
  (void)size, (void)device, (void)stream;
  cudaFree(ptr);
}

namespace lowrank {

cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(ptr, bytes, on_device(device), 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, bytes, device, stream);
#endif
}

}  // namespace lowrank
