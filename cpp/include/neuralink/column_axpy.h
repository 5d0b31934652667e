#pragma once

// The sparse down projection's inner step: y += h * column, one neuron's down
// column in the sidecar's encoding. q8_0 columns are scaled and accumulated
// block by block without a float copy; other types are dequantized once into
// scratch. The loops are compiled for AVX-512, AVX2+FMA and plain x86-64 and
// the first call picks by what the CPU reports (never -march=native: the
// build runs everywhere).

#include "neuralink/weight_types.h"

#include <cstdint>

namespace neuralink {

// y[0, n) += h * column[0, n), the column's values in `wt`'s encoding; n a multiple of its block size
// and tmp room for n floats (used by types other than q8_0)
void column_axpy(const WeightType & wt, const uint8_t * column, float h, float * y, int64_t n, float * tmp);

// y[0, n) += sum over k of h[k] * columns[k][0, n), the columns added in order (as `count` calls of column_axpy
// would add them); q8_0 columns are added four at a time to each block of y held in registers
void columns_axpy(const WeightType & wt, const uint8_t * const * columns, const float * h, int count, float * y,
                  int64_t n, float * tmp);

// the most tokens columns_axpy_tokens takes at once (AVX-512: 16 registers of y, 2 of a converted block)
constexpr int kMaxTileTokens = 8;

// For each token t < n_tok (1 to kMaxTileTokens): y + t * y_stride gets what columns_axpy would add with the
// weights h[k * n_tok + t]; each q8_0 block is converted once for all the tokens (a prompt batch), and a
// token's sums are the ones it would get alone. tmp: room for n floats (types other than q8_0).
void columns_axpy_tokens(const WeightType & wt, const uint8_t * const * columns, const float * h, int count,
                         int n_tok, float * y, int64_t y_stride, int64_t n, float * tmp);

// y[0, n) += h * x[0, n)
void float_axpy(const float * x, float h, float * y, int64_t n);

// the instruction set of the loops in use: "avx512", "avx2" or "generic"
const char * column_axpy_isa();

} // namespace neuralink
