#pragma once

// One FFN layer's weights and its dense evaluation, split into phases that
// run on every compute thread with a barrier between them:
//   0  x  -> xq   activations converted to the gate/up vec_dot types
//   1  xq -> h    h = act(gate x + b) * (up x + b)   (or act(up x + b))
//   2  h  -> hq   hidden activations converted to down's vec_dot type
//   3  hq -> y    y = down h + b
// This is the arithmetic of ggml's mul_mat (vec_dot on converted
// activations), so results match llama.cpp's own FFN.

#include "neuralink/weight_types.h"

#include <cstdint>
#include <string>
#include <vector>

namespace neuralink {

enum class Activation : int32_t { Silu = 0, Gelu = 1, Relu = 2, ReluSqr = 3 };

const char * activation_name(Activation act);
// throws std::invalid_argument for unknown names
Activation activation_from_name(const std::string & name);

// one activation value: SiLU with neuralink's own exp (silu.h; as close as ggml's scalar expf), GELU
// through ggml's fp16 table; the value activate_span gives it
float activate(Activation act, float v);

// out[i] = activate(act, in[i]) for i < n (in == out allowed), SiLU vectorized
void activate_span(Activation act, const float * in, float * out, int64_t n);

// out[i] = act(g[i]) * u[i] (gated) or act(u[i]), with ggml's own kernels where
// they are vectorized (SiLU); g is unused when !gated
void activate_rows(Activation act, bool gated, int n, float * out, const float * g, const float * u);

// Rows are evaluated in blocks of kRowBlock starting at multiples of it: this
// keeps weight rows hot across tokens and, as every SIMD width divides it,
// makes ggml's vectorized activations round exactly as on a whole row.
constexpr int64_t kRowBlock = 16;

struct WeightMatrix {
    const WeightType * wt = nullptr;
    std::string name;
    int64_t rows = 0;
    int64_t cols = 0;
    size_t  row_bytes = 0;
    const uint8_t * data = nullptr;

    const uint8_t * row(int64_t r) const { return data + (size_t) r * row_bytes; }
};

struct FfnLayer {
    int        il = -1;
    Activation act = Activation::Silu;
    bool       gated = false;
    int64_t    n_embd = 0;
    int64_t    n_ff = 0;
    int64_t    n_out = 0;
    WeightMatrix gate; // n_ff rows of n_embd (absent when !gated)
    WeightMatrix up;   // n_ff rows of n_embd
    WeightMatrix down; // n_out rows of n_ff, as stored in GGUF
    std::vector<float> gate_bias, up_bias, down_bias; // empty when absent
};

constexpr int kDensePhases = 4;

// Scratch for evaluating FFNs of up to capacity() tokens. Grown at graph
// build time (single thread); the phases only use it.
class FfnScratch {
public:
    void reserve(const FfnLayer & layer, int64_t n_tokens);
    int64_t capacity() const { return capacity_; }

    uint8_t * xq_gate = nullptr;
    uint8_t * xq_up = nullptr;
    float *   h = nullptr;
    uint8_t * hq = nullptr;

private:
    std::vector<uint8_t> mem_;
    int64_t capacity_ = 0;
    size_t  xq_bytes_ = 0, h_bytes_ = 0, hq_bytes_ = 0; // per token, largest over layers
};

// Runs one phase for threads ith of nth. x: n_tokens rows of n_embd floats;
// y: n_tokens rows of n_out floats.
void dense_ffn_phase(const FfnLayer & layer, FfnScratch & scratch, int phase,
                     const float * x, float * y, int64_t n_tokens, int ith, int nth);

// [begin, end) of n items for thread ith of nth, in whole multiples of `grain`
std::pair<int64_t, int64_t> split_range(int64_t n, int ith, int nth, int64_t grain = 1);

} // namespace neuralink
