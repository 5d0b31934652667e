#pragma once

// Sparse FFN evaluation from the sidecar's bundle store. Per layer, four
// phases on every compute thread:
//   0  x -> xq: activations converted to the gate/up vec_dot types
//   1  over the thread's own range of positions: predict the candidate neurons
//   2  over the thread's share of all the candidates (an equal count each, in
//      position order: placement clusters hot neurons, so equal ranges would
//      not be equal work): look them up in the cache, plan collapsed reads for
//      the misses and submit them at once, then compute h = act(g) * u neuron
//      by neuron as cache hits and completed reads allow (compute overlaps the
//      reads). With the split layout a second wave follows: the down columns
//      of the neurons whose h passed the criterion, from the cache or read the
//      same way.
//   3  a layer whose down projection reads rows (use_down_rows): h made zero
//      outside the final neurons and converted to the rows' vec_dot type, the
//      blocks split across threads; nothing for the others
//   4  y = down h over the final neurons, each thread owning a slice of the
//      output rows (no reduction): the down columns of the final neurons, or
//      every down row against h
// The result equals the dense FFN of the thresholded model: h is zero for a
// neuron the predictor leaves out (and, for exact predictors, where the
// criterion says so for a token). Every record read from the sidecar is
// checked against its checksum before it is used or cached.

#include "neuralink/bundle_cache.h"
#include "neuralink/defaults.h"
#include "neuralink/ffn_layer.h"
#include "neuralink/gate_stream.h"
#include "neuralink/io_pool.h"
#include "neuralink/read_planner.h"
#include "neuralink/read_queue.h"
#include "neuralink/region_stream.h"
#include "neuralink/sidecar_store.h"
#include "neuralink/store_arena.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace neuralink {

enum class Predictor { Dense, Gate, Oracle, LowRank };
const char * predictor_name(Predictor p);
Predictor predictor_from_name(const std::string & name); // throws std::invalid_argument

struct SparseOptions {
    Predictor predictor = Predictor::Gate;
    CachePolicy cache_policy = CachePolicy::Linking;
    size_t cache_bytes = 0;
    int queue_depth = kDefaultQueueDepth; // reads in flight: per compute thread with io_uring, in all with the pread pool
    IoBackend io_backend = IoBackend::Auto; // io_uring where the kernel allows, else the pread pool
    uint64_t collapse_gap_bytes = UINT64_MAX; // merge runs whose gap is at most this; UINT64_MAX: from the cost model
    uint64_t max_read_bytes = kDefaultMaxReadBytes;
    DeviceCost device;
    // adapt the read cost (and so the collapse gap) to the reads' own timing while running, starting from
    // `device` with the latency that gives collapse_gap_bytes when that is set (AdaptiveCollapse)
    bool adaptive_collapse = false;
    bool direct_io = true;
    // per-layer activity thresholds replacing the sidecar's, to run at another density without converting
    // again (empty: the sidecar's); a neuron is active when its criterion value exceeds the threshold
    std::vector<float> thresholds;
    // per-layer low-rank predictor thresholds replacing the sidecar's (empty: the sidecar's)
    std::vector<float> predictor_thresholds;
    // per-layer candidate thresholds of the contribution criterion replacing the sidecar's (empty: the sidecar's)
    std::vector<float> candidate_thresholds;
    // check every record read against its checksum (off only to measure what checking costs)
    bool verify_checksums = true;
};

// What llama.cpp computes a layer from, apart from the bundles.
struct SparseLayerWeights {
    int il = -1;
    Activation act = Activation::Silu;
    bool gated = false;
    int64_t n_embd = 0, n_ff = 0, n_out = 0;
    WeightMatrix gate;        // gate rows in placed order (gate/oracle predictors on gated models); data null
                              // while the rows are streamed (SparseFfn::stream_gate_rows), set per evaluation
    WeightMatrix up;          // resident up rows (oracle on non-gated models, and with the contribution criterion)
    WeightMatrix down;        // resident down rows (n_out rows of n_ff, the converted GGUF's ffn_down, placed order)
                              // when the down projection reads rows instead of columns (SparseFfn::use_down_rows)
    WeightMatrix trial_down;  // down rows on trial (SparseFfn::try_down_rows): decoded tokens alternate between
                              // them and the down columns until the trial keeps the faster
    std::vector<float> gate_bias, up_bias, down_bias; // placed order; empty when absent
};

