#pragma once

// What the column loops share (column_axpy.cpp picks among them; kquant_columns.cpp holds the K-quant ones):
// their signatures, the group of columns added to one stretch of y held in registers, and the prefetching
// that asks scattered columns into the caches ahead of their group.

#include "simd.h"

#include <cstddef>
#include <cstdint>

namespace neuralink {

// y[0, n) += sum over k < count of h[k] * columns[k][0, n), in order
using ColumnsAxpy = void (*)(const uint8_t * const *, const float *, int, float *, int64_t);
// a column decoded into floats, the values ggml's to_float gives
using Decode = void (*)(const uint8_t *, float *, int64_t);

#ifdef NL_X86_VERSIONS
// a stretch of y stays in registers while up to kGroup columns are added to it
constexpr int kGroup = 4;

// Columns are scattered over the store, so the hardware prefetchers do not see them coming: while the group
// starting at k0 computes, the next group's lines are asked into L1 and those of the group kFarGroups ahead into
// L2. Measured on a store four times the L3 (q6_K columns of Qwen2.5-Coder-1.5B, 3,500 of 8,960 per layer): the
// L2 requests took a layer from 660-780 to 470-520 us; 3 to 5 groups ahead did alike, 2 ahead into L1 did not.
constexpr int kFarGroups = 4;

NL_INLINE void prefetch_group(const uint8_t * const * columns, int k0, int count, size_t bytes) {
    for (int k = k0 + kGroup; k < k0 + 2 * kGroup && k < count; ++k) {
        for (size_t at = 0; at < bytes; at += 64) _mm_prefetch((const char *) columns[k] + at, _MM_HINT_T0);
    }
    for (int k = k0 + kFarGroups * kGroup; k < k0 + (kFarGroups + 1) * kGroup && k < count; ++k) {
        for (size_t at = 0; at < bytes; at += 64) _mm_prefetch((const char *) columns[k] + at, _MM_HINT_T1);
    }
}

// K-quant columns (n a multiple of 256), decoded in registers: kquant_columns.cpp
void q6_k_axpy_avx512(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n);
void q6_k_decode_avx512(const uint8_t * column, float * out, int64_t n);
void q6_k_axpy_avx2(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n);
void q6_k_decode_avx2(const uint8_t * column, float * out, int64_t n);
void q5_k_axpy_avx512(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n);
void q5_k_decode_avx512(const uint8_t * column, float * out, int64_t n);
void q5_k_axpy_avx2(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n);
void q5_k_decode_avx2(const uint8_t * column, float * out, int64_t n);
void q4_k_axpy_avx512(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n);
void q4_k_decode_avx512(const uint8_t * column, float * out, int64_t n);
void q4_k_axpy_avx2(const uint8_t * const * columns, const float * h, int count, float * y, int64_t n);
void q4_k_decode_avx2(const uint8_t * column, float * out, int64_t n);
#endif

} // namespace neuralink
