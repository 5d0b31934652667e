#include "runner_options.h"

#include "neuralink/cpu_threads.h"
#include "neuralink/prompt_lookup.h"

#include "neuralink/sizes.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace neuralink_run {

using neuralink::kAutoProposals;
using neuralink::kDraftTrialShare;
using neuralink::kMaxProposals;

const char * default_io_backend() {
#if defined(NEURALINK_RUNNER_DEFAULT_IO)
    return NEURALINK_RUNNER_DEFAULT_IO;
#elif defined(__ANDROID__)
    return "pread";
#else
    return "auto";
#endif
}

const char * default_io_backend_reason() {
#if defined(NEURALINK_RUNNER_DEFAULT_IO)
    return "set when this runner was built (NEURALINK_RUNNER_DEFAULT_IO)";
#elif defined(__ANDROID__)
    return "the Android default: seccomp commonly refuses io_uring to apps and adb shells";
#else
    return "the Linux default: io_uring where the kernel allows it, else the pread pool";
#endif
}

std::string usage(const char * argv0) {
    std::string u = std::string("usage: ") + argv0 + " -m MODEL.gguf -p PROMPT [options]\n";
    u += R"(
Generates text greedily with llama.cpp, every layer's FFN computed by
neuralink's engine through the FFN hook: densely from the GGUF's weights, or
sparsely from a converted model's sidecar (bundles read from flash with direct
I/O). Text is streamed to stdout; statistics and diagnostics go to stderr.

model and weights:
  -m, --model FILE         the GGUF to run (a model converted by `neuralink convert`
                           for sparse mode, or any supported GGUF for dense mode)
  --sidecar FILE           the bundle store to read FFN neurons from; by default the
                           sidecar a converted model names (neuralink.sidecar.name),
                           looked up beside the model
  --dense                  ignore any sidecar: read all FFN weights into RAM once
  --ffn NAME               who computes the FFNs: engine (neuralink's), llama (no
                           engine, no hook: llama.cpp from its mapped weights, the
                           baseline to compare with) or auto: llama for a converted
                           model when stock llama.cpp running it whole fits the
                           memory there is (the tighter of the cgroup limit and
                           available memory, as --cache-bytes' default) and no
                           option only the engine takes is given (--dense,
                           --predictor, --cache-policy, --cache-bytes,
                           --memory-budget, --io-backend, --queue-depth,
                           --no-direct-io, --adaptive-collapse, --down-rows,
                           --prompt-lookup above 0, --output-screen on), else
                           engine (default auto)
  --stock-ffn              the same as --ffn llama
  --predictor NAME         how active neurons are found with a sidecar: gate (exact
                           gate from resident gate rows and the sidecar's threshold),
                           dense (every neuron: the reference), lowrank (the
                           sidecar's low-rank estimate; no gate row resident when
                           the records hold them) or oracle (the true active set,
                           for measurement); default: the predictor the
                           conversion validated, else dense
  --cache-policy NAME      DRAM cache of bundles: auto (the whole store when it fits,
                           else stream when reads would cover the layers anyway,
                           else pinned), none, lru, s3fifo, linking, pinned, stream
                           (each layer's records read whole, ahead of the layer;
                           no cache) (default auto)
  --cache-bytes SIZE       the cache's size (0: no cache). Default: without
                           --memory-budget, sized from the memory there is (the
                           tighter of the cgroup limit and available memory, less
                           10 % and at least 256 MiB), which may hold the whole
                           store (then read at load in long sequential reads)
  --memory-budget SIZE     the whole process's memory: everything resident is
                           accounted (process, non-FFN weights, engine, KV cache,
                           llama.cpp buffers, engine scratch) and the bundle cache
                           gets the rest; below the minimum, some layers' gate rows
                           are read per token instead of kept, and a budget even
                           that cannot meet is refused. Locks the weights read
                           every token in RAM (read from the mapping: llama.cpp
                           makes no repacked copies of them). Overrides
                           --cache-bytes. Needs a sidecar.
  --io-backend NAME        auto (io_uring where the kernel allows it, else a pool of
                           pread threads), uring or pread (default: )";
    u += default_io_backend();
    u += R"(; on Android
                           pread, since seccomp commonly refuses io_uring there)
  --queue-depth N          reads in flight (per compute thread with io_uring; default )";
    u += std::to_string(neuralink::kDefaultQueueDepth);
    u += R"()
  --no-direct-io           read through the page cache instead of O_DIRECT
  --adaptive-collapse      fit the cost of a read (latency, bandwidth) to the reads'
                           own timing while running and merge runs by that, instead
                           of by the built-in device model (off by default; the
                           fitted gap is printed at the end)
  --down-rows on|trial|off when the cache holds the whole store: on (the default)
                           computes the down projection by the converted GGUF's
                           own rows in the layers where the cost model says they
                           cost less than the sidecar's columns; trial times rows
                           and columns on the first decoded tokens and keeps the
                           faster (two encodings of the weights: the text then
                           depends on the timing); off keeps the columns
  --output-screen auto|on|off
                           an untied output matrix replaced by a q3_K copy that
                           ranks the vocabulary, the rows within 10 nats of its
                           maximum read from the model and multiplied exactly
                           (greedy decoding takes llama.cpp's token): under
                           --memory-budget or a tight cgroup limit (auto, the
                           default), always (on), or never (off)

generation:
  -p, --prompt TEXT        the prompt (tokenized with the model's BOS where it uses one)
  -n, --n-predict N        tokens to generate (default 64)
  -t, --threads N          compute threads (default: one per physical core this process may use; on a
                           hybrid CPU its big or P-cores only)
  -c, --ctx-size N         context length (default: prompt + n-predict tokens)
  -b, --batch-size N       prompt tokens per decode call (default 512, or )";
    u += std::to_string(neuralink::kBudgetBatch);
    u += R"( under
                           --memory-budget: more of the budget left to the cache)
  --flash-attn             llama.cpp's flash attention (default off, as neuralink.Llama,
                           so both give the same tokens)
  --ignore-eos             keep generating past end-of-generation tokens
  --prompt-lookup N|auto   drafts: propose up to N tokens that followed an earlier
                           occurrence of the last tokens and verify them with the
                           next one in one batch, which reads the layers' records
                           once; keeps what the greedy choice confirms. auto (the
                           default): )";
    u += std::to_string(kAutoProposals);
    u += R"(, under cache policy stream only, tried
                           where waiting for reads takes )";
    u += std::to_string((int) (kDraftTrialShare * 100 + 0.5));
    u += R"( % of a token or more
                           (below that a verification's arithmetic costs more than
                           it saves) and made while they give tokens faster than
                           single decodes, both timed as it runs; 0: none. Greedy
                           text may differ slightly from one token at a time
                           (llama.cpp's batched kernels)
  --dump-logits FILE       write the logits behind each generated token: raw float32,
                           little-endian, one row of n_vocab values per token
  --follow-tokens FILE     feed the token ids in FILE (whitespace-separated, e.g. the
                           'generated token ids' of another run) instead of the greedy
                           choice, so two builds' logits compare at every step; the
                           greedy choices are still reported ('greedy token ids')

other:
  -v, --verbose            show llama.cpp's own log
  -h, --help               this text

SIZE is bytes or a number with a unit: 120MB, 1.5GiB, 512M (K/M/G and
KiB/MiB/GiB binary, kB/MB/GB decimal).

exit status: 0 done; 1 a read or decode failed while generating; 2 bad
arguments; 3 a missing, unreadable or malformed model or sidecar, or a
sidecar of another model; 4 a model whose FFNs the hook cannot take (the
architecture and the reason are named); 5 a memory budget below the minimum.
)";
    return u;
}

