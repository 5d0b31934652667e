#pragma once

// ggml's type traits for one weight type, gathered once: how to dequantize a
// row, which type activations are converted to, and the dot-product kernel.
// All quantized math goes through these; the one exception is faster dot
// products for q4_K, q5_K and q6_K rows on AVX-512 CPUs that give ggml's
// results bit for bit (kquant_dots.cpp), put in place of ggml's vec_dot here.

#include "ggml.h"
#include "ggml-cpu.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace neuralink {

struct WeightType {
    ggml_type         type;
    ggml_type         vec_dot_type; // activations are converted to this for vec_dot
    int64_t           block_size;   // elements per block
    ggml_to_float_t   to_float;     // dequantize a row of this type
    ggml_from_float_t from_float;   // quantize a row of this type (ggml-cpu's, may be null)
    ggml_from_float_t act_from_float; // quantize a row of activations into vec_dot_type
    ggml_vec_dot_t    vec_dot;      // dot(row of this type, row of vec_dot_type): ggml's, or ggml's results faster

    size_t row_bytes(int64_t n) const { return ggml_row_size(type, n); }
    size_t act_row_bytes(int64_t n) const { return ggml_row_size(vec_dot_type, n); }
    const char * name() const { return ggml_type_name(type); }
};

// Whether `type` can be used as an FFN weight type, with the reason if not.
bool weight_type_supported(ggml_type type, std::string * why = nullptr);

// Traits of a supported type; throws std::invalid_argument for others.
const WeightType & weight_type(ggml_type type);

// Initializes ggml-cpu's tables (idempotent); call before using any kernel.
void init_ggml_cpu();

// ggml type by its ggml name ("q4_1", "f16", ...), looked up in ggml's own type traits (the table is
// ggml's, not ours: names.h is for the engine's options); throws std::invalid_argument
ggml_type type_from_name(const std::string & name);

// rows x cols floats encoded in `type` with ggml's reference quantizer
// (ggml_quantize_chunk); cols must be a multiple of the block size.
void quantize_rows(ggml_type type, const float * src, void * dst, int64_t rows, int64_t cols);

// rows x cols values of `type` decoded to floats
void dequantize_rows(ggml_type type, const void * src, float * dst, int64_t rows, int64_t cols);

} // namespace neuralink
