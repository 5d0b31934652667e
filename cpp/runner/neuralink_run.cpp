// neuralink-run: greedy generation with llama.cpp whose FFNs run in
// neuralink's engine, without Python. It does what neuralink.Llama does
// (plugin/neuralink/llama.py): engine first (it reads what it keeps of the FFN
// weights itself), then the model with its FFN weights mapped lazily, then the
// hook, and it refuses a model unless every layer is taken.

#include "neuralink/memory_plan.h"
#include "neuralink/residency.h"
#include "neuralink/model_integrity.h"
#include "generation.h"
#include "runner_options.h"

#include "neuralink/engine.h"
#include "neuralink/errors.h"
#include "neuralink/sidecar_store.h"

#include "llama-ffn-hook.h"
#include "llama.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <memory>
#include <optional>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

using namespace neuralink_run;
using neuralink::MemoryPlan;
using neuralink::gate_layers_to_stream;
using neuralink::minimum_with_gate_rows_streamed;
using neuralink::plan_memory;
using neuralink::resident_bytes;

namespace {

struct BudgetError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// llama.cpp's log: shown with --verbose, errors always; kept while the memory plan needs the buffer sizes
struct LlamaLog {
    bool verbose = false;
    bool capture = false;
    std::vector<std::string> lines;
    std::string last_error;
    ggml_log_level last_level = GGML_LOG_LEVEL_INFO;
};

void on_llama_log(ggml_log_level level, const char * text, void * user_data) {
    auto & log = *(LlamaLog *) user_data;
    if (level == GGML_LOG_LEVEL_CONT) {
        level = log.last_level; // a continuation of the previous message
    }
    log.last_level = level;
    if (log.capture) {
        log.lines.emplace_back(text);
    }
    if (level == GGML_LOG_LEVEL_ERROR) {
        log.last_error += text;
    }
    if (log.verbose || level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void note(const char * fmt, ...) __attribute__((format(printf, 1, 2)));
void note(const char * fmt, ...) {
    std::fputs("neuralink-run: ", stderr);
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stderr, fmt, ap);
    va_end(ap);
    std::fputc('\n', stderr);
}

// Opens the model for reading before anything else, so the first error names the file and the cause.
void check_readable(const std::string & path, const char * what) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) {
        throw neuralink::ModelFileError(path + ": cannot open " + what + ": " + std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        throw neuralink::ModelFileError(path + ": " + what + " is not a regular file");
    }
    const int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) {
        throw neuralink::ModelFileError(path + ": cannot read " + what + ": " + std::strerror(errno));
    }
    close(fd);
}

std::string directory_of(const std::string & path) {
    const size_t slash = path.rfind('/');
    return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

// The sidecar to use, or "" for the dense engine. A converted model names its sidecar; running it
// densely by accident would read every FFN weight into RAM, so a named but absent sidecar is an error.
std::string resolve_sidecar(const RunnerOptions & o, const neuralink::GgufModel & model) {
    if (o.dense) {
        return "";
    }
    if (!o.sidecar.empty()) {
        check_readable(o.sidecar, "sidecar");
        return o.sidecar;
    }
    const std::string name = model.get_string("neuralink.sidecar.name");
    if (name.empty()) {
        return "";
    }
    const std::string path = directory_of(o.model) + "/" + name;
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) {
        throw neuralink::ModelFileError(o.model + ": names its sidecar '" + name + "', which is not beside it (" + path +
                                        ": " + std::strerror(errno) + "); pass --sidecar FILE, or --dense to run "
                                        "without one");
    }
    check_readable(path, "sidecar");
    return path;
}

// As neuralink.Llama: the predictor the conversion validated for quality, else every neuron.
std::string default_predictor(const neuralink::SidecarStore & store) { return store.default_predictor(); }

// The policy --cache-policy auto stands for at this cache size (SparseFfn::auto_policy, as neuralink.Llama):
// the whole store when it fits (the store arena), else every region read whole ahead of its layer when collapsed
// reads would cover the layers anyway (stream), else the most frequently needed records pinned.
neuralink::CachePolicy resolved_policy(const RunnerOptions & o, const neuralink::SparseFfn & sparse, size_t bytes) {
    if (o.cache_policy != "auto") {
        return neuralink::cache_policy_from_name(o.cache_policy);
    }
    return sparse.auto_policy(bytes);
}

