#include "generation.h"

#include "neuralink/prompt_lookup.h"

#include "neuralink/errors.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>

namespace neuralink_run {

using neuralink::confirmed_prefix;
using neuralink::kAutoProposals;
using neuralink::DraftGate;
using neuralink::kDraftTrialShare;
using neuralink::prompt_lookup;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string piece(const llama_vocab * vocab, llama_token token) {
    char buf[256];
    const int n = llama_token_to_piece(vocab, token, buf, sizeof(buf), 0, false);
    return n > 0 ? std::string(buf, (size_t) n) : std::string();
}

// greedy: the first of the largest logits of output row `row` (-1: the last)
llama_token argmax(llama_context * ctx, int32_t row, int n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, row);
    return (llama_token) (std::max_element(logits, logits + n_vocab) - logits);
}

// llama_batch_init's batch, freed when it goes out of scope
struct OwnedBatch {
    llama_batch batch;
    explicit OwnedBatch(int n) : batch(llama_batch_init(n, 0, 1)) {}
    ~OwnedBatch() { llama_batch_free(batch); }
    OwnedBatch(const OwnedBatch &) = delete;
    OwnedBatch & operator=(const OwnedBatch &) = delete;
};

// llama_decode of `tokens` at positions pos0... of sequence 0, with a logits row for every one of them
int decode_every_row(llama_context * ctx, const std::vector<llama_token> & tokens, llama_pos pos0) {
    OwnedBatch b((int) tokens.size());
    for (size_t j = 0; j < tokens.size(); ++j) {
        b.batch.token[j] = tokens[j];
        b.batch.pos[j] = pos0 + (llama_pos) j;
        b.batch.n_seq_id[j] = 1;
        b.batch.seq_id[j][0] = 0;
        b.batch.logits[j] = 1;
    }
    b.batch.n_tokens = (int32_t) tokens.size();
    return llama_decode(ctx, b.batch);
}

// Whether, and how many, drafts this run may verify; the reason when none.
DraftTotals draft_setup(const RunnerOptions & o, const neuralink::SparseFfn * sparse) {
    DraftTotals d;
    const int rows = verification_rows(o);
    if (rows <= 1) {
        d.off_reason = o.prompt_lookup == 0 ? "off (--prompt-lookup 0)"
                     : !o.follow_tokens.empty() || !o.dump_logits.empty()
                           ? "off (--follow-tokens and --dump-logits compare one token at a time)"
                           : "off (a batch of one token: raise --batch-size)";
        return d;
    }
    d.automatic = o.prompt_lookup < 0;
    if (d.automatic && !(sparse && sparse->streams_regions())) {
        // the records are cached or read sparsely: a verification would add arithmetic and save no reads
        d.off_reason = "off (the records are not read whole each token: cache policy is not stream)";
        return d;
    }
    d.proposals = rows - 1;
    return d;
}

} // namespace

void StepTotals::add(const std::vector<neuralink::LayerStepStats> & stats) {
    for (const neuralink::LayerStepStats & s : stats) {
        reads += s.reads; bytes_read += s.bytes_read; active_bytes += s.active_bytes;
        cache_hits += s.cache_hits;
        lookups += s.predicted + (s.down_reads + s.down_cache_hits > 0 ? s.final_neurons : 0);
        io_ns += s.io_ns; stall_ns += s.stall_ns; ffn_ns += s.layer_ns;
    }
}

int verification_rows(const RunnerOptions & o) {
    if (o.prompt_lookup == 0 || !o.follow_tokens.empty() || !o.dump_logits.empty()) {
        return 1;
    }
    const int proposals = o.prompt_lookup < 0 ? kAutoProposals : o.prompt_lookup;
    return std::max(1, std::min(1 + proposals, o.n_batch)); // a verification is one micro-batch
}

