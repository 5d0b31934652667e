#include "neuralink/column_axpy.h"

#include "column_loops.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags the _mm512_undefined_* placeholders inside its own AVX-512 headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace neuralink {

namespace {

// IEEE half to float, exactly (ggml_fp16_to_fp32 is a call per block; this inlines into the clones)
inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);           // infinity, NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
    } else if (man != 0) {
        float f = (float) man * 0x1p-24f;                   // subnormal: man * 2^-24
        std::memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    } else {
        bits = sign;
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

constexpr int64_t kQ8Block = 32;
constexpr size_t kQ8BlockBytes = 2 + kQ8Block; // fp16 scale, 32 int8 values (ggml's block_q8_0)

// Every loop below adds a column as fma(h, value, y) (or h * value + y where the ISA has no fused multiply-add),
// value being what ggml's to_float decodes (q8_0: d * q): one column at a time, several in order, or decoded
// once for a batch of tokens, y gets the same sums.

NL_INLINE void q8_0_axpy_body(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n) {
    for (int k = 0; k < count; ++k) {
        for (int64_t b = 0; b < n / kQ8Block; ++b) {
            const uint8_t * block = columns[k] + (size_t) b * kQ8BlockBytes;
            uint16_t dh;
            std::memcpy(&dh, block, sizeof dh);
            const float d = half_to_float(dh);
            const int8_t * q = (const int8_t *) (block + 2);
            float * yb = y + b * kQ8Block;
            for (int64_t i = 0; i < kQ8Block; ++i) yb[i] += h[k] * (d * (float) q[i]);
        }
    }
}

NL_INLINE void q8_0_decode_body(const uint8_t * column, float * out, int64_t n) {
    for (int64_t b = 0; b < n / kQ8Block; ++b) {
        const uint8_t * block = column + (size_t) b * kQ8BlockBytes;
        uint16_t dh;
        std::memcpy(&dh, block, sizeof dh);
        const float d = half_to_float(dh);
        const int8_t * q = (const int8_t *) (block + 2);
        for (int64_t i = 0; i < kQ8Block; ++i) out[b * kQ8Block + i] = d * (float) q[i];
    }
}

NL_INLINE void axpy_body(const float * x, float h, float * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += h * x[i];
}

using FloatAxpy = void (*)(const float *, float, float *, int64_t);
// y + t * y_stride += sum over k < kc of h[t * h_stride + h_index[k]] * c[k * n, (k + 1) * n), t < n_tok
using TokensGemm = void (*)(const float *, int, int64_t, const float *, int64_t, const uint32_t *, int, float *,
                            int64_t);

void q8_0_axpy_generic(const uint8_t * const * c, const float * h, int count, float * y, int64_t n) {
    q8_0_axpy_body(c, h, count, y, n);
}
void q8_0_decode_generic(const uint8_t * column, float * out, int64_t n) { q8_0_decode_body(column, out, n); }
void axpy_generic(const float * x, float h, float * y, int64_t n) { axpy_body(x, h, y, n); }
#ifdef NL_X86_VERSIONS
NL_AVX512 void q8_0_axpy_avx512(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n) {
    for (int k0 = 0; k0 < count; k0 += kGroup) {
        const int m = count - k0 < kGroup ? count - k0 : kGroup;
        prefetch_group(columns, k0, count, (size_t) (n / kQ8Block) * kQ8BlockBytes);
        for (int64_t b = 0; b < n / kQ8Block; ++b) {
            float * yb = y + b * kQ8Block;
            __m512 lo = _mm512_loadu_ps(yb), hi = _mm512_loadu_ps(yb + 16);
            for (int k = k0; k < k0 + m; ++k) {
                const uint8_t * block = columns[k] + (size_t) b * kQ8BlockBytes;
                uint16_t dh;
                std::memcpy(&dh, block, sizeof dh);
                const __m512 d = _mm512_set1_ps(_cvtsh_ss(dh)), hv = _mm512_set1_ps(h[k]);
                const __m128i q0 = _mm_loadu_si128((const __m128i *) (block + 2));
                const __m128i q1 = _mm_loadu_si128((const __m128i *) (block + 18));
                lo = _mm512_fmadd_ps(hv, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))), lo);
                hi = _mm512_fmadd_ps(hv, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))), hi);
            }
            _mm512_storeu_ps(yb, lo);
            _mm512_storeu_ps(yb + 16, hi);
        }
    }
}

