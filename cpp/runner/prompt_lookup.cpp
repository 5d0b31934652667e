#include "prompt_lookup.h"

#include <algorithm>

namespace neuralink_run {

std::vector<int32_t> prompt_lookup(const std::vector<int32_t> & text, int max_tokens) {
    const size_t n = text.size();
    if (max_tokens <= 0) {
        return {};
    }
    for (size_t ngram = std::min(kLookupNgram, n > 0 ? n - 1 : 0); ngram > 0; --ngram) {
        const auto tail = text.end() - (std::ptrdiff_t) ngram;
        // the most recent occurrence that is followed by at least one token: it starts before n - ngram
        for (size_t start = n - ngram; start-- > 0;) {
            if (std::equal(tail, text.end(), text.begin() + (std::ptrdiff_t) start)) {
                const size_t from = start + ngram;
                const size_t to = std::min(n, from + (size_t) max_tokens);
                return { text.begin() + (std::ptrdiff_t) from, text.begin() + (std::ptrdiff_t) to };
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

void StallShare::observe(double stall_seconds, double wall_seconds) {
    const double share = stall_seconds / std::max(wall_seconds, 1e-9);
    share_ = measured_ ? 0.75 * share_ + 0.25 * share : share;
    measured_ = true;
}

} // namespace neuralink_run
