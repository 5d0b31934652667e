#pragma once

// The memory plan of a sparse engine under a budget (docs/engine.md, "Memory
// budget"): what the process holds before the model, the non-FFN weights, what
// the engine keeps resident, llama.cpp's KV cache, output and compute buffers
// (from llama.cpp's own log) and the engine's worst-case scratch. The bundle
// cache gets the rest. The one definition of the plan: neuralink-run uses it
// directly, neuralink.Llama through the bindings (neuralink._engine.plan_memory).

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace neuralink {

class Engine;
class GgufModel;

// ggml's GGML_TYPE_F16, llama.cpp's default type of K and V
constexpr int kKvTypeF16 = 1;

// llama.cpp's allocations as it logs them ("KV buffer size = 1.00 MiB" ...).
struct LlamaBuffers {
    uint64_t kv_cache = 0;
    uint64_t output = 0;
    uint64_t compute = 0; // the last reservation per backend: attaching the hook re-reserves
};

LlamaBuffers parse_buffer_sizes(const std::vector<std::string> & log);

// This process's resident set size (VmRSS), 0 where /proc is unreadable.
uint64_t resident_bytes();
// Its anonymous part (RssAnon: heap and private mappings, no file pages), 0 where /proc is unreadable.
uint64_t anonymous_resident_bytes();
// Hands the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). A load frees what it
// parsed (llama.cpp's vocabulary maps, the GGUF's metadata) between what it keeps: without this those pages stay
// resident, counted in the load's heap (loading Qwen2.5-Coder-1.5B's vocabulary: 58.8 MiB, 21.5 after it).
void release_free_heap();
// Keeps glibc's mmap threshold at its default (128 KiB) for the rest of the process, unless
// MALLOC_MMAP_THRESHOLD_ is set (nothing elsewhere than glibc). glibc raises the threshold to the size of each
// large block freed (up to 32 MiB); blocks below it then come from the heap and the threads' malloc arenas,
// which keep what is freed between larger blocks. Under a budget that is memory the plan cannot see: on
// Qwen2.5-Coder-1.5B under a 389.5 MiB budget neuralink-run's load heap measured 3.5 MiB more (so the region
// stream did not fit and decoding ran at half the speed) and its RSS reached 443 MiB. Called before anything
// is loaded, where a memory budget is given.
void fix_malloc_thresholds();

// The memory limit of this process's cgroup, found through `proc_cgroup` under `root`: v1's
// memory/<path>/memory.limit_in_bytes or v2's <path>/memory.max; nullopt where there is none (v1's huge
// number, v2's "max") or it cannot be read.
std::optional<uint64_t> cgroup_memory_limit(const std::string & proc_cgroup = "/proc/self/cgroup",
                                            const std::string & root = "/sys/fs/cgroup");

// What a cgroup charges beyond its processes' RSS at the least: page cache the kernel keeps active (the model's
// pages read at load and then mapped, libraries), which it did not reclaim before killing (SmolLM2 under a 220MB
// cap was OOM-killed 19 MiB below the cap and ran 28 MiB below). A budget under a cgroup limit stays this far
// below it, and 5 % below it at the least: `neuralink bench e2e`'s rule for every capped run since the seventh
// pass, peak within the cap in all of them.
constexpr uint64_t kCgroupHeadroom = 24ull << 20;
constexpr double kCgroupBudgetFraction = 0.95;
uint64_t budget_under_cgroup_limit(uint64_t limit, double fraction = kCgroupBudgetFraction);

// What a process may hold when no budget is given (its bundle cache is then sized from it): the tighter of its
// cgroup's limit less the headroom above (budget_under_cgroup_limit) and `rss` plus the system's available
// memory (MemAvailable) less a margin for the rest of the system and for allocations no plan sees (10 %, at
// least 256 MiB); where that came from, for the log; and whether the cgroup's limit was the tighter, a limit the
// kernel enforces by reclaim and by killing, as an explicit budget's. nullopt where neither can be read.
// neuralink.Llama without memory_budget= and neuralink-run without --memory-budget or --cache-bytes use it.
struct AutomaticBudget {
    uint64_t bytes = 0;
    std::string source;
    bool cgroup_limit = false;
};
std::optional<AutomaticBudget> automatic_budget(uint64_t rss);

struct MemoryPlan {
    uint64_t budget = 0;
    uint64_t process = 0;         // resident before the model was loaded
    uint64_t load_heap = 0;       // heap the load added beyond KV cache and engine rows: vocabulary, tables
    uint64_t code_pages = 0;      // library code first run after the load (ggml kernels, sampling)
    uint64_t non_ffn_weights = 0; // attention, norms, output: read every token
    uint64_t token_embedding = 0; // the pages of token_embd one context's tokens touch (all of it when tied)
    uint64_t engine_resident = 0; // gate rows, biases
    uint64_t kv_cache = 0;
    uint64_t llama_buffers = 0;   // output and compute buffers
    uint64_t engine_scratch = 0;  // I/O buffers and compute scratch, worst case
    uint64_t store_bytes = 0;     // all bundles
    uint64_t whole_store_cache = 0; // a cache this large holds them all (slots and tables): more is useless

    uint64_t minimum() const {
        return process + load_heap + code_pages + non_ffn_weights + token_embedding + engine_resident + kv_cache +
               llama_buffers +
               engine_scratch;
    }
    uint64_t cache() const;
    std::string describe() const; // one "  name  N MiB" line per field
};

// The plan for a sparse engine attached to a context of n_ctx tokens with
// n_threads threads and micro-batches of n_ubatch tokens. `load_anon_growth`: how much anonymous
// memory opening the engine, loading the model and creating the context added
// (RssAnon after minus before); what exceeds the KV cache (which llama.cpp
// clears, so it is resident) and the engine's resident rows is heap nobody
// reports: llama.cpp's vocabulary and tokenizer tables (~18 MiB for a
// 49k-token vocabulary) and the engine's sidecar tables. `weights_in_heap`: llama.cpp read the weights it uses
// into its heap (use_mmap=False), where load_anon_growth counts them; nothing of the mapping is then planned for.
MemoryPlan plan_memory(const Engine & engine, uint64_t budget, uint64_t process_before,
                       const std::vector<std::string> & llama_log, int n_threads, int n_ubatch, int n_ctx,
                       uint64_t load_anon_growth, bool weights_in_heap = false);

// The context llama.cpp creates for n_ctx tokens: n_ctx itself, or the model's training context
// (<arch>.context_length) where n_ctx is 0, as llama.cpp takes it; 0 where the model records none.
int resolved_context(const GgufModel & model, int n_ctx);

// What llama.cpp's KV cache holds at the least for a context of n_ctx tokens (0: the model's training context)
// with K and V of ggml types type_k and type_v: its cells (n_ctx rounded up to 256, as llama.cpp rounds) times
// every layer's K and V widths from the model's metadata. On a model with a sliding window every layer is counted
// at the window's width (llama.cpp keeps a full-width cache for its global layers too). 0 where the metadata
// does not say (a per-layer array of KV heads, a missing head count). A context of 32768 tokens, Qwen2.5's
// training context, holds 896 MiB of f16 KV on Qwen2.5-Coder-1.5B; 512 tokens 14.
uint64_t kv_cache_lower_bound(const GgufModel & model, int n_ctx, int type_k = kKvTypeF16, int type_v = kKvTypeF16);

// The plan before llama.cpp loads: plan_memory without llama.cpp's log, its KV cache kv_cache_lower_bound's and
// its load heap, output and compute buffers not yet known, so its minimum is at most the loaded one's (for the
// same budget, process, threads and micro-batch): a budget below it is refused before llama.cpp allocates, where
// under a cgroup the kernel would kill the load instead. `process_before`: what the process held before the
// engine was opened (the engine's resident rows are a line of their own).
MemoryPlan plan_before_load(const Engine & engine, uint64_t budget, uint64_t process_before, int n_threads,
                            int n_ubatch, int n_ctx, int type_k = kKvTypeF16, int type_v = kKvTypeF16,
                            bool weights_in_heap = false);

// What llama.cpp allocates at load beyond what plan_before_load can count (its vocabulary's tables after the
// load, its output and compute buffers at 512-token micro-batches): Qwen2.5-Coder-1.5B held 166 MiB more once
// loaded than plan_before_load's minimum at micro-batches of 512, ~80 of it llama.cpp's repacked copies of the
// attention matrices (counted apart by unbounded_need, which puts them at 67 MiB), so ~86 MiB of this;
// SmolLM2-135M 42 MiB, nothing repacked. 112 MiB: the most measured and a margin for the repacked copies'
// shortfall, since a process run unbounded with a cache short of its store reads storage every token.
constexpr uint64_t kUnseenLoadBytes = 112ull << 20;

// What a process runs unbounded in with the whole store cached, by a plan before llama.cpp loads, at the most:
// plan_before_load's minimum for micro-batches of n_ubatch, the whole store's cache, a copy of every matrix read
// every token but the output (which llama.cpp repacks for faster kernels where it can) and kUnseenLoadBytes.
// Qwen2.5-Coder-1.5B at n_ctx 512, micro-batches of 512: 1336 MiB, where it held 1316 once loaded (minimum
// 834, whole store 482); SmolLM2-135M 305 against 221.
uint64_t unbounded_need(const Engine & engine, uint64_t rss, int n_threads, int n_ubatch, int n_ctx);

// What stock llama.cpp holds running the model whole, its FFN included, by a plan before it loads: `rss`, every
// tensor once (mapped, or copied into repacked rows, whose mapped pages are then clean page cache the kernel may
// reclaim), the KV cache for n_ctx tokens (kv_cache_lower_bound), kUnseenLoadBytes, and with `all_logits`
// llama-cpp-python's float logits of every position (logits_all).
uint64_t llama_whole_need(const GgufModel & model, uint64_t rss, int n_ctx, int type_k = kKvTypeF16,
                          int type_v = kKvTypeF16, bool all_logits = false);

// Whether `automatic` is a cgroup's limit too tight to run unbounded with the whole store cached
// (unbounded_need, for micro-batches of n_ubatch, the ones the process would then run): the process then runs as
// under an explicit budget of that size (micro-batches of kBudgetBatch, the weights unrepacked and those read
// every token locked), and refused below its minimum as one is. Erring towards tight costs prompt speed; the other
// way, a cache short of the store, which is read from storage every token. neuralink.Llama and neuralink-run both
// decide so. `rss`: what the process held before the engine was opened.
bool tight_cgroup_limit(const Engine & engine, const std::optional<AutomaticBudget> & automatic, uint64_t rss,
                        int n_threads, int n_ubatch, int n_ctx);

// The fewest layers whose gate rows, read every time the layer runs instead of kept resident
// (Engine::stream_gate_rows), bring `plan`'s minimum within its budget: 0 when the plan fits as it is, -1 when
// streaming every layer's gate rows would not be enough (or they are streamed already). With
// `room_for_region_stream` (cache policy auto or stream), where reading every region whole would pay
// (SparseFfn::auto_policy's rule), it streams as many more as leave room for the region stream's two buffers,
// which replace the one layer of read scratch the minimum counts, when that many are resident: one more
// layer's gate rows read per token against every region read in one long read instead of collapsed ones
// (Qwen2.5-Coder-1.5B under 530MB at n_batch 64: one layer more, 2.8 -> 4.0 tok/s).
int gate_layers_to_stream(const MemoryPlan & plan, const Engine & engine, bool room_for_region_stream = false);
// The lowest minimum streaming gate rows can reach (every resident layer's rows streamed): what a refused
// budget must at least be. The plan's own minimum where streaming would not lower it.
uint64_t minimum_with_gate_rows_streamed(const MemoryPlan & plan, const Engine & engine);

} // namespace neuralink