NL_AVX512 void q8_0_decode_avx512(const uint8_t * column, float * out, int64_t n) {
    for (int64_t b = 0; b < n / kQ8Block; ++b) {
        const uint8_t * block = column + (size_t) b * kQ8BlockBytes;
        uint16_t dh;
        std::memcpy(&dh, block, sizeof dh);
        const __m512 d = _mm512_set1_ps(_cvtsh_ss(dh));
        const __m128i q0 = _mm_loadu_si128((const __m128i *) (block + 2));
        const __m128i q1 = _mm_loadu_si128((const __m128i *) (block + 18));
        _mm512_storeu_ps(out + b * kQ8Block, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))));
        _mm512_storeu_ps(out + b * kQ8Block + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))));
    }
}

NL_AVX2 void q8_0_axpy_avx2(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n) {
    for (int k0 = 0; k0 < count; k0 += kGroup) {
        const int m = count - k0 < kGroup ? count - k0 : kGroup;
        prefetch_group(columns, k0, count, (size_t) (n / kQ8Block) * kQ8BlockBytes);
        for (int64_t b = 0; b < n / kQ8Block; ++b) {
            float * yb = y + b * kQ8Block;
            __m256 acc[4] = { _mm256_loadu_ps(yb), _mm256_loadu_ps(yb + 8), _mm256_loadu_ps(yb + 16),
                              _mm256_loadu_ps(yb + 24) };
            for (int k = k0; k < k0 + m; ++k) {
                const uint8_t * block = columns[k] + (size_t) b * kQ8BlockBytes;
                uint16_t dh;
                std::memcpy(&dh, block, sizeof dh);
                const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh)), hv = _mm256_set1_ps(h[k]);
                for (int j = 0; j < 4; ++j) {
                    const __m128i q = _mm_loadl_epi64((const __m128i *) (block + 2 + 8 * j));
                    acc[j] = _mm256_fmadd_ps(hv, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))), acc[j]);
                }
            }
            for (int j = 0; j < 4; ++j) _mm256_storeu_ps(yb + 8 * j, acc[j]);
        }
    }
}

