#include "neuralink/silu.h"

#include "simd.h"

#include <cmath>
#include <cstring>

namespace neuralink {

namespace {

// exp(y) = 2^n * e^r, n = round(y * log2 e), r = y - n ln 2 in two steps (Cody-Waite), e^r by a degree-7
// polynomial (Taylor coefficients; |r| <= ln 2 / 2), 2^n put in the exponent bits. y is clamped to
// [-87, 88] first so that 2^n stays a normal float: SiLU is then -0-like below -88 and x above 88, as with expf.
constexpr float kLo = -87.0f, kHi = 88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;        // ln 2 rounded to 16 bits: n * kLn2Hi is exact
constexpr float kLn2Lo = 1.42860682030941723212e-6f; // ln 2 - kLn2Hi
constexpr float kC[8] = { 1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040 };

inline float exp_scalar(float y) {
    y = std::fmin(std::fmax(y, kLo), kHi);
    const float n = std::nearbyint(y * kLog2e);
    float r = std::fma(n, -kLn2Hi, y);
    r = std::fma(n, -kLn2Lo, r);
    float p = kC[7];
    for (int k = 6; k >= 0; --k) p = std::fma(p, r, kC[k]);
    const uint32_t bits = (uint32_t) ((int32_t) n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline float silu_scalar(float x) { return x / (1.0f + exp_scalar(-x)); }

void silu_span_generic(const float * in, float * out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = silu_scalar(in[i]);
}

#ifdef NL_X86_VERSIONS
// the same operations as exp_scalar, lane by lane (fmin/fmax of non-NaN values, round half to even, fused
// multiply-adds, one rounding per operation), so each lane gives exp_scalar's float
NL_AVX512 void silu_span_avx512(const float * in, float * out, int64_t n) {
    const __m512 lo = _mm512_set1_ps(kLo), hi = _mm512_set1_ps(kHi), one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(in + i);
        const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), lo), hi);
        const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(kLog2e)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-kLn2Hi), y);
        r = _mm512_fmadd_ps(k, _mm512_set1_ps(-kLn2Lo), r);
        __m512 p = _mm512_set1_ps(kC[7]);
        for (int c = 6; c >= 0; --c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[c]));
        const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
        const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
        _mm512_storeu_ps(out + i, _mm512_div_ps(x, _mm512_add_ps(one, e)));
    }
    for (; i < n; ++i) out[i] = silu_scalar(in[i]);
}

NL_AVX2 void silu_span_avx2(const float * in, float * out, int64_t n) {
    const __m256 lo = _mm256_set1_ps(kLo), hi = _mm256_set1_ps(kHi), one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(in + i);
        const __m256 y = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), lo), hi);
        const __m256 k = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-kLn2Hi), y);
        r = _mm256_fmadd_ps(k, _mm256_set1_ps(-kLn2Lo), r);
        __m256 p = _mm256_set1_ps(kC[7]);
        for (int c = 6; c >= 0; --c) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC[c]));
        const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        _mm256_storeu_ps(out + i, _mm256_div_ps(x, _mm256_add_ps(one, e)));
    }
    for (; i < n; ++i) out[i] = silu_scalar(in[i]);
}
#endif

using SpanFn = void (*)(const float *, float *, int64_t);

SpanFn span_kernel() {
    static const SpanFn chosen = [] {
        switch (simd_level()) {
#ifdef NL_X86_VERSIONS
            case SimdLevel::Avx512: return (SpanFn) silu_span_avx512;
            case SimdLevel::Avx2: return (SpanFn) silu_span_avx2;
#endif
            default: return (SpanFn) silu_span_generic;
        }
    }();
    return chosen;
}

} // namespace

float silu(float x) { return silu_scalar(x); }

void silu_span(const float * in, float * out, int64_t n) { span_kernel()(in, out, n); }

} // namespace neuralink
