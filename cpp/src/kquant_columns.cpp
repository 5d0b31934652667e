#include "column_loops.h"
#include "kquant_blocks.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags the _mm512_undefined_* placeholders inside its own AVX-512 headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// The K-quant column loops: a column's blocks decoded in registers, each value as ggml's to_float decodes it,
// and added as fma(h, value, y), the sums of decoding the column into scratch first and adding the floats.

namespace neuralink {

#ifdef NL_X86_VERSIONS
// q6_K columns (ggml's block_q6_K: 256 values as low 4 bits ql[128], high 2 bits qh[64], int8 scales[16] of 16
// values each, fp16 d), decoded in registers and added without a float copy. Each value is decoded as ggml's
// to_float decodes it, (d * scale) * q as floats, and added as fma(h, value, y) like the float loop: the same
// sums as decoding the column into scratch first.
constexpr size_t kQ6BlockBytes = 128 + 64 + 16 + 2;

// d * scale of a block's 16 scales, the same float products as ggml's, worked out once per block for all its
// pieces (AVX2 instructions: the AVX-512 loops inline them too)
NL_AVX2 NL_INLINE void q6_k_coefs(const uint8_t * block, float * coef) {
    uint16_t dh;
    std::memcpy(&dh, block + 208, sizeof dh);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
    const __m128i sc = _mm_loadu_si128((const __m128i *) (block + 192));
    _mm256_store_ps(coef, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    _mm256_store_ps(coef + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
}

// one column's 128 values of half `half` of a block, decoded, scaled by the block's coefficients (q6_k_coefs)
// and added to y's 8 registers. The 6-bit values are put together in two 512-bit registers (values 0-63 and
// 64-127 of the half) and spilled to the stack, so that each group of 16 is sign-extended straight from memory.
NL_AVX512 NL_INLINE void q6_k_half(const uint8_t * block, int half, const float * coefs, float h, __m512 * acc) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(0x03), bias = _mm512_set1_epi8(32);
    const float * coef = coefs + 8 * half;
    // ql bytes 0-31 hold values 0-31 (low nibble) and 64-95 (high), bytes 32-63 values 32-63 and 96-127; the
    // 32 qh bytes hold their two high bits at bits 0-1, 2-3, 4-5 and 6-7 respectively
    const __m512i l = _mm512_loadu_si512((const void *) (block + 64 * half));
    const __m256i hb = _mm256_loadu_si256((const __m256i *) (block + 128 + 32 * half));
    const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1);
    alignas(64) int8_t q[128];
    _mm512_store_si512((void *) q, _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(l, low4),
                                                   _mm512_slli_epi16(_mm512_and_si512(hh, low2), 4)), bias));
    _mm512_store_si512((void *) (q + 64),
                       _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4),
                                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hh, 4), low2), 4)),
                                       bias));
    const __m512 hv = _mm512_set1_ps(h);
    for (int i = 0; i < 8; ++i) {
        const __m512 w = _mm512_mul_ps(_mm512_set1_ps(coef[i]),
                                       _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *) (q + 16 * i)))));
        acc[i] = _mm512_fmadd_ps(hv, w, acc[i]);
    }
}

// The AVX2 loops for q6_K: a quarter of a block (64 values, its four scales) at a time, y's 64 values held in 8
// registers while the group's columns are added; values and sums as in the AVX-512 loop (d * scale first, then
// the 6-bit value, then fma(h, value, y)).
NL_AVX2 NL_INLINE void q6_k_quarter_avx2(const uint8_t * block, int quarter, const float * coefs, float h, __m256 * acc) {
    const int half = quarter / 2, high = quarter % 2; // high: values 64-127 of the half (the high nibbles)
    const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03), bias = _mm256_set1_epi8(32);
    const float * coef = coefs + 8 * half + 4 * high; // the quarter's four scales (q6_k_coefs)
    const uint8_t * ql = block + 64 * half;
    __m256i l0 = _mm256_loadu_si256((const __m256i *) ql), l1 = _mm256_loadu_si256((const __m256i *) (ql + 32));
    __m256i hb = _mm256_loadu_si256((const __m256i *) (block + 128 + 32 * half));
    if (high) {
        l0 = _mm256_srli_epi16(l0, 4);
        l1 = _mm256_srli_epi16(l1, 4);
        hb = _mm256_srli_epi16(hb, 4);
    }
    alignas(32) int8_t q[64];
    _mm256_store_si256((__m256i *) q, _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l0, low4),
                                                                     _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4)),
                                                     bias));
    _mm256_store_si256((__m256i *) (q + 32),
                       _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l1, low4),
                                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), low2), 4)),
                                       bias));
    const __m256 hv = _mm256_set1_ps(h);
    for (int i = 0; i < 8; ++i) {
        const __m256 w = _mm256_mul_ps(_mm256_set1_ps(coef[i / 2]),
                                       _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (q + 8 * i)))));
        acc[i] = _mm256_fmadd_ps(hv, w, acc[i]);
    }
}