// One layer evaluation's counters.
struct LayerStepStats {
    uint32_t il = 0;
    uint32_t n_tokens = 0;
    uint32_t predicted = 0;     // neurons evaluated (union over the tokens)
    int32_t  truly_active = -1; // neurons active by the criterion, -1 when the predictor cannot know
    uint32_t reads = 0;
    uint32_t cache_hits = 0;
    uint64_t bytes_read = 0;
    uint64_t active_bytes = 0;  // record bytes of the evaluated neurons
    uint64_t io_ns = 0;         // first read issued -> last read completed
    uint64_t stall_ns = 0;      // longest time a compute thread waited for reads (the I/O not hidden by compute),
                                // streamed gate rows included
    uint64_t layer_ns = 0;      // phase 0 start -> the down projection's end (thread 0's view)
    uint64_t predicted_pairs = 0; // (token, neuron) pairs the predictor selected
    uint64_t computed_pairs = 0;  // (token, neuron) pairs whose h entered the down projection
    uint32_t final_neurons = 0;   // neurons whose down column entered the projection (union over the tokens)
    uint32_t down_reads = 0;      // of `reads`: reads of the down region (split layout)
    uint32_t down_cache_hits = 0; // of `cache_hits`: down columns found in the cache
    uint64_t down_bytes_read = 0; // of `bytes_read`: bytes read from the down region
};

class SparseFfn {
public:
    static constexpr int kPhases = 5;

    SparseFfn(std::shared_ptr<SidecarStore> store, const SparseOptions & options);
    ~SparseFfn();

    // a layer's resident weights; `L.il` indexes the sidecar's layers
    void add_layer(SparseLayerWeights L);
    bool has_layer(int il) const { return il >= 0 && il < (int) layers_.size() && layers_[il] != nullptr; }
    const SparseLayerWeights & layer(int il) const { return *layers_.at((size_t) il); }

    // grows scratch for n_tokens (graph build time, single thread)
    void reserve(int il, int64_t n_tokens);
    void phase(int il, int phase, const float * x, float * y, int64_t n_tokens, int ith, int nth);