NL_AVX2 void q8_0_decode_avx2(const uint8_t * column, float * out, int64_t n) {
    for (int64_t b = 0; b < n / kQ8Block; ++b) {
        const uint8_t * block = column + (size_t) b * kQ8BlockBytes;
        uint16_t dh;
        std::memcpy(&dh, block, sizeof dh);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
        for (int j = 0; j < 4; ++j) {
            const __m128i q = _mm_loadl_epi64((const __m128i *) (block + 2 + 8 * j));
            _mm256_storeu_ps(out + b * kQ8Block + 8 * j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
        }
    }
}

NL_AVX512 void axpy_avx512(const float * x, float h, float * y, int64_t n) {
    const __m512 hv = _mm512_set1_ps(h);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(hv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    }
    if (i < n) {
        const __mmask16 m = (__mmask16) ((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(hv, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

NL_AVX2 void axpy_avx2(const float * x, float h, float * y, int64_t n) {
    const __m256 hv = _mm256_set1_ps(h);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(hv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; ++i) y[i] = std::fma(h, x[i], y[i]);
}

// A prompt batch's down projection on decoded columns: T tokens' W registers of y (16 W floats from e, masked to
// the first `tail` of the last register when tail > 0) held while the decoded columns ks[0 .. nk) are added in
// order, each as fma(h, value, y) like the single-token loops.
template <int T, int W>
NL_AVX512 NL_INLINE void tokens_tile_avx512(const float * c, const int * ks, int nk, int64_t n, int64_t e,
                                           const float * const * hrow, const uint32_t * h_index, float * const * yrow,
                                           int tail) {
    const __mmask16 last = tail > 0 ? (__mmask16) ((1u << tail) - 1) : (__mmask16) 0xFFFF;
    __m512 acc[T][W];
    for (int t = 0; t < T; ++t) {
        for (int j = 0; j < W; ++j) {
            acc[t][j] = j == W - 1 ? _mm512_maskz_loadu_ps(last, yrow[t] + e + 16 * j) : _mm512_loadu_ps(yrow[t] + e + 16 * j);
        }
    }
    for (int i = 0; i < nk; ++i) {
        const int k = ks[i];
        const float * ck = c + (size_t) k * n + e;
        __m512 v[W];
        for (int j = 0; j < W; ++j) v[j] = j == W - 1 ? _mm512_maskz_loadu_ps(last, ck + 16 * j) : _mm512_loadu_ps(ck + 16 * j);
        const uint32_t p = h_index[k];
        for (int t = 0; t < T; ++t) {
            const __m512 hv = _mm512_set1_ps(hrow[t][p]);
            for (int j = 0; j < W; ++j) acc[t][j] = _mm512_fmadd_ps(hv, v[j], acc[t][j]);
        }
    }
    for (int t = 0; t < T; ++t) {
        for (int j = 0; j < W; ++j) {
            if (j == W - 1) {
                _mm512_mask_storeu_ps(yrow[t] + e + 16 * j, last, acc[t][j]);
            } else {
                _mm512_storeu_ps(yrow[t] + e + 16 * j, acc[t][j]);
            }
        }
    }
}

// six tokens' four registers of y (24) and one column's four (the 32 AVX-512 registers hold them and the h)
constexpr int kTileTokens = 6;

template <int T>
NL_AVX512 void tokens_span_avx512(const float * c, const int * ks, int nk, int64_t n, const float * const * hrow,
                                  const uint32_t * h_index, float * const * yrow) {
    int64_t e = 0;
    for (; e + 64 <= n; e += 64) tokens_tile_avx512<T, 4>(c, ks, nk, n, e, hrow, h_index, yrow, 0);
    for (; e + 16 <= n; e += 16) tokens_tile_avx512<T, 1>(c, ks, nk, n, e, hrow, h_index, yrow, 0);
    if (e < n) tokens_tile_avx512<T, 1>(c, ks, nk, n, e, hrow, h_index, yrow, (int) (n - e));
}

// kc <= kBatchColumns: the decoded chunk columns_axpy_batch hands over
NL_AVX512 void tokens_gemm_avx512(const float * c, int kc, int64_t n, const float * h, int64_t h_stride,
                                  const uint32_t * h_index, int n_tok, float * y, int64_t y_stride) {
    for (int t0 = 0; t0 < n_tok; t0 += kTileTokens) {
        const int m = n_tok - t0 < kTileTokens ? n_tok - t0 : kTileTokens;
        const float * hrow[kTileTokens];
        float * yrow[kTileTokens];
        for (int t = 0; t < m; ++t) {
            hrow[t] = h + (size_t) (t0 + t) * h_stride;
            yrow[t] = y + (size_t) (t0 + t) * y_stride;
        }
        // the columns some token of the tile needs: fma(0, w, y) is y, so a column whose h is zero for every
        // token of the tile is left out (a prompt's cold neurons are final for few of its tokens)
        int ks[kBatchColumns];
        int nk = 0;
        for (int k = 0; k < kc; ++k) {
            bool needed = false;
            for (int t = 0; t < m; ++t) needed |= hrow[t][h_index[k]] != 0.0f;
            ks[nk] = k;
            nk += needed;
        }
        if (nk == 0) continue;
        switch (m) {
            case 1: tokens_span_avx512<1>(c, ks, nk, n, hrow, h_index, yrow); break;
            case 2: tokens_span_avx512<2>(c, ks, nk, n, hrow, h_index, yrow); break;
            case 3: tokens_span_avx512<3>(c, ks, nk, n, hrow, h_index, yrow); break;
            case 4: tokens_span_avx512<4>(c, ks, nk, n, hrow, h_index, yrow); break;
            case 5: tokens_span_avx512<5>(c, ks, nk, n, hrow, h_index, yrow); break;
            default: tokens_span_avx512<6>(c, ks, nk, n, hrow, h_index, yrow); break;
        }
    }
}
#endif

// a column type's loops; null: its columns are decoded into scratch by ggml's to_float, then added
struct TypeLoops {
    ColumnsAxpy axpy = nullptr;
    Decode decode = nullptr;
};

struct Kernels {
    const char * isa;
    FloatAxpy f32;
    TypeLoops q8_0, q6_k, q5_k, q4_k;
    TokensGemm tokens = nullptr; // null: each token's columns added one at a time with f32
};

const Kernels & kernels() {
    static const Kernels chosen = [] {
        switch (simd_level()) {
#ifdef NL_X86_VERSIONS
            case SimdLevel::Avx512:
                return Kernels { "avx512", axpy_avx512,
                                 { q8_0_axpy_avx512, q8_0_decode_avx512 }, { q6_k_axpy_avx512, q6_k_decode_avx512 },
                                 { q5_k_axpy_avx512, q5_k_decode_avx512 }, { q4_k_axpy_avx512, q4_k_decode_avx512 },
                                 tokens_gemm_avx512 };
            case SimdLevel::Avx2:
                return Kernels { "avx2", axpy_avx2,
                                 { q8_0_axpy_avx2, q8_0_decode_avx2 }, { q6_k_axpy_avx2, q6_k_decode_avx2 },
                                 { q5_k_axpy_avx2, q5_k_decode_avx2 }, { q4_k_axpy_avx2, q4_k_decode_avx2 } };
#endif
            default:
                return Kernels { "generic", axpy_generic, { q8_0_axpy_generic, q8_0_decode_generic }, {}, {}, {} };
        }
    }();
    return chosen;
}

const TypeLoops & loops_of(ggml_type type) {
    static const TypeLoops none;
    const Kernels & K = kernels();
    switch (type) {
        case GGML_TYPE_Q8_0: return K.q8_0;
        case GGML_TYPE_Q6_K: return K.q6_k;
        case GGML_TYPE_Q5_K: return K.q5_k;
        case GGML_TYPE_Q4_K: return K.q4_k;
        default: return none;
    }
}

} // namespace

const char * column_axpy_isa() { return kernels().isa; }

void float_axpy(const float * x, float h, float * y, int64_t n) { kernels().f32(x, h, y, n); }

void column_axpy(const WeightType & wt, const uint8_t * column, float h, float * y, int64_t n, float * tmp) {
    columns_axpy(wt, &column, &h, 1, y, n, tmp);
}

void columns_axpy(const WeightType & wt, const uint8_t * const * columns, const float * h, int count, float * y,
                  int64_t n, float * tmp) {
    if (const ColumnsAxpy loop = loops_of(wt.type).axpy) {
        loop(columns, h, count, y, n);
        return;
    }
    for (int k = 0; k < count; ++k) {
        wt.to_float(columns[k], tmp, n);
        kernels().f32(tmp, h[k], y, n);
    }
}

void decode_column(const WeightType & wt, const uint8_t * column, float * out, int64_t n) {
    if (const Decode loop = loops_of(wt.type).decode) {
        loop(column, out, n);
    } else {
        wt.to_float(column, out, n);
    }
}

void columns_axpy_batch(const WeightType & wt, const uint8_t * const * columns, const uint32_t * h_index, int count,
                        const float * h, int64_t h_stride, int n_tok, float * y, int64_t y_stride, int64_t n,
                        float * tmp) {
    const Kernels & K = kernels();
    for (int k0 = 0; k0 < count; k0 += kBatchColumns) {
        const int kc = count - k0 < kBatchColumns ? count - k0 : kBatchColumns;
        for (int k = 0; k < kc; ++k) decode_column(wt, columns[k0 + k], tmp + (size_t) k * n, n);
        if (K.tokens) {
            K.tokens(tmp, kc, n, h, h_stride, h_index + k0, n_tok, y, y_stride);
            continue;
        }
        for (int t = 0; t < n_tok; ++t) {
            for (int k = 0; k < kc; ++k) {
                K.f32(tmp + (size_t) k * n, h[(size_t) t * h_stride + h_index[k0 + k]], y + (size_t) t * y_stride, n);
            }
        }
    }
}

} // namespace neuralink
