#pragma once

// The instruction sets the hand-written loops (column_axpy.cpp, silu.cpp) are compiled for, one copy per set,
// and the one they run, picked once from the features the CPU reports (never -march=native: the build runs
// everywhere; target_clones' "arch=" clones ran the plain loop on a Sapphire Rapids: their resolver matches CPU
// models, not features). NEURALINK_KERNELS=avx2 or generic picks a narrower set than the CPU has, so that the
// tests check every loop on an AVX-512 machine too.

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NL_X86_VERSIONS 1
#define NL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define NL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif
#define NL_INLINE inline __attribute__((always_inline))

namespace neuralink {

// Avx512: AVX-512 F, BW and VL with FMA; Avx2: AVX2 with FMA
enum class SimdLevel { Generic, Avx2, Avx512 };

SimdLevel simd_level();

} // namespace neuralink
