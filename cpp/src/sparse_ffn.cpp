#include "sparse_ffn_state.h"

#include "neuralink/errors.h"
#include "neuralink/names.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace neuralink {

static constexpr Named<Predictor> kPredictorNames[] = {
    { Predictor::Dense, "dense" }, { Predictor::Gate, "gate" }, { Predictor::Oracle, "oracle" },
    { Predictor::LowRank, "lowrank" },
};

const char * predictor_name(Predictor p) { return name_in(kPredictorNames, p); }
Predictor predictor_from_name(const std::string & name) { return value_in(kPredictorNames, name, "predictor"); }


SparseFfn::SparseFfn(std::shared_ptr<SidecarStore> store, const SparseOptions & options)
    : store_(std::move(store)), options_(options) {
    init_ggml_cpu();
    std::string why;
    if (options_.io_backend == IoBackend::Pread || !uring_available(&why)) {
        if (options_.io_backend == IoBackend::Uring) {
            throw IoError(store_->path() + ": io_uring was asked for but is not available: " + why);
        }
        backend_ = IoBackend::Pread;
        io_note_ = options_.io_backend == IoBackend::Pread ? "pread pool chosen" : why + "; using the pread pool";
        pool_ = std::make_unique<IoPool>(store_->file(), options_.queue_depth, &faults_);
    } else {
        backend_ = IoBackend::Uring;
    }
    check_thresholds(options_.thresholds, "activity");
    check_thresholds(options_.candidate_thresholds, "candidate");
    check_thresholds(options_.predictor_thresholds, "predictor");
    layers_.resize((size_t) store_->n_layer());
    threads_.resize(kMaxThreads);
    configure_cache(options_.cache_policy, options_.cache_bytes);
    if (options_.adaptive_collapse) {
        collapse_ = std::make_unique<AdaptiveCollapse>(options_.collapse_gap_bytes == UINT64_MAX
                ? options_.device : options_.device.with_gap(options_.collapse_gap_bytes));
    }
}

float SparseFfn::threshold(int il) const {
    return options_.thresholds.empty() ? store_->layer(il).threshold : options_.thresholds.at((size_t) il);
}

void SparseFfn::check_thresholds(const std::vector<float> & given, const char * what) const {
    if (given.empty()) {
        return;
    }
    if (given.size() != (size_t) store_->n_layer()) {
        throw std::invalid_argument(store_->path() + ": " + std::to_string(given.size()) + " " + what +
                                    " thresholds given for " + std::to_string(store_->n_layer()) + " layers");
    }
    for (size_t il = 0; il < given.size(); ++il) {
        if (std::isnan(given[il])) {
            throw std::invalid_argument(std::string(what) + " threshold of layer " + std::to_string(il) + " is NaN");
        }
    }
    if (std::string(what) == "predictor" && store_->predictor_rank() == 0) {
        throw std::invalid_argument(store_->path() + ": predictor thresholds given, but the sidecar has no "
                                    "low-rank predictor");
    }
    if (std::string(what) == "candidate" && store_->criterion_kind() != Criterion::Contribution) {
        throw std::invalid_argument(store_->path() + ": candidate thresholds apply to the contribution criterion, "
                                    "this sidecar's is '" + store_->criterion() + "'");
    }
}

void SparseFfn::set_thresholds(std::vector<float> thresholds, std::vector<float> candidate_thresholds,
                               std::vector<float> predictor_thresholds) {
    check_thresholds(thresholds, "activity");
    check_thresholds(candidate_thresholds, "candidate");
    check_thresholds(predictor_thresholds, "predictor");
    options_.thresholds = std::move(thresholds);
    options_.candidate_thresholds = std::move(candidate_thresholds);
    options_.predictor_thresholds = std::move(predictor_thresholds);
}

float SparseFfn::candidate_threshold(int il) const {
    return options_.candidate_thresholds.empty() ? store_->layer(il).candidate_threshold
                                                 : options_.candidate_thresholds.at((size_t) il);
}

