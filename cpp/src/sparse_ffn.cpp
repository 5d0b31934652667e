#include "sparse_ffn_state.h"

#include "neuralink/column_axpy.h"
#include "neuralink/errors.h"
#include "neuralink/names.h"
#include "neuralink/row_gemm.h"

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

size_t SparseFfn::cache_bytes_to_hold_store() const {
    std::vector<size_t> record_bytes;
    for (int il = 0; il < store_->n_layer(); ++il) {
        record_bytes.push_back(store_->layer(il).region.record_bytes);
        if (store_->split()) record_bytes.push_back(store_->layer(il).down_region.record_bytes);
    }
    return BundleCache::bytes_to_hold(options_.cache_policy, record_bytes, (size_t) store_->n_ff());
}

bool SparseFfn::arena_fits(size_t bytes) const {
    std::vector<size_t> record_bytes;
    for (int il = 0; il < store_->n_layer(); ++il) {
        record_bytes.push_back(store_->layer(il).region.record_bytes);
        if (store_->split()) record_bytes.push_back(store_->layer(il).down_region.record_bytes);
    }
    return bytes >= StoreArena::bytes_for(record_bytes, (size_t) store_->n_ff());
}

// The cache's keys: layer il's bundle records are key il, its down columns (split layout) key n_layer + il.
void SparseFfn::configure_cache(CachePolicy policy, size_t bytes) {
    const int n_layer = store_->n_layer();
    std::vector<size_t> record_bytes;
    std::vector<std::vector<float>> frequency;
    for (int il = 0; il < n_layer; ++il) {
        record_bytes.push_back(store_->layer(il).region.record_bytes);
        frequency.push_back(store_->layer(il).candidate_frequency);
    }
    for (int il = 0; store_->split() && il < n_layer; ++il) {
        record_bytes.push_back(store_->layer(il).down_region.record_bytes);
        frequency.push_back(store_->layer(il).frequency);
    }
    const size_t n_ff = (size_t) store_->n_ff();
    std::unique_ptr<StoreArena> arena;
    if (policy != CachePolicy::None && policy != CachePolicy::Pinned && arena_fits(bytes)) {
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
        cache->pin_hottest(frequency, [this, n_layer](uint32_t key, uint32_t pos, uint8_t * dst) {
            const bool down = (int) key >= n_layer;
            const int il = down ? (int) key - n_layer : (int) key;
            const BundleRegion & region = down ? store_->layer(il).down_region : store_->layer(il).region;
            const uint8_t * start = nullptr;
            AlignedBuffer buf = store_->file().read_range(region.record_offset(pos), region.record_bytes, &start);
            if (options_.verify_checksums) {
                store_->check_record(il, down, pos, start);
            }
            std::memcpy(dst, start, region.record_bytes);
        });
    }
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
    grow(token_active_, tokens * (size_t) L.n_ff);
    grow(record_of_, (size_t) L.n_ff);
    grow(down_of_, (size_t) L.n_ff);
    grow(lowrank_z_, tokens * (size_t) store_->predictor_rank());
    capacity_ = (int64_t) tokens;
}

