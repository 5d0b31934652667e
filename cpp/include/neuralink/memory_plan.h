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

// Whether `automatic` is a cgroup's limit too tight to cache the whole store, by a plan made before llama.cpp
// loads (its buffers not yet known, so a little short) for micro-batches of kBudgetBatch: the process then runs
// as under an explicit budget of that size (micro-batches of kBudgetBatch, the weights unrepacked and those read
// every token locked), and refused below its minimum as one is. neuralink.Llama and neuralink-run both decide so.
bool tight_cgroup_limit(const Engine & engine, const std::optional<AutomaticBudget> & automatic, uint64_t rss,
                        int n_threads, int n_ctx);

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
