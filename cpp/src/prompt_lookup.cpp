#include "neuralink/prompt_lookup.h"

#include <algorithm>

namespace neuralink {

std::vector<int32_t> prompt_lookup(const int32_t * text, size_t n, int max_tokens, size_t max_ngram) {
    if (max_tokens <= 0) {
        return {};
    }
    const int32_t * end = text + n;
    for (size_t ngram = std::min(max_ngram, n > 0 ? n - 1 : 0); ngram > 0; --ngram) {
        const int32_t * tail = end - ngram;
        // the most recent occurrence that is followed by at least one token: it starts before n - ngram
        for (size_t start = n - ngram; start-- > 0;) {
            if (std::equal(tail, end, text + start)) {
                const size_t from = start + ngram;
                return { text + from, text + std::min(n, from + (size_t) max_tokens) };
            }
        }
    }
    return {};
}

size_t confirmed_prefix(const std::vector<int32_t> & draft, const std::vector<int32_t> & greedy) {
    size_t j = 0;
    while (j < draft.size() && j < greedy.size() && draft[j] == greedy[j]) {
        ++j;
    }
    return j;
}

void MovingAverage::add(double value) {
    value_ = measured_ ? (1 - weight_) * value_ + weight_ * value : value;
    measured_ = true;
}

void StallShare::observe(double stall_seconds, double wall_seconds) {
    share_.add(stall_seconds / std::max(wall_seconds, 1e-9));
}

void DraftGate::observe_single(double stall_seconds, double wall_seconds) {
    stall_.observe(stall_seconds, wall_seconds);
    single_.add(wall_seconds);
    since_single_ = 0;
}

void DraftGate::observe_verification(double wall_seconds, size_t produced) {
    if (produced > 0) {
        pass_.add(wall_seconds);
        produced_.add((double) produced);
        since_pass_ = 0;
    }
}

bool DraftGate::draft() {
    // below the share the reads hide too little of a verification's arithmetic to try one
    const bool worth_trying = stall_.at_least(trial_share_);
    if (!pass_.measured()) {
        return worth_trying;
    }
    ++since_single_;
    ++since_pass_;
    if (drafted_seconds() < single_.value()) {
        return since_single_ < kDraftRetrial; // ahead: a single token once in a while, if none came otherwise
    }
    return worth_trying && since_pass_ >= kDraftRetrial;
}

} // namespace neuralink
