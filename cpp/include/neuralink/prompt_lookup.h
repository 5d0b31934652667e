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
// neuralink.Llama prompt_lookup=None).
inline constexpr int kAutoProposals = 4;
// Automatic drafts are tried only where waiting for reads takes at least this share of a single decoded token
// (a verification of 5 tokens costs ~3.5x one token's arithmetic, which only a wait for the reads can hide), and
// then made while they deliver tokens faster than single decodes (DraftGate). Measured (docs/benchmarks.md):
// drafts lost 20-57 % at shares 0-0.26 (uncapped Qwen2.5-Coder-1.5B, SmolLM2 under 220MB), were even at
// 0.45-0.46 on an EPYC machine and more than doubled the speed at 0.45-0.56 on a Xeon whose arithmetic and
// disk are both slower, where a fixed share of 0.55 had shut them.
inline constexpr double kDraftTrialShare = 0.35;
// While one way is ahead, the other is taken once in this many opportunities, so that both stay measured.
inline constexpr unsigned kDraftRetrial = 16;

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

// A moving average in which each new value weighs `weight` (a quarter unless given); unmeasured until the first
// value, which it takes whole, unless it starts from a prior.
class MovingAverage {
  public:
    explicit MovingAverage(double weight = 0.25) : weight_(weight) {}
    MovingAverage(double weight, double prior) : weight_(weight), measured_(true), value_(prior) {}

    void add(double value);
    bool measured() const { return measured_; }
    double value() const { return value_; }

  private:
    double weight_;
    bool measured_ = false;
    double value_ = 0;
};

// The share of recent decoded tokens' time spent waiting for reads: a moving average over single-token
// decodes (each new one weighs a quarter), as neuralink.Llama's stall_share.
class StallShare {
  public:
    void observe(double stall_seconds, double wall_seconds);
    bool measured() const { return share_.measured(); }
    double value() const { return share_.value(); }
    bool at_least(double threshold) const { return measured() && value() >= threshold; }

  private:
    MovingAverage share_;
};

// The tokens a verification produces, as DraftGate assumes before any is made.
inline constexpr double kDraftPriorProduced = 2.0;

// Whether automatic drafts are verified, decided by what they deliver (neuralink-run --prompt-lookup auto and
// neuralink.Llama's prompt_lookup=None): once waiting for reads takes at least kDraftTrialShare of a single
// decoded token, a verification is tried, and then they are made while a verification's seconds over the
// tokens a verification produces (the proposals it confirms and the token after them) stay below a single
// decode's seconds. Seconds are moving averages in which each new value weighs a quarter (the cost of a pass
// against a single token is the machine's); confirmations come in bursts, so the tokens a pass produces are
// averaged with each new pass weighing an eighth, from kDraftPriorProduced. Both stay measured: while drafts are
// ahead, a single token is decoded where none was for kDraftRetrial opportunities (lookups that find nothing
// decode single tokens anyway); while they are behind, one opportunity in kDraftRetrial is verified (only where
// the share is still at least the trial share).
class DraftGate {
  public:
    explicit DraftGate(double trial_share = kDraftTrialShare) : trial_share_(trial_share) {}

    // A decode of one token: its seconds, of which `stall_seconds` waiting for reads.
    void observe_single(double stall_seconds, double wall_seconds);
    // A verification: its seconds and the tokens it produced (1 + the proposals confirmed).
    void observe_verification(double wall_seconds, size_t produced);
    // Whether to verify the proposals a lookup found: one opportunity.
    bool draft();

    const StallShare & stall() const { return stall_; }
    const MovingAverage & single_seconds() const { return single_; } // per token
    const MovingAverage & pass_seconds() const { return pass_; }     // per verification
    double produced_per_pass() const { return produced_.value(); } // the prior until verifications are made
    // A verification's seconds per token produced, or -1 before any verification.
    double drafted_seconds() const { return pass_.measured() ? pass_.value() / produced_per_pass() : -1; }

  private:
    double trial_share_;
    StallShare stall_;
    MovingAverage single_, pass_;
    MovingAverage produced_{ 0.125, kDraftPriorProduced }; // tokens a verification produces: a long memory
    unsigned since_single_ = 0, since_pass_ = 0; // opportunities since each was last observed
};

} // namespace neuralink