uint64_t parse_size(const std::string & text, const char * what) {
    try {
        return neuralink::parse_size(text);
    } catch (const std::invalid_argument & e) {
        throw UsageError(std::string(what) + ": " + e.what());
    }
}

static int parse_int(const std::string & flag, const std::string & text, int min, int max) {
    char * end = nullptr;
    errno = 0;
    const long v = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0 || v < min || v > max) {
        throw UsageError(flag + " expects an integer in [" + std::to_string(min) + ", " + std::to_string(max) +
                         "], got '" + text + "'");
    }
    return (int) v;
}

static void check_name(const std::string & flag, const std::string & value, std::initializer_list<const char *> names) {
    std::string all;
    for (const char * n : names) {
        if (value == n) {
            return;
        }
        all += (all.empty() ? "" : ", ") + std::string(n);
    }
    throw UsageError(flag + " must be one of " + all + ", got '" + value + "'");
}

RunnerOptions parse_options(int argc, char ** argv) {
    RunnerOptions o;
    bool predictor_given = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        // every option but the switches takes the next argument
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                throw UsageError(a + " expects a value");
            }
            return argv[++i];
        };
        if (a == "-h" || a == "--help") { o.help = true; return o; }
        else if (a == "-m" || a == "--model") { o.model = value(); }
        else if (a == "--sidecar") { o.sidecar = value(); }
        else if (a == "--dense") { o.dense = true; }
        else if (a == "--stock-ffn") { o.ffn = "llama"; }
        else if (a == "--ffn") { o.ffn = value(); }
        else if (a == "--predictor") { o.predictor = value(); predictor_given = true; }
        else if (a == "--cache-policy") { o.cache_policy = value(); }
        else if (a == "--cache-bytes") { o.cache_bytes = parse_size(value(), "--cache-bytes"); o.cache_bytes_given = true; }
        else if (a == "--memory-budget") { o.memory_budget = parse_size(value(), "--memory-budget"); }
        else if (a == "--io-backend") { o.io_backend = value(); o.io_backend_given = true; }
        else if (a == "--queue-depth") { o.queue_depth = parse_int(a, value(), 1, 1024); }
        else if (a == "--no-direct-io") { o.direct_io = false; }
        else if (a == "--adaptive-collapse") { o.adaptive_collapse = true; }
        else if (a == "--down-rows") { o.down_rows = value(); }
        else if (a == "--output-screen") { o.output_screen = value(); }
        else if (a == "-p" || a == "--prompt") { o.prompt = value(); }
        else if (a == "-n" || a == "--n-predict") { o.n_predict = parse_int(a, value(), 0, 1 << 20); }
        else if (a == "-t" || a == "--threads") { o.n_threads = parse_int(a, value(), 1, 256); }
        else if (a == "-c" || a == "--ctx-size") { o.n_ctx = parse_int(a, value(), 1, 1 << 24); }
        else if (a == "-b" || a == "--batch-size") { o.n_batch = parse_int(a, value(), 1, 1 << 16); o.n_batch_given = true; }
        else if (a == "--flash-attn") { o.flash_attn = true; }
        else if (a == "--ignore-eos") { o.ignore_eos = true; }
        else if (a == "--prompt-lookup") {
            const std::string v = value();
            try {
                o.prompt_lookup = v == "auto" ? -1 : parse_int(a, v, 0, kMaxProposals);
            } catch (const UsageError &) {
                throw UsageError(a + " expects 'auto' or a number of tokens in [0, " + std::to_string(kMaxProposals) +
                                 "], got '" + v + "'");
            }
        }
        else if (a == "--dump-logits") { o.dump_logits = value(); }
        else if (a == "--follow-tokens") { o.follow_tokens = value(); }
        else if (a == "-v" || a == "--verbose") { o.verbose = true; }
        else { throw UsageError("unknown argument '" + a + "' (see --help)"); }
    }
    if (o.model.empty()) {
        throw UsageError("no model: pass -m MODEL.gguf");
    }
    if (o.prompt.empty()) {
        throw UsageError("no prompt: pass -p TEXT");
    }
    check_name("--ffn", o.ffn, { "auto", "engine", "llama" });
    o.stock_ffn = o.ffn == "llama";
    if (o.stock_ffn && (o.dense || !o.sidecar.empty() || predictor_given || o.cache_bytes_given || o.memory_budget)) {
        throw UsageError("--ffn llama (--stock-ffn) runs llama.cpp alone: it takes none of --dense, --sidecar, "
                         "--predictor, --cache-bytes, --memory-budget");
    }
    o.engine_options_given = o.dense || predictor_given || o.cache_policy != "auto" || o.cache_bytes_given ||
                             o.memory_budget || o.io_backend_given || o.queue_depth != neuralink::kDefaultQueueDepth ||
                             !o.direct_io || o.adaptive_collapse || o.down_rows != "on" || o.prompt_lookup > 0 ||
                             o.output_screen == "on";
    if (o.dense && !o.sidecar.empty()) {
        throw UsageError("--dense and --sidecar exclude each other");
    }
    if (predictor_given) {
        check_name("--predictor", o.predictor, { "gate", "dense", "lowrank", "oracle" });
        if (o.dense && o.predictor != "dense") {
            throw UsageError("--predictor " + o.predictor + " needs a sidecar, and --dense uses none");
        }
    }
    check_name("--cache-policy", o.cache_policy, { "auto", "none", "lru", "s3fifo", "linking", "pinned", "stream" });
    if (o.io_backend.empty()) {
        o.io_backend = default_io_backend();
    }
    check_name("--io-backend", o.io_backend, { "auto", "uring", "pread" });
    check_name("--down-rows", o.down_rows, { "on", "trial", "off" });
    check_name("--output-screen", o.output_screen, { "auto", "on", "off" });
    if ((o.dense || o.stock_ffn) && o.adaptive_collapse) {
        throw UsageError("--adaptive-collapse plans sidecar reads: it needs a sidecar, and --dense or --stock-ffn "
                         "reads none");
    }
    if (o.dense && (o.memory_budget || o.cache_bytes_given)) {
        throw UsageError("--memory-budget and --cache-bytes need a sidecar: with --dense every FFN weight is in RAM");
    }
    if (o.prompt_lookup > 0 && (!o.follow_tokens.empty() || !o.dump_logits.empty())) {
        throw UsageError("--prompt-lookup " + std::to_string(o.prompt_lookup) + " verifies several tokens per "
                         "batch; --follow-tokens and --dump-logits compare one token at a time: pass one or the other");
    }
    if (o.memory_budget && !o.n_batch_given) {
        o.n_batch = neuralink::kBudgetBatch;
    }
    if (o.n_threads == 0) {
        // neuralink.Llama's rule: a phone's big cores, a desktop's physical (performance) cores
        o.n_threads = neuralink::default_thread_count();
    }
    return o;
}

} // namespace neuralink_run