float SparseFfn::predictor_threshold(int il) const {
    return options_.predictor_thresholds.empty() ? store_->layer(il).predictor_threshold
                                                 : options_.predictor_thresholds.at((size_t) il);
}

uint64_t SparseFfn::store_bytes() const {
    uint64_t bytes = 0;
    for (int il = 0; il < store_->n_layer(); ++il) {
        const SidecarLayer & S = store_->layer(il);
        bytes += (uint64_t) S.region.record_bytes * S.region.n_records +
                 (uint64_t) S.down_region.record_bytes * S.down_region.n_records;
    }
    return bytes;
}

const BundleRegion & SparseFfn::region_of_key(uint32_t key) const {
    const int n_layer = store_->n_layer();
    return (int) key < n_layer ? store_->layer((int) key).region : store_->layer((int) key - n_layer).down_region;
}

const std::vector<float> & SparseFfn::frequency_of_key(uint32_t key) const {
    const int n_layer = store_->n_layer();
    return (int) key < n_layer ? store_->layer((int) key).candidate_frequency : store_->layer((int) key - n_layer).frequency;
}

std::vector<size_t> SparseFfn::record_bytes_by_key() const {
    std::vector<size_t> record_bytes;
    for (uint32_t key = 0; key < n_keys(); ++key) record_bytes.push_back(region_of_key(key).record_bytes);
    return record_bytes;
}

size_t SparseFfn::cache_bytes_to_hold_store() const {
    return BundleCache::bytes_to_hold(options_.cache_policy, record_bytes_by_key(), (size_t) store_->n_ff());
}

bool SparseFfn::arena_fits(size_t bytes) const {
    return bytes >= StoreArena::bytes_for(record_bytes_by_key(), (size_t) store_->n_ff());
}

// the longest read pinning makes: a stretch of records from the one asked for (a layer's region at most)
static constexpr size_t kPinReadBytes = 256 << 10;

void SparseFfn::configure_cache(CachePolicy policy, size_t bytes) {
    const int n_layer = store_->n_layer();
    const std::vector<size_t> record_bytes = record_bytes_by_key();
    std::vector<std::vector<float>> frequency; // by key, as record_bytes
    for (uint32_t key = 0; key < n_keys(); ++key) frequency.push_back(frequency_of_key(key));
    const size_t n_ff = (size_t) store_->n_ff();
    std::unique_ptr<StoreArena> arena;
    if (policy != CachePolicy::None && policy != CachePolicy::Pinned && policy != CachePolicy::Stream &&
        arena_fits(bytes)) {
        // everything fits: nothing would ever be evicted, so no policy has anything to decide
        arena = std::make_unique<StoreArena>(record_bytes, n_ff, bytes);
    }
    // one of the two holds the records: every use of cache_ is on the path without the arena
    std::unique_ptr<BundleCache> cache;
    if (!arena) {
        BundleCacheOptions cache_options;
        cache_options.max_entries = record_bytes.size() * n_ff;
        cache = std::make_unique<BundleCache>(policy, bytes, record_bytes, cache_options);
    }
    if (policy == CachePolicy::Pinned) {
        // records come in (key, position) order and hot ones lie side by side: each read takes up to
        // kPinReadBytes from the record asked for, and the records after it are served from that read
        struct Window { uint32_t key = UINT32_MAX, first = 0, count = 0; AlignedBuffer buf; const uint8_t * start = nullptr; };
        Window win;
        cache->pin_hottest(frequency, [this, n_layer, &win](uint32_t key, uint32_t pos, uint8_t * dst) {
            const bool down = (int) key >= n_layer;
            const int il = down ? (int) key - n_layer : (int) key;
            const BundleRegion & region = region_of_key(key);
            if (win.key != key || pos < win.first || pos >= win.first + win.count) {
                const uint32_t per = (uint32_t) std::max<size_t>(1, kPinReadBytes / std::max<size_t>(region.record_bytes, 1));
                win.count = std::min(per, region.n_records - pos);
                win.buf = store_->file().read_range(region.record_offset(pos), (size_t) win.count * region.record_bytes,
                                                    &win.start);
                win.key = key;
                win.first = pos;
            }
            const uint8_t * start = win.start + (size_t) (pos - win.first) * region.record_bytes;
            if (options_.verify_checksums) {
                store_->check_record(il, down, pos, start);
            }
            std::memcpy(dst, start, region.record_bytes);
        });
    }
    start_stream(policy == CachePolicy::Stream, bytes);
    cache_ = std::move(cache);
    arena_ = std::move(arena);
    options_.cache_policy = policy;
    options_.cache_bytes = bytes;
}

