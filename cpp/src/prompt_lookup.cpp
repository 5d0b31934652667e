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

void StallShare::observe(double stall_seconds, double wall_seconds) {
    const double share = stall_seconds / std::max(wall_seconds, 1e-9);
    share_ = measured_ ? 0.75 * share_ + 0.25 * share : share;
    measured_ = true;
}

} // namespace neuralink
