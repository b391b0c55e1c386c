// Compiling a region of a file for a vector ISA whatever the compiler flags, with GCC or Clang.
//
// GCC: `#pragma GCC target("...")` (nf4_cpu_avx2.cpp, nf4_cpu_avx512.cpp write it out, as GCC
// needs it before <immintrin.h>). Clang ignores that pragma, and its intrinsics then refuse to
// inline into functions without the feature, so for Clang (Apple's included) the region is
// opened and closed with the macros below: every function declared inside, lambdas included,
// gets __attribute__((target(...))). Clang's regions do not nest usefully (the outer features
// win), so a file pops its region before opening another.
#pragma once

#if defined(__clang__)
#define LOWRANK_PRAGMA(x) _Pragma(#x)
#define LOWRANK_TARGET_PUSH(features) \
  LOWRANK_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define LOWRANK_TARGET_POP() LOWRANK_PRAGMA(clang attribute pop)
#else
#define LOWRANK_TARGET_PUSH(features)
#define LOWRANK_TARGET_POP()
#endif
