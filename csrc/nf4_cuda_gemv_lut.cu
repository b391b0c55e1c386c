// y[M, N] = x[M, K] @ W[N, K]^T + bias[N] on tensor cores, kGemvMmaLut (M <= 64): the GEMV that
// decodes two weights with one table lookup and scales each block's sum once, instead of each
// weight. See nf4_cuda_gemv.cu for what the GEMVs compute, nf4_cuda_mma.h for the pieces shared
// with the others, and Note: pairs and block sums, below. Written without a GPU at hand and checked
// on the CPU emulator (tests/csrc/test_cuda_emulated.py); its first GPU run (H200, 2026-11-30,
// docs/benchmarks.md) found it right and the fastest GEMV at most shapes, so it is the default
// (nf4_cuda_gemv.cu, Note: LOWRANK_CUDA_GEMV).
#include "nf4_cuda_mma.h"

namespace lowrank {
namespace {

// Note: pairs and block sums. In the staged kernels (nf4_cuda_gemv_staged.cu) ~90% of the K loop
// is the decode of each weight: SHF + LOP3 + LDS for NF4[code], FMUL by the block's scale, half an
// F2FP to round the pair to T; 4.5 instructions a weight, and the H200 kernel was bound by
// instruction issue. This kernel computes
//     y[m, n] = sum over the blocks b of row n of  scale[b] * (sum over k in b of T(NF4[c_nk]) x[m, k])
// i.e. the 16 NF4 values are rounded to T once, the tensor cores take the codes' values unscaled,
// and the block's float32 sum is multiplied by its scale (one FMA into the row's total). So:
//   - a byte of codes (two weights of a row, the high nibble the smaller column) is one lookup in a
//     table of 256 packed pairs (T(NF4[hi]), T(NF4[lo])): exactly the 32-bit A-operand register of
//     the mma. The table has one copy a lane (entry e of lane l at word 32 e + l), so the 32 lanes
//     of a lookup always hit 32 different banks; 32 KiB of shared memory. A pair is PRMT + IMAD +
//     LDS: 1.5 instructions a weight, no FMUL, no F2FP.
//   - every mma step's 16 columns must lie in one block of each of its rows, so that the step's sum
//     can take one scale. A tile is 64 columns (4 lanes x 16, one 8-byte load of codes a row), and
//     the kernel runs when K % 64 == 0 and blocksize >= 64 (then the 64 columns of a tile of any row
//     start at a multiple of 64 in W's flat order, inside one block); otherwise nf4_gemv_cuda runs
//     kGemvMmaStaged.
//   - the k permutation of Note: the k permutation (nf4_cuda_mma.h), on 16 columns a lane: step s
//     (0..3) feeds physical columns 16t + 4s + {0, 1} as logical 2t + {0, 1} (byte 2s of the lane's
//     8 bytes) and 16t + 4s + {2, 3} as logical 2t + 8 + {0, 1} (byte 2s + 1); x: words 2s, 2s + 1
//     of the lane's 16 columns.
// The operand is not the reference's: the reference multiplies W by T(NF4[c] * scale) (one rounding
// of the product), this kernel by T(NF4[c]) * scale (the value rounded, the product exact). Both
// are within 2^-8 (bfloat16) or 2^-11 (float16) of NF4[c] * scale relative to it, so the results
// differ by about the reference's own rounding of W; tests/csrc/test_cuda_kernels.py (GPU) and
// test_cuda_emulated.py (CPU emulator) check this kernel against the float64 product of its own operand with the a-priori bound of
// tests/ops/bounds.py. (bitsandbytes' gemv_4bit also multiplies NF4 values held in T,
// `__shared__ T quant_map[16]` in its kgemm_4bit_inference_naive.)
// Everything else is the staged kernels': scales staged in shared memory by a prologue, no predicate
// in the loop (rows past N / M read the last valid row), batches of U tiles with the next batch's
// codes in flight, the warps' sums added in warp order.
//
// Note: scales a tile. The prologue stages one scale for each row and tile of the CTA (16 RTW K / 64
// floats, the number of blocks at blocksize 64, more at larger blocksizes), so that in the loop the
// scale of a row's next tile is the next float: one LDS with an immediate offset, no index math.
//
// Note: row tiles across warps. Every CTA reads all of x (M K values) once for its rows of W, so with
// 16 rows a CTA the CTAs together read x from L2 N / 16 times: 2M / 8.3 times the bytes of W (0.24 M:
// 4x W at M = 16; the H200 times of the mma kernel rose ~25 us per 8 rows of x at 4096 x 14336,
// docs/csrc.md). With RTW row tiles a CTA (one a warp, 8 / RTW warps splitting K), the warps of a K
// group read the same x (from L1 after the first) and the CTAs read it N / (16 RTW) times. The
// launcher groups 4 (N >= 8192) or 2 (N >= 4096) row tiles above 4 rows of x, keeping the grid at
// >= kLutMinCtas CTAs; 1 at up to 4 rows (x is then at most W's bytes) and for small N. The thresholds
// are a guess, not a measurement (the H200 run timed the kernel as a whole, not each choice).
constexpr int kLutTileK = 64;  // columns of W a warp covers a tile: 4 lanes x 16
constexpr int kLutWarps = 8;
constexpr int kLutScales = 16 * 1024;  // floats of dynamic shared memory at most: K up to 65536
constexpr int kLutMinCtas = 128;  // CTAs a grid keeps at least when row tiles are grouped (~1 an SM of an H100 / H200)

__shared__ __align__(128) uint32_t s_pairs[256 * 32];  // entry e, lane l: word 32 e + l
constexpr size_t kLutStaticBytes = sizeof(s_pairs) + 256 * sizeof(float);  // the pair table and lut_kernel's dynamic map

// The pair of byte j (0..3) of word, from the lane's copy of the table: `column` is the shared-memory
// address of the lane's entry 0 (the table's address + 4 x lane; from after_barrier). PRMT takes
// the byte out, one IMAD adds 128 x byte: 2 integer instructions and an LDS a pair.
__device__ __forceinline__ uint32_t pair_at(uint32_t word, int j, uint32_t column) {
  return lds32(column + (__byte_perm(word, 0, 0x4440 + j) << 7));
}

// One tile: the lane's 8 bytes of its two rows, its 16 columns of x for each n8 tile (xs[j]: words
// 0..7 in two uint4), the two rows' scales, the lane's column of the table (pair_at). The four mma steps sum into zeroed accumulators; the
// block sum then goes into acc with one FMA (c0, c1: row g; c2, c3: row g + 8).
template <typename T, int MT>
__device__ __forceinline__ void tile_lut(float (&acc)[MT][4], const uint2 (&codes)[2], const float (&scale)[2],
                                         const uint4 (&xs)[MT][2], uint32_t column) {
  float part[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.0f;
#pragma unroll
  for (int s = 0; s < 4; ++s) {  // See Note: pairs and block sums.
    const int b = 2 * (s % 2);  // bytes 2s and 2s + 1 are bytes b and b + 1 of word s / 2
    const uint32_t w0 = s < 2 ? codes[0].x : codes[0].y, w1 = s < 2 ? codes[1].x : codes[1].y;
    const uint32_t a[4] = {pair_at(w0, b, column), pair_at(w1, b, column), pair_at(w0, b + 1, column),
                           pair_at(w1, b + 1, column)};
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const uint4& v = xs[j][s / 2];
      Mma<T>::step(part[j], a, s % 2 == 0 ? v.x : v.z, s % 2 == 0 ? v.y : v.w);
    }
  }
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = __fmaf_rn(scale[i / 2], part[j][i], acc[j][i]);
}

// The lane's 16 columns of x of each n8 tile (two 16-byte loads), `offset` elements past xrow[j].
template <typename T, int MT>
__device__ __forceinline__ void load_x16(uint4 (&xs)[MT][2], const T* const (&xrow)[MT], int offset) {
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const uint4* src = reinterpret_cast<const uint4*>(xrow[j] + offset);
    xs[j][0] = __ldg(src);
    xs[j][1] = __ldg(src + 1);
  }
}

// The lane's codes for U consecutive tiles: 8 bytes of each of its two rows.
template <int U>
struct PairCodes {
  uint2 v[U][2];
};

// RTW: row tiles a CTA (16 RTW rows of W), one a warp; its 8 warps are RTW row tiles x 8 / RTW groups
// splitting K. See Note: row tiles across warps.
template <typename T, int MT, int U, int RTW>
__global__ void __launch_bounds__(kLutWarps * 32) lut_kernel(NF4View w, int64_t N, int64_t K, const T* __restrict__ x,
                                                             int M, const T* __restrict__ bias, T* __restrict__ y,
                                                             int shift) {
  constexpr int kThreads = kLutWarps * 32, kGroups = kLutWarps / RTW, kRows = 16 * RTW;
  static_assert(kThreads >= 256, "one thread copies one entry of the dynamic map");
  static_assert(kLutWarps % RTW == 0, "the row tiles split the warps evenly");
  LOWRANK_DYNAMIC_SHARED(float, staged);  // the CTA's scales; after the loop, the warps' partial sums
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int tile_row = 16 * (warp % RTW), group = warp / RTW;  // the warp's first row in the CTA, its K group
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = N - row0 < kRows ? static_cast<int>(N - row0) : kRows;
  const int r[2] = {tile_row + g < rows ? tile_row + g : rows - 1,  // clamped: Note: staged scales
                    tile_row + g + 8 < rows ? tile_row + g + 8 : rows - 1};
  const int64_t tiles = K / kLutTileK;  // K % 64 == 0
  const int64_t per_warp = (tiles + kGroups - 1) / kGroups;
  const int64_t tile_begin = group * per_warp < tiles ? group * per_warp : tiles;
  const int64_t tile_end = tile_begin + per_warp < tiles ? tile_begin + per_warp : tiles;

  // The lane's pointers at tile_begin (a tile is 32 bytes of a row: 4 uint2), and the index of the
  // scale of its row i at tile_begin: staged holds a scale a row and tile (See Note: scales a tile).
  const uint2* codes[2];
  int scale_at[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    codes[i] = reinterpret_cast<const uint2*>(w.packed + (((row0 + r[i]) * K + 16 * t) >> 1)) + 4 * tile_begin;
    scale_at[i] = r[i] * static_cast<int>(tiles) + static_cast<int>(tile_begin);
  }
  const T* xrow[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) xrow[j] = x + (8 * j + g < M ? 8 * j + g : M - 1) * K + 16 * t + tile_begin * kLutTileK;

  const int batches = static_cast<int>((tile_end - tile_begin) / U);
  PairCodes<U> cur, next;
  if (batches > 0) {  // the first batch, in flight during the prologue
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < 2; ++i) cur.v[u][i] = __ldg(codes[i] + 4 * u);
  }
  // The prologue: the dynamic map, the pair table (a thread stores four lanes' copies of an entry
  // at once), then the scales.
  __shared__ float dynamic[256];
  if (threadIdx.x < 256) dynamic[threadIdx.x] = g_dynamic[threadIdx.x];
  for (int q = threadIdx.x; q < 256 * 8; q += kThreads) {
    const int e = q / 8;
    const uint32_t v = Mma<T>::pack(g_nf4[e >> 4], g_nf4[e & 15]);  // the high nibble is the smaller column
    reinterpret_cast<uint4*>(s_pairs)[q] = make_uint4(v, v, v, v);
  }
  const int per_row = static_cast<int>(tiles);
  stage_scales<kThreads>(staged, dynamic, w, rows * per_row, [=](int i) {
    return ((row0 + i / per_row) * K + static_cast<int64_t>(kLutTileK) * (i % per_row)) >> shift;
  });
  __syncthreads();
  const uint32_t column = after_barrier(static_cast<uint32_t>(__cvta_generic_to_shared(s_pairs)) + 4 * lane);

  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

#pragma unroll 2  // two batches a trip: cur and next swap names instead of registers
  for (int batch = 0; batch < batches; ++batch) {
    const int ahead = batch + 1 < batches ? 4 * U : 0;  // after the last batch, this one again (cached)
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < 2; ++i) next.v[u][i] = __ldg(codes[i] + ahead + 4 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint4 xs[MT][2];
      load_x16<T, MT>(xs, xrow, u * kLutTileK);
      const float scale[2] = {staged[scale_at[0] + u], staged[scale_at[1] + u]};
      tile_lut<T, MT>(acc, cur.v[u], scale, xs, column);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) codes[i] += 4 * U, scale_at[i] += U;
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] += U * kLutTileK;
    cur = next;
  }
  for (int64_t tt = tile_begin + static_cast<int64_t>(batches) * U; tt < tile_end; ++tt) {  // the last tiles, one by one
    uint4 xs[MT][2];
    load_x16<T, MT>(xs, xrow, 0);
    const uint2 c[2] = {__ldg(codes[0]), __ldg(codes[1])};
    const float scale[2] = {staged[scale_at[0]], staged[scale_at[1]]};
    tile_lut<T, MT>(acc, c, scale, xs, column);
#pragma unroll
    for (int i = 0; i < 2; ++i) codes[i] += 4, scale_at[i] += 1;
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] += kLutTileK;
  }

  __syncthreads();  // every warp is done with the staged scales: their memory takes the partial sums
  reduce_store<T, MT, 1, kLutWarps, RTW>(staged, reinterpret_cast<const float(&)[1][MT][4]>(acc), row0, N, M, bias, y);
}