    const SparseOptions & options() const { return options_; }
    // the activity, low-rank predictor and candidate thresholds in use for layer il (the options' or the sidecar's)
    float threshold(int il) const;
    float predictor_threshold(int il) const;
    float candidate_threshold(int il) const;
    // Replaces the per-layer thresholds (between evaluations only; an empty vector keeps the sidecar's).
    void set_thresholds(std::vector<float> thresholds, std::vector<float> candidate_thresholds,
                        std::vector<float> predictor_thresholds);
    const SidecarStore & store() const { return *store_; }
    // the cache's counters (of the store arena when the budget holds the whole store)
    CacheStats cache_stats() const { return arena_ ? arena_->stats() : cache_->stats(); }
    // Replaces the cache (between evaluations only); the pinned policy reads its records here. A budget that
    // holds every record of the store gets the store arena instead (any policy but none and pinned): the same
    // records kept, without eviction, locks or copies.
    void configure_cache(CachePolicy policy, size_t bytes);
    // Whether the cache is the store arena (its budget holds every record of the store).
    bool holds_store() const { return arena_ != nullptr; }
    // Whether the record regions are read whole, ahead of their layer (the stream policy: RegionStream).
    bool streams_regions() const { return stream_ != nullptr; }
    // the two buffers the stream policy reads regions into: two of the largest streamed part's aligned span (of
    // the largest region's before the stream starts)
    size_t stream_buffer_bytes() const;
    // Bytes of the records the stream policy keeps in DRAM: the head of every region (the same fraction of each,
    // read once when the cache is configured), which the stream then skips; 0 under any other policy.
    uint64_t stream_head_bytes() const;
    // the I/O buffers a layer's reads need at worst without the stream policy: a layer's records
    uint64_t layer_read_bytes() const;
    // The expected time of one decoded token's collapsed reads over the time of the stream's reads, under the
    // read cost in use: each record needed independently at its profiled frequency (candidates' bundle records,
    // final neurons' down columns), the most frequent ones pinned in `cache_bytes` as the pinned policy would;
    // the stream reads every region whole less the heads the same bytes hold (stream_head_counts). Near 1 or
    // above: the collapsed reads cover what the stream reads anyway.
    double collapsed_read_cost_ratio(size_t cache_bytes) const;
    // What the `auto` policy is for a cache of `bytes`: the store arena (linking) when it holds the whole
    // store; else stream when collapsed reads would cost at least kStreamCostRatio of reading the regions
    // whole and the stream's buffers fit in `bytes` plus the read buffers they replace; else pinned.
    CachePolicy auto_policy(size_t bytes) const;
    // between the ratios measured on either side of the crossover (0.48: pinned as fast; 0.73: stream 15 %
    // faster; docs/engine.md): streaming overlaps its reads with compute, so it wins while reading more bytes
    static constexpr double kStreamCostRatio = 0.6;
    // Whether a cache of `bytes` would be the store arena (with a policy that allows one).
    bool arena_fits(size_t bytes) const;
    // Reads every record of the store into the arena in long sequential reads, `threads` of them at once,
    // checking each record's checksum (between evaluations only). Does nothing without the arena. Returns
    // the bytes read. Throws IoError for a failed read or a record that fails its checksum.
    uint64_t fill_arena(int threads = 2);
    // bytes of all bundle records of all layers
    uint64_t store_bytes() const;
    // the cache capacity (records and the cache's tables) that holds every record of the store
    size_t cache_bytes_to_hold_store() const;
    // bytes of resident predictor/gate/bias data, and down rows
    size_t resident_bytes() const { return resident_bytes_; }
    // From now on layer il's down projection multiplies `rows` (n_out rows of n_ff: the converted GGUF's ffn_down,
    // in placed order, as llama.cpp does) by h, zero outside the final neurons and converted to the rows'
    // vec_dot type, instead of adding the final neurons' down columns: for a store held whole in DRAM, where
    // rows stream at the memory's rate and the scattered columns do not (docs/engine.md). The layer's down
    // columns are then never read. Split layout only; between evaluations. Throws std::invalid_argument for
    // rows of the wrong shape, a joint layout or a layer not served.
    void use_down_rows(int il, WeightMatrix rows);
    bool down_by_rows(int il) const { return has_layer(il) && layers_[(size_t) il]->down.data != nullptr; }
    // Down rows on trial, for a store held whole in DRAM, where which of rows and columns costs less depends on
    // the machine (docs/engine.md): from now on decoded tokens (evaluations of one token) alternate between layer
    // il's down columns and `rows`, owned by `storage`, each token timed from the start of its evaluation to the
    // next's (all of it: what either does to the rest of the token counts); once kDownTrialTokens tokens each
    // way are timed, the rows are kept for every layer on trial (as use_down_rows keeps them) if their median
    // token is shorter by kDownTrialMargin at least, the columns' memory then freed from the store arena, else
    // the columns, the rows then freed. Prompt batches use the columns until then. Between
    // evaluations; the same refusals as use_down_rows, and a layer whose rows are in use or on trial already.
    void try_down_rows(int il, WeightMatrix rows, AlignedBuffer storage);
    static constexpr int kDownTrialTokens = 32;
    static constexpr double kDownTrialMargin = 0.02;
    struct DownTrial {
        int layers = 0;          // layers on trial (or, once settled, that were)
        int tokens = 0;          // decoded tokens timed, both ways together
        uint64_t rows_ns = 0;    // the median decoded token's time with rows (0 before any)
        uint64_t columns_ns = 0; // the same with columns
        bool settled = false;
        bool rows_kept = false;
    };
    DownTrial down_trial() const;
    // Whether layer il's down projection would cost less by rows of type `row_type`, `row_bytes` bytes each (n_out
    // of them), than by the down columns of the neurons it is expected to need (the sidecar's frequencies), with
    // what one byte of each costs (row_byte_cost, docs/engine.md).
    bool down_rows_pay(int il, ggml_type row_type, size_t row_bytes) const;
    // What a byte of K-quant down columns, scattered over DRAM, costs per byte of down rows of `row_type`. Measured
    // end to end on Qwen2.5-Coder-1.5B (AVX-512, fourteenth pass), rows of every neuron against q5_K columns of
    // 40 %: q4_K rows (this engine's AVX-512 q4_K dot) 3-5 % of a decoded token faster, q5_K and q6_K rows
    // (ggml's dots) 3-4 % slower, which puts a column byte at about 2.6, 2.1 and 2.6 row bytes; noisy, so set to
    // take q4_K rows at such densities and keep the columns otherwise. Columns in other types (q8_0, floats)
    // take simpler loops and count half (not measured in the engine).
    static double row_byte_cost(ggml_type row_type) { return row_type == GGML_TYPE_Q4_K ? 2.5 : 2.0; }
    // From now on, the gate rows of the layers with ranges[il].bytes > 0 are read from `file` each time the
    // layer runs (GateStream) instead of kept: their resident rows are no longer used and the caller may free
    // them. Between evaluations, once. Throws std::invalid_argument when a range does not match the layer's
    // resident rows, or when gate rows are streamed already.
    void stream_gate_rows(std::shared_ptr<const DirectFile> file, std::vector<GateRange> ranges);
    // layers whose gate rows are streamed (0: all resident)
    int gate_layers_streamed() const { return gate_stream_ ? gate_stream_->n_streamed() : 0; }
    // the buffer streamed gate rows are read into (kGateStreamBuffers of them; 0 without streaming)
    size_t gate_stream_bytes() const { return gate_stream_ ? gate_stream_->buffer_bytes() : 0; }
    // resident bytes streaming gave up: what the load held that resident_bytes() no longer counts
    uint64_t released_bytes() const { return released_bytes_; }
    // worst-case bytes of I/O and compute scratch
    size_t scratch_bytes() const;
    // the read cost reads are planned with now: the adaptive fit, or the options' fixed one
    DeviceCost read_cost() const { return collapse_ ? collapse_->cost() : options_.device; }
    // the largest gap, in bytes, read through now
    uint64_t collapse_gap_bytes() const;