// For a cache holding the whole store, the converted GGUF's down rows by the engine's rule (Engine::hold_down_rows,
// as neuralink.Llama), given `room`, the memory the cache may use, as --down-rows asks.
void hold_down_rows(neuralink::Engine & engine, uint64_t room, const std::string & mode) {
    if (mode == "off") return;
    const neuralink::DownRowChoice c = engine.hold_down_rows(room, mode == "trial");
    if (c.trial) {
        note("down projection of %zu layers timed on the first decoded tokens by the model's own rows (%.0f MiB) and "
             "by the down columns; the faster is kept", c.layers.size(), c.row_bytes / 1048576.0);
    } else if (!c.layers.empty()) {
        note("down projection of %zu layers by the model's own rows (%.0f MiB, in place of %.0f MiB of down columns)",
             c.layers.size(), c.row_bytes / 1048576.0, c.column_bytes / 1048576.0);
    }
}

// Reads the whole store into the cache when the cache holds it, rather than neuron by neuron while decoding.
void preload_store(neuralink::SparseFfn & sparse) {
    if (sparse.holds_store()) {
        const uint64_t bytes = sparse.fill_arena();
        note("bundle store read into the cache: %.1f MiB", (double) bytes / (1 << 20));
    }
}

neuralink::EngineOptions engine_options(const RunnerOptions & o, const std::string & sidecar,
                                        const std::string & predictor) {
    neuralink::EngineOptions opts;
    opts.direct_io = o.direct_io;
    if (!sidecar.empty()) {
        opts.sidecar_path = sidecar;
        opts.sparse.predictor = neuralink::predictor_from_name(predictor);
        // auto: chosen once the store's size is known (resolved_policy)
        const bool automatic = o.cache_policy == "auto";
        // (until then pinned, whose hits need no copies, like both policies auto stands for)
        opts.sparse.cache_policy = automatic ? neuralink::CachePolicy::Pinned
                                             : neuralink::cache_policy_from_name(o.cache_policy);
        opts.sparse.cache_bytes = automatic ? 0 : o.cache_bytes;
        opts.sparse.queue_depth = o.queue_depth;
        opts.sparse.direct_io = o.direct_io;
        opts.sparse.adaptive_collapse = o.adaptive_collapse;
        opts.sparse.io_backend = neuralink::io_backend_from_name(o.io_backend);
    }
    return opts;
}

// Every layer must be taken, or part of the model would run from llama.cpp's mapped weights.
void require_all_layers_taken(const neuralink::Engine & engine, const std::string & model_path) {
    std::vector<const neuralink::LayerStatus *> refused;
    for (const auto & s : engine.layer_status()) {
        if (!s.taken) {
            refused.push_back(&s);
        }
    }
    if (refused.empty()) {
        return;
    }
    std::string details;
    for (size_t i = 0; i < refused.size() && i < 3; ++i) {
        const auto & s = *refused[i];
        std::string why = s.offered ? s.reason
                : "llama.cpp did not offer its FFN to the hook (a form neuralink does not serve: fused gate/up, "
                  "per-tensor scales, clamped SwiGLU, or no build_ffn call)" +
                  (s.reason.empty() ? std::string() : "; the engine notes: " + s.reason);
        details += (i ? "; layer " : "layer ") + std::to_string(s.il) + ": " + why;
    }
    if (refused.size() > 3) {
        details += " (and " + std::to_string(refused.size() - 3) + " more)";
    }
    throw neuralink::UnsupportedModelError(model_path + ": architecture '" + engine.model().architecture() + "': " +
            std::to_string(refused.size()) + " of " + std::to_string(engine.n_layer()) +
            " layers cannot be served by neuralink: " + details);
}

struct ModelFree { void operator()(llama_model * m) const { llama_model_free(m); } };
struct ContextFree { void operator()(llama_context * c) const { llama_free(c); } };

// Detaches the hook before the context is freed, so no graph refers to the engine any more.
struct HookAttachment {
    llama_context * ctx = nullptr;
    ~HookAttachment() { if (ctx) llama_set_ffn_hook(ctx, nullptr); }
};

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    const int n = -llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), nullptr, 0, true, false);
    std::vector<llama_token> tokens((size_t) std::max(n, 0));
    if (llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(), true,
                       false) < 0) {
        throw std::runtime_error("cannot tokenize the prompt");
    }
    return tokens;
}