// q5_K and q4_K columns (ggml's block_q5_K: fp16 d and dmin, 12 bytes of 6-bit scales and mins for eight
// sub-blocks of 32 values, the high bits qh[32], the low 4 bits qs[128]; block_q4_K: the same without qh).
// Value = (d * scale) * q - (dmin * min) as floats, a product then a difference, as ggml's to_float computes
// it (ggml-base is built without FMA, so its compiler cannot fuse the two).
// (block layout and scale unpacking: kquant_blocks.h)

// (d * scale) of a block's eight sub-blocks (coefs 0-7) and (dmin * min) (coefs 8-15), one float product each
// as in ggml, worked out once per block for all its pieces (AVX2 instructions: the AVX-512 loops inline them too)
NL_AVX2 NL_INLINE void k_coefs(const uint8_t * block, float * coefs) {
    uint16_t dh, mh;
    k_super_scales(block, &dh, &mh);
    alignas(16) uint8_t sm[16];
    k_scales_mins(block, sm);
    const __m128i both = _mm_load_si128((const __m128i *) sm);
    _mm256_store_ps(coefs, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(dh)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(both))));
    _mm256_store_ps(coefs + 8, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(mh)),
                                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(both, 8)))));
}

// one column's 128 values of half `half` of a block (its sub-blocks 4 half .. 4 half + 3) added to y's 8
// registers, with the block's coefficients (k_coefs). qs bytes 0-31 of the half hold sub-block 4 half
// (low nibbles) and 4 half + 1 (high), bytes 32-63 sub-blocks 4 half + 2 and + 3; the high bit of sub-block j's
// value l is bit j of qh[l].
template <bool kHighBit>
NL_AVX512 NL_INLINE void k_half_avx512(const uint8_t * block, int half, const float * coefs, float h, __m512 * acc) {
    const float * coef = coefs + 4 * half;
    const float * mins = coefs + 8 + 4 * half;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i l = _mm512_loadu_si512((const void *) (block + k_low_bits_at<kHighBit>() + 64 * half));
    __m512i lo = _mm512_and_si512(l, low4);                       // sub-blocks 4 half, 4 half + 2
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(l, 4), low4); // 4 half + 1, 4 half + 3
    if constexpr (kHighBit) {
        const __m512i one = _mm512_set1_epi8(1);
        const __m256i hb = _mm256_loadu_si256((const __m256i *) (block + 16));
        // bit 4 half of qh[l] beside bit 4 half + 2 (a 16-bit shift by at most 7 brings each byte's bit down)
        const __m512i hl = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(4 * half))),
                                              _mm256_srl_epi16(hb, _mm_cvtsi32_si128(4 * half + 2)), 1);
        lo = _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(hl, one), 4));
        hi = _mm512_or_si512(hi, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hl, 1), one), 4));
    }
    alignas(64) uint8_t q[128];
    _mm512_store_si512((void *) q, lo);
    _mm512_store_si512((void *) (q + 64), hi);
    // 16 values at q + 16 i: their sub-block (of the half's four) and their register of y
    constexpr int kSub[8] = { 0, 0, 2, 2, 1, 1, 3, 3 };
    constexpr int kAcc[8] = { 0, 1, 4, 5, 2, 3, 6, 7 };
    const __m512 hv = _mm512_set1_ps(h);
    for (int i = 0; i < 8; ++i) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *) (q + 16 * i))));
        const __m512 w = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(coef[kSub[i]]), v), _mm512_set1_ps(mins[kSub[i]]));
        acc[kAcc[i]] = _mm512_fmadd_ps(hv, w, acc[kAcc[i]]);
    }
}