    // Reading or computing failed: the message, empty when all is well. Once
    // set, layers produce zeros until cleared, so a wrong answer is never silent.
    std::string error() const;
    // the failure was a non-finite FFN output (NumericError), not a read (IoError)
    bool error_is_numeric() const;
    void clear_error();

    // The counters of every layer evaluation since the last call. At most kStatsKept are kept between calls (the
    // oldest half goes when full): a caller that never asks (llama-cpp-python's embed() decodes without
    // neuralink.Llama's eval) had let them grow ~2.9 KB a token on a 28-layer model, for the process's life.
    static constexpr size_t kStatsKept = size_t(1) << 15;
    std::vector<LayerStepStats> take_stats();

    // test seam: the read `after` reads from now fails with `fault`
    void inject_fault(InjectedFault fault, uint64_t after) { faults_.inject(fault, after); }
    // the read path in use, and why it is not io_uring when it is not
    IoBackend io_backend() const { return backend_; }
    const std::string & io_note() const { return io_note_; }

private:
    struct ThreadState;
    struct Pending;
    struct Wave;

    void predict(int il, int64_t n_tokens, int64_t r0, int64_t r1, ThreadState & ts);
    void convert_inputs(int il, const float * x, int64_t n_tokens, int ith, int nth);
    void predict_range(int il, int64_t n_tokens, int ith, int nth, ThreadState & ts);
    void take_share(int nth, int ith, ThreadState & ts) const;
    void read_and_compute(int il, int64_t n_tokens, int ith, int nth, ThreadState & ts);
    void record_stats(int il, int64_t n_tokens, int nth);
    void gather(int il, bool down, const std::vector<uint32_t> & positions, int64_t n_tokens, ThreadState & ts, Wave & w);
    template <class OnRecords>
    void complete(int il, bool down, ThreadState & ts, Wave & w, OnRecords on_records);
    void compute_h(int il, int64_t n_tokens, const uint8_t * const * records, const uint32_t * pos, size_t n, ThreadState & ts);
    void compute_h_batched(int il, int64_t n_tokens, const uint8_t * const * records, const uint32_t * pos, size_t n,
                           ThreadState & ts);
    struct LayerMath;
    LayerMath layer_math(int il) const;
    static bool finish_pair(const LayerMath & M, uint32_t p, float u, float g, float & hv);
    void finish_neuron(const LayerMath & M, int64_t n_tokens, uint32_t p, const uint8_t * rec, ThreadState & ts);
    void finish_stretch(const LayerMath & M, int64_t n_tokens, const uint32_t * pos, const uint8_t * const * records,
                        size_t m, ThreadState & ts, const float * u, const float * g);
    void check_thresholds(const std::vector<float> & given, const char * what) const;
    void down(int il, float * y, int64_t n_tokens, int ith, int nth);
    // the down projection by rows (sparse_down_rows.cpp): phase 3's h, phase 4's product
    void prepare_down_rows(int il, int64_t n_tokens, int ith, int nth);
    void down_rows(int il, float * y, int64_t n_tokens, int ith, int nth);
    // the down trial (try_down_rows): whether layer il's down projection reads rows in this evaluation; thread
    // 0's step at the start of each evaluation (phase 0 of the first layer on trial); the choice, made there
    bool rows_now(const SparseLayerWeights & L) const {
        return L.down.data != nullptr || (L.trial_down.data != nullptr && trial_rows_now_);
    }
    const WeightMatrix & down_rows_of(const SparseLayerWeights & L) const { return L.down.data ? L.down : L.trial_down; }
    void advance_down_trial(int64_t n_tokens);
    void settle_down_trial();
    void fail(const std::string & what, bool numeric = false);
    // layer il's streamed gate rows, done with: the stream's buffer takes the next streamed layer's
    void release_gate_rows(int il);
    ThreadState & thread_state(int ith);
    uint64_t gap_bytes(const DeviceCost & device) const;
    // The cache's keys: layer il's bundle records are key il, its down columns (split layout) key n_layer + il.
    uint32_t n_keys() const { return (uint32_t) (store_->split() ? 2 : 1) * (uint32_t) store_->n_layer(); }
    const BundleRegion & region_of_key(uint32_t key) const;
    // how often each record of a key is needed: candidates' bundle records, final neurons' down columns
    const std::vector<float> & frequency_of_key(uint32_t key) const;
    // bytes of one record of each cache key
    std::vector<size_t> record_bytes_by_key() const;