// The ids of --follow-tokens FILE: whitespace-separated integers.
std::vector<llama_token> read_token_ids(const std::string & path) {
    FILE * f = std::fopen(path.c_str(), "r");
    if (!f) {
        throw UsageError("--follow-tokens " + path + ": " + std::strerror(errno));
    }
    std::vector<llama_token> ids;
    long id = 0;
    int n = 0;
    while ((n = std::fscanf(f, "%ld", &id)) == 1) {
        ids.push_back((llama_token) id);
    }
    const bool clean_end = n == EOF && !std::ferror(f);
    std::fclose(f);
    if (!clean_end) {
        throw UsageError("--follow-tokens " + path + ": token " + std::to_string(ids.size()) +
                         " is not an integer (expected whitespace-separated token ids)");
    }
    return ids;
}

// Whether --ffn auto leaves a converted model's FFNs to llama.cpp: no option only the engine takes, and stock
// llama.cpp running the model whole fits the memory there is (llama_whole_need against automatic_budget, the
// context planned as run() plans it), as neuralink.Llama decides (neuralink/runtime/llama_ffn.py).
bool llama_ffn_fits(const RunnerOptions & o, const neuralink::GgufModel & model) {
    if (o.ffn != "auto" || o.engine_options_given) {
        return false;
    }
    const uint64_t rss = resident_bytes();
    const auto automatic = neuralink::automatic_budget(rss);
    const uint64_t need = neuralink::llama_whole_need(model, rss, o.n_ctx > 0 ? o.n_ctx : o.n_predict + 1);
    if (!automatic || need > automatic->bytes) {
        return false;
    }
    note("llama.cpp computes the FFNs from its mapped weights, no engine: the whole model fits %s (%.0f of %.0f "
         "MiB; --ffn engine or an engine option runs the engine)", automatic->source.c_str(), need / 1048576.0,
         automatic->bytes / 1048576.0);
    return true;
}

// The engine for the model, or null with --ffn llama (or auto, where the model fits whole); *sidecar_out is the
// sidecar it reads, if any.
std::unique_ptr<neuralink::Engine> open_engine(const RunnerOptions & o, std::string * sidecar_out) {
    check_readable(o.model, "model");
    const neuralink::GgufModel directory(o.model); // names the file if it is not a valid GGUF
    if (o.stock_ffn) {
        note("stock llama.cpp: FFNs computed by llama.cpp from its mapped weights, no engine");
        return nullptr;
    }
    const std::string sidecar = resolve_sidecar(o, directory);
    std::string predictor = "dense";
    if (!sidecar.empty()) {
        const std::string model_id = directory.get_string("neuralink.model_id");
        if (model_id.empty()) {
            throw neuralink::ModelFileError(o.model + ": not a model converted by neuralink (no neuralink.model_id); "
                                            "a sidecar belongs to the converted GGUF written with it");
        }
        const neuralink::SidecarStore store(sidecar, model_id, false); // checks the model id before any weight is read
        neuralink::verify_model_file(o.model, store); // what llama.cpp will read, before it parses the model
        if (llama_ffn_fits(o, directory)) {
            return nullptr;
        }
        predictor = o.predictor.empty() ? default_predictor(store) : o.predictor;
    } else if (!o.predictor.empty() && o.predictor != "dense") {
        throw UsageError("--predictor " + o.predictor + " needs a sidecar; " + o.model + " names none (pass --sidecar)");
    } else if (o.memory_budget) {
        throw UsageError(o.model + ": --memory-budget needs a model converted by neuralink and its sidecar "
                         "(without one, the engine keeps every FFN weight in RAM)");
    }

    const auto t0 = std::chrono::steady_clock::now();
    auto engine = std::make_unique<neuralink::Engine>(o.model, engine_options(o, sidecar, predictor));
    if (o.direct_io && !engine->direct_io()) {
        note("%s", engine->io_note().c_str());
    }
    if (auto * sparse = engine->sparse()) {
        if (o.cache_policy == "auto" && o.cache_bytes > 0 && !o.memory_budget) {
            sparse->configure_cache(resolved_policy(o, *sparse, o.cache_bytes), o.cache_bytes);
            hold_down_rows(*engine, o.cache_bytes, o.down_rows);
            preload_store(*sparse);
        }
        note("sparse: sidecar %s, predictor %s, cache %s", sidecar.c_str(), predictor.c_str(),
             neuralink::cache_policy_name(sparse->options().cache_policy));
        const std::string asked = o.io_backend_given ? "--io-backend " + o.io_backend
                : o.io_backend + " by default, " + default_io_backend_reason();
        note("reads: %s%s%s (asked: %s)", neuralink::io_backend_name(sparse->io_backend()),
             sparse->io_note().empty() ? "" : ", ", sparse->io_note().c_str(), asked.c_str());
    } else {
        note("dense: %.1f MiB of FFN weights read in %.2f s", engine->weight_bytes() / 1048576.0, seconds_since(t0));
    }
    *sidecar_out = sidecar;
    return engine;
}

