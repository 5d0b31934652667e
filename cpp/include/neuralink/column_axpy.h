#pragma once

// The sparse down projection's inner step: y += h * column, one neuron's down
// column in the sidecar's encoding. q8_0, q6_K, q5_K and q4_K columns are decoded
// in registers and accumulated block by block without a float copy; other types
// are dequantized once into scratch. Prompt batches decode each column once
// and add it to several tokens at a time. The loops are compiled for
// AVX-512, AVX2+FMA and plain x86-64 and the first call picks by what the CPU
// reports (never -march=native: the build runs everywhere).

#include "neuralink/weight_types.h"

#include <cstdint>

namespace neuralink {

// y[0, n) += h * column[0, n), the column's values in `wt`'s encoding; n a multiple of its block size
// and tmp room for n floats (used by types without a loop of their own)
void column_axpy(const WeightType & wt, const uint8_t * column, float h, float * y, int64_t n, float * tmp);

// y[0, n) += sum over k of h[k] * columns[k][0, n), the columns added in order (as `count` calls of column_axpy
// would add them); q8_0 columns are added four at a time to each block of y held in registers
void columns_axpy(const WeightType & wt, const uint8_t * const * columns, const float * h, int count, float * y,
                  int64_t n, float * tmp);

// a column decoded into floats, the values ggml's to_float gives (q8_0 and the K-quants by loops of their own)
void decode_column(const WeightType & wt, const uint8_t * column, float * out, int64_t n);

// how many columns columns_axpy_batch decodes at a time: its scratch holds kBatchColumns * n floats
constexpr int kBatchColumns = 64;

// A prompt batch's down projection: for each token t < n_tok, y + t * y_stride gets what columns_axpy would add
// with the weights h[t * h_stride + h_index[k]] (a zero weight adds nothing: fma(0, w, y) is y). Each column is
// decoded once for all the tokens and added to several tokens' y held in registers (AVX-512); a token's sums are
// the ones it gets alone.
// tmp: room for kBatchColumns * n floats.
void columns_axpy_batch(const WeightType & wt, const uint8_t * const * columns, const uint32_t * h_index, int count,
                        const float * h, int64_t h_stride, int n_tok, float * y, int64_t y_stride, int64_t n,
                        float * tmp);

// y[0, n) += h * x[0, n)
void float_axpy(const float * x, float h, float * y, int64_t n);

// the instruction set of the loops in use: "avx512", "avx2" or "generic"
const char * column_axpy_isa();

} // namespace neuralink
