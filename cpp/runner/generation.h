#pragma once

// neuralink-run's decoding: the prompt in micro-batches, then greedy tokens,
// one at a time or, with drafts, several verified in one batch.

#include "runner_options.h"

#include "neuralink/engine.h"
#include "neuralink/sparse_ffn.h"

#include "llama.h"

#include <cstdint>
#include <string>
#include <vector>

namespace neuralink_run {

// Layer counters summed over a phase of the run (prompt or generation).
struct StepTotals {
    uint64_t tokens = 0;
    uint64_t reads = 0, bytes_read = 0, active_bytes = 0, cache_hits = 0;
    uint64_t lookups = 0; // cache lookups: every predicted neuron's record, and in the split layout every final
                          // neuron's down record too (a layer whose down wave read or hit anything)
    uint64_t io_ns = 0, stall_ns = 0, ffn_ns = 0;
    double seconds = 0;

    void add(const std::vector<neuralink::LayerStepStats> & stats);
};

// What the drafts did: verifications made, tokens proposed and confirmed, and why none were made.
struct DraftTotals {
    int proposals = 0;          // per verification, at most; 0: drafts off
    bool automatic = false;     // made while faster than single decodes (neuralink::DraftGate)
    uint64_t verifications = 0, proposed = 0, confirmed = 0;
    double stall_share = -1;    // of single-token decodes at the end (moving average); -1: none measured
    double single_seconds = -1, drafted_seconds = -1; // per token single and per token drafted (moving averages)
    std::string off_reason;     // set when drafts were off for the whole run
};

struct Generation {
    std::vector<llama_token> tokens; // fed back (and printed): the greedy ones, or those of --follow-tokens
    std::vector<llama_token> greedy; // the argmax at each step
    StepTotals prompt, decode;       // decode.tokens: generated tokens after the first (each took a decode)
    DraftTotals drafts;
};

// The output rows a context needs for these options: 1, or 1 + the proposals a verification holds.
int verification_rows(const RunnerOptions & o);

// Decodes `prompt`, then generates up to o.n_predict greedy tokens (or those of `follow`), printing them to
// stdout. `sparse` (null for a dense engine or stock llama.cpp) supplies the counters and the read errors;
// `last_llama_error` is llama.cpp's last logged error, named when a decode fails.
Generation generate(const RunnerOptions & o, llama_context * ctx, const std::vector<llama_token> & prompt,
                    neuralink::SparseFfn * sparse, const std::string & last_llama_error,
                    const std::vector<llama_token> & follow);

// Prints a phase's totals to stderr (per-token reads and bytes only for a sparse engine).
void print_totals(const char * what, const StepTotals & t, bool sparse);

// Prints what the drafts did to stderr.
void print_drafts(const DraftTotals & d);

// Prints the run's report to stderr: the generated (and, following a list, the greedy) token ids, each phase's
// totals, the drafts, and the engine's memory, reads and down projection (null: stock llama.cpp).
void report(const Generation & g, const neuralink::Engine * engine, bool followed);

} // namespace neuralink_run