SparseFfn::~SparseFfn() = default;

void SparseFfn::add_layer(SparseLayerWeights L) {
    if (L.il < 0 || L.il >= store_->n_layer()) {
        throw std::invalid_argument("layer " + std::to_string(L.il) + " is not in the sidecar");
    }
    resident_bytes_ += L.gate.row_bytes * (size_t) L.gate.rows + L.up.row_bytes * (size_t) L.up.rows +
            sizeof(float) * (L.gate_bias.size() + L.up_bias.size() + L.down_bias.size());
    const int il = L.il;
    layers_[(size_t) il] = std::make_unique<SparseLayerWeights>(std::move(L));
}

void SparseFfn::stream_gate_rows(std::shared_ptr<const DirectFile> file, std::vector<GateRange> ranges) {
    if (gate_stream_) {
        throw std::invalid_argument(store_->path() + ": gate rows are streamed already");
    }
    if (ranges.size() != layers_.size()) {
        throw std::invalid_argument(std::to_string(ranges.size()) + " gate ranges given for " +
                                    std::to_string(layers_.size()) + " layers");
    }
    uint64_t released = 0;
    for (size_t il = 0; il < ranges.size(); ++il) {
        if (ranges[il].bytes == 0) continue;
        const SparseLayerWeights * L = layers_[il].get();
        if (!L || !L->gate.data || L->gate.row_bytes * (size_t) L->gate.rows != ranges[il].bytes) {
            throw std::invalid_argument("layer " + std::to_string(il) + " has no resident gate rows of " +
                                        std::to_string(ranges[il].bytes) + " bytes to stream");
        }
        released += ranges[il].bytes;
    }
    gate_stream_ = std::make_unique<GateStream>(std::move(file), ranges, &faults_, backend_);
    for (size_t il = 0; il < ranges.size(); ++il) {
        if (ranges[il].bytes > 0) layers_[il]->gate.data = nullptr;
    }
    resident_bytes_ -= (size_t) released;
    released_bytes_ += released;
}

void SparseFfn::release_gate_rows(int il) {
    if (!gate_stream_ || !gate_stream_->streams(il)) return;
    gate_stream_->release(il);
    layers_[(size_t) il]->gate.data = nullptr; // the buffer now takes the next layer's rows
}

void SparseFfn::reserve(int il, int64_t n_tokens) {
    const SparseLayerWeights & L = *layers_.at((size_t) il);
    const SidecarLayer & S = store_->layer(il);
    const size_t xq_gate = S.gate.wt ? S.gate.wt->act_row_bytes(L.n_embd) : 0;
    const size_t xq_gate_resident = L.gate.wt ? L.gate.wt->act_row_bytes(L.n_embd) : 0;
    const size_t xq_up = S.up.wt->act_row_bytes(L.n_embd);
    const size_t xq_up_resident = L.up.wt ? L.up.wt->act_row_bytes(L.n_embd) : 0;
    const size_t tokens = (size_t) std::max(n_tokens, capacity_);
    auto grow = [&](auto & v, size_t n) { if (v.size() < n) v.resize(n); };
    grow(xq_gate_, tokens * std::max(xq_gate, xq_gate_resident));
    grow(xq_up_, tokens * std::max(xq_up, xq_up_resident));
    grow(h_, tokens * (size_t) L.n_ff);
    if (const WeightMatrix & D = down_rows_of(L); D.data) grow(hq_, tokens * D.wt->act_row_bytes(L.n_ff));
    grow(token_active_, tokens * (size_t) L.n_ff);
    grow(record_of_, (size_t) L.n_ff);
    grow(down_of_, (size_t) L.n_ff);
    grow(lowrank_z_, tokens * (size_t) store_->predictor_rank());
    capacity_ = (int64_t) tokens;
}