// AVX2: a quarter of a block (64 values: sub-blocks 2 quarter, low nibbles of qs bytes 32 quarter .. + 31, and
// 2 quarter + 1, their high nibbles) held in 8 registers of y
template <bool kHighBit>
NL_AVX2 NL_INLINE void k_quarter_avx2(const uint8_t * block, int quarter, const float * coefs, float h, __m256 * acc) {
    const float * coef = coefs + 2 * quarter;     // the quarter's two sub-blocks (k_coefs)
    const float * mins = coefs + 8 + 2 * quarter;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i l = _mm256_loadu_si256((const __m256i *) (block + k_low_bits_at<kHighBit>() + 32 * quarter));
    __m256i lo = _mm256_and_si256(l, low4), hi = _mm256_and_si256(_mm256_srli_epi16(l, 4), low4);
    if constexpr (kHighBit) {
        const __m256i one = _mm256_set1_epi8(1);
        const __m256i hb = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *) (block + 16)),
                                            _mm_cvtsi32_si128(2 * quarter));
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4));
    }
    alignas(32) uint8_t q[64];
    _mm256_store_si256((__m256i *) q, lo);
    _mm256_store_si256((__m256i *) (q + 32), hi);
    const __m256 hv = _mm256_set1_ps(h);
    for (int i = 0; i < 8; ++i) {
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (q + 8 * i))));
        const __m256 w = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(coef[i / 4]), v), _mm256_set1_ps(mins[i / 4]));
        acc[i] = _mm256_fmadd_ps(hv, w, acc[i]);
    }
}

// The loops around the pieces above: a block of a column is decoded a piece (a half under AVX-512, a quarter
// under AVX2) at a time. `Piece` names the type: its block bytes; coefs(block, c), the block's 16 float
// coefficients, worked out once per block (worked out in every piece they had cost 10-15 % of the AVX-512
// loop); and piece(block, i, c, h, acc), which adds h times the i-th piece's values to the registers acc.
struct Q6Pieces {
    static constexpr size_t kBytes = kQ6BlockBytes;
    NL_AVX2 static NL_INLINE void coefs(const uint8_t * b, float * c) { q6_k_coefs(b, c); }
    NL_AVX512 static NL_INLINE void half(const uint8_t * b, int i, const float * c, float h, __m512 * acc) { q6_k_half(b, i, c, h, acc); }
    NL_AVX2 static NL_INLINE void quarter(const uint8_t * b, int i, const float * c, float h, __m256 * acc) {
        q6_k_quarter_avx2(b, i, c, h, acc);
    }
};
template <bool kHighBit> struct KPieces {
    static constexpr size_t kBytes = k_block_bytes<kHighBit>();
    NL_AVX2 static NL_INLINE void coefs(const uint8_t * b, float * c) { k_coefs(b, c); }
    NL_AVX512 static NL_INLINE void half(const uint8_t * b, int i, const float * c, float h, __m512 * acc) {
        k_half_avx512<kHighBit>(b, i, c, h, acc);
    }
    NL_AVX2 static NL_INLINE void quarter(const uint8_t * b, int i, const float * c, float h, __m256 * acc) {
        k_quarter_avx2<kHighBit>(b, i, c, h, acc);
    }
};

// a column decoded into floats: fma(1, w, -0) is w exactly, signed zeros included
template <class P> NL_AVX512 void decode_avx512(const uint8_t * column, float * out, int64_t n) {
    for (int64_t b = 0; b < n / kKBlock; ++b) {
        alignas(64) float c[16];
        P::coefs(column + (size_t) b * P::kBytes, c);
        for (int half = 0; half < 2; ++half) {
            __m512 acc[8];
            for (int i = 0; i < 8; ++i) acc[i] = _mm512_set1_ps(-0.0f);
            P::half(column + (size_t) b * P::kBytes, half, c, 1.0f, acc);
            for (int i = 0; i < 8; ++i) _mm512_storeu_ps(out + b * kKBlock + 128 * half + 16 * i, acc[i]);
        }
    }
}

// 128 values of y (a half block) stay in registers while a group's columns are added, in order
template <class P> NL_AVX512 void axpy_avx512(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n) {
    const size_t bytes = (size_t) (n / kKBlock) * P::kBytes;
    for (int k0 = 0; k0 < count; k0 += kGroup) {
        const int m = count - k0 < kGroup ? count - k0 : kGroup;
        prefetch_group(columns, k0, count, bytes);
        for (int64_t b = 0; b < n / kKBlock; ++b) {
            alignas(64) float c[kGroup][16];
            for (int k = 0; k < m; ++k) P::coefs(columns[k0 + k] + (size_t) b * P::kBytes, c[k]);
            for (int half = 0; half < 2; ++half) {
                float * yh = y + b * kKBlock + 128 * half;
                __m512 acc[8];
                for (int i = 0; i < 8; ++i) acc[i] = _mm512_loadu_ps(yh + 16 * i);
                for (int k = 0; k < m; ++k) P::half(columns[k0 + k] + (size_t) b * P::kBytes, half, c[k], h[k0 + k], acc);
                for (int i = 0; i < 8; ++i) _mm512_storeu_ps(yh + 16 * i, acc[i]);
            }
        }
    }
}