size_t SparseFfn::scratch_bytes() const {
    size_t bytes = xq_gate_.size() + xq_up_.size() + h_.size() * sizeof(float) + token_active_.size() +
            (record_of_.size() + down_of_.size()) * sizeof(void *);
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

// records ahead of the one being computed whose cache lines are requested
static constexpr size_t kPrefetchAhead = 2;
static inline void prefetch(const uint8_t * p) { __builtin_prefetch(p, 0, 3); }

// the down input as the dense path would round it: F16/BF16 vec_dot types see h in that precision
static float round_for(ggml_type vec_dot_type, float v) {
    if (vec_dot_type == GGML_TYPE_F16) return ggml_fp16_to_fp32(ggml_fp32_to_fp16(v));
    if (vec_dot_type == GGML_TYPE_BF16) return ggml_bf16_to_fp32(ggml_fp32_to_bf16(v));
    return v;
}

void SparseFfn::predict(int il, int64_t n_tokens, int64_t r0, int64_t r1, ThreadState & ts) {
    const SparseLayerWeights & L = *layers_[il];
    const SidecarLayer & S = store_->layer(il);
    const Criterion criterion = store_->criterion_kind();
    const int64_t n_ff = L.n_ff;
    const float threshold = this->threshold(il);
    ts.active.clear();
    if (options_.predictor == Predictor::Dense) {
        for (int64_t p = r0; p < r1; ++p) {
            ts.active.push_back((uint32_t) p);
            for (int64_t t = 0; t < n_tokens; ++t) token_active_[t * n_ff + p] = 1;
        }
        return;
    }
    if (options_.predictor == Predictor::LowRank) {
        // scores B (A x) from phase 0's A x; the real criterion is applied once the neuron is computed
        const int rank = store_->predictor_rank();
        const float predictor_threshold = this->predictor_threshold(il);
        for (int64_t p = r0; p < r1; ++p) {
            const float * b = S.predictor_b.data() + (size_t) p * rank;
            bool any = false;
            for (int64_t t = 0; t < n_tokens; ++t) {
                const float * z = lowrank_z_.data() + (size_t) t * rank;
                float v = 0.0f;
                for (int k = 0; k < rank; ++k) v += b[k] * z[k];
                const float a = activate(L.act, v);
                const bool on = (criterion == Criterion::NativeZero ? a : std::fabs(a)) > predictor_threshold;
                token_active_[t * n_ff + p] = on;
                any |= on;
            }
            if (any) {
                ts.active.push_back((uint32_t) p);
            }
        }
        return;
    }
    // gate (and oracle on gated models): exact gate values from the resident rows; oracle on
    // non-gated models: exact up values from resident up rows
    const WeightMatrix & W = L.gated ? L.gate : L.up;
    const std::vector<float> & bias = L.gated ? L.gate_bias : L.up_bias;
    const size_t xq_row = W.wt->act_row_bytes(L.n_embd);
    const uint8_t * xq = L.gated ? xq_gate_.data() : xq_up_.data();
    const bool contribution = criterion == Criterion::Contribution;
    // the oracle knows u too (resident up rows) and selects exactly the final neurons
    const bool oracle_up = contribution && options_.predictor == Predictor::Oracle;
    const float candidate_threshold = contribution ? this->candidate_threshold(il) : 0.0f;
    const size_t xq_up_row = oracle_up ? L.up.wt->act_row_bytes(L.n_embd) : 0;
    // a prompt batch: the range's rows against every token at once, into h_
    const bool batched = n_tokens >= kGemmMinTokens && r1 > r0;
    if (batched) {
        rows_times_tokens(*W.wt, W.row(r0), W.row_bytes, r1 - r0, L.n_embd, xq, n_tokens, h_.data() + r0, n_ff,
                          ts.gemm_work);
    }
    for (int64_t p = r0; p < r1; ++p) {
        bool any = false;
        for (int64_t t = 0; t < n_tokens; ++t) {
            float v;
            if (batched) {
                v = h_[t * n_ff + p];
            } else {
                W.wt->vec_dot((int) L.n_embd, &v, 0, W.row(p), 0, xq + t * xq_row, 0, 1);
            }
            if (!bias.empty()) v += bias[p];
            h_[t * n_ff + p] = v; // the pre-activation, consumed by compute_h
            const float a = activate(L.act, v);
            bool on;
            if (oracle_up) {
                float u;
                L.up.wt->vec_dot((int) L.n_embd, &u, 0, L.up.row(p), 0, xq_up_.data() + t * xq_up_row, 0, 1);
                if (!L.up_bias.empty()) u += L.up_bias[p];
                on = std::fabs(a * u) * S.down_norm[p] > threshold;
            } else if (contribution) {
                on = std::fabs(a) * S.candidate_scale[p] > candidate_threshold;
            } else {
                // ReLU-family activations are >= 0: a threshold of 0 keeps exactly the native non-zeros
                on = (criterion == Criterion::NativeZero ? a : std::fabs(a)) > threshold;
            }
            token_active_[t * n_ff + p] = on;
            any |= on;
        }
        if (any) {
            ts.active.push_back((uint32_t) p);
        }
    }
}

// What finishing a neuron needs of its layer, worked out once per call of compute_h rather than per neuron.
struct SparseFfn::LayerMath {
    const SparseLayerWeights & L;
    const SidecarLayer & S;
    Criterion criterion;
    float threshold;
    bool resident_pre; // gate and oracle computed the exact pre-activation into h_ while predicting
    bool filter;       // neurons read for nothing keep h = 0 (the thresholded model); dense computes all
    ggml_type down_vdt;
    size_t xq_up_row;
    const WeightType * gate_wt; // the gate row's type: the record's, or the resident rows' when records hold none
    size_t xq_gate_row;
};

SparseFfn::LayerMath SparseFfn::layer_math(int il) const {
    const SparseLayerWeights & L = *layers_[il];
    const SidecarLayer & S = store_->layer(il);
    const Criterion criterion = store_->criterion_kind();
    const WeightType * gate_wt = S.gate.wt ? S.gate.wt : L.gate.wt;
    return LayerMath { L, S, criterion, threshold(il),
                       options_.predictor == Predictor::Gate || options_.predictor == Predictor::Oracle,
                       options_.predictor == Predictor::LowRank ||
                               (criterion == Criterion::Contribution && options_.predictor != Predictor::Dense),
                       S.down.wt->vec_dot_type, S.up.wt->act_row_bytes(L.n_embd), gate_wt,
                       gate_wt ? gate_wt->act_row_bytes(L.n_embd) : 0 };
}

// One neuron's h for every token of the batch, and whether it enters the down projection. u and g, when
// given, hold the neuron's up and gate products for token t at u[t * u_stride] (a batched product); else
// they are computed here from the record with vec_dot.
inline void SparseFfn::finish_neuron(const LayerMath & M, int64_t n_tokens, uint32_t p, const uint8_t * rec,
                                     ThreadState & ts, const float * u_given, int64_t u_stride, const float * g_given,
                                     int64_t g_stride) {
    const SparseLayerWeights & L = M.L;
    const SidecarLayer & S = M.S;
    const int64_t n_ff = L.n_ff;
    record_of_[p] = rec;
    bool criterion_holds = false, computed = false;
    for (int64_t t = 0; t < n_tokens; ++t) {
        float & hv = h_[t * n_ff + p];
        if (!token_active_[t * n_ff + p]) {
            hv = 0.0f;
            continue;
        }
        ++ts.predicted_pairs;
        float u;
        if (u_given) {
            u = u_given[t * u_stride];
        } else {
            S.up.wt->vec_dot((int) L.n_embd, &u, 0, rec + S.up.offset, 0, xq_up_.data() + t * M.xq_up_row, 0, 1);
        }
        if (!L.up_bias.empty()) u += L.up_bias[p];
        float a;
        if (L.gated) {
            float g = hv;
            if (!M.resident_pre) {
                if (g_given) {
                    g = g_given[t * g_stride];
                } else {
                    const uint8_t * row = S.gate.wt ? rec + S.gate.offset : L.gate.row(p);
                    M.gate_wt->vec_dot((int) L.n_embd, &g, 0, row, 0, xq_gate_.data() + t * M.xq_gate_row, 0, 1);
                }
                if (!L.gate_bias.empty()) g += L.gate_bias[p];
            }
            a = activate(L.act, g);
            hv = round_for(M.down_vdt, a * u);
        } else {
            a = activate(L.act, u);
            hv = round_for(M.down_vdt, a);
        }
        const bool holds = M.criterion == Criterion::NativeZero ? a > M.threshold
                         : M.criterion == Criterion::GateMagnitude ? std::fabs(a) > M.threshold
                         : M.criterion == Criterion::Contribution ? std::fabs(hv) * S.down_norm[p] > M.threshold
                         : std::fabs(hv) > M.threshold;
        if (!holds && M.filter) {
            hv = 0.0f;
        } else {
            ++ts.computed_pairs;
            computed = true;
        }
        criterion_holds |= holds;
    }
    ts.truly_active += criterion_holds;
    if (computed) {
        ts.finals.push_back(p);
    }
}

void SparseFfn::compute_h(int il, int64_t n_tokens, const uint8_t * const * records, const uint32_t * pos, size_t n,
                          ThreadState & ts) {
    if (n_tokens >= kGemmMinTokens) {
        compute_h_batched(il, n_tokens, records, pos, n, ts);
        return;
    }
    const LayerMath M = layer_math(il);
    const size_t record_bytes = M.S.region.record_bytes;
    for (size_t i = 0; i < n; ++i) {
        if (i + kPrefetchAhead < n) {
            // records sit wherever the cache or the read put them: ask for a later one's lines while this computes
            for (size_t at = 0; at < record_bytes; at += 64) prefetch(records[i + kPrefetchAhead] + at);
        }
        finish_neuron(M, n_tokens, pos[i], records[i], ts, nullptr, 0, nullptr, 0);
    }
}

// the fewest records worth a batched product (kStretchRecords at most: its results for a 64-token batch, 64 KiB)
static constexpr size_t kMinStretchRecords = 4;

// A prompt batch: the up rows (and gate rows, when the prediction did not compute the gate) of each stretch of
// equally spaced records go through ggml's batched mul_mat at once; records that stand alone through vec_dot.
void SparseFfn::compute_h_batched(int il, int64_t n_tokens, const uint8_t * const * records, const uint32_t * pos,
                                  size_t n, ThreadState & ts) {
    const LayerMath M = layer_math(il);
    const SparseLayerWeights & L = M.L;
    const SidecarLayer & S = M.S;
    const bool need_gate = L.gated && !M.resident_pre;
    const WeightType * gate_wt = M.gate_wt;
    auto up_of = [&](size_t k) { return records[k] + S.up.offset; };
    auto gate_of = [&](size_t k) { return S.gate.wt ? records[k] + S.gate.offset : L.gate.row(pos[k]); };
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        const ptrdiff_t su = j < n ? up_of(j) - up_of(i) : 0;
        const ptrdiff_t sg = j < n && need_gate ? gate_of(j) - gate_of(i) : 0;
        const bool spaced = su > 0 && gemm_stride_ok(*S.up.wt, L.n_embd, (size_t) su) &&
                            (!need_gate || (sg > 0 && gemm_stride_ok(*gate_wt, L.n_embd, (size_t) sg)));
        while (spaced && j < n && j - i < kStretchRecords && up_of(j) - up_of(j - 1) == su &&
               (!need_gate || gate_of(j) - gate_of(j - 1) == sg)) {
            ++j;
        }
        const size_t m = j - i;
        if (m < kMinStretchRecords) {
            for (size_t k = i; k < j; ++k) finish_neuron(M, n_tokens, pos[k], records[k], ts, nullptr, 0, nullptr, 0);
            i = j;
            continue;
        }
        const size_t need = (size_t) n_tokens * m;
        if (ts.gemm_u.size() < need) ts.gemm_u.resize(need);
        rows_times_tokens(*S.up.wt, up_of(i), (size_t) su, (int64_t) m, L.n_embd, xq_up_.data(), n_tokens,
                          ts.gemm_u.data(), (int64_t) m, ts.gemm_work);
        if (need_gate) {
            if (ts.gemm_g.size() < need) ts.gemm_g.resize(need);
            rows_times_tokens(*gate_wt, gate_of(i), (size_t) sg, (int64_t) m, L.n_embd, xq_gate_.data(), n_tokens,
                              ts.gemm_g.data(), (int64_t) m, ts.gemm_work);
        }
        for (size_t k = i; k < j; ++k) {
            finish_neuron(M, n_tokens, pos[k], records[k], ts, ts.gemm_u.data() + (k - i), (int64_t) m,
                          need_gate ? ts.gemm_g.data() + (k - i) : nullptr, (int64_t) m);
        }
        i = j;
    }
}