size_t SparseFfn::scratch_bytes() const {
    size_t bytes = xq_gate_.size() + xq_up_.size() + h_.size() * sizeof(float) + hq_.size() + token_active_.size() +
            (record_of_.size() + down_of_.size()) * sizeof(void *);
    if (stream_) bytes += stream_->buffer_bytes();
    for (const auto & ts : threads_) {
        if (ts) {
            for (const Wave & w : ts->wave) bytes += w.cache_copies.size() + w.read_arena.size();
        }
    }
    return bytes;
}

SparseFfn::ThreadState & SparseFfn::thread_state(int ith) {
    if (ith < 0 || ith >= kMaxThreads) {
        throw std::runtime_error("compute thread " + std::to_string(ith) + " beyond the engine's " +
                                 std::to_string(kMaxThreads) + " thread slots");
    }
    // only thread ith touches slot ith, so creating it needs no lock
    if (!threads_[ith]) {
        threads_[ith] = std::make_unique<ThreadState>();
    }
    return *threads_[ith];
}

void SparseFfn::fail(const std::string & what, bool numeric) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (error_.empty()) {
        error_ = what;
        error_numeric_ = numeric;
    }
    failed_.store(true, std::memory_order_release);
}

std::string SparseFfn::error() const {
    std::lock_guard<std::mutex> lock(error_mutex_);
    return error_;
}

bool SparseFfn::error_is_numeric() const {
    std::lock_guard<std::mutex> lock(error_mutex_);
    return error_numeric_;
}

void SparseFfn::clear_error() {
    std::lock_guard<std::mutex> lock(error_mutex_);
    error_numeric_ = false;
    if (pool_) {
        pool_->clear_error();
    }
    error_.clear();
    failed_.store(false, std::memory_order_release);
}

std::vector<LayerStepStats> SparseFfn::take_stats() {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    std::vector<LayerStepStats> out;
    out.swap(stats_);
    return out;
}

// converts rows of floats into `type`, the blocks split across threads (as the dense path does)
static void convert_rows_split(const WeightType & wt, const float * x, int64_t n_tokens, int64_t n, uint8_t * dst,
                               int ith, int nth) {
    const int64_t bs = ggml_blck_size(wt.vec_dot_type);
    const size_t bb = ggml_type_size(wt.vec_dot_type);
    const size_t row = wt.act_row_bytes(n);
    const int64_t per_row = n / bs;
    const auto [b0, b1] = split_range(n_tokens * per_row, ith, nth);
    for (int64_t b = b0; b < b1;) {
        const int64_t t = b / per_row, first = b % per_row;
        const int64_t last = std::min(per_row, first + (b1 - b));
        wt.act_from_float(x + t * n + first * bs, dst + t * row + first * bb, (last - first) * bs);
        b += last - first;
    }
}