// What run() holds of llama.cpp; members are freed in reverse order: the hook is detached first.
struct LlamaSession {
    std::unique_ptr<llama_model, ModelFree> model;
    std::unique_ptr<llama_context, ContextFree> ctx;
    HookAttachment attachment;
    const llama_vocab * vocab = nullptr;
    std::vector<llama_token> prompt;
};

void load_llama(const RunnerOptions & o, neuralink::Engine * engine, LlamaLog & log, LlamaSession & s) {
    llama_model_kv_override overrides[3] {}; // the empty key ends the list
    llama_model_params mparams = llama_model_default_params();
    if (engine) {
        // llama.cpp maps the FFN weights lazily: never prefetched, repacked or read by it; and the output matrix
        // an output screen stands in for
        int n = 0;
        auto lazy = [&](const char * key) {
            overrides[n].tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
            std::snprintf(overrides[n].key, sizeof(overrides[n].key), "%s", key);
            overrides[n].val_bool = true;
            ++n;
        };
        lazy(LLAMA_FFN_HOOK_LAZY_WEIGHTS_KEY);
        if (engine->output_screen()) lazy(LLAMA_FFN_HOOK_LAZY_OUTPUT_KEY);
        mparams.kv_overrides = overrides;
    }
    if (o.memory_budget || o.tight_cgroup) {
        // where memory is short, no anonymous copy of the weights llama.cpp has repacked kernels for (80 MiB on
        // Qwen2.5-Coder-1.5B): they are read from the mapping, which the budget's plan counts and locks
        mparams.use_extra_bufts = false;
    }
    s.model.reset(llama_model_load_from_file(o.model.c_str(), mparams));
    if (!s.model) {
        throw neuralink::ModelFileError(o.model + ": llama.cpp cannot load it: " +
                                        (log.last_error.empty() ? std::string("see --verbose") : log.last_error));
    }
    s.vocab = llama_model_get_vocab(s.model.get());
    s.prompt = tokenize(s.vocab, o.prompt);
    if (s.prompt.empty()) {
        throw UsageError("the prompt tokenizes to nothing");
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t) (o.n_ctx ? o.n_ctx : (int) s.prompt.size() + o.n_predict);
    cparams.n_batch = (uint32_t) o.n_batch;
    cparams.n_ubatch = (uint32_t) std::min(o.n_batch, (int) cparams.n_ubatch);
    // the last position's logits, or a verification's rows: no compute buffer for n_batch rows of logits
    cparams.n_outputs_max = (uint32_t) verification_rows(o);
    cparams.n_threads = cparams.n_threads_batch = o.n_threads;
    cparams.flash_attn_type = o.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if ((int) s.prompt.size() + o.n_predict > (int) cparams.n_ctx) {
        throw UsageError("the prompt (" + std::to_string(s.prompt.size()) + " tokens) and -n " +
                         std::to_string(o.n_predict) + " exceed the context of " + std::to_string(cparams.n_ctx) +
                         " tokens: raise --ctx-size");
    }
    s.ctx.reset(llama_init_from_model(s.model.get(), cparams));
    if (!s.ctx) {
        throw std::runtime_error("llama.cpp cannot create a context: " + log.last_error);
    }
    if (engine) {
        llama_set_ffn_hook(s.ctx.get(), engine->hook());
        s.attachment.ctx = s.ctx.get();
        require_all_layers_taken(*engine, o.model);
        if (engine->output_screen() && !engine->output_taken()) {
            note("llama.cpp computes the output product itself (not offered to the hook): the output screen is "
                 "dropped and the output matrix counted");
            engine->drop_output_screen();
        }
    }
}