    std::shared_ptr<SidecarStore> store_;
    SparseOptions options_;
    FaultPlan faults_;
    IoBackend backend_ = IoBackend::Pread;
    std::string io_note_;
    std::unique_ptr<IoPool> pool_; // the pread path only
    std::unique_ptr<BundleCache> cache_;
    std::unique_ptr<StoreArena> arena_; // in place of cache_ (then null) when the budget holds the whole store
    std::vector<std::unique_ptr<SparseLayerWeights>> layers_;
    size_t resident_bytes_ = 0;
    uint64_t released_bytes_ = 0;
    std::unique_ptr<GateStream> gate_stream_; // null while every gate row is resident
    std::unique_ptr<AdaptiveCollapse> collapse_; // null: the options' fixed read cost and gap
    std::unique_ptr<RegionStream> stream_;       // the stream policy's reads (null under any other)
    int streamed_layer_ = -1;                     // the layer whose regions the stream last served
    size_t stream_item(int il, bool down) const { return store_->split() ? 2 * (size_t) il + (down ? 1 : 0) : (size_t) il; }
    void release_streamed(int il);
    // two of the largest region's aligned span: the stream's buffers without heads
    size_t whole_region_buffer_bytes() const;
    // The stream policy's reader and heads for a cache of `bytes`, or none.
    void start_stream(bool on, size_t bytes);
    // Per cache key, how many records at the head of its region the stream keeps in DRAM for a cache of `bytes`:
    // the same fraction of every region (so every layer's reads shrink alike and keep pace with its compute),
    // the largest for which the heads and the stream's two buffers fit in `bytes` plus the read buffers the
    // stream replaces; at least one record of each region is left to the stream.
    std::vector<uint32_t> stream_head_counts(size_t bytes) const;
    // the stream's held heads, by cache key: the first `count` records of the region, at `data`
    struct RegionHead {
        uint32_t count = 0;
        AlignedBuffer buf;
        const uint8_t * data = nullptr;
    };
    std::vector<RegionHead> stream_heads_;

    // shared per evaluation (layers run one after the other)
    int64_t capacity_ = 0;
    std::vector<uint8_t> xq_gate_, xq_up_;   // n_tokens rows in the vec_dot types
    std::vector<float> h_;                   // n_tokens x n_ff, placed order
    std::vector<uint8_t> hq_;                // n_tokens rows of h in the down rows' vec_dot type (use_down_rows)
    std::vector<uint8_t> token_active_;      // n_tokens x n_ff flags (1: the criterion holds for the token)
    std::vector<float> lowrank_z_;           // n_tokens x rank: A x, the low-rank predictor's inner values
    std::vector<const uint8_t *> record_of_; // n_ff: bundle record of each evaluated position
    std::vector<const uint8_t *> down_of_;   // n_ff: the record holding each final position's down column
    // one slot per compute thread, allocated up front so no thread ever sees the table move
    static constexpr int kMaxThreads = 256;
    std::vector<std::unique_ptr<ThreadState>> threads_;

    std::atomic<bool> failed_ { false };
    mutable std::mutex error_mutex_;
    std::string error_;
    bool error_numeric_ = false;

    // the down trial (try_down_rows)
    std::vector<AlignedBuffer> trial_storage_;
    int trial_first_layer_ = -1;  // the first layer on trial: its phase 0 starts each evaluation's step
    bool trial_rows_now_ = false; // this evaluation's layers on trial read rows
    int trial_last_way_ = -1;     // the last evaluation's way (0 columns, 1 rows) if it was a timed token, else -1
    uint64_t trial_last_start_ns_ = 0;
    std::vector<uint64_t> trial_token_ns_[2]; // each timed token's time, by way
    DownTrial trial_;
    mutable std::mutex trial_mutex_; // trial_ and the times: down_trial() may be asked while decoding

    uint64_t layer_start_ns_ = 0;
    uint64_t gate_wait_ns_ = 0; // this evaluation's wait for the layer's streamed gate rows (thread 0, phase 0)
    std::mutex stats_mutex_;
    std::vector<LayerStepStats> stats_;
};

} // namespace neuralink