Generation generate(const RunnerOptions & o, llama_context * ctx, const std::vector<llama_token> & prompt,
                    neuralink::SparseFfn * sparse, const std::string & last_llama_error,
                    const std::vector<llama_token> & follow) {
    const llama_vocab * vocab = llama_model_get_vocab(llama_get_model(ctx));
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (size_t i = 0; i < follow.size(); ++i) {
        if (follow[i] < 0 || follow[i] >= n_vocab) {
            throw UsageError("--follow-tokens " + o.follow_tokens + ": token " + std::to_string(i) + " is " +
                             std::to_string(follow[i]) + ", outside this model's vocabulary of " +
                             std::to_string(n_vocab));
        }
    }
    FILE * logits_out = nullptr;
    if (!o.dump_logits.empty() && !(logits_out = std::fopen(o.dump_logits.c_str(), "wb"))) {
        throw UsageError("--dump-logits " + o.dump_logits + ": " + std::strerror(errno));
    }
    std::unique_ptr<FILE, int (*)(FILE *)> logits_guard(logits_out, &std::fclose);
    // a failed read leaves zeros in the layer's output: never let such a token through
    auto check = [&](int rc, const std::string & what) {
        if (sparse && !sparse->error().empty()) {
            if (sparse->error_is_numeric()) throw neuralink::NumericError("during " + what + ": " + sparse->error());
            throw neuralink::IoError("during " + what + ": " + sparse->error());
        }
        if (rc != 0) {
            throw std::runtime_error("llama_decode failed on " + what + " (status " + std::to_string(rc) + "): " +
                                     last_llama_error);
        }
    };
    auto decode = [&](const llama_token * tokens, int n, const std::string & what) {
        check(llama_decode(ctx, llama_batch_get_one(const_cast<llama_token *>(tokens), n)), what);
    };
    Generation g;
    g.drafts = draft_setup(o, sparse);
    std::fputs(o.prompt.c_str(), stdout);
    std::fflush(stdout);
    auto t0 = Clock::now();
    for (size_t i = 0; i < prompt.size(); i += (size_t) o.n_batch) {
        const int n = (int) std::min(prompt.size() - i, (size_t) o.n_batch);
        decode(prompt.data() + i, n, "the prompt");
    }
    g.prompt.seconds = seconds_since(t0);
    g.prompt.tokens = prompt.size();
    if (sparse) {
        g.prompt.add(sparse->take_stats());
    }

    std::vector<llama_token> text = prompt; // what prompt lookup searches: the prompt and the tokens generated
    // prints and keeps a generated token; false once generation ends (end of generation, or n_predict reached)
    auto emit = [&](llama_token greedy) {
        const llama_token next = follow.empty() ? greedy : follow[g.tokens.size()];
        g.greedy.push_back(greedy);
        if (!o.ignore_eos && llama_vocab_is_eog(vocab, next)) {
            return false;
        }
        g.tokens.push_back(next);
        text.push_back(next);
        std::fputs(piece(vocab, next).c_str(), stdout);
        std::fflush(stdout);
        return (int) g.tokens.size() < o.n_predict; // the last token is printed, not fed back
    };
    auto dump_row = [&] {
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (logits_out && std::fwrite(logits, sizeof(float), (size_t) n_vocab, logits_out) != (size_t) n_vocab) {
            throw std::runtime_error("--dump-logits " + o.dump_logits + ": write failed: " + std::strerror(errno));
        }
    };
    DraftGate gate; // automatic drafts: made while they deliver tokens faster than single decodes
    std::vector<llama_token> fed, greedy_rows;
    t0 = Clock::now();
    llama_token greedy = argmax(ctx, -1, n_vocab);
    if (o.n_predict > 0) {
        dump_row();
    }
    while (o.n_predict > 0 && emit(greedy)) {
        const std::string what = "generated token " + std::to_string(g.tokens.size() - 1);
        std::vector<llama_token> draft;
        if (g.drafts.proposals > 0) {
            // every proposal confirmed, the token after them is still one of n_predict
            const int room = o.n_predict - (int) g.tokens.size() - 1;
            draft = prompt_lookup(text, std::min(g.drafts.proposals, room));
            if (!draft.empty() && g.drafts.automatic && !gate.draft()) {
                draft.clear();
            }
        }
        if (draft.empty()) {
            const auto t_token = Clock::now();
            decode(&g.tokens.back(), 1, what);
            ++g.decode.tokens;
            if (sparse) {
                const std::vector<neuralink::LayerStepStats> stats = sparse->take_stats();
                uint64_t stall_ns = 0;
                for (const neuralink::LayerStepStats & s : stats) {
                    stall_ns += s.stall_ns;
                }
                gate.observe_single(stall_ns * 1e-9, seconds_since(t_token));
                g.decode.add(stats);
            }
            greedy = argmax(ctx, -1, n_vocab);
            dump_row();
            continue;
        }
        // the fed token and the proposals in one batch; the KV entries of what it does not confirm are dropped
        const auto t_pass = Clock::now();
        fed.assign(1, g.tokens.back());
        fed.insert(fed.end(), draft.begin(), draft.end());
        const llama_pos pos0 = llama_memory_seq_pos_max(llama_get_memory(ctx), 0) + 1;
        check(decode_every_row(ctx, fed, pos0), what + " and a draft of " + std::to_string(draft.size()));
        greedy_rows.resize(fed.size());
        for (size_t j = 0; j < fed.size(); ++j) {
            greedy_rows[j] = argmax(ctx, (int32_t) j, n_vocab);
        }
        const size_t kept = confirmed_prefix(draft, greedy_rows);
        llama_memory_seq_rm(llama_get_memory(ctx), 0, pos0 + 1 + (llama_pos) kept, -1);
        gate.observe_verification(seconds_since(t_pass), 1 + kept);
        ++g.drafts.verifications;
        g.drafts.proposed += draft.size();
        g.drafts.confirmed += kept;
        g.decode.tokens += 1 + kept;
        if (sparse) {
            g.decode.add(sparse->take_stats());
        }
        bool going = true;
        for (size_t j = 0; j < kept && going; ++j) {
            going = emit(draft[j]);
        }
        if (!going) {
            break;
        }
        greedy = greedy_rows[kept];
    }
    g.decode.seconds = seconds_since(t0);
    if (gate.stall().measured()) {
        g.drafts.stall_share = gate.stall().value();
    }
    if (gate.single_seconds().measured()) {
        g.drafts.single_seconds = gate.single_seconds().value();
    }
    g.drafts.drafted_seconds = gate.drafted_seconds();
    std::fputs("\n", stdout);
    std::fflush(stdout);
    return g;
}

