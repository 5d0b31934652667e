#include "neuralink/contribution_mask.h"

#include "neuralink/threads.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace neuralink {

static MaskCounts mask_rows(Activation act, const float * gate, float * h, int64_t r0, int64_t r1, int64_t n_ff,
                            const float * candidate_scale, const float * down_norm, float candidate_threshold,
                            float threshold, bool apply) {
    MaskCounts c;
    for (int64_t r = r0; r < r1; ++r) {
        const float * g = gate + r * n_ff;
        float * hr = h + r * n_ff;
        for (int64_t i = 0; i < n_ff; ++i) {
            const bool candidate = contribution_candidate(activate(act, g[i]), candidate_scale[i], candidate_threshold);
            const bool final = candidate && contribution_final(hr[i], down_norm[i], threshold);
            c.candidates += candidate;
            c.finals += final;
            if (!final) {
                c.changed += hr[i] != 0.0f;
                if (apply) hr[i] = 0.0f;
            }
        }
    }
    return c;
}

MaskCounts zero_dropped_pairs(Activation act, const float * gate, float * h, int64_t n_rows, int64_t n_ff,
                              const float * candidate_scale, const float * down_norm, float candidate_threshold,
                              float threshold, int threads, bool apply) {
    const int n = (int) std::max<int64_t>(1, std::min<int64_t>(threads, n_rows));
    std::vector<MaskCounts> counts((size_t) n);
    auto work = [&](int k) {
        const auto [r0, r1] = split_range(n_rows, k, n);
        counts[(size_t) k] = mask_rows(act, gate, h, r0, r1, n_ff, candidate_scale, down_norm, candidate_threshold,
                                       threshold, apply);
    };
    run_on_threads(n, work);
    MaskCounts total;
    for (const MaskCounts & c : counts) {
        total.candidates += c.candidates;
        total.finals += c.finals;
        total.changed += c.changed;
    }
    return total;
}

} // namespace neuralink