// phase 0: x converted to the gate/up vec_dot types (and A x for the low-rank predictor), split across threads
void SparseFfn::convert_inputs(int il, const float * x, int64_t n_tokens, int ith, int nth) {
    const SparseLayerWeights & L = *layers_[il];
    const SidecarLayer & S = store_->layer(il);
    if (ith == 0) {
        layer_start_ns_ = steady_now_ns();
        if (il == 0) {
            store_->check_unchanged();
        }
        if (il == trial_first_layer_) advance_down_trial(n_tokens);
        gate_wait_ns_ = 0;
        if (gate_stream_ && gate_stream_->streams(il)) {
            // read ahead since the layer before released its rows; the barrier after this phase publishes the
            // pointer. Every thread waits at that barrier while this one waits for the rows: a stall like a wait
            // for records (the share of a token spent waiting decides on prompt lookup drafts)
            const uint64_t t0 = steady_now_ns();
            layers_[il]->gate.data = gate_stream_->acquire(il);
            gate_wait_ns_ = steady_now_ns() - t0;
        }
        if (stream_) {
            // the layer before is done with its regions: their buffers take the next ones; this layer's are
            // held (read ahead), or read now when layers ran out of order (no thread uses a record here)
            if (streamed_layer_ >= 0 && streamed_layer_ != il) release_streamed(streamed_layer_);
            streamed_layer_ = il;
            stream_->prepare(stream_item(il, false), store_->split() ? 2 : 1);
        }
    }
    // resident rows are the model's own, bundle rows verbatim copies: one conversion serves both
    if (const WeightType * gate_wt = L.gate.wt ? L.gate.wt : S.gate.wt) {
        convert_rows_split(*gate_wt, x, n_tokens, L.n_embd, xq_gate_.data(), ith, nth);
    }
    if (options_.predictor == Predictor::LowRank) {
        // z = A x, the tokens split across threads
        const int rank = store_->predictor_rank();
        const auto [t0, t1] = split_range(n_tokens, ith, nth);
        for (int64_t t = t0; t < t1; ++t) {
            const float * xt = x + t * L.n_embd;
            for (int k = 0; k < rank; ++k) {
                const float * a = S.predictor_a.data() + (size_t) k * L.n_embd;
                float v = 0.0f;
                for (int64_t i = 0; i < L.n_embd; ++i) v += a[i] * xt[i];
                lowrank_z_[(size_t) t * rank + k] = v;
            }
        }
    }
    convert_rows_split(*S.up.wt, x, n_tokens, L.n_embd, xq_up_.data(), ith, nth);
}

// phase 1: the candidates among this thread's range of positions
void SparseFfn::predict_range(int il, int64_t n_tokens, int ith, int nth, ThreadState & ts) {
    const SparseLayerWeights & L = *layers_[il];
    const auto [r0, r1] = split_range(L.n_ff, ith, nth, kRowBlock);
    predict(il, n_tokens, r0, r1, ts);
}

// after the down projection, on thread 0: the layer's counters, summed over the threads
void SparseFfn::record_stats(int il, int64_t n_tokens, int nth) {
    const SidecarLayer & S = store_->layer(il);
    LayerStepStats st;
    st.il = (uint32_t) il;
    st.n_tokens = (uint32_t) n_tokens;
    uint64_t first = UINT64_MAX, last = 0;
    uint32_t truly = 0;
    for (int j = 0; j < nth; ++j) {
        const ThreadState & o = *threads_[j];
        st.predicted += (uint32_t) o.active.size();
        st.final_neurons += (uint32_t) o.finals.size();
        truly += o.truly_active;
        st.predicted_pairs += o.predicted_pairs;
        st.computed_pairs += o.computed_pairs;
        for (int k = 0; k < 2; ++k) {
            st.reads += o.wave[k].reads;
            st.cache_hits += o.wave[k].cache_hits;
            st.bytes_read += o.wave[k].bytes_read;
        }
        st.down_reads += o.wave[1].reads;
        st.down_cache_hits += o.wave[1].cache_hits;
        st.down_bytes_read += o.wave[1].bytes_read;
        st.stall_ns = std::max(st.stall_ns, o.stall_ns);
        if (o.first_issue_ns) {
            first = std::min(first, o.first_issue_ns);
            last = std::max(last, o.last_done_ns);
        }
    }
    if (gate_stream_ && gate_stream_->streams(il)) {
        // the layer's gate rows, read whole (ahead of time) for this evaluation, and what phase 0 waited for them
        const SparseLayerWeights & L = *layers_[il];
        st.reads += 1;
        st.bytes_read += L.gate.row_bytes * (uint64_t) L.gate.rows;
        st.stall_ns += gate_wait_ns_;
    }
    if (stream_) {
        // the layer's regions, read whole ahead of time for this evaluation
        for (const bool down : { false, true }) {
            if (down && !store_->split()) continue;
            const size_t item = stream_item(il, down);
            const uint64_t bytes = RegionStream::span_bytes(stream_->item(item));
            st.reads += 1;
            st.bytes_read += bytes;
            st.io_ns += stream_->read_ns(item);
            if (down) {
                st.down_reads += 1;
                st.down_bytes_read += bytes;
            }
        }
    }
    if (collapse_) {
        // each wave of all threads, submitted together, as one observation of the device
        for (int k = 0; k < 2; ++k) {
            uint64_t reads = 0, bytes = 0, w_first = UINT64_MAX, w_last = 0;
            for (int j = 0; j < nth; ++j) {
                const Wave & w = threads_[j]->wave[k];
                if (w.reads == 0) continue;
                reads += w.reads;
                bytes += w.bytes_read;
                w_first = std::min(w_first, w.first_issue_ns);
                w_last = std::max(w_last, w.last_done_ns);
            }
            if (reads > 0 && w_last > w_first) collapse_->observe(reads, bytes, w_last - w_first);
        }
    }
    st.truly_active = (int32_t) truly;
    st.active_bytes = (uint64_t) st.predicted * S.region.record_bytes +
                      (uint64_t) st.final_neurons * S.down_region.record_bytes;
    if (!stream_) st.io_ns = last > first ? last - first : 0;
    st.layer_ns = steady_now_ns() - layer_start_ns_;
    std::lock_guard<std::mutex> lock(stats_mutex_);
    if (stats_.size() >= kStatsKept) {
        stats_.erase(stats_.begin(), stats_.begin() + (std::ptrdiff_t) (stats_.size() / 2));
    }
    stats_.push_back(st);
}

