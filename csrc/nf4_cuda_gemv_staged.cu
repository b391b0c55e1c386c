// y[M, N] = x[M, K] @ W[N, K]^T + bias[N] on tensor cores, the staged variants: kGemvMmaStaged
// (M <= 64) and kGemvMmaStaged2 (M <= 16). See nf4_cuda_gemv.cu for what the GEMVs compute and
// nf4_cuda_mma.h for the pieces they share with kGemvMma; Note: staged scales, below, for what
// these do differently. Written without a GPU at hand and run only on the CPU emulator
// (tests/csrc/test_cuda_emulated.py): not the default until a GPU run has timed them against
// kGemvMma (benchmarks/gpu_check.sh).
#include "nf4_cuda_mma.h"

namespace lowrank {
namespace {

// Note: staged scales. mma_kernel spends about a third of its K loop on bookkeeping, not on
// decoding (sm_90a SASS, bf16, one n8 tile: 881 instructions for 128 weights a lane, of which
// ~630 decode and multiply): per row and tile a lane computes 64-bit addresses of its codes, its
// scale code and its nested scale, loads all three under predicates (row < N, k < K, tile in
// range), looks the code up in the dynamic map and multiplies and adds the scale. staged_kernel
// computes the same products with the same lanes, k permutation, operands and reduction, and
// takes that work out of the loop:
//   - a prologue decodes every block scale the CTA's rows use into shared memory (the rows are
//     contiguous in W, so their blocks are one range, ~16 RT K / blocksize scales); in the loop a
//     scale is one shift and one LDS;
//   - no predicate in the loop: a lane whose row is past N reads row N - 1, one whose row of x is
//     past M reads row M - 1. Their products land in rows / columns of D whose outputs are never
//     written (an mma output column depends on its own column of B only, a row on its row of A),
//     and all they read is finite. Only the last tile of K, when K % 128 != 0, runs a path that
//     zeroes the codes, scale and x of lanes past K;
//   - the loads of a batch of U tiles use immediate offsets from pointers advanced once a batch.
// The staged scales must fit in the 48 KiB of shared memory a CTA gets without opting in: 16 RT K /
// blocksize + 2 <= kStagedScales (RT row tiles a warp; K up to ~47000 at blocksize 64 and RT = 1);
// larger weights take mma_kernel. (stage_scales, in nf4_cuda_mma.h, is shared with kGemvMmaLut.)
constexpr int kStagedScales = 12 * 1024 - 512;  // floats: 48 KiB less the dynamic map, s_nf4 and some slack

// The lane's codes for U consecutive tiles: 16 bytes of each of its two rows in each of RT row tiles.
template <int U, int RT>
struct Codes {
  uint4 v[U][RT][2];
};

// RT: m16 row tiles a warp (16 RT rows of W a CTA; each x fragment feeds RT mma steps, so the CTAs
// read x 1 / RT as often); WARPS: warps a CTA, splitting K. See Note: staged scales.
template <typename T, int MT, int U, int RT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) staged_kernel(NF4View w, int64_t N, int64_t K, const T* __restrict__ x,
                                                            int M, const T* __restrict__ bias, T* __restrict__ y,
                                                            int shift) {
  static_assert(kNestedBlocksize == 256, "the prologue shifts by 8");
  static_assert(WARPS * 32 >= 256, "one thread copies one entry of the dynamic map");
  constexpr int kThreads = WARPS * 32, kRows = 16 * RT;
  LOWRANK_DYNAMIC_SHARED(float, staged);  // the CTA's block scales; after the loop, the warps' partial sums
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = N - row0 < kRows ? static_cast<int>(N - row0) : kRows;
  int r[RT][2];  // the lane's rows within the CTA's, clamped to its last (See Note: staged scales)
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 2; ++i) r[rt][i] = 16 * rt + 8 * i + g < rows ? 16 * rt + 8 * i + g : rows - 1;
  const int64_t tiles = (K + kTileK - 1) / kTileK, full = K / kTileK;  // full: tiles all 4 lanes' columns are in
  const int64_t per_warp = (tiles + WARPS - 1) / WARPS;
  const int64_t tile_begin = warp * per_warp < tiles ? warp * per_warp : tiles;
  const int64_t tile_end = tile_begin + per_warp < tiles ? tile_begin + per_warp : tiles;
  const int64_t lean_end = tile_end < full ? tile_end : full;

