#include "neuralink/kquant_dots.h"

#include "kquant_blocks.h"

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags the _mm512_undefined_* placeholders inside its own AVX-512 headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// q4_K (and q5_K, see k_dot_avx512) rows against q8_K activations, 64 values per instruction on AVX-512 CPUs,
// with the result ggml's vec_dot gives on x86 (its AVX2 kernel) bit for bit: the same integer sums gathered in
// the same eight int32 lanes, then the same float operations in the same order.
//
// ggml's kernel, per block: lane k of an int32 sum holds, over the eight sub-blocks, scale * (q4 . q8) of the
// sub-block's values 4k .. 4k + 3 (maddubs pairs bytes, madd multiplies by the scale and pairs again); then
// acc = fma(d_y * d_x, float(sum), acc) in eight float lanes, and the mins' part, scale-free, in four lanes
// acc_m = fma(-d_y * dmin_x, float(mins . bsums pairs), acc_m). Here one 512-bit register covers two
// sub-blocks (one per 256-bit half), so the same 4-value groups land in lanes k and k + 8, and adding the two
// halves gives each of the eight lanes the same integers (int32 sums are exact: at most 63 * 15 * 128 * 256
// in magnitude). The mins' part and the final sums are ggml's operations as they are.

namespace neuralink {

#ifdef NL_X86_VERSIONS
// ggml's block_q8_K: float d, int8 qs[256], int16 bsums[16] (sums of 16 values each)
constexpr size_t kQ8KQsAt = 4, kQ8KSumsAt = 4 + 256, kQ8KBytes = 4 + 256 + 32;

#define NL_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// sum of products of int16 pairs added to acc: one instruction with VNNI, madd then add without
template <bool kVnni> NL_AVX512_VNNI NL_INLINE __m512i pair_products_added(__m512i acc, __m512i a, __m512i b) {
    if constexpr (kVnni) {
        return _mm512_dpwssd_epi32(acc, a, b);
    } else {
        return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
    }
}

// q4_K rows (kHighBit false) and q5_K rows (true): ggml's q5_K kernel is its q4_K one with a fifth bit (bit
// j of qh[l] for sub-block j's value l, added as 16), put in here by a masked shift, and with the mins summed
// otherwise: their four int32 pairs added into one integer per block, then its C's summs += dmin * float(that),
// which the compiler contracts into one fused multiply-add (ggml-cpu is built with FMA; the test against
// ggml's own kernel tells the two apart), where q4_K keeps four float lanes of mins.
template <bool kVnni, bool kHighBit>
NL_AVX512_VNNI void k_dot_avx512(int n, float * s, size_t, const void * vx, size_t, const void * vy, size_t, int) {
    const uint8_t * x = (const uint8_t *) vx;
    const uint8_t * y = (const uint8_t *) vy;
    const __m512i low4 = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi8(1);
    // word indices giving sub-block 2j's scale to the low half and 2j + 1's to the high half
    const __m512i pair_index[4] = {
        _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(1), 1),
        _mm512_inserti64x4(_mm512_set1_epi16(2), _mm256_set1_epi16(3), 1),
        _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(5), 1),
        _mm512_inserti64x4(_mm512_set1_epi16(6), _mm256_set1_epi16(7), 1),
    };
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps(); // q4_K: four lanes; q5_K: lane 0, ggml's scalar sum
    for (int64_t b = 0; b < n / kKBlock; ++b, x += k_block_bytes<kHighBit>(), y += kQ8KBytes) {
        float yd;
        std::memcpy(&yd, y, sizeof yd);
        uint16_t dh, mh;
        k_super_scales(x, &dh, &mh);
        const float d = yd * _cvtsh_ss(dh);
        const float dmin = -yd * _cvtsh_ss(mh);
        alignas(16) uint8_t sm[16];
        k_scales_mins(x, sm);
        const __m256i scales_mins = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *) sm));
        // the mins against the sub-blocks' sums of q8 (pairs of bsums), as ggml
        const __m256i sums16 = _mm256_loadu_si256((const __m256i *) (y + kQ8KSumsAt));
        const __m128i sums32 = _mm_hadd_epi16(_mm256_castsi256_si128(sums16), _mm256_extracti128_si256(sums16, 1));
        const __m128i mins_dot = _mm_madd_epi16(_mm256_extracti128_si256(scales_mins, 1), sums32);
        if constexpr (kHighBit) {
            const __m128i zero = _mm_setzero_si128();
            const __m128i total = _mm_hadd_epi32(_mm_hadd_epi32(mins_dot, zero), zero);
            acc_m = _mm_fmadd_ss(_mm_set_ss(dmin), _mm_cvtepi32_ps(total), acc_m);
        } else {
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(mins_dot), acc_m);
        }

        const __m512i scales = _mm512_castsi256_si512(scales_mins); // words 0-7: the sub-blocks' scales
        const uint8_t * qs = x + k_low_bits_at<kHighBit>();
        const uint8_t * q8 = y + kQ8KQsAt;
        const __m512i high = kHighBit ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (x + 16)))
                                      : _mm512_setzero_si512();
        // two sums, sub-blocks 0-3 and 4-7, so that their additions do not wait on each other
        __m512i sum[2] = { _mm512_setzero_si512(), _mm512_setzero_si512() };
        for (int j = 0; j < 4; ++j) {
            // qs bytes 32j .. 32j + 31: sub-block 2j in their low nibbles, 2j + 1 in their high ones, against
            // the activation's values 64j .. 64j + 63 (2j's then 2j + 1's); q5_K's fifth bits are bits 2j and
            // 2j + 1 of the qh bytes
            const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (qs + 32 * j)));
            __m512i q = _mm512_and_si512(_mm512_mask_srli_epi16(both, 0xFFFF0000u, both, 4), low4);
            if constexpr (kHighBit) {
                const __m512i bits = _mm512_and_si512(
                        _mm512_mask_srli_epi16(_mm512_srli_epi16(high, 2 * j), 0xFFFF0000u, high, 2 * j + 1), one);
                q = _mm512_or_si512(q, _mm512_slli_epi16(bits, 4));
            }
            const __m512i a = _mm512_loadu_si512((const void *) (q8 + 64 * j));
            const __m512i scale = _mm512_permutexvar_epi16(pair_index[j], scales);
            sum[j / 2] = pair_products_added<kVnni>(sum[j / 2], scale, _mm512_maddubs_epi16(q, a));
        }
        const __m512i both_sums = _mm512_add_epi32(sum[0], sum[1]);
        const __m256i lanes = _mm256_add_epi32(_mm512_castsi512_si256(both_sums), _mm512_extracti64x4_epi64(both_sums, 1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
    }
    // ggml's final sums: the eight lanes halved thrice, q4_K's mins' four lanes twice, then added
    if constexpr (!kHighBit) {
        acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    }
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    *s = _mm_cvtss_f32(r) + _mm_cvtss_f32(acc_m);
}

