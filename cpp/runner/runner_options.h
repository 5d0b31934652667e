#pragma once

// neuralink-run's command line: what to run and how, parsed and checked
// before any file is opened.

#include "neuralink/defaults.h"

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace neuralink_run {

// Exit codes, documented in --help.
enum ExitCode : int {
    kExitOk          = 0,
    kExitRunFailed   = 1, // a read or decode failed while generating
    kExitBadArgs     = 2,
    kExitModelFile   = 3, // a missing, unreadable or malformed model or sidecar, or a mismatched sidecar
    kExitUnsupported = 4, // a well-formed model whose FFNs the hook cannot take
    kExitBudget      = 5, // the memory budget cannot hold the model
};

// A command line that cannot be run; the message says what to change.
struct UsageError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

struct RunnerOptions {
    std::string model;
    std::string sidecar;         // empty: the one the converted model names, if any
    bool dense = false;          // ignore any sidecar: all FFN weights in RAM
    bool stock_ffn = false;      // no engine: llama.cpp's own FFNs (the baseline, and a reference): --ffn llama
    std::string ffn = "auto";    // who computes the FFNs: engine, llama, or auto (llama where the model fits whole)
    bool engine_options_given = false; // an option only the engine takes: --ffn auto then runs the engine
    std::string predictor;       // empty: "gate" where the sidecar allows it, else "dense"
    std::string cache_policy = "auto";
    uint64_t cache_bytes = 0;
    bool cache_bytes_given = false; // else, without --memory-budget, the cache is sized from the memory there is
    std::optional<uint64_t> memory_budget;
    std::string io_backend;      // "auto", "uring" or "pread"; empty: the platform default
    bool io_backend_given = false; // false: io_backend is this build's default (logged as such)
    int queue_depth = neuralink::kDefaultQueueDepth;
    bool adaptive_collapse = false; // fit the read cost (and the collapse gap) to the reads' own timing
    std::string down_rows = "on"; // the converted GGUF's down rows where they pay (on), timed against the columns
                                   // (trial), or never (off), when the cache holds the whole store
    std::string output_screen = "auto"; // a coarse copy of an untied output matrix in its place (output_screen.h):
                                        // under a budget (auto), always (on) or never (off)
    bool direct_io = true;
    std::string prompt;
    int n_predict = 64;
    int n_threads = 0;           // 0: the hardware's threads, at most 4
    int n_ctx = 0;               // 0: prompt + n_predict tokens
    int n_batch = 512;           // kBudgetBatch under --memory-budget or a tight cgroup limit, unless -b is given
    bool n_batch_given = false;
    // set by run(): no budget given, and a cgroup limit too tight for the whole store (tight_cgroup_limit), which
    // the run then treats as a budget (micro-batches, repacking, locked weights)
    bool tight_cgroup = false;
    bool flash_attn = false;     // off, as neuralink.Llama (llama-cpp-python's default): same tokens as Python
    bool ignore_eos = false;
    int prompt_lookup = -1;      // drafts of N tokens per verification; 0 none; -1 auto (stream, reads dominate)
    std::string dump_logits;     // raw float32, one row of n_vocab per generated token
    std::string follow_tokens;   // feed these token ids instead of the greedy ones (compare builds step by step)
    bool verbose = false;        // llama.cpp's own log
    bool help = false;
};

// Parses argv; throws UsageError naming the offending argument.
RunnerOptions parse_options(int argc, char ** argv);

// The --help text.
std::string usage(const char * argv0);

// neuralink::parse_size (neuralink/sizes.h) for the option `what`; throws UsageError naming it.
uint64_t parse_size(const std::string & text, const char * what);

// The read path used when --io-backend is not given: "pread" on Android, where
// seccomp commonly refuses io_uring to apps and shells, "auto" elsewhere; a
// build may fix it with NEURALINK_RUNNER_DEFAULT_IO (cpp/CMakeLists.txt).
const char * default_io_backend();

// Why default_io_backend() is what it is, for the log.
const char * default_io_backend_reason();

} // namespace neuralink_run