  // The lane's pointers at tile_begin: codes of its rows, x of its row in each n8 tile. The scale of
  // row (rt, i) in the tile starting at column k: staged[(rel[rt][i] + k) >> shift], rel counted
  // from the start of the CTA's first block.
  const int64_t first = row0 * K;
  const int64_t b0 = first >> shift;
  const uint4* codes[RT][2];
  int rel[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      codes[rt][i] = reinterpret_cast<const uint4*>(w.packed + (((row0 + r[rt][i]) * K + 32 * t) >> 1)) + 4 * tile_begin;
      rel[rt][i] = static_cast<int>(first - (b0 << shift)) + r[rt][i] * static_cast<int>(K) + 32 * t;
    }
  const T* xrow[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) xrow[j] = x + (8 * j + g < M ? 8 * j + g : M - 1) * K + 32 * t + tile_begin * kTileK;

  // Whole batches of whole tiles, no predicate. The loads of the next batch are issued before this
  // one is decoded; after the last batch they read this batch again (cached, never used), so the
  // loop has no branch but its own.
  const int batches = lean_end > tile_begin ? static_cast<int>((lean_end - tile_begin) / U) : 0;
  Codes<U, RT> cur, next;
  if (batches > 0) {  // the first batch, in flight during the prologue
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int i = 0; i < 2; ++i) cur.v[u][rt][i] = __ldg(codes[rt][i] + 4 * u);
  }
  // The prologue: the tables, then every scale of the CTA's blocks (See Note: staged scales).
  __shared__ float dynamic[256];
  if (threadIdx.x < 256) dynamic[threadIdx.x] = g_dynamic[threadIdx.x];
  if (threadIdx.x < 16) s_nf4[threadIdx.x] = g_nf4[threadIdx.x];
  stage_scales<kThreads>(staged, dynamic, w, static_cast<int>(((first + rows * K - 1) >> shift) - b0 + 1),
                         [b0](int i) { return b0 + i; });
  __syncthreads();
  const uint32_t base = after_barrier(static_cast<uint32_t>(__cvta_generic_to_shared(s_nf4)));  // a multiple of 64

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j) acc[rt][j][0] = acc[rt][j][1] = acc[rt][j][2] = acc[rt][j][3] = 0.0f;

  int k = static_cast<int>(tile_begin) * kTileK;  // the first column of the tile at hand
  for (int batch = 0; batch < batches; ++batch) {
    const int ahead = batch + 1 < batches ? 4 * U : 0;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int i = 0; i < 2; ++i) next.v[u][rt][i] = __ldg(codes[rt][i] + ahead + 4 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint2 xs[MT][8];
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int s = 0; s < 8; ++s) xs[j][s] = __ldg(reinterpret_cast<const uint2*>(xrow[j] + u * kTileK) + s);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const float scale[2] = {staged[(rel[rt][0] + k + u * kTileK) >> shift],
                                staged[(rel[rt][1] + k + u * kTileK) >> shift]};
        tile_mma<T, MT>(acc[rt], cur.v[u][rt], scale, xs, base);
      }
    }
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int i = 0; i < 2; ++i) codes[rt][i] += 4 * U;
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] += U * kTileK;
    k += U * kTileK;
    cur = next;
  }
  for (int64_t tt = tile_begin + static_cast<int64_t>(batches) * U; tt < tile_end; ++tt) {
    // the warp's last tiles one by one; past `full`, lanes past K add 0
    const bool in = tt < full || k + 32 * t < K;
    uint2 xs[MT][8];
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int s = 0; s < 8; ++s) xs[j][s] = in ? __ldg(reinterpret_cast<const uint2*>(xrow[j]) + s) : make_uint2(0, 0);
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const uint4 zero = make_uint4(0, 0, 0, 0);
      const uint4 c[2] = {in ? __ldg(codes[rt][0]) : zero, in ? __ldg(codes[rt][1]) : zero};
      const float scale[2] = {in ? staged[(rel[rt][0] + k) >> shift] : 0.0f, in ? staged[(rel[rt][1] + k) >> shift] : 0.0f};
      tile_mma<T, MT>(acc[rt], c, scale, xs, base);
