#pragma once

// Negative log-likelihood of each row's target token under its logits: what perplexity scoring needs from a
// window's (tokens, n_vocab) logits, without materialising their softmax.

#include <cstdint>

namespace neuralink {

// out[r] = log(sum_v exp(logits[r, v])) - logits[r, targets[r]] for each of n_rows rows of n_vocab floats,
// the sum taken in double after subtracting the row's maximum. Rows are shared among `threads` threads.
void token_nll(const float * logits, int64_t n_rows, int64_t n_vocab, const int64_t * targets, double * out,
               int threads);

} // namespace neuralink
