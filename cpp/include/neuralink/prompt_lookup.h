#pragma once

// Drafts: tokens proposed by finding the last tokens earlier in the text
// (prompt lookup), verified in one batch. Under a cap where every token reads
// the layers' records whole, a batch of several tokens reads them once, so each
// token the verification confirms saves a token's reads (docs/engine.md,
// "Drafts"). One definition for neuralink-run and, through the bindings,
// neuralink.Llama's prompt_lookup= (neuralink.runtime.draft).

#include <cstddef>
#include <cstdint>
#include <vector>

namespace neuralink {

// Proposals per verification where drafts are made automatically (neuralink-run --prompt-lookup auto,
// neuralink.Llama prompt_lookup=None), and the share of a decoded token's time spent waiting for reads from which
// they are, measured in docs/benchmarks.md (sixteenth pass): a verification of 5 tokens costs ~3.5x one token's
// arithmetic, which only a long wait for the reads hides.
inline constexpr int kAutoProposals = 4;
inline constexpr double kAutoStallShare = 0.55;

// The most proposals --prompt-lookup takes.
inline constexpr int kMaxProposals = 64;

// The longest run of last tokens looked up.
inline constexpr size_t kLookupNgram = 2;

// Up to `max_tokens` tokens that followed the most recent earlier occurrence of the last `max_ngram` tokens of
// the `n` tokens of `text`, else of fewer, down to the last one; none if none occurs earlier (or max_tokens <= 0).
std::vector<int32_t> prompt_lookup(const int32_t * text, size_t n, int max_tokens, size_t max_ngram = kLookupNgram);
inline std::vector<int32_t> prompt_lookup(const std::vector<int32_t> & text, int max_tokens,
                                          size_t max_ngram = kLookupNgram) {
    return prompt_lookup(text.data(), text.size(), max_tokens, max_ngram);
}

// How many of `draft` a verification confirms: greedy[j] is the model's choice after the fed token and
// draft[0..j), so draft[j] stands while it equals greedy[j].
size_t confirmed_prefix(const std::vector<int32_t> & draft, const std::vector<int32_t> & greedy);

// The share of recent decoded tokens' time spent waiting for reads: a moving average over single-token
// decodes (each new one weighs a quarter), as neuralink.Llama's stall_share (neuralink-run's gate).
class StallShare {
  public:
    void observe(double stall_seconds, double wall_seconds);
    bool measured() const { return measured_; }
    double value() const { return share_; }
    bool at_least(double threshold) const { return measured_ && share_ >= threshold; }

  private:
    bool measured_ = false;
    double share_ = 0;
};

} // namespace neuralink