// A BudgetError when `plan`'s budget is below its minimum, or below the lowest minimum streaming gate rows
// reaches: the minimum, the fix and the plan's lines. `before_load`: a plan made before llama.cpp loads
// (plan_before_load), whose minimum leaves out what the load will add.
void refuse_below_minimum(const RunnerOptions & o, const neuralink::Engine & engine, const MemoryPlan & plan,
                          const std::optional<neuralink::AutomaticBudget> & automatic, bool before_load) {
    if (plan.budget >= plan.minimum()) {
        return;
    }
    const uint64_t lowest = minimum_with_gate_rows_streamed(plan, engine);
    if (before_load && plan.budget >= lowest) {
        return; // streaming gate rows may make it fit: the loaded plan decides
    }
    char budget[160];
    if (automatic) {
        std::snprintf(budget, sizeof(budget), "%s leaves a budget of %.1f MiB (5 %% and at least %llu MiB below "
                      "it), which is", automatic->source.c_str(), plan.budget / 1048576.0,
                      (unsigned long long) (neuralink::kCgroupHeadroom >> 20));
    } else {
        std::snprintf(budget, sizeof(budget), "memory budget %.1f MiB is", plan.budget / 1048576.0);
    }
    std::string notes;
    if (lowest < plan.minimum()) notes = "with every layer's gate rows read each token";
    if (before_load) {
        notes += std::string(notes.empty() ? "" : "; ") + "counted before loading, without llama.cpp's own buffers";
    }
    char head[400];
    std::snprintf(head, sizeof(head), "%s below the minimum %.1f MiB%s%s%s", budget, lowest / 1048576.0,
                  notes.empty() ? "" : " (", notes.c_str(), notes.empty() ? "" : ")");
    throw BudgetError(o.model + ": " + head + " this model and context need (raise the " +
                      (automatic ? "limit" : "budget") + ", or lower --ctx-size / --batch-size):\n" +
                      plan.describe());
}

// Sizes the bundle cache from --memory-budget, or refuses a budget below the minimum; or, with `automatic` (no
// budget or cache size given), from the memory there is (automatic_budget), refusing only below a cgroup's limit.
void apply_memory_budget(const RunnerOptions & o, neuralink::Engine & engine, const LlamaSession & s,
                         const std::optional<neuralink::AutomaticBudget> & automatic, uint64_t process_before,
                         uint64_t load_anon_growth, const std::vector<std::string> & llama_log) {
    const uint64_t budget = automatic ? automatic->bytes : *o.memory_budget;
    auto plan_now = [&] {
        return plan_memory(engine, budget, process_before, llama_log, o.n_threads,
                           (int) llama_n_ubatch(s.ctx.get()), (int) llama_n_ctx(s.ctx.get()), load_anon_growth);
    };
    MemoryPlan plan = plan_now();
    const bool may_stream = o.cache_policy == "auto" || o.cache_policy == "stream";
    if (const int layers = gate_layers_to_stream(plan, engine, may_stream); layers > 0) {
        // every gate row resident does not fit: the fewest layers' rows are read each time the layer runs
        const double before = plan.minimum() / 1048576.0;
        engine.stream_gate_rows(layers);
        plan = plan_now();
        note("gate rows of %d of %d layers read each time their layer runs (minimum %.1f MiB, %.1f MiB with all "
             "resident)", layers, engine.n_layer(), plan.minimum() / 1048576.0, before);
    }
    // refused below the minimum where asked for, or where a cgroup's limit gave the budget (the kernel kills above
    // it); never where it came from the available memory
    if (!automatic || automatic->cgroup_limit) {
        refuse_below_minimum(o, engine, plan, automatic, false);
    }
    engine.sparse()->configure_cache(resolved_policy(o, *engine.sparse(), plan.cache()), plan.cache());
    if (engine.sparse()->streams_regions()) {
        // its two buffers replace the read buffers the plan counted
        plan = plan_now();
        note("every layer's records read whole, ahead of the layer (cache policy stream)");
    }
    if (automatic) {
        note("bundle cache %.0f MiB of a %.0f MiB store, sized from %s (--memory-budget or --cache-bytes choose it)",
             plan.cache() / 1048576.0, engine.sparse()->store_bytes() / 1048576.0, automatic->source.c_str());
    } else {
        note("memory budget:\n%s", plan.describe().c_str());
    }
    if (!automatic || o.tight_cgroup) {
        // the plan counts the weights read every token resident: keep them so under the cgroup's reclaim (with no
        // budget asked for, llama.cpp reads the repacked copies it made of them instead)
        const neuralink::LockedPages locked = neuralink::lock_every_token_weights(engine.model(),
                                                                                  engine.screened_tensor());
        if (!locked.error.empty()) {
            note("%s; %.0f MiB locked, the rest may be evicted and read again", locked.error.c_str(),
                 locked.bytes / 1048576.0);
        }
    }
    // and what the token embedding's lookups map, at most one micro-batch's rows (the plan counts that)
    if (const neuralink::LookupPages & pages = engine.bound_lookup_pages(); !pages.error.empty()) {
        note("%s; the token embedding's lookups stay mapped", pages.error.c_str());
    }
    hold_down_rows(engine, plan.budget > plan.minimum() ? plan.budget - plan.minimum() : 0, o.down_rows);
    preload_store(*engine.sparse());
}

