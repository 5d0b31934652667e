#pragma once

// Row dot products faster than ggml's own on this CPU, giving ggml's results bit for bit (kquant_dots.cpp):
// weight_type() puts them in place of ggml's vec_dot, so every product of a row with activations (the gate
// predictor's rows, the candidates' up rows, the dense path) uses them.

#include "ggml-cpu.h"

#include <vector>

namespace neuralink {

// the faster dot product for rows of `type` against its vec_dot type, or null (then ggml's is used): q4_K, q5_K and
// q6_K on AVX-512 CPUs (with VNNI where the CPU has it)
ggml_vec_dot_t faster_vec_dot(ggml_type type);

// "avx512-vnni", "avx512" or "ggml": which dot product rows of `type` use here
const char * faster_vec_dot_isa(ggml_type type);

// every faster dot product this CPU can run for `type`, fastest first (the tests check each one)
struct FasterDot {
    const char *   isa;
    ggml_vec_dot_t dot;
};
std::vector<FasterDot> faster_vec_dots(ggml_type type);

} // namespace neuralink