void SparseFfn::phase(int il, int phase, const float * x, float * y, int64_t n_tokens, int ith, int nth) {
    const SparseLayerWeights & L = *layers_[il];
    if (failed_.load(std::memory_order_acquire)) {
        if (phase == kPhases - 1) {
            const auto [t0, t1] = split_range(n_tokens, ith, nth);
            std::memset(y + t0 * L.n_out, 0, sizeof(float) * (size_t) ((t1 - t0) * L.n_out));
        }
        return;
    }
    ThreadState & ts = thread_state(ith);
    try {
        switch (phase) {
            case 0: convert_inputs(il, x, n_tokens, ith, nth); break;
            case 1: predict_range(il, n_tokens, ith, nth, ts); break;
            case 2: read_and_compute(il, n_tokens, ith, nth, ts); break;
            case 3:
                // every thread is done with the gate rows (the prediction, and phase 2's gate products for the
                // predictors that compute them there) and this layer's own reads are in: the next streamed
                // layer's rows are read now, behind them and, under the stream policy, behind the down region
                // this layer waits for next, while the down projection and the next attention compute
                if (ith == 0) release_gate_rows(il);
                if (ith == 0 && stream_ && store_->split()) {
                    // every thread is done with the bundle records (phase 2); the down projection reads only
                    // down columns, so the next region can be read into their buffer now
                    stream_->release(stream_item(il, false));
                }
                if (rows_now(L)) prepare_down_rows(il, n_tokens, ith, nth);
                break;
            case 4:
                if (rows_now(L)) {
                    down_rows(il, y, n_tokens, ith, nth);
                } else {
                    down(il, y, n_tokens, ith, nth);
                }
                if (ith == 0) record_stats(il, n_tokens, nth);
                break;
            default: break;
        }
    } catch (const std::exception & e) {
        // reads still in flight write into this thread's arena: let them land before anything reuses it
        if (ts.queue) {
            ts.queue->drain();
        }
        for (Wave & w : ts.wave) w.n_pending = 0;
        ts.active.clear();
        ts.work.clear();
        ts.finals.clear();
        fail(e.what(), dynamic_cast<const NumericError *>(&e) != nullptr);
        if (phase == kPhases - 1) {
            const auto [t0, t1] = split_range(n_tokens, ith, nth);
            std::memset(y + t0 * L.n_out, 0, sizeof(float) * (size_t) ((t1 - t0) * L.n_out));
        }
    }
}

} // namespace neuralink
