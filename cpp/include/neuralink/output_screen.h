#pragma once

// The output matrix as a screen: under a memory budget, an untied output
// matrix (Qwen2.5-Coder-1.5B: 151,936 rows of q6_K, 182.6 MiB) is the largest
// thing llama.cpp reads every token. A coarse copy of it (q3_K: 95.6 MiB)
// stays in RAM instead and ranks the vocabulary; the rows within `margin`
// nats of the coarse maximum are read from the model file and multiplied
// exactly, as llama.cpp multiplies them. Greedy decoding then takes the token
// llama.cpp would (the coarse copy's error, 0.4-0.5 nats sd, is far inside the
// margin), and the likely tokens' logits are exact; the rest keep the coarse
// copy's, which moves the tail of the distribution a little (docs/engine.md,
// "The output screen").
//
// It runs as the FFN hook's output product (LLAMA_FFN_HOOK_KIND_OUTPUT) in
// four phases: the coarse logits (rows split over the threads), the rows to
// multiply exactly (one thread), the reads of those not in RAM and their
// exact logits (both split over the threads). The exact
// rows most recently used stay in RAM (a CLOCK cache of `cached_rows`): the
// likely tokens repeat (a space, a newline, the code's names), and a cap's
// page cache does not keep them. The others are asked of the kernel all at
// once (POSIX_FADV_WILLNEED) before the threads read them.

#include "neuralink/direct_file.h"
#include "neuralink/gguf_model.h"
#include "neuralink/weight_types.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace neuralink {

struct OutputScreenOptions {
    ggml_type coarse_type = GGML_TYPE_Q3_K;
    float     margin      = 10.0f; // nats below the coarse maximum whose rows are multiplied exactly
    int64_t   cached_rows = 4096;  // exact rows kept in RAM, the most recently used (5 MiB of Qwen's q6_K rows;
                                   // at most a sixteenth of the vocabulary)
    int       n_threads   = 1;     // for making the coarse copy
};

struct OutputScreenStats {
    uint64_t tokens = 0;     // rows of logits computed
    uint64_t exact_rows = 0; // rows multiplied exactly, over all of them
    uint64_t max_exact_rows = 0; // the most for one row of logits
    uint64_t rows_read = 0;  // exact rows read from the file (the rest were in the row cache)
};

class OutputScreen {
public:
    static constexpr int kPhases = 4;

    // Why the model's output matrix cannot be screened in `coarse_type` ("" when it can): tied (no
    // output.weight), a type without ggml's dot product, a row length the coarse type cannot encode, or a
    // coarse copy no smaller than the matrix.
    static std::string unsupported(const GgufModel & model, ggml_type coarse_type);

    // Reads the output matrix once and keeps its coarse copy; throws UnsupportedModelError (see above) or
    // IoError naming the file.
    OutputScreen(const GgufModel & model, const OutputScreenOptions & options);

    int64_t n_embd() const { return n_embd_; }
    int64_t n_vocab() const { return n_vocab_; }
    const std::string & name() const { return name_; }
    float margin() const { return options_.margin; }
    ggml_type coarse_type() const { return coarse_->type; }
    // the coarse copy and the row cache
    uint64_t resident_bytes() const { return (uint64_t) (coarse_bytes_.size() + cache_bytes_.size()) +
                                             (uint64_t) cache_row_.size() * sizeof(int64_t) +
                                             (uint64_t) slot_of_.size() * sizeof(int32_t); }
    // the output matrix it stands in for
    uint64_t matrix_bytes() const { return matrix_bytes_; }
    // what the phases keep on n_threads threads for the rows of logits reserved (one before llama.cpp builds
    // its graphs): the activations per thread, the lists of rows to multiply and read (kListedRows a row of
    // logits; more grow them, and rows beyond the row cache's slots take overflow slots)
    uint64_t scratch_bytes(int n_threads) const;
    static constexpr int64_t kListedRows = 2048;

    // when llama.cpp builds a graph: room for n_tokens rows of logits (n_outputs, one under a budget)
    void reserve(int64_t n_tokens);
    void phase(int phase, const float * x, float * y, int64_t n_tokens, int ith, int nth);

    OutputScreenStats stats() const;
    // a failed read of an exact row, kept for the caller (a graph's op cannot throw); "" when none
    std::string error() const;
    void clear_error();

private:
    void read_row(int64_t row, uint8_t * dst) const;
    const uint8_t * activations(const float * x, int64_t n_tokens) const;

    OutputScreenOptions options_;
    const WeightType * exact_ = nullptr;
    const WeightType * coarse_ = nullptr;
    std::string name_;
    std::unique_ptr<DirectFile> file_; // buffered: rows are read where the coarse ranking puts them
    int64_t n_embd_ = 0, n_vocab_ = 0;
    uint64_t offset_ = 0, matrix_bytes_ = 0;
    size_t exact_row_bytes_ = 0, coarse_row_bytes_ = 0, act_row_bytes_ = 0;
    std::vector<uint8_t> coarse_bytes_;

    // per call (phase 1): the rows to multiply exactly, each with the slot holding its bytes (the row cache's,
    // then overflow slots past them for rows beyond its size), and the rows to read into their slots (the
    // activations' type is both types' vec_dot_type: checked)
    struct Exact { int64_t token, row, slot; };
    struct Read { int64_t row, slot; };
    std::vector<Exact> exact_list_;
    std::vector<Read> reads_;
    std::vector<uint8_t> overflow_bytes_;
    void list_exact_rows(const float * y, int64_t n_tokens);
    uint8_t * slot_bytes(int64_t slot);
    // the cache slot of `row` (a hit, or a slot evicted for it), -1 when every slot holds a row of this call
    int32_t cache_slot(int64_t row, bool * hit);
    // the row cache: cached_rows rows, the row each slot holds (-1 none), a slot per vocabulary row (-1 none),
    // CLOCK's reference bits and hand; a slot used by this call (used_in_call_ == call_) is not evicted
    std::vector<uint8_t> cache_bytes_;
    std::vector<int64_t> cache_row_;
    std::vector<int32_t> slot_of_;
    std::vector<uint8_t> referenced_;
    std::vector<uint64_t> used_in_call_;
    uint64_t call_ = 0;
    size_t hand_ = 0;
    int64_t reserved_tokens_ = 1;

    // written by one thread in phase 1, read between graph computations
    std::atomic<uint64_t> tokens_ { 0 }, exact_rows_ { 0 }, max_exact_rows_ { 0 }, rows_read_ { 0 };
    mutable std::mutex error_mutex_;
    std::string error_;
};

} // namespace neuralink