template <typename T, int MT, int U, int RTW>
bool launch_lut_as(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                   cudaStream_t stream) {
  const int64_t scales = 16 * RTW * (K / kLutTileK), partial = kLutWarps * MT * 4 * 32;  // See Note: scales a tile.
  const int64_t floats = scales > partial ? scales : partial;
  if (floats > kLutScales) return false;
  const size_t bytes = floats * sizeof(float);
  const auto kernel = lut_kernel<T, MT, U, RTW>;
  if (kLutStaticBytes + bytes > 48 * 1024 &&  // more than a CTA gets without opting in
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) != cudaSuccess)
    return false;
  LOWRANK_LAUNCH(kernel, static_cast<unsigned>((N + 16 * RTW - 1) / (16 * RTW)), kLutWarps * 32, bytes, stream)(
      w, N, K, x, M, bias, y, log2_of(w.blocksize));
  return true;
}

// Up to 4 rows of x one row tile a CTA; above, as many (2 or 4) as leave at least kLutMinCtas CTAs,
// falling back to fewer when the scales do not fit. See Note: row tiles across warps.
template <typename T, int MT, int U>
bool launch_lut_rows(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                     cudaStream_t stream) {
  if (M > 4 && N >= 64 * kLutMinCtas && launch_lut_as<T, MT, U, 4>(w, N, K, x, M, bias, y, stream)) return true;
  if (M > 4 && N >= 32 * kLutMinCtas && launch_lut_as<T, MT, U, 2>(w, N, K, x, M, bias, y, stream)) return true;
  return launch_lut_as<T, MT, U, 1>(w, N, K, x, M, bias, y, stream);
}

}  // namespace