void SparseFfn::down(int il, float * y, int64_t n_tokens, int ith, int nth) {
    const SparseLayerWeights & L = *layers_[il];
    const SidecarLayer & S = store_->layer(il);
    const WeightType & dt = *S.down.wt;
    const int64_t bs = dt.block_size;
    const auto [b0, b1] = split_range(L.n_embd / bs, ith, nth);
    const int64_t e0 = b0 * bs, e1 = b1 * bs, n = e1 - e0;
    for (int64_t t = 0; t < n_tokens; ++t) {
        float * yt = y + t * L.n_out;
        for (int64_t e = e0; e < e1; ++e) yt[e] = L.down_bias.empty() ? 0.0f : L.down_bias[e];
    }
    if (n == 0) {
        return;
    }
    ThreadState & me = thread_state(ith);
    if ((int64_t) me.tmp.size() < n) me.tmp.resize((size_t) n);
    const size_t slice_offset = S.down.offset + (size_t) b0 * ggml_type_size(dt.type);
    const std::vector<const uint8_t *> & down_records = store_->split() ? down_of_ : record_of_;
    // up to kMaxTileTokens tokens at a time: the encoded columns of their nonzero h scaled straight into their
    // slices of y, held in registers while the columns stream past, each column block converted once for all
    // of them; a token gets the same sums in a batch as alone
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kMaxTileTokens) {
        const int tile = (int) std::min<int64_t>(kMaxTileTokens, n_tokens - t0);
        me.down_columns.clear();
        me.down_h.clear();
        for (int j = 0; j < nth; ++j) {
            for (uint32_t p : threads_[j]->finals) {
                bool any = false;
                for (int t = 0; t < tile; ++t) any |= h_[(t0 + t) * L.n_ff + p] != 0.0f;
                if (!any) continue;
                me.down_columns.push_back(down_records[p] + slice_offset);
                for (int t = 0; t < tile; ++t) me.down_h.push_back(h_[(t0 + t) * L.n_ff + p]);
            }
        }
        float * yt = y + t0 * L.n_out + e0;
        if (tile == 1) {
            columns_axpy(dt, me.down_columns.data(), me.down_h.data(), (int) me.down_columns.size(), yt, n, me.tmp.data());
        } else {
            columns_axpy_tokens(dt, me.down_columns.data(), me.down_h.data(), (int) me.down_columns.size(), tile, yt,
                                L.n_out, n, me.tmp.data());
        }
    }
    // a NaN or infinity here would spread through every later layer into the logits: refuse it
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float * yt = y + t * L.n_out;
        if (!std::all_of(yt + e0, yt + e1, [](float v) { return std::isfinite(v); })) {
            throw NumericError("layer " + std::to_string(il) + ": the FFN output of token " + std::to_string(t) +
                               " is not finite (NaN or infinity): the sidecar's weights are corrupt or the "
                               "activations overflowed");
        }
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

// after phase 3, on thread 0: the layer's counters, summed over the threads
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
    st.truly_active = (int32_t) truly;
    st.active_bytes = (uint64_t) st.predicted * S.region.record_bytes +
                      (uint64_t) st.final_neurons * S.down_region.record_bytes;
    st.io_ns = last > first ? last - first : 0;
    st.layer_ns = steady_now_ns() - layer_start_ns_;
    std::lock_guard<std::mutex> lock(stats_mutex_);
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
                down(il, y, n_tokens, ith, nth);
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
