// SparseFfn's computing side: the prediction (phase 1's work), h of each read or cached neuron (phase 2),
// for prompt batches through ggml's batched products, and the down projection by columns (phase 4); see
// sparse_ffn.h.

#include "sparse_ffn_state.h"

#include "neuralink/column_axpy.h"
#include "neuralink/contribution_mask.h"
#include "neuralink/errors.h"
#include "neuralink/row_gemm.h"

#include <algorithm>
#include <cmath>

namespace neuralink {

// records ahead of the one being computed whose cache lines are requested: an up row's product takes less
// than a DRAM round trip, and 8 ahead was the fastest of 2, 4, 6, 8 and 12 decoding Qwen2.5-Coder-1.5B warm
// (2 ahead, and the whole record, ran 10 % slower)
static constexpr size_t kPrefetchAhead = 8;
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
        // scores B (A x) from phase 0's A x; the real criterion is applied once the neuron is computed. Under the
        // contribution criterion the score is the candidate test's, |act(g~)| * E|up| * |d| with the estimated g~,
        // against a threshold the conversion set low enough to find the validated pairs
        const int rank = store_->predictor_rank();
        const float predictor_threshold = this->predictor_threshold(il);
        const bool contribution = criterion == Criterion::Contribution;
        for (int64_t p = r0; p < r1; ++p) {
            const float * b = S.predictor_b.data() + (size_t) p * rank;
            bool any = false;
            for (int64_t t = 0; t < n_tokens; ++t) {
                const float * z = lowrank_z_.data() + (size_t) t * rank;
                float v = 0.0f;
                for (int k = 0; k < rank; ++k) v += b[k] * z[k];
                const float a = activate(L.act, v);
                const bool on = contribution ? contribution_candidate(a, S.candidate_scale[p], predictor_threshold)
                                             : (criterion == Criterion::NativeZero ? a : std::fabs(a)) > predictor_threshold;
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
    // token by token along the range's rows (h_ and the flags are rows of n_ff per token); on gated models h_
    // keeps the activation act(g), which compute_h then uses as it is
    ts.any.assign((size_t) (r1 - r0), 0);
    for (int64_t t = 0; t < n_tokens; ++t) {
        float * h_row = h_.data() + t * n_ff;
        uint8_t * on_row = token_active_.data() + t * n_ff;
        if (!batched) {
            for (int64_t p = r0; p < r1; ++p) W.wt->vec_dot((int) L.n_embd, &h_row[p], 0, W.row(p), 0, xq + t * xq_row, 0, 1);
        }
        if (!bias.empty()) {
            for (int64_t p = r0; p < r1; ++p) h_row[p] += bias[p];
        }
        // gated: the row's act(g) at once, in place (activate_span gives each value what activate gives it)
        if (L.gated) activate_span(L.act, h_row + r0, h_row + r0, r1 - r0);
        for (int64_t p = r0; p < r1; ++p) {
            const float a = L.gated ? h_row[p] : activate(L.act, h_row[p]);
            bool on;
            if (oracle_up) {
                float u;
                L.up.wt->vec_dot((int) L.n_embd, &u, 0, L.up.row(p), 0, xq_up_.data() + t * xq_up_row, 0, 1);
                if (!L.up_bias.empty()) u += L.up_bias[p];
                on = contribution_final(a * u, S.down_norm[p], threshold);
            } else if (contribution) {
                on = contribution_candidate(a, S.candidate_scale[p], candidate_threshold);
            } else {
                // ReLU-family activations are >= 0: a threshold of 0 keeps exactly the native non-zeros
                on = (criterion == Criterion::NativeZero ? a : std::fabs(a)) > threshold;
            }
            on_row[p] = on;
            ts.any[(size_t) (p - r0)] |= on;
        }
    }
    // appended without a branch: which neurons a token needs has no pattern to predict
    const size_t had = ts.active.size();
    ts.active.resize(had + (size_t) (r1 - r0));
    uint32_t * __restrict out = ts.active.data() + had;
    const uint8_t * __restrict any = ts.any.data();
    size_t kept = 0;
    for (int64_t p = r0; p < r1; ++p) {
        out[kept] = (uint32_t) p;
        kept += any[p - r0] != 0;
    }
    ts.active.resize(had + kept);
}

// What finishing a neuron needs of its layer, worked out once per call of compute_h rather than per neuron.
struct SparseFfn::LayerMath {
    const SparseLayerWeights & L;
    const SidecarLayer & S;
    Criterion criterion;
    float threshold;
    bool resident_pre; // gate and oracle computed the exact gate (act(g) on gated models) into h_ while predicting
    bool filter;       // neurons read for nothing keep h = 0 (the thresholded model); dense computes all
    ggml_type down_vdt;
    size_t xq_up_row;
    const WeightType * gate_wt; // the gate row's type: the record's, or the resident rows' when records hold none
    size_t xq_gate_row;
    // the low-rank predictor under the contribution criterion: a pair is kept only if the exact gate passes the
    // candidate test too, so what it computes is the gate predictor's thresholded model, less what it missed
    bool exact_candidate;
    float candidate_threshold;
};

SparseFfn::LayerMath SparseFfn::layer_math(int il) const {
    const SparseLayerWeights & L = *layers_[il];
    const SidecarLayer & S = store_->layer(il);
    const Criterion criterion = store_->criterion_kind();
    const WeightType * gate_wt = S.gate.wt ? S.gate.wt : L.gate.wt;
    const bool exact_candidate = options_.predictor == Predictor::LowRank && criterion == Criterion::Contribution;
    return LayerMath { L, S, criterion, threshold(il),
                       options_.predictor == Predictor::Gate || options_.predictor == Predictor::Oracle,
                       options_.predictor == Predictor::LowRank ||
                               (criterion == Criterion::Contribution && options_.predictor != Predictor::Dense),
                       S.down.wt->vec_dot_type, S.up.wt->act_row_bytes(L.n_embd), gate_wt,
                       gate_wt ? gate_wt->act_row_bytes(L.n_embd) : 0,
                       exact_candidate, exact_candidate ? candidate_threshold(il) : 0.0f };
}

// One (token, neuron) pair, the neuron predicted for the token: hv (its h_ entry) becomes h, or zero when the
// criterion drops the pair under a filter. u is the up product with its bias; g the gate's pre-activation with
// its bias, unused when the prediction left act(g) in hv. Returns whether the criterion holds.
inline bool SparseFfn::finish_pair(const LayerMath & M, uint32_t p, float u, float g, float & hv) {
    float a;
    if (M.L.gated) {
        a = M.resident_pre ? hv : activate(M.L.act, g);
        hv = round_for(M.down_vdt, a * u);
    } else {
        a = activate(M.L.act, u);
        hv = round_for(M.down_vdt, a);
    }
    const bool holds = M.criterion == Criterion::NativeZero ? a > M.threshold
                     : M.criterion == Criterion::GateMagnitude ? std::fabs(a) > M.threshold
                     : M.criterion == Criterion::Contribution
                             ? contribution_final(hv, M.S.down_norm[p], M.threshold) &&
                                       (!M.exact_candidate ||
                                        contribution_candidate(a, M.S.candidate_scale[p], M.candidate_threshold))
                     : std::fabs(hv) > M.threshold;
    if (!holds && M.filter) hv = 0.0f;
    return holds;
}

// One neuron's h for every token of the batch, its up (and gate) products computed here from the record with
// vec_dot, and whether it enters the down projection.
inline void SparseFfn::finish_neuron(const LayerMath & M, int64_t n_tokens, uint32_t p, const uint8_t * rec,
                                     ThreadState & ts) {
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
        float u, g = 0.0f;
        S.up.wt->vec_dot((int) L.n_embd, &u, 0, rec + S.up.offset, 0, xq_up_.data() + t * M.xq_up_row, 0, 1);
        if (!L.up_bias.empty()) u += L.up_bias[p];
        if (L.gated && !M.resident_pre) {
            const uint8_t * row = S.gate.wt ? rec + S.gate.offset : L.gate.row(p);
            M.gate_wt->vec_dot((int) L.n_embd, &g, 0, row, 0, xq_gate_.data() + t * M.xq_gate_row, 0, 1);
            if (!L.gate_bias.empty()) g += L.gate_bias[p];
        }
        const bool holds = finish_pair(M, p, u, g, hv);
        criterion_holds |= holds;
        if (holds || !M.filter) {
            ++ts.computed_pairs;
            computed = true;
        }
    }
    ts.truly_active += criterion_holds;
    if (computed) {
        ts.finals.push_back(p);
    }
}

// One token's pairs of a stretch, finish_stretch's branch-free arithmetic: h = act(g) * u with act(g) from the
// prediction (in h_row), kept where the pair was predicted and the criterion holds (or without a filter). The
// stretch's neuron k is at index pos[k] of h_row, on_row, ub and dn; or, when kConsecutive, these point at the
// stretch's first neuron and it is at index k: plain arrays then, which the compiler turns into vector
// instructions (a prompt batch's usual case; the index must be k itself for that, not p0 + k).
template <bool kConsecutive, bool kUpBias>
static inline void finish_row(float * __restrict h_row, const uint8_t * __restrict on_row, const float * __restrict ut,
                              const float * __restrict ub, const float * __restrict dn, const uint32_t * pos,
                              float threshold, bool filter, size_t m, uint8_t * __restrict flags, uint64_t & predicted,
                              uint64_t & computed_pairs) {
    uint32_t n_on = 0, n_kept = 0;
    for (size_t k = 0; k < m; ++k) {
        const size_t p = kConsecutive ? k : pos[k];
        const uint32_t on = on_row[p] != 0;
        const float hv = h_row[p] * (kUpBias ? ut[k] + ub[p] : ut[k]);
        const uint32_t holds = contribution_final(hv, dn[p], threshold);
        const uint32_t kept = on & (holds | (uint32_t) !filter);
        h_row[p] = kept ? hv : 0.0f;
        n_on += on;
        n_kept += kept;
        flags[k] |= (uint8_t) ((on & holds) | (kept << 1));
    }
    predicted += n_on;
    computed_pairs += n_kept;
}

// finish_neuron for a stretch of m records whose up (and gate) products for token t are u[t * m + k] (and
// g[t * m + k]), token by token along the stretch; finals in the records' order, as finish_neuron's
void SparseFfn::finish_stretch(const LayerMath & M, int64_t n_tokens, const uint32_t * pos,
                               const uint8_t * const * records, size_t m, ThreadState & ts, const float * u,
                               const float * g) {
    const SparseLayerWeights & L = M.L;
    const int64_t n_ff = L.n_ff;
    ts.stretch_flags.assign(m, 0); // bit 0: the criterion holds for some token; bit 1: h computed for some token
    uint64_t predicted = 0, computed_pairs = 0;
    const bool up_bias = !L.up_bias.empty(), gate_bias = !L.gate_bias.empty();
    // restrict: a byte store may alias anything, and would make every pointer of the layer be loaded again per pair
    uint8_t * __restrict flags = ts.stretch_flags.data();
    if (L.gated && M.resident_pre && M.criterion == Criterion::Contribution && M.down_vdt != GGML_TYPE_F16 &&
        M.down_vdt != GGML_TYPE_BF16) {
        // The gate predictor on a gated model, the usual case: finish_pair's arithmetic written out, h = act(g) * u
        // with act(g) from the prediction, the criterion |h| * |d| > t, nothing rounded for down; and without a
        // branch on the data (whether a pair was predicted, and whether it holds, vary without a pattern): every
        // pair is finished, and the prediction decides what is kept. This function's share of a 256-token
        // prompt's samples: 11.6 % -> 9.5 %, prompt throughput within noise; what is left is walking h, a row of
        // n_ff floats per token, across every token for each stretch.
        const float * __restrict ub = up_bias ? L.up_bias.data() : nullptr;
        const float * __restrict dn = M.S.down_norm.data();
        const float threshold = M.threshold;
        const bool filter = M.filter;
        const uint32_t p0 = pos[0];
        bool consecutive = true;
        for (size_t k = 0; k < m; ++k) consecutive &= pos[k] == p0 + (uint32_t) k;
        const int64_t at = consecutive ? p0 : 0; // where index 0 of finish_row's arrays lies
        auto finish = consecutive ? (ub ? finish_row<true, true> : finish_row<true, false>)
                                  : (ub ? finish_row<false, true> : finish_row<false, false>);
        for (int64_t t = 0; t < n_tokens; ++t) {
            finish(h_.data() + t * n_ff + at, token_active_.data() + t * n_ff + at, u + t * (int64_t) m,
                   ub ? ub + at : nullptr, dn + at, pos, threshold, filter, m, flags, predicted, computed_pairs);
        }
    } else {
        for (int64_t t = 0; t < n_tokens; ++t) {
            float * h_row = h_.data() + t * n_ff;
            const uint8_t * on_row = token_active_.data() + t * n_ff;
            const float * ut = u + t * (int64_t) m;
            const float * gt = g ? g + t * (int64_t) m : nullptr;
            for (size_t k = 0; k < m; ++k) {
                const uint32_t p = pos[k];
                float & hv = h_row[p];
                if (!on_row[p]) {
                    hv = 0.0f;
                    continue;
                }
                ++predicted;
                const float uk = ut[k] + (up_bias ? L.up_bias[p] : 0.0f);
                const float gk = gt ? gt[k] + (gate_bias ? L.gate_bias[p] : 0.0f) : 0.0f;
                const bool holds = finish_pair(M, p, uk, gk, hv);
                const bool computed = holds || !M.filter;
                computed_pairs += computed;
                flags[k] |= (uint8_t) (holds | (computed << 1));
            }
        }
    }
    ts.predicted_pairs += predicted;
    ts.computed_pairs += computed_pairs;
    // the finals appended without a branch: whether a neuron is final has no pattern to predict
    const size_t had = ts.finals.size();
    ts.finals.resize(had + m);
    uint32_t * __restrict out = ts.finals.data() + had;
    size_t kept = 0;
    uint32_t truly_active = 0;
    for (size_t k = 0; k < m; ++k) {
        record_of_[pos[k]] = records[k];
        truly_active += flags[k] & 1;
        out[kept] = pos[k];
        kept += (flags[k] >> 1) & 1;
    }
    ts.truly_active += truly_active;
    ts.finals.resize(had + kept);
}

void SparseFfn::compute_h(int il, int64_t n_tokens, const uint8_t * const * records, const uint32_t * pos, size_t n,
                          ThreadState & ts) {
    if (n_tokens >= kGemmMinTokens) {
        compute_h_batched(il, n_tokens, records, pos, n, ts);
        return;
    }
    const LayerMath M = layer_math(il);
    // what finish_neuron reads of a record: its up row, and its gate row when the prediction did not compute it
    // (the down column waits for phase 4, by when these lines would have left the L1 again)
    const RecordPart & up = M.S.up;
    const bool gate_in_record = M.L.gated && !M.resident_pre && M.S.gate.wt;
    const size_t from = gate_in_record ? std::min(M.S.gate.offset, up.offset) : up.offset;
    const size_t to = gate_in_record ? std::max(M.S.gate.offset + M.S.gate.nbytes, up.offset + up.nbytes)
                                     : up.offset + up.nbytes;
    if (n_tokens > 1) {
        for (size_t i = 0; i < n; ++i) {
            if (i + kPrefetchAhead < n) {
                // records sit wherever the cache or the read put them: ask for a later one's lines meanwhile
                const uint8_t * later = records[i + kPrefetchAhead];
                for (size_t at = from & ~(size_t) 63; at < to; at += 64) prefetch(later + at);
            }
            finish_neuron(M, n_tokens, pos[i], records[i], ts);
        }
        return;
    }
    // one token, the decoding case: every neuron given is predicted for it, so the products of a stretch of
    // records come first, in a loop of nothing else, and finish_stretch then finishes them without branches
    const bool need_gate = M.L.gated && !M.resident_pre;
    if (ts.gemm_u.size() < kStretchRecords) ts.gemm_u.resize(kStretchRecords);
    if (need_gate && ts.gemm_g.size() < kStretchRecords) ts.gemm_g.resize(kStretchRecords);
    const ggml_vec_dot_t up_dot = up.wt->vec_dot;
    const int n_embd = (int) M.L.n_embd;
    const uint8_t * xq_up = xq_up_.data();
    for (size_t i = 0; i < n; i += kStretchRecords) {
        const size_t m = std::min(kStretchRecords, n - i);
        float * u = ts.gemm_u.data();
        for (size_t k = 0; k < m; ++k) {
            if (i + k + kPrefetchAhead < n) {
                // as above, written out twice: one lambda for both loops left compute_h's own code without a
                // prefetch instruction (GCC 12, -O3), and decoding ran ~20 % slower
                const uint8_t * later = records[i + k + kPrefetchAhead];
                for (size_t at = from & ~(size_t) 63; at < to; at += 64) prefetch(later + at);
            }
            up_dot(n_embd, &u[k], 0, records[i + k] + up.offset, 0, xq_up, 0, 1);
        }
        if (need_gate) {
            for (size_t k = 0; k < m; ++k) {
                const uint8_t * row = M.S.gate.wt ? records[i + k] + M.S.gate.offset : M.L.gate.row(pos[i + k]);
                M.gate_wt->vec_dot(n_embd, &ts.gemm_g[k], 0, row, 0, xq_gate_.data(), 0, 1);
            }
        }
        finish_stretch(M, 1, pos + i, records + i, m, ts, u, need_gate ? ts.gemm_g.data() : nullptr);
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
            for (size_t k = i; k < j; ++k) finish_neuron(M, n_tokens, pos[k], records[k], ts);
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
        finish_stretch(M, n_tokens, pos + i, records + i, m, ts, ts.gemm_u.data(), need_gate ? ts.gemm_g.data() : nullptr);
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
    me.down_columns.clear();
    me.down_h.clear();
    me.down_index.clear();
    for (int j = 0; j < nth; ++j) {
        for (uint32_t p : threads_[j]->finals) {
            if (n_tokens == 1) {
                if (h_[p] == 0.0f) continue;
                me.down_h.push_back(h_[p]);
            } else {
                me.down_index.push_back(p);
            }
            me.down_columns.push_back(down_records[p] + slice_offset);
        }
    }
    float * y0 = y + e0;
    if (n_tokens == 1) {
        columns_axpy(dt, me.down_columns.data(), me.down_h.data(), (int) me.down_columns.size(), y0, n, me.tmp.data());
    } else {
        // a prompt batch: this thread's slice of each column decoded once and added to every token, several
        // tokens' slices of y held in registers at a time; a token gets the same sums in a batch as alone
        if ((int64_t) me.tmp.size() < kBatchColumns * n) me.tmp.resize((size_t) (kBatchColumns * n));
        columns_axpy_batch(dt, me.down_columns.data(), me.down_index.data(), (int) me.down_columns.size(), h_.data(),
                           L.n_ff, (int) n_tokens, y0, L.n_out, n, me.tmp.data());
    }
    refuse_non_finite(il, y, n_tokens, L.n_out, e0, e1);
}

void refuse_non_finite(int il, const float * y, int64_t n_tokens, int64_t n_out, int64_t e0, int64_t e1) {
    // a NaN or infinity here would spread through every later layer into the logits: refuse it
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float * yt = y + t * n_out;
        if (!std::all_of(yt + e0, yt + e1, [](float v) { return std::isfinite(v); })) {
            throw NumericError("layer " + std::to_string(il) + ": the FFN output of token " + std::to_string(t) +
                               " is not finite (NaN or infinity): the sidecar's weights are corrupt or the "
                               "activations overflowed");
        }
    }
}

} // namespace neuralink