// q6_K rows against q8_K activations, with ggml's AVX2 result bit for bit. ggml's kernel, per block: values
// 0-127 then 128-255, each half as four groups of 32 (6-bit values from ql's nibbles and qh's bit pairs);
// lane k of an int32 sum holds scale * (q6 . q8) of the 4-value groups 4k .. 4k + 3 of every group of 32
// (maddubs, then madd by the 16-value scales), less 32 * (scales . bsums pairs), the values' offset; then
// acc = fma(d_y * d_x, float(sum), acc). Here one 512-bit register holds two groups of 32 (one per 256-bit
// half), against 64 contiguous activations, so the same 4-value groups land in lanes k and k + 8, and adding
// the halves gives the eight lanes the same integers.
constexpr size_t kQ6Bytes = 210, kQ6HighAt = 128, kQ6ScalesAt = 192, kQ6DAt = 208;
// for the groups of 32 values 2r and 2r + 1 (a 512-bit register's halves): each word's 16-value scale, scales
// 4r .. 4r + 3 eight words each
alignas(64) static const int16_t kQ6ScaleWords[4][32] = {
    { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
      2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3 },
    { 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
      6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7 },
    { 8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9,
      10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11 },
    { 12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13,
      14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15 },
};

template <bool kVnni>
NL_AVX512_VNNI void q6_k_dot_avx512(int n, float * s, size_t, const void * vx, size_t, const void * vy, size_t, int) {
    const uint8_t * x = (const uint8_t *) vx;
    const uint8_t * y = (const uint8_t *) vy;
    const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
    // word indices of the 16-value scales of groups 4j .. 4j + 1 (A) and 4j + 2 .. 4j + 3 (B) of 32 values
    __m512i index[2][2];
    for (int k = 0; k < 4; ++k) index[k / 2][k % 2] = _mm512_load_si512((const void *) kQ6ScaleWords[k]);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / kKBlock; ++b, x += kQ6Bytes, y += kQ8KBytes) {
        float yd;
        std::memcpy(&yd, y, sizeof yd);
        uint16_t dh;
        std::memcpy(&dh, x + kQ6DAt, sizeof dh);
        const float d = yd * _cvtsh_ss(dh);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *) (x + kQ6ScalesAt));
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        // the values' offset of 32, as ggml: 32 * (scales . bsums) in pairs
        const __m256i sums16 = _mm256_loadu_si256((const __m256i *) (y + kQ8KSumsAt));
        const __m256i offset = _mm256_slli_epi32(_mm256_madd_epi16(sums16, sc16), 5);
        const __m512i scales = _mm512_castsi256_si512(sc16);
        const uint8_t * q8 = y + kQ8KQsAt;
        __m512i sum[2] = { _mm512_setzero_si512(), _mm512_setzero_si512() };
        for (int j = 0; j < 2; ++j) {
            // ql bytes 64j .. 64j + 63: groups 4j and 4j + 1 in their low nibbles, 4j + 2 and 4j + 3 in their high
            // ones; qh bytes 32j .. 32j + 31 hold the high bit pairs of the four groups at bits 0-1, 2-3, 4-5, 6-7
            const __m512i l = _mm512_loadu_si512((const void *) (x + 64 * j));
            const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (x + kQ6HighAt + 32 * j)));
            const __m512i high_a = _mm512_and_si512(_mm512_mask_blend_epi64(0xF0, _mm512_slli_epi16(h, 4),
                                                                            _mm512_slli_epi16(h, 2)), bits45);
            const __m512i high_b = _mm512_and_si512(_mm512_mask_blend_epi64(0xF0, h, _mm512_srli_epi16(h, 2)), bits45);
            const __m512i qa = _mm512_or_si512(_mm512_and_si512(l, low4), high_a);
            const __m512i qb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4), high_b);
            const __m512i pa = _mm512_maddubs_epi16(qa, _mm512_loadu_si512((const void *) (q8 + 128 * j)));
            const __m512i pb = _mm512_maddubs_epi16(qb, _mm512_loadu_si512((const void *) (q8 + 128 * j + 64)));
            sum[0] = pair_products_added<kVnni>(sum[0], _mm512_permutexvar_epi16(index[j][0], scales), pa);
            sum[1] = pair_products_added<kVnni>(sum[1], _mm512_permutexvar_epi16(index[j][1], scales), pb);
        }
        const __m512i both_sums = _mm512_add_epi32(sum[0], sum[1]);
        const __m256i lanes = _mm256_sub_epi32(
                _mm256_add_epi32(_mm512_castsi512_si256(both_sums), _mm512_extracti64x4_epi64(both_sums, 1)), offset);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
    }
    // ggml's final sum of the eight lanes
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    *s = _mm_cvtss_f32(r);
}
#endif

