#pragma once

// SiLU, x / (1 + exp(-x)), with an exp of our own that gives the same float
// for a value whether it is computed alone or among others in a SIMD register:
// the prediction activates a whole row of gate values at once, and the
// conversion's mask and the engine's per-pair code activate one at a time, and
// they must agree on every candidate. Within 3 ulp of SiLU in double precision,
// as close as x / (1 + expf(-x)) (measured over 2 million values in [-80, 80]).

#include <cstdint>

namespace neuralink {

float silu(float x);

// out[i] = silu(in[i]) for i < n (in == out allowed); AVX-512 or AVX2 where the CPU has them
void silu_span(const float * in, float * out, int64_t n);

} // namespace neuralink
