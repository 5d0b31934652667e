#pragma once

// Rows of one weight type against a batch of activation rows, through ggml's
// own mul_mat on the calling thread: for prompt batches, where ggml's batched
// kernels (its tiled GEMM for K-quants, where built) beat one vec_dot per
// (row, token). The rows need not be contiguous, only equally spaced, so a
// stretch of bundle records is a matrix as it lies.

#include "neuralink/weight_types.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace neuralink {

// Batches of at least this many tokens go through rows_times_tokens (ggml's tiled GEMM takes batches of 8 up).
constexpr int64_t kGemmMinTokens = 8;

// Whether rows `stride` bytes apart can be handed to ggml as one matrix of `wt` (whole blocks apart, no overlap).
bool gemm_stride_ok(const WeightType & wt, int64_t n_embd, size_t stride);

// out[t * out_stride + r] = row r . xq[t] for r < n_rows, t < n_tokens: row r at rows + r * stride (n_embd values
// of wt; gemm_stride_ok), xq n_tokens contiguous rows of n_embd activations already in wt's vec_dot type (as phase
// 0 converted them). `work` is grown to ggml's work buffer. Throws std::runtime_error when ggml reports a failure.
void rows_times_tokens(const WeightType & wt, const uint8_t * rows, size_t stride, int64_t n_rows, int64_t n_embd,
                       const uint8_t * xq, int64_t n_tokens, float * out, int64_t out_stride, std::vector<uint8_t> & work);

// the bytes of `work` rows_times_tokens needs for n_rows rows of wt against n_tokens tokens (ggml's own plan)
size_t rows_times_tokens_work_bytes(const WeightType & wt, int64_t n_rows, int64_t n_embd, int64_t n_tokens);

// the records of one batched product in compute_h (bounds its result buffers)
constexpr size_t kStretchRecords = 256;

} // namespace neuralink