void print_totals(const char * what, const StepTotals & t, bool sparse) {
    if (t.tokens == 0) {
        return;
    }
    const double n = (double) t.tokens;
    std::fprintf(stderr, "%-10s %6llu tokens  %8.3f s  %9.2f tok/s", what, (unsigned long long) t.tokens, t.seconds,
                 n / t.seconds);
    if (!sparse) {
        std::fputc('\n', stderr); // the dense engine keeps no per-layer counters
        return;
    }
    std::fprintf(stderr, "  FFN %.3f ms/token\n", t.ffn_ns / n / 1e6);
    const double lookups = (double) t.lookups;
    std::fprintf(stderr,
                 "           reads/token %.1f  bytes/token %.1f KiB  mean read %.1f KiB  cache hits %.1f%%\n"
                 "           I/O %.3f ms/token  I/O stall %.3f ms/token  effective bandwidth %.1f MB/s\n",
                 t.reads / n, t.bytes_read / n / 1024.0, t.reads ? t.bytes_read / (double) t.reads / 1024.0 : 0.0,
                 lookups > 0 ? 100.0 * t.cache_hits / lookups : 0.0, t.io_ns / n / 1e6, t.stall_ns / n / 1e6,
                 t.io_ns ? t.active_bytes / (t.io_ns / 1e9) / 1e6 : 0.0);
}

void print_drafts(const DraftTotals & d) {
    if (d.proposals == 0) {
        std::fprintf(stderr, "drafts     %s\n", d.off_reason.c_str());
        return;
    }
    char gate[120] = "";
    if (d.automatic) {
        std::snprintf(gate, sizeof(gate), " while faster than single tokens (tried where reads take %.0f %% of a "
                      "token or more)", 100.0 * kDraftTrialShare);
    }
    std::fprintf(stderr, "drafts     prompt lookup, up to %d tokens%s: %llu verifications, %llu of %llu proposed "
                 "tokens confirmed", d.proposals, gate,
                 (unsigned long long) d.verifications, (unsigned long long) d.confirmed,
                 (unsigned long long) d.proposed);
    if (d.stall_share >= 0) {
        std::fprintf(stderr, "; reads took %.0f %% of a single token", 100.0 * d.stall_share);
    }
    if (d.single_seconds >= 0 && d.drafted_seconds >= 0) {
        std::fprintf(stderr, "; %.1f ms a token single, %.1f drafted", 1e3 * d.single_seconds,
                     1e3 * d.drafted_seconds);
    }
    std::fputc('\n', stderr);
}

static std::string join_ids(const std::vector<llama_token> & tokens) {
    std::string ids;
    for (llama_token t : tokens) {
        ids += (ids.empty() ? "" : " ") + std::to_string(t);
    }
    return ids;
}

void report(const Generation & g, const neuralink::Engine * engine, bool followed) {
    std::fprintf(stderr, "\ngenerated token ids: %s\n", join_ids(g.tokens).c_str());
    if (followed) {
        std::fprintf(stderr, "greedy token ids: %s\n", join_ids(g.greedy).c_str());
    }
    const neuralink::SparseFfn * sparse = engine ? engine->sparse() : nullptr;
    print_totals("prompt", g.prompt, sparse != nullptr);
    print_totals("generation", g.decode, sparse != nullptr);
    print_drafts(g.drafts);
    if (sparse) {
        const auto c = sparse->cache_stats();
        std::fprintf(stderr, "engine     resident %.1f MiB, bundle store %.1f MiB, cache %.1f of %.1f MiB\n",
                     sparse->resident_bytes() / 1048576.0, sparse->store_bytes() / 1048576.0,
                     c.used_bytes / 1048576.0, c.capacity_bytes / 1048576.0);
        std::fprintf(stderr, "reads      merged across gaps up to %.1f KiB (%s)\n", sparse->collapse_gap_bytes() / 1024.0,
                     sparse->options().adaptive_collapse ? "adaptive: fitted to the reads' timing" : "device model");
        if (const auto t = sparse->down_trial(); t.layers > 0) {
            std::fprintf(stderr, "down       %s: a decoded token %.2f ms with the model's own rows, %.2f ms with the "
                         "down columns (medians of %d tokens)\n",
                         !t.settled ? "rows on trial" : t.rows_kept ? "by rows" : "by columns",
                         t.rows_ns / 1e6, t.columns_ns / 1e6, t.tokens);
        }
    } else if (engine) {
        std::fprintf(stderr, "engine     dense, %.1f MiB of FFN weights resident\n", engine->weight_bytes() / 1048576.0);
    }
}

} // namespace neuralink_run