// Note: deep batches. On the H200 (2026-11-30, docs/csrc.md) mma-lut moved W at 1.45 TB/s at M = 1, cuBLAS
// bf16 at 3.5: a warp keeps one batch of U tiles of codes in flight while it works on the last (2 rows x
// U x 8 bytes a lane), about 32 KiB an SM at N = 4096. kGemvMmaLutDeep doubles U up to 8 rows of x (the
// codes of a batch: 32 registers a lane more). The tiles of a warp are summed in the same order whatever
// U is, so the two give the same bits; only a GPU can say which is faster (bench_nf4_cuda.py).
template <typename T>
bool launch_lut(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y, bool deep,
                cudaStream_t stream) {
  if (K % kLutTileK != 0 || w.blocksize < kLutTileK) return false;  // See Note: pairs and block sums.
  if (M <= 8 && deep) return launch_lut_rows<T, 1, 8>(w, N, K, x, M, bias, y, stream);  // See Note: deep batches.
  if (M <= 8) return launch_lut_rows<T, 1, 4>(w, N, K, x, M, bias, y, stream);
  if (M <= 16) return launch_lut_rows<T, 2, 4>(w, N, K, x, M, bias, y, stream);
  if (M <= 32) return launch_lut_rows<T, 4, 2>(w, N, K, x, M, bias, y, stream);
  return launch_lut_rows<T, 8, 2>(w, N, K, x, M, bias, y, stream);
}

template bool launch_lut<__half>(const NF4View&, int64_t, int64_t, const __half*, int, const __half*, __half*, bool,
                                 cudaStream_t);
template bool launch_lut<__nv_bfloat16>(const NF4View&, int64_t, int64_t, const __nv_bfloat16*, int,
                                        const __nv_bfloat16*, __nv_bfloat16*, bool, cudaStream_t);

}  // namespace lowrank