// The output screen (output_screen.h) where --output-screen asks for it: on, or auto under a budget or a tight
// cgroup limit with a sidecar. Before llama.cpp loads (it then maps the output matrix lazily) and before the plans.
void start_output_screen(const RunnerOptions & o, neuralink::Engine & engine) {
    const bool bounded = o.memory_budget || o.tight_cgroup;
    if (o.output_screen == "off" || (o.output_screen == "auto" && !(bounded && engine.sparse()))) {
        return;
    }
    neuralink::OutputScreenOptions screen; // the engine's type and margin
    screen.n_threads = o.n_threads;
    if (const std::string why = neuralink::OutputScreen::unsupported(engine.model(), screen.coarse_type); !why.empty()) {
        if (o.output_screen == "on") {
            throw neuralink::UnsupportedModelError(o.model + ": --output-screen on, but " + why);
        }
        note("no output screen: %s", why.c_str());
        return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    engine.screen_output(screen);
    note("the output matrix screened by a %s copy of %.1f MiB in place of its %.1f MiB (made in %.1f s)",
         ggml_type_name(screen.coarse_type), engine.output_screen()->resident_bytes() / 1048576.0,
         engine.output_screen()->matrix_bytes() / 1048576.0, seconds_since(t0));
}

int run(RunnerOptions o) {
    LlamaLog log;
    log.verbose = o.verbose;
    llama_log_set(on_llama_log, &log);
    llama_backend_init();
    if (llama_ffn_hook_api_version() != LLAMA_FFN_HOOK_API_VERSION) {
        throw std::runtime_error("libllama's FFN hook API is version " + std::to_string(llama_ffn_hook_api_version()) +
                                 ", this runner was built for version " + std::to_string(LLAMA_FFN_HOOK_API_VERSION));
    }
    std::vector<llama_token> follow;
    if (!o.follow_tokens.empty()) {
        follow = read_token_ids(o.follow_tokens);
        if ((int) follow.size() < o.n_predict) {
            throw UsageError("--follow-tokens " + o.follow_tokens + ": holds " + std::to_string(follow.size()) +
                             " token ids, fewer than -n " + std::to_string(o.n_predict));
        }
    }
    if (o.memory_budget) {
        neuralink::fix_malloc_thresholds(); // what is freed leaves the process, as the plan counts it
    }
    const uint64_t process_before = resident_bytes();
    const uint64_t anon_before = neuralink::anonymous_resident_bytes();
    note("system: %s", llama_print_system_info()); // which SIMD kernels this build of ggml runs

    std::string sidecar;
    // declared before the session: the engine must outlive every graph that calls it
    std::unique_ptr<neuralink::Engine> engine = open_engine(o, &sidecar);
    const auto t0 = std::chrono::steady_clock::now();
    LlamaSession session;
    // without a budget or a cache size, the cache is sized from the memory there is, as neuralink.Llama does
    std::optional<neuralink::AutomaticBudget> automatic;
    // the context planned before the load: -c 0 is the prompt and -n (the prompt is tokenized once loaded), so at
    // least -n + 1; and its micro-batch at o.n_batch, as load_llama sets it
    const int planned_ctx = o.n_ctx > 0 ? o.n_ctx : o.n_predict + 1;
    auto planned_ubatch = [&] {
        return std::min({ planned_ctx, o.n_batch, (int) llama_context_default_params().n_ubatch });
    };
    if (!o.memory_budget && !o.cache_bytes_given && o.cache_policy != "none" && engine && engine->sparse()) {
        automatic = neuralink::automatic_budget(process_before);
        o.tight_cgroup = neuralink::tight_cgroup_limit(*engine, automatic, process_before, o.n_threads,
                                                       planned_ubatch(), planned_ctx);
        if (automatic && automatic->cgroup_limit) {
            neuralink::fix_malloc_thresholds(); // what is freed leaves the process, as the plan counts it
        }
        if (o.tight_cgroup) {
            note("%s cannot hold the whole store: run as under a memory budget of %.1f MiB", automatic->source.c_str(),
                 automatic->bytes / 1048576.0);
            if (!o.n_batch_given) {
                o.n_batch = neuralink::kBudgetBatch;
            }
        }
    }
    if (engine) {
        start_output_screen(o, *engine);
    }
    if (engine && engine->sparse() && (o.memory_budget || (automatic && automatic->cgroup_limit))) {
        // a budget the model cannot run in is refused before llama.cpp allocates its KV cache (a large context
        // under a cgroup's limit: the kernel would kill the load)
        refuse_below_minimum(o, *engine,
                             neuralink::plan_before_load(*engine, automatic ? automatic->bytes : *o.memory_budget,
                                                         process_before, o.n_threads, planned_ubatch(), planned_ctx),
                             automatic, true);
    }
    // llama.cpp logs its KV, output and compute buffer sizes while loading; attaching re-reserves the latter
    log.capture = o.memory_budget || automatic;
    load_llama(o, engine.get(), log, session);
    neuralink::release_free_heap();
    const uint64_t anon_after = neuralink::anonymous_resident_bytes();
    log.capture = false;
    if (o.memory_budget || automatic) {
        apply_memory_budget(o, *engine, session, automatic, process_before,
                            anon_after > anon_before ? anon_after - anon_before : 0, log.lines);
    }
    if (engine) {
        note("model loaded in %.2f s: architecture '%s', all %d FFNs served by the engine, %d thread%s",
             seconds_since(t0), engine->model().architecture().c_str(), engine->n_layer(), o.n_threads,
             o.n_threads == 1 ? "" : "s");
    } else {
        note("model loaded in %.2f s, %d thread%s", seconds_since(t0), o.n_threads, o.n_threads == 1 ? "" : "s");
    }
    const Generation g = generate(o, session.ctx.get(), session.prompt, engine ? engine->sparse() : nullptr,
                                  log.last_error, follow);
    report(g, engine.get(), !follow.empty());
    return kExitOk;
}

} // namespace

int main(int argc, char ** argv) {
    RunnerOptions options;
    try {
        options = parse_options(argc, argv);
    } catch (const UsageError & e) {
        std::fprintf(stderr, "neuralink-run: %s\nrun '%s --help' for usage\n", e.what(), argv[0]);
        return kExitBadArgs;
    }
    if (options.help) {
        std::fputs(usage(argv[0]).c_str(), stdout);
        return kExitOk;
    }
    try {
        return run(options);
    } catch (const UsageError & e) {
        note("%s", e.what());
        return kExitBadArgs;
    } catch (const neuralink::ModelFileError & e) {
        note("%s", e.what());
        return kExitModelFile;
    } catch (const neuralink::UnsupportedModelError & e) {
        note("%s", e.what());
        return kExitUnsupported;
    } catch (const BudgetError & e) {
        note("%s", e.what());
        return kExitBudget;
    } catch (const std::exception & e) {
        note("error: %s", e.what());
        return kExitRunFailed;
    }
}
