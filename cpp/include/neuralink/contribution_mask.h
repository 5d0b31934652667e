#pragma once

// The contribution criterion applied to a dense FFN's tensors, as the sparse engine applies it neuron by
// neuron: what the conversion's quality search and the perplexity sweep use to score a setting with
// llama.cpp's own forward pass (h zeroed where the engine would skip).

#include "neuralink/ffn_layer.h"

#include <cmath>
#include <cstdint>

namespace neuralink {

// The contribution criterion's two tests, one rule for the sparse engine and for zero_dropped_pairs: a
// (token, neuron) pair is a candidate (its up row is read) when |act(g)| * E|up| * |d| passes the candidate
// threshold, and final (its down column enters y) when |h| * |d| passes the threshold.
inline bool contribution_candidate(float a, float candidate_scale, float candidate_threshold) {
    return std::fabs(a) * candidate_scale > candidate_threshold;
}
inline bool contribution_final(float h, float down_norm, float threshold) {
    return std::fabs(h) * down_norm > threshold;
}

struct MaskCounts {
    uint64_t candidates = 0; // (token, neuron) pairs whose up row the engine reads
    uint64_t finals = 0;     // of those, the pairs whose down column enters y
    uint64_t changed = 0;    // pairs not final whose h is not 0: what zeroing changes in the dense FFN
};

// For each of n_rows tokens and n_ff neurons: a = act(gate[t, i]) (the engine's activate); the pair is a
// candidate when |a| * candidate_scale[i] > candidate_threshold, and final when it is a candidate and
// |h[t, i]| * down_norm[i] > threshold; h[t, i] becomes 0 where the pair is not final (with `apply`; without,
// h is left as it is and only counted). Rows are shared among `threads` threads.
MaskCounts zero_dropped_pairs(Activation act, const float * gate, float * h, int64_t n_rows, int64_t n_ff,
                              const float * candidate_scale, const float * down_norm, float candidate_threshold,
                              float threshold, int threads, bool apply = true);

} // namespace neuralink