ggml_vec_dot_t faster_vec_dot(ggml_type type) {
    // the integer sums are ggml's AVX2 kernel's: only where ggml-cpu runs that kernel, and never under a
    // narrower NEURALINK_KERNELS (so the tests compare with ggml on any machine); the first is the fastest
    const std::vector<FasterDot> all = faster_vec_dots(type);
    return all.empty() ? nullptr : all.front().dot;
}

const char * faster_vec_dot_isa(ggml_type type) {
    const ggml_vec_dot_t chosen = faster_vec_dot(type);
    for (const FasterDot & f : faster_vec_dots(type)) {
        if (f.dot == chosen) return f.isa;
    }
    return "ggml";
}

std::vector<FasterDot> faster_vec_dots(ggml_type type) {
    std::vector<FasterDot> all;
#ifdef NL_X86_VERSIONS
    if ((type != GGML_TYPE_Q4_K && type != GGML_TYPE_Q5_K && type != GGML_TYPE_Q6_K) ||
        simd_level() != SimdLevel::Avx512 || !ggml_cpu_has_avx2()) {
        return all;
    }
    __builtin_cpu_init();
    const auto pick = [type](ggml_vec_dot_t q4, ggml_vec_dot_t q5, ggml_vec_dot_t q6) {
        return type == GGML_TYPE_Q4_K ? q4 : type == GGML_TYPE_Q5_K ? q5 : q6;
    };
    if (__builtin_cpu_supports("avx512vnni")) {
        all.push_back({ "avx512-vnni", pick(k_dot_avx512<true, false>, k_dot_avx512<true, true>, q6_k_dot_avx512<true>) });
    }
    all.push_back({ "avx512", pick(k_dot_avx512<false, false>, k_dot_avx512<false, true>, q6_k_dot_avx512<false>) });
#else
    (void) type;
#endif
    return all;
}

} // namespace neuralink
