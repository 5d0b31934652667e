#pragma once

// The sparse down projection's inner step: y += h * column, one neuron's down
// column in the sidecar's encoding. q8_0 columns are scaled and accumulated
// block by block without a float copy; other types are dequantized once into
// scratch. The loops are compiled for AVX-512, AVX2+FMA and plain x86-64 and
// the CPU picks at load time (never -march=native: the build runs everywhere).

#include "neuralink/weight_types.h"

#include <cstdint>

namespace neuralink {

// y[0, n) += h * column[0, n), the column's values in `wt`'s encoding; n a multiple of its block size
// and tmp room for n floats (used by types other than q8_0)
void column_axpy(const WeightType & wt, const uint8_t * column, float h, float * y, int64_t n, float * tmp);

// y[0, n) += h * x[0, n)
void float_axpy(const float * x, float h, float * y, int64_t n);

} // namespace neuralink
