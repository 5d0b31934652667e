#include "neuralink/token_nll.h"

#include "neuralink/ffn_layer.h"
#include "neuralink/threads.h"

#include <algorithm>
#include <cmath>

namespace neuralink {

static double row_nll(const float * row, int64_t n_vocab, int64_t target) {
    float peak = row[0];
    for (int64_t v = 1; v < n_vocab; ++v) peak = std::max(peak, row[v]);
    // float exponentials summed in blocks of 256, each block's sum added in double: no precision lost to a
    // running float sum over 10^5 terms
    double sum = 0.0;
    constexpr int64_t kBlock = 256;
    for (int64_t v0 = 0; v0 < n_vocab; v0 += kBlock) {
        const int64_t v1 = std::min(n_vocab, v0 + kBlock);
        float block = 0.0f;
        for (int64_t v = v0; v < v1; ++v) block += std::exp(row[v] - peak);
        sum += block;
    }
    return std::log(sum) + (double) peak - (double) row[target];
}

void token_nll(const float * logits, int64_t n_rows, int64_t n_vocab, const int64_t * targets, double * out,
               int threads) {
    const int n = (int) std::max<int64_t>(1, std::min<int64_t>(threads, n_rows));
    auto work = [&](int k) {
        const auto [r0, r1] = split_range(n_rows, k, n);
        for (int64_t r = r0; r < r1; ++r) {
            out[r] = row_nll(logits + r * n_vocab, n_vocab, targets[r]);
        }
    };
    run_on_threads(n, work);
}

} // namespace neuralink