#pragma unroll
      for (int i = 0; i < 2; ++i) codes[rt][i] += 4;
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] += kTileK;
    k += kTileK;
  }

  __syncthreads();  // every warp is done with the staged scales: their memory takes the partial sums
  reduce_store<T, MT, RT, WARPS>(staged, acc, row0, N, M, bias, y);
}

// Shared memory (floats) a staged_kernel CTA needs: its scales (16 RT K consecutive weights span at
// most 16 RT K / blocksize + 2 blocks), then the warps' partial sums in the same memory; 0 when either
// is over kStagedScales.
inline int staged_floats(int64_t K, int shift, int mt, int rt, int warps) {
  const int64_t scales = ((16 * rt * K) >> shift) + 2;
  const int64_t partial = static_cast<int64_t>(warps) * rt * mt * 4 * 32;
  if (scales > kStagedScales || partial > kStagedScales) return 0;
  return static_cast<int>(scales > partial ? scales : partial);
}

template <typename T, int MT, int U, int RT, int WARPS>
bool launch_staged_as(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                      cudaStream_t stream) {
  const int shift = log2_of(w.blocksize);
  const int floats = staged_floats(K, shift, MT, RT, WARPS);
  if (floats == 0) return false;
  const auto kernel = staged_kernel<T, MT, U, RT, WARPS>;
  LOWRANK_LAUNCH(kernel, static_cast<unsigned>((N + 16 * RT - 1) / (16 * RT)), WARPS * 32, floats * sizeof(float),
                 stream)(w, N, K, x, M, bias, y, shift);
  return true;
}

}  // namespace

// kGemvMmaStaged: staged_kernel with one row tile a warp and 8 warps; kGemvMmaStaged2: two row tiles
// a warp and 16 warps (M <= 16: 32 rows a CTA, x read half as often).
template <typename T>
bool launch_staged(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y, bool two_tiles,
                   cudaStream_t stream) {
  if (two_tiles) {
    if (M <= 8) return launch_staged_as<T, 1, 1, 2, 16>(w, N, K, x, M, bias, y, stream);
    return M <= 16 && launch_staged_as<T, 2, 1, 2, 16>(w, N, K, x, M, bias, y, stream);
  }
  if (M <= 8) return launch_staged_as<T, 1, 2, 1, kMmaWarps>(w, N, K, x, M, bias, y, stream);
  if (M <= 16) return launch_staged_as<T, 2, 2, 1, kMmaWarps>(w, N, K, x, M, bias, y, stream);
  if (M <= 32) return launch_staged_as<T, 4, 2, 1, kMmaWarps>(w, N, K, x, M, bias, y, stream);
  return launch_staged_as<T, 8, 2, 1, kMmaWarps>(w, N, K, x, M, bias, y, stream);
}

template bool launch_staged<__half>(const NF4View&, int64_t, int64_t, const __half*, int, const __half*, __half*, bool,
                                    cudaStream_t);
template bool launch_staged<__nv_bfloat16>(const NF4View&, int64_t, int64_t, const __nv_bfloat16*, int,
                                           const __nv_bfloat16*, __nv_bfloat16*, bool, cudaStream_t);

}  // namespace lowrank
