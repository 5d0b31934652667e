#pragma once

// SparseFfn's per-thread state, shared by its four source files: sparse_ffn.cpp
// (options, cache set-up, the phases), sparse_compute.cpp (prediction, h, the
// down projection), sparse_reads.cpp (cache lookups, planned reads,
// completions, the store's preload) and sparse_stream.cpp (the stream policy).

#include "neuralink/sparse_ffn.h"

namespace neuralink {

// A read in flight and what it covers.
struct SparseFfn::Pending {
    PendingRead read;
    PlannedRead plan;
};

// One wave of records of one region: the cache hits, and the reads of the misses.
struct SparseFfn::Wave {
    std::vector<uint32_t> misses;
    std::vector<const uint8_t *> hit_records;
    std::vector<uint32_t> hit_positions;
    AlignedBuffer cache_copies;     // records copied out of the cache
    AlignedBuffer read_arena;       // destinations of the reads
    std::vector<std::unique_ptr<Pending>> pending;
    size_t n_pending = 0;
    uint32_t cache_hits = 0;
    uint32_t reads = 0;
    uint64_t bytes_read = 0;
    uint64_t first_issue_ns = 0; // this wave's reads submitted (0: none)
    uint64_t last_done_ns = 0;   // and the last of them completed
};

// What one compute thread keeps between phases; other threads read it in phases 2 and 3.
struct SparseFfn::ThreadState {
    std::vector<uint32_t> active;   // candidate positions predicted in this thread's range (phase 1), sorted
    std::vector<uint8_t> any;       // phase 1: whether any token of the batch needs each neuron of the range
    std::vector<uint32_t> work;     // this thread's share of all threads' candidates (phase 2), sorted
    std::vector<uint32_t> finals;   // of those, the positions whose down column enters y, sorted
    Wave wave[2];                   // 0: the bundle region; 1: the down region (split layout)
    std::vector<float> tmp;         // dequantized slices of down columns (a prompt batch: kBatchColumns of them)
    std::vector<const uint8_t *> down_columns; // phase 3: this thread's slice of each final neuron's down column
    std::vector<float> down_h;                 // one token: the h each is scaled by
    std::vector<uint32_t> down_index;          // a batch: each one's neuron, its column of h
    std::unique_ptr<ReadQueue> queue;          // this thread's way to the device
    std::vector<const uint8_t *> read_records; // the needed records of one completed read
    std::vector<uint32_t> read_positions;
    std::vector<PendingRead *> batch;
    // prompt batches: ggml's work buffer, and the up (and gate) products of a stretch of records
    std::vector<uint8_t> gemm_work;
    std::vector<float> gemm_u, gemm_g;
    std::vector<uint8_t> stretch_flags; // per record of a stretch: the criterion held, h computed
    // counters of the current layer
    uint32_t truly_active = 0;
    uint64_t predicted_pairs = 0;
    uint64_t computed_pairs = 0;
    uint64_t first_issue_ns = 0;
    uint64_t last_done_ns = 0;
    uint64_t stall_ns = 0;
};

// Throws NumericError when an output y[t * n_out + e], t < n_tokens, e0 <= e < e1, of layer il is not finite.
void refuse_non_finite(int il, const float * y, int64_t n_tokens, int64_t n_out, int64_t e0, int64_t e1);

} // namespace neuralink