template <class P> NL_AVX2 void decode_avx2(const uint8_t * column, float * out, int64_t n) {
    for (int64_t b = 0; b < n / kKBlock; ++b) {
        alignas(32) float c[16];
        P::coefs(column + (size_t) b * P::kBytes, c);
        for (int quarter = 0; quarter < 4; ++quarter) {
            __m256 acc[8];
            for (int i = 0; i < 8; ++i) acc[i] = _mm256_set1_ps(-0.0f);
            P::quarter(column + (size_t) b * P::kBytes, quarter, c, 1.0f, acc);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + b * kKBlock + 64 * quarter + 8 * i, acc[i]);
        }
    }
}

// y's 64 values of a quarter block held in 8 registers while a group's columns are added, in order
template <class P> NL_AVX2 void axpy_avx2(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n) {
    const size_t bytes = (size_t) (n / kKBlock) * P::kBytes;
    for (int k0 = 0; k0 < count; k0 += kGroup) {
        const int m = count - k0 < kGroup ? count - k0 : kGroup;
        prefetch_group(columns, k0, count, bytes);
        for (int64_t b = 0; b < n / kKBlock; ++b) {
            alignas(32) float c[kGroup][16];
            for (int k = 0; k < m; ++k) P::coefs(columns[k0 + k] + (size_t) b * P::kBytes, c[k]);
            for (int quarter = 0; quarter < 4; ++quarter) {
                float * yq = y + b * kKBlock + 64 * quarter;
                __m256 acc[8];
                for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(yq + 8 * i);
                for (int k = 0; k < m; ++k) {
                    P::quarter(columns[k0 + k] + (size_t) b * P::kBytes, quarter, c[k], h[k0 + k], acc);
                }
                for (int i = 0; i < 8; ++i) _mm256_storeu_ps(yq + 8 * i, acc[i]);
            }
        }
    }
}

void q6_k_axpy_avx512(const uint8_t * const * c, const float * h, int count, float * y, int64_t n) { axpy_avx512<Q6Pieces>(c, h, count, y, n); }
void q6_k_decode_avx512(const uint8_t * column, float * out, int64_t n) { decode_avx512<Q6Pieces>(column, out, n); }
void q6_k_axpy_avx2(const uint8_t * const * c, const float * h, int count, float * y, int64_t n) { axpy_avx2<Q6Pieces>(c, h, count, y, n); }
void q6_k_decode_avx2(const uint8_t * column, float * out, int64_t n) { decode_avx2<Q6Pieces>(column, out, n); }
void q5_k_axpy_avx512(const uint8_t * const * c, const float * h, int count, float * y, int64_t n) { axpy_avx512<KPieces<true>>(c, h, count, y, n); }
void q5_k_decode_avx512(const uint8_t * column, float * out, int64_t n) { decode_avx512<KPieces<true>>(column, out, n); }
void q5_k_axpy_avx2(const uint8_t * const * c, const float * h, int count, float * y, int64_t n) { axpy_avx2<KPieces<true>>(c, h, count, y, n); }
void q5_k_decode_avx2(const uint8_t * column, float * out, int64_t n) { decode_avx2<KPieces<true>>(column, out, n); }
void q4_k_axpy_avx512(const uint8_t * const * c, const float * h, int count, float * y, int64_t n) { axpy_avx512<KPieces<false>>(c, h, count, y, n); }
void q4_k_decode_avx512(const uint8_t * column, float * out, int64_t n) { decode_avx512<KPieces<false>>(column, out, n); }
void q4_k_axpy_avx2(const uint8_t * const * c, const float * h, int count, float * y, int64_t n) { axpy_avx2<KPieces<false>>(c, h, count, y, n); }
void q4_k_decode_avx2(const uint8_t * column, float * out, int64_t n) { decode_avx2<KPieces<false>>(column, out, n); }
#endif

} // namespace neuralink
