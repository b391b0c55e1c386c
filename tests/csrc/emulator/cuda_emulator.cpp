// The scheduler of cuda_emulator.h: CUDA threads as fibers, CTAs one after another, and the
// meetings (barriers, mma.sync, shuffles) performed once every participant has arrived.
#include "cuda_emulator.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

namespace emu {

alignas(4096) unsigned char g_anchor[4096];
Fiber* g_current = nullptr;
Index g_block_idx{0, 0, 0}, g_block_dim{1, 1, 1}, g_grid_dim{1, 1, 1};

enum class State { kReady, kWarp, kBlock, kDone };
enum class Op { kMma, kShfl };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Index tid;
  State state = State::kReady;
  Op op = Op::kMma;
  uint32_t a[4] = {}, b0 = 0, b1 = 0;  // mma operands, and where its accumulators live
  float* d = nullptr;
  bool bf16 = true;
  float value = 0.0f, result = 0.0f;  // shuffle
  int mask = 0;
};

namespace {

constexpr size_t kStack = 256 * 1024;
ucontext_t g_scheduler;
std::vector<Fiber> g_fibers;
std::vector<unsigned char> g_dynamic;
const std::function<void()>* g_body = nullptr;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "cuda emulator: %s (block %u)\n", what, g_block_idx.x);
  std::abort();
}

void entry() {
  (*g_body)();
  g_current->state = State::kDone;
  swapcontext(&g_current->context, &g_scheduler);
  fail("a finished thread was resumed");
}

void wait(State state) {
  g_current->state = state;
  swapcontext(&g_current->context, &g_scheduler);
}

// The two 16-bit elements of a packed pair as exact doubles (the lower column in the low half).
void unpack(uint32_t pair, bool bf16, double (&out)[2]) {
  for (int h = 0; h < 2; ++h) {
    const uint16_t bits = static_cast<uint16_t>(pair >> (16 * h));
    if (bf16) {
      const uint32_t wide = static_cast<uint32_t>(bits) << 16;
      float f;
      std::memcpy(&f, &wide, 4);
      out[h] = f;
    } else {
      __half_raw raw;
      raw.x = bits;
      out[h] = __half2float(__half(raw));
    }
  }
}

void run_mma(Fiber* lanes) {
  double A[16][16], B[16][8], pair[2];
  for (int lane = 0; lane < 32; ++lane) {
    const Fiber& f = lanes[lane];
    if (f.bf16 != lanes[0].bf16) fail("mma lanes disagree on the type");
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int r = 0; r < 4; ++r) {
      unpack(f.a[r], f.bf16, pair);
      A[rows[r]][cols[r]] = pair[0], A[rows[r]][cols[r] + 1] = pair[1];
    }
    unpack(f.b0, f.bf16, pair);
    B[2 * t][g] = pair[0], B[2 * t + 1][g] = pair[1];
    unpack(f.b1, f.bf16, pair);
    B[2 * t + 8][g] = pair[0], B[2 * t + 9][g] = pair[1];
  }
  float out[32][4];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      double sum = lanes[lane].d[i];
      for (int k = 0; k < 16; ++k) sum += A[rows[i]][k] * B[k][cols[i]];  // exact: 16 products of 8- or 11-bit values
      out[lane][i] = static_cast<float>(sum);
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) lanes[lane].d[i] = out[lane][i];
}

void run_warp(Fiber* lanes) {
  for (int lane = 0; lane < 32; ++lane)
    if (lanes[lane].op != lanes[0].op) fail("the lanes of a warp met at different warp-wide operations");
  if (lanes[0].op == Op::kMma) {
    run_mma(lanes);
  } else {
    for (int lane = 0; lane < 32; ++lane) lanes[lane].result = lanes[lane ^ lanes[lane].mask].value;
  }
  for (int lane = 0; lane < 32; ++lane) lanes[lane].state = State::kReady;
}

}  // namespace

void misaligned(const char* what, const void* p, size_t alignment) {
  std::fprintf(stderr, "cuda emulator: %s at %p, not %zu-byte aligned (block %u, thread %u)\n", what, p, alignment,
               g_block_idx.x, g_current ? g_current->tid.x : 0u);
  std::abort();
}

const Index& thread_idx() { return g_current->tid; }

void syncthreads() { wait(State::kBlock); }

void mma(const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (&d)[4], bool bf16) {
  Fiber* f = g_current;
  std::memcpy(f->a, a, sizeof(f->a));
  f->b0 = b0, f->b1 = b1, f->d = d, f->bf16 = bf16, f->op = Op::kMma;
  wait(State::kWarp);
}

float shfl_xor(float v, int mask) {
  Fiber* f = g_current;
  f->value = v, f->mask = mask, f->op = Op::kShfl;
  wait(State::kWarp);
  return f->result;
}

void* dynamic_shared() { return g_dynamic.data(); }

void run_grid(unsigned grid, unsigned block, size_t smem, const std::function<void()>& body) {
  if (block == 0 || block % 32 != 0 || block > 1024) fail("the block size must be a multiple of 32 up to 1024");
  g_grid_dim = {grid, 1, 1}, g_block_dim = {block, 1, 1};
  g_body = &body;
  if (g_fibers.size() < block) g_fibers.resize(block);
  for (unsigned b = 0; b < grid; ++b) {
    g_block_idx = {b, 0, 0};
    g_dynamic.assign(smem, 0xFF);  // float NaN: a read of dynamic shared memory nobody wrote shows up
    for (unsigned i = 0; i < block; ++i) {
      Fiber& f = g_fibers[i];
      if (!f.stack) f.stack.reset(new char[kStack]);
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, entry, 0);
      f.tid = {i, 0, 0}, f.state = State::kReady;
    }
    for (;;) {
      for (unsigned i = 0; i < block; ++i)
        if (g_fibers[i].state == State::kReady) {
          g_current = &g_fibers[i];
          swapcontext(&g_scheduler, &g_fibers[i].context);
        }
      bool released = false, done = true, all_at_barrier = true;
      for (unsigned w = 0; w < block / 32; ++w) {
        Fiber* lanes = &g_fibers[32 * w];
        int at_warp = 0;
        for (int lane = 0; lane < 32; ++lane) at_warp += lanes[lane].state == State::kWarp;
        if (at_warp == 32) {
          run_warp(lanes);
          released = true;
        } else if (at_warp > 0) {
          fail("part of a warp reached a warp-wide operation, the rest a barrier or the end");
        }
      }
      for (unsigned i = 0; i < block; ++i) {
        done = done && g_fibers[i].state == State::kDone;
        all_at_barrier = all_at_barrier && (g_fibers[i].state == State::kBlock || g_fibers[i].state == State::kDone);
      }
      if (done) break;
      if (!released && all_at_barrier) {
        for (unsigned i = 0; i < block; ++i)
          if (g_fibers[i].state == State::kBlock) g_fibers[i].state = State::kReady;
        released = true;
      }
      if (!released) fail("deadlock: threads wait for a meeting nobody else reaches");
    }
  }
  g_current = nullptr;
}

}  // namespace emu

// The launchers ask the CUDA runtime for the last launch's error: none here (a failure aborts).
extern "C" cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
