// SparseFfn's down projection by rows (see sparse_ffn.h): for a store held whole in DRAM, the model's own down
// rows multiplied by h as llama.cpp multiplies them, h zero outside the final neurons. Rows are read in
// sequence at the memory's rate and the scattered down columns are not, but every row is read where only the
// final neurons' columns are. Which costs less depends on the machine as much as on the types: on
// Qwen2.5-Coder-1.5B (docs/engine.md) q5_K rows lost to the q5_K columns of 40 % of the neurons by 3-4 % of a
// decoded token on one EPYC machine, and on another of the same kind were faster by ~8 % in some processes and
// slower by ~4 % in others, so where both fit the engine times them on the first decoded tokens of the process
// and keeps the faster (try_down_rows).

#include "sparse_ffn_state.h"

#include "neuralink/row_gemm.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>

namespace neuralink {

void SparseFfn::use_down_rows(int il, WeightMatrix rows) {
    if (!has_layer(il)) {
        throw std::invalid_argument("layer " + std::to_string(il) + " is not served from the sidecar");
    }
    if (!store_->split()) {
        throw std::invalid_argument(store_->path() + ": down rows replace the down columns of the split layout; "
                                    "this sidecar's records hold them (joint)");
    }
    SparseLayerWeights & L = *layers_[(size_t) il];
    if (L.trial_down.data) {
        throw std::invalid_argument("layer " + std::to_string(il) + ": its down rows are on trial (try_down_rows)");
    }
    if (!rows.data || !rows.wt || rows.rows != L.n_out || rows.cols != L.n_ff) {
        throw std::invalid_argument("layer " + std::to_string(il) + ": down rows must be " +
                                    std::to_string(L.n_out) + " rows of " + std::to_string(L.n_ff));
    }
    if (L.n_ff % ggml_blck_size(rows.wt->vec_dot_type) != 0) {
        throw std::invalid_argument("layer " + std::to_string(il) + ": n_ff " + std::to_string(L.n_ff) +
                                    " is not whole blocks of the down rows' vec_dot type");
    }
    if (L.down.data) resident_bytes_ -= L.down.row_bytes * (size_t) L.down.rows;
    L.down = rows;
    resident_bytes_ += L.down.row_bytes * (size_t) L.down.rows;
    const size_t need = (size_t) std::max<int64_t>(capacity_, 1) * L.down.wt->act_row_bytes(L.n_ff);
    if (hq_.size() < need) hq_.resize(need);
}

void SparseFfn::try_down_rows(int il, WeightMatrix rows, AlignedBuffer storage) {
    if (has_layer(il) && (layers_[(size_t) il]->down.data || layers_[(size_t) il]->trial_down.data)) {
        throw std::invalid_argument("layer " + std::to_string(il) + ": its down rows are in use or on trial already");
    }
    if (trial_.settled) {
        throw std::invalid_argument("the down trial has ended: rows can no longer join it");
    }
    use_down_rows(il, rows); // the same checks, and hq_ sized for them
    SparseLayerWeights & L = *layers_[(size_t) il];
    L.trial_down = L.down;
    L.down = WeightMatrix();
    trial_storage_.push_back(std::move(storage));
    {
        std::lock_guard<std::mutex> lock(trial_mutex_);
        trial_.layers += 1;
    }
    if (trial_first_layer_ < 0 || il < trial_first_layer_) trial_first_layer_ = il;
}

static uint64_t median_ns(std::vector<uint64_t> v) {
    if (v.empty()) return 0;
    std::nth_element(v.begin(), v.begin() + (std::ptrdiff_t) (v.size() / 2), v.end());
    return v[v.size() / 2];
}

SparseFfn::DownTrial SparseFfn::down_trial() const {
    std::lock_guard<std::mutex> lock(trial_mutex_);
    DownTrial out = trial_;
    out.columns_ns = median_ns(trial_token_ns_[0]);
    out.rows_ns = median_ns(trial_token_ns_[1]);
    return out;
}

// thread 0, phase 0 of the first layer on trial: no thread is past phase 0 of this evaluation, the others are in
// phase 0 of the same layer (which reads neither the down rows nor the trial's state), and a barrier follows.
// A token's time runs to the next evaluation's start: the model's other layers, its output and the caller's
// sampling are in both ways alike, and the median leaves out a wait for the next request.
void SparseFfn::advance_down_trial(int64_t n_tokens) {
    if (trial_.settled || trial_.layers == 0) {
        return;
    }
    const uint64_t now = steady_now_ns();
    size_t timed = 0;
    {
        std::lock_guard<std::mutex> lock(trial_mutex_);
        if (trial_last_way_ >= 0) trial_token_ns_[trial_last_way_].push_back(now - trial_last_start_ns_);
        timed = std::min(trial_token_ns_[0].size(), trial_token_ns_[1].size());
    }
    trial_last_way_ = -1;
    trial_rows_now_ = false;
    if (n_tokens != 1) {
        return; // a prompt batch: the columns, untimed
    }
    if (timed >= (size_t) kDownTrialTokens) {
        settle_down_trial();
        return;
    }
    trial_rows_now_ = trial_.tokens % 2 == 1; // columns first, then alternate
    {
        std::lock_guard<std::mutex> lock(trial_mutex_);
        trial_.tokens += 1;
    }
    trial_last_way_ = trial_rows_now_ ? 1 : 0;
    trial_last_start_ns_ = now;
}

void SparseFfn::settle_down_trial() {
    const DownTrial t = down_trial();
    {
        std::lock_guard<std::mutex> lock(trial_mutex_);
        trial_.settled = true;
        trial_.rows_kept = (double) t.rows_ns < (1.0 - kDownTrialMargin) * (double) t.columns_ns;
    }
    trial_rows_now_ = false;
    for (auto & Lp : layers_) {
        if (!Lp || !Lp->trial_down.data) continue;
        SparseLayerWeights & L = *Lp;
        if (trial_.rows_kept) {
            L.down = L.trial_down;
            // nothing reads the layer's down columns any more: their memory goes back
            if (arena_) arena_->release((uint32_t) (store_->n_layer() + L.il));
        } else {
            resident_bytes_ -= L.trial_down.row_bytes * (size_t) L.trial_down.rows;
        }
        L.trial_down = WeightMatrix();
    }
    if (!trial_.rows_kept) trial_storage_.clear(); // the columns won: the rows' memory goes back
}

bool SparseFfn::down_rows_pay(int il, ggml_type row_type, size_t row_bytes) const {
    if (!has_layer(il) || !store_->split()) return false;
    const SparseLayerWeights & L = *layers_[(size_t) il];
    const SidecarLayer & S = store_->layer(il);
    // the neurons a token needs on average: every one for the dense predictor, else at the profiled thresholds
    const double density = options_.predictor == Predictor::Dense || S.frequency.empty() ? 1.0
            : std::accumulate(S.frequency.begin(), S.frequency.end(), 0.0) / (double) S.frequency.size();
    const ggml_type t = S.down.wt->type;
    const bool k_quant = t == GGML_TYPE_Q6_K || t == GGML_TYPE_Q5_K || t == GGML_TYPE_Q4_K;
    const double columns = density * (double) L.n_ff * (double) S.down_region.record_bytes *
                           row_byte_cost(row_type) * (k_quant ? 1.0 : 0.5);
    return (double) row_bytes * (double) L.n_out < columns;
}

// phase 3: h_ holds every candidate's h (zero where the criterion dropped a pair) but also, elsewhere, the
// predictor's act(g) and earlier layers' values; the rows see h, so this thread's blocks of it are made zero
// outside the final neurons and converted to the rows' vec_dot type
void SparseFfn::prepare_down_rows(int il, int64_t n_tokens, int ith, int nth) {
    const SparseLayerWeights & L = *layers_[(size_t) il];
    const WeightType & wt = *down_rows_of(L).wt;
    const int64_t bs = ggml_blck_size(wt.vec_dot_type);
    const size_t row = wt.act_row_bytes(L.n_ff), block = ggml_type_size(wt.vec_dot_type);
    const auto [b0, b1] = split_range(L.n_ff / bs, ith, nth);
    const int64_t p0 = b0 * bs, p1 = b1 * bs;
    if (p0 == p1) {
        return;
    }
    for (int64_t t = 0; t < n_tokens; ++t) {
        float * ht = h_.data() + t * L.n_ff;
        int64_t next = p0; // the first position not yet settled
        // each thread's finals are sorted, and the threads' shares follow each other in position order
        for (int j = 0; j < nth; ++j) {
            const std::vector<uint32_t> & f = threads_[(size_t) j]->finals;
            for (auto it = std::lower_bound(f.begin(), f.end(), (uint32_t) p0); it != f.end() && *it < p1; ++it) {
                std::fill(ht + next, ht + *it, 0.0f);
                next = (int64_t) *it + 1;
            }
        }
        std::fill(ht + next, ht + p1, 0.0f);
        wt.act_from_float(ht + p0, hq_.data() + (size_t) t * row + (size_t) b0 * block, p1 - p0);
    }
}

// phase 4: this thread's slice of the output rows, every row against h as llama.cpp computes it (vec_dot; a
// prompt batch through ggml's batched mul_mat)
void SparseFfn::down_rows(int il, float * y, int64_t n_tokens, int ith, int nth) {
    const SparseLayerWeights & L = *layers_[(size_t) il];
    const WeightMatrix & D = down_rows_of(L);
    const WeightType & wt = *D.wt;
    const size_t row = wt.act_row_bytes(L.n_ff);
    const auto [e0, e1] = split_range(L.n_out, ith, nth, kRowBlock);
    if (e0 == e1) {
        return;
    }
    if (n_tokens >= kGemmMinTokens) {
        rows_times_tokens(wt, D.row(e0), D.row_bytes, e1 - e0, L.n_ff, hq_.data(), n_tokens, y + e0,
                          L.n_out, thread_state(ith).gemm_work);
    } else {
        for (int64_t t = 0; t < n_tokens; ++t) {
            const uint8_t * hqt = hq_.data() + (size_t) t * row;
            float * yt = y + t * L.n_out;
            for (int64_t e = e0; e < e1; ++e) wt.vec_dot((int) L.n_ff, yt + e, 0, D.row(e), 0, hqt, 0, 1);
        }
    }
    if (!L.down_bias.empty()) {
        for (int64_t t = 0; t < n_tokens; ++t) {
            for (int64_t e = e0; e < e1; ++e) y[t * L.n_out + e] += L.down_bias[(size_t) e];
        }
    }
    refuse_non_finite(il, y, n_tokens, L.n_out, e0, e1);
}

} // namespace neuralink
