#include "neuralink/memory_plan.h"

#include "cgroup_dirs.h"

#include "ggml.h"

#include "neuralink/column_axpy.h"
#include "neuralink/defaults.h"
#include "neuralink/engine.h"
#include "neuralink/errors.h"
#include "neuralink/gguf_model.h"
#include "neuralink/residency.h"
#include "neuralink/row_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace neuralink {

// Library pages the process first touches after the load: ggml's kernels, llama.cpp's graph and sampling
// code. Measured 3.8 MiB on x86-64 (AVX-512 ggml, SmolLM2, 64 tokens); 8 MiB leaves room for other CPUs' kernels
// and for the allocator's own bookkeeping (the closest of 33 budget runs then came 2.5 MiB under its budget).
static constexpr uint64_t kRuntimeCodePages = 8ull << 20;

// the value before " MiB" that follows `marker` in a log line, if any
static bool mib_after(const std::string & line, const std::string & marker, uint64_t * bytes) {
    const size_t at = line.find(marker);
    if (at == std::string::npos) {
        return false;
    }
    const double mib = std::strtod(line.c_str() + at + marker.size(), nullptr);
    *bytes = (uint64_t) (mib * 1024.0 * 1024.0);
    return true;
}

LlamaBuffers parse_buffer_sizes(const std::vector<std::string> & log) {
    LlamaBuffers b;
    std::map<std::string, uint64_t> compute; // per backend name
    for (const std::string & line : log) {
        uint64_t bytes = 0;
        if (mib_after(line, "KV buffer size = ", &bytes)) {
            b.kv_cache += bytes;
        } else if (mib_after(line, "output buffer size = ", &bytes)) {
            b.output += bytes;
        } else if (mib_after(line, "compute buffer size = ", &bytes)) {
            // "llama_context:        CPU compute buffer size = ..." : the backend is the word before
            const std::string head = line.substr(0, line.find(" compute buffer size"));
            const size_t colon = head.rfind(':');
            std::string backend = colon == std::string::npos ? head : head.substr(colon + 1);
            backend.erase(0, backend.find_first_not_of(' '));
            compute[backend] = bytes;
        }
    }
    for (const auto & kv : compute) {
        b.compute += kv.second;
    }
    return b;
}

uint64_t resident_bytes() {
    FILE * f = std::fopen("/proc/self/statm", "r");
    if (!f) {
        return 0;
    }
    unsigned long long size = 0, resident = 0;
    const int n = std::fscanf(f, "%llu %llu", &size, &resident);
    std::fclose(f);
    return n == 2 ? (uint64_t) resident * (uint64_t) sysconf(_SC_PAGESIZE) : 0;
}

void release_free_heap() {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
}

void fix_malloc_thresholds() {
#if defined(__GLIBC__)
    if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr) {
        mallopt(M_MMAP_THRESHOLD, 128 * 1024); // glibc's default; setting it turns the dynamic adjustment off
    }
#endif
}

uint64_t anonymous_resident_bytes() {
    FILE * f = std::fopen("/proc/self/status", "r");
    if (!f) {
        return 0;
    }
    char line[256];
    unsigned long long kib = 0;
    while (std::fgets(line, sizeof(line), f)) {
        if (std::sscanf(line, "RssAnon: %llu kB", &kib) == 1) {
            break;
        }
    }
    std::fclose(f);
    return (uint64_t) kib * 1024;
}

namespace {

// a limit file's number; nullopt for v2's "max", v1's huge "no limit", or anything else
std::optional<uint64_t> read_limit(const std::string & path) {
    std::ifstream in(path);
    std::string text;
    if (!(in >> text) || text.find_first_not_of("0123456789") != std::string::npos || text.size() > 19) {
        return std::nullopt;
    }
    const uint64_t limit = std::stoull(text);
    return limit < (1ull << 60) ? std::optional<uint64_t>(limit) : std::nullopt;
}

std::optional<uint64_t> available_memory() {
    std::ifstream in("/proc/meminfo");
    std::string key, rest;
    uint64_t kib = 0;
    while (in >> key >> kib && std::getline(in, rest)) {
        if (key == "MemAvailable:") return kib * 1024;
    }
    return std::nullopt;
}

std::string with_mib(const char * what, uint64_t bytes) {
    return std::string(what) + " " + std::to_string(bytes >> 20) + " MiB";
}

} // namespace

std::optional<uint64_t> cgroup_memory_limit(const std::string & proc_cgroup, const std::string & root) {
    for (const std::string & dir : own_cgroup_dirs(root, "memory", proc_cgroup)) {
        if (const auto limit = read_limit(dir + "/memory.limit_in_bytes")) return limit;
    }
    for (const std::string & dir : own_cgroup_dirs(root, "", proc_cgroup)) {
        if (const auto limit = read_limit(dir + "/memory.max")) return limit;
    }
    return std::nullopt;
}

uint64_t budget_under_cgroup_limit(uint64_t limit, double fraction) {
    const auto share = (uint64_t) ((double) limit * fraction);
    return std::min(share, limit > kCgroupHeadroom ? limit - kCgroupHeadroom : 0);
}

std::optional<AutomaticBudget> automatic_budget(uint64_t rss) {
    constexpr double kMarginFraction = 0.10;
    constexpr uint64_t kMarginMin = 256ull << 20;
    std::optional<AutomaticBudget> best;
    if (const auto limit = cgroup_memory_limit()) {
        best = AutomaticBudget { budget_under_cgroup_limit(*limit), with_mib("the cgroup memory limit", *limit), true };
    }
    if (const auto available = available_memory()) {
        const uint64_t there = rss + *available;
        const uint64_t margin = std::max(kMarginMin, (uint64_t) ((double) there * kMarginFraction));
        const uint64_t bytes = there > margin ? there - margin : 0;
        if (!best || bytes < best->bytes) {
            best = AutomaticBudget { bytes, with_mib("available memory", there), false };
        }
    }
    return best;
}

int resolved_context(const GgufModel & model, int n_ctx) {
    if (n_ctx > 0) {
        return n_ctx;
    }
    try {
        const int64_t train = model.get_int(model.architecture() + ".context_length", 0);
        return train > 0 && train <= INT32_MAX ? (int) train : 0;
    } catch (const ModelFileError &) {
        return 0; // not an integer: llama.cpp would refuse the model anyway
    }
}

uint64_t kv_cache_lower_bound(const GgufModel & model, int n_ctx, int type_k, int type_v) {
    const std::string & arch = model.architecture();
    const int ctx = resolved_context(model, n_ctx);
    if (ctx <= 0 || type_k < 0 || type_k >= GGML_TYPE_COUNT || type_v < 0 || type_v >= GGML_TYPE_COUNT ||
        ggml_blck_size((ggml_type) type_k) <= 0 || ggml_blck_size((ggml_type) type_v) <= 0) {
        return 0;
    }
    int64_t n_layer = 0, n_embd = 0, n_head = 0, n_head_kv = 0, key_length = 0, value_length = 0, window = 0;
    try {
        n_layer = model.get_int(arch + ".block_count", 0);
        n_embd = model.get_int(arch + ".embedding_length", 0);
        n_head = model.get_int(arch + ".attention.head_count", 0);
        n_head_kv = model.get_int(arch + ".attention.head_count_kv", n_head);
        const int64_t head_dim = n_head > 0 ? n_embd / n_head : 0;
        key_length = model.get_int(arch + ".attention.key_length", head_dim);
        value_length = model.get_int(arch + ".attention.value_length", head_dim);
        window = model.get_int(arch + ".attention.sliding_window", 0);
    } catch (const ModelFileError &) {
        return 0; // a per-layer array (of KV heads, say): not estimated here
    }
    if (n_layer <= 0 || n_head_kv <= 0 || key_length <= 0 || value_length <= 0) {
        return 0;
    }
    uint64_t cells = ((uint64_t) ctx + 255) / 256 * 256; // llama.cpp pads the context to 256 cells
    if (window > 0) {
        cells = std::min<uint64_t>(cells, (uint64_t) window);
    }
    auto row_bytes = [](int type, int64_t width) {
        return (uint64_t) width / (uint64_t) ggml_blck_size((ggml_type) type) * ggml_type_size((ggml_type) type);
    };
    return (uint64_t) n_layer * cells *
           (row_bytes(type_k, key_length * n_head_kv) + row_bytes(type_v, value_length * n_head_kv));
}

MemoryPlan plan_before_load(const Engine & engine, uint64_t budget, uint64_t process_before, int n_threads,
                            int n_ubatch, int n_ctx, int type_k, int type_v, bool weights_in_heap) {
    const int ctx = resolved_context(engine.model(), n_ctx);
    MemoryPlan plan = plan_memory(engine, budget, process_before, {}, n_threads, n_ubatch, ctx, 0, weights_in_heap);
    plan.kv_cache = kv_cache_lower_bound(engine.model(), ctx, type_k, type_v);
    return plan;
}

uint64_t unbounded_need(const Engine & engine, uint64_t rss, int n_threads, int n_ubatch, int n_ctx) {
    const MemoryPlan plan = plan_before_load(engine, 0, rss, n_threads, n_ubatch, n_ctx);
    // the copies llama.cpp may repack of the matrices read every token (the output matrix's type is one it
    // does not repack on any CPU here: q6_K or f16 in the models measured), at most those matrices
    const GgufModel & model = engine.model();
    const TensorInfo * embedding = model.find("token_embd.weight");
    const TensorInfo * output = model.find("output.weight");
    uint64_t repacked = 0;
    for (const TensorInfo & t : model.tensors()) {
        if (&t != embedding && &t != output && t.ne[1] > 1 && read_every_token(model, t)) {
            repacked += t.nbytes;
        }
    }
    return plan.minimum() + plan.whole_store_cache + repacked + kUnseenLoadBytes;
}

uint64_t llama_whole_need(const GgufModel & model, uint64_t rss, int n_ctx, int type_k, int type_v, bool all_logits) {
    uint64_t tensors = 0;
    for (const TensorInfo & t : model.tensors()) {
        tensors += t.nbytes;
    }
    const TensorInfo * embedding = model.find("token_embd.weight");
    const uint64_t logits = all_logits && embedding ?
        (uint64_t) std::max(resolved_context(model, n_ctx), 0) * (uint64_t) embedding->ne[1] * sizeof(float) : 0;
    return rss + tensors + kv_cache_lower_bound(model, n_ctx, type_k, type_v) + kUnseenLoadBytes + logits;
}

bool tight_cgroup_limit(const Engine & engine, const std::optional<AutomaticBudget> & automatic, uint64_t rss,
                        int n_threads, int n_ubatch, int n_ctx) {
    if (!automatic || !automatic->cgroup_limit || !engine.sparse()) {
        return false;
    }
    return unbounded_need(engine, rss, n_threads, n_ubatch, n_ctx) > automatic->bytes;
}

uint64_t MemoryPlan::cache() const {
    const uint64_t min = minimum();
    return budget > min ? std::min(budget - min, whole_store_cache) : 0;
}

std::string MemoryPlan::describe() const {
    const std::pair<const char *, uint64_t> rows[] = {
        { "budget", budget }, { "process", process }, { "load heap", load_heap }, { "code pages", code_pages },
        { "non ffn weights", non_ffn_weights }, { "token embedding", token_embedding },
        { "engine resident", engine_resident }, { "kv cache", kv_cache }, { "llama buffers", llama_buffers },
        { "engine scratch", engine_scratch }, { "store bytes", store_bytes },
        { "whole store cache", whole_store_cache }, { "minimum", minimum() },
        { "bundle cache", cache() },
    };
    std::string out;
    char line[96];
    for (const auto & r : rows) {
        std::snprintf(line, sizeof(line), "  %-16s %9.1f MiB\n", r.first, (double) r.second / (1 << 20));
        out += line;
    }
    return out;
}

MemoryPlan plan_memory(const neuralink::Engine & engine, uint64_t budget, uint64_t process_before,
                       const std::vector<std::string> & llama_log, int n_threads, int n_ubatch, int n_ctx,
                       uint64_t load_anon_growth, bool weights_in_heap) {
    const SparseFfn & sparse = *engine.sparse();
    MemoryPlan p;
    p.budget = budget;
    p.process = process_before;
    // The GGUF's header (metadata, the vocabulary's arrays: 1.7 MiB on SmolLM2's vocabulary, 5.7 on Qwen's) is
    // not counted: llama.cpp parses it with reads into the heap (the load heap counts what stays) and unmaps the
    // mapping's pages before the first tensor after the load, so none of it is resident while decoding (measured
    // page by page); its page cache is clean and among what CGROUP_HEADROOM leaves the cgroup
    const GgufModel & model = engine.model();
    const TensorInfo * embedding = model.find("token_embd.weight");
    const bool tied = model.find("output.weight") == nullptr;
    // what llama.cpp reads every token (residency.h's rule, the tensors it locks); the embedding counts below.
    // Read into its heap (use_mmap=False) they are in the load heap, the whole embedding table with them
    for (const TensorInfo & t : model.tensors()) {
        if (!weights_in_heap && engine.llama_reads_every_token(t) && &t != embedding) {
            p.non_ffn_weights += t.nbytes;
        }
    }
    if (embedding && !weights_in_heap) {
        // with an output matrix of its own, token_embd is only looked up: under a budget what its lookups map is
        // released every micro-batch (residency.h's bound_lookup_pages), so one micro-batch's rows at most, each
        // with what a fault maps around it; tied, every token reads all of it
        const uint64_t row = embedding->ne[1] > 0 ? embedding->nbytes / (uint64_t) embedding->ne[1] : embedding->nbytes;
        const long page_size = sysconf(_SC_PAGESIZE);
        const uint64_t page = page_size > 0 ? (uint64_t) page_size : 4096;
        const uint64_t rows = (uint64_t) std::max(1, std::min(n_ubatch, std::max(n_ctx, 1)));
        const uint64_t touched = rows * lookup_mapped_bytes(row, page);
        p.token_embedding = tied ? embedding->nbytes : std::min(embedding->nbytes, touched);
    }
    const LlamaBuffers buffers = parse_buffer_sizes(llama_log);
    const OutputScreen * screen = engine.output_screen();
    // the output screen's coarse copy stands in for the output matrix (not counted above)
    p.engine_resident = sparse.resident_bytes() + (screen ? screen->resident_bytes() : 0);
    p.kv_cache = buffers.kv_cache;
    // gate rows streamed since the load were resident when the growth was measured
    const uint64_t reported = buffers.kv_cache + p.engine_resident + sparse.released_bytes();
    p.load_heap = load_anon_growth > reported ? load_anon_growth - reported : 0;
    p.code_pages = kRuntimeCodePages;
    p.llama_buffers = buffers.output + buffers.compute;
    p.store_bytes = sparse.store_bytes();
    // the stream policy holds region heads, at most the store, in what its cache is given
    p.whole_store_cache = sparse.options().cache_policy == CachePolicy::Stream ? sparse.store_bytes()
                                                                                : sparse.cache_bytes_to_hold_store();
    // reads (and cache copies) of a whole layer at worst; per thread 64 KiB of slack and what the phases keep
    // (below); h and token flags per batch row
    const std::string & arch = engine.model().architecture();
    const uint64_t n_ff = (uint64_t) std::max<int64_t>(0, engine.model().get_int(arch + ".feed_forward_length", 0));
    const uint64_t layer_store = sparse.layer_read_bytes();
    // the down projection's list of columns and their h or neuron (a pointer and 4 bytes per neuron), and a
    // prompt batch's decoded columns (kBatchColumns slices of at most n_embd floats)
    uint64_t per_thread = 64 * 1024 + n_ff * (sizeof(void *) + sizeof(float)) +
                          (n_ubatch > 1 ? (uint64_t) kBatchColumns * (uint64_t) sparse.store().n_embd() * sizeof(float) : 0);
    if (n_ubatch >= kGemmMinTokens && sparse.store().n_layer() > 0) {
        // prompt batches: ggml's work buffer for the largest product (a thread's range of gate rows, or a
        // stretch of records' up or gate rows) and the up and gate results of one stretch
        const SidecarLayer & S = sparse.store().layer(0);
        const int64_t n_embd = sparse.store().n_embd();
        uint64_t work = 0;
        for (const WeightType * wt : { S.up.wt, S.gate.wt, sparse.has_layer(0) ? sparse.layer(0).gate.wt : nullptr }) {
            if (wt) work = std::max<uint64_t>(work, rows_times_tokens_work_bytes(*wt, (int64_t) n_ff, n_embd, n_ubatch));
        }
        per_thread += work + 2 * (uint64_t) n_ubatch * kStretchRecords * sizeof(float);
    }
    // cache hits are copied out of a cache that may evict them; the arena's and pinned records are used in place;
    // the stream policy reads into its two buffers instead
    const CachePolicy policy = sparse.options().cache_policy;
    const bool copies = policy == CachePolicy::Lru || policy == CachePolicy::S3Fifo || policy == CachePolicy::Linking;
    const uint64_t reads = policy == CachePolicy::Stream ? sparse.stream_buffer_bytes() : (copies ? 2 : 1) * layer_store;
    p.engine_scratch = reads + (uint64_t) n_threads * per_thread + (uint64_t) n_ubatch * n_ff * 6 +
                       sparse.gate_stream_bytes() + (screen ? screen->scratch_bytes(n_threads) : 0);
    return p;
}

// the largest resident gate layer's rows and the blocks a direct read adds around them: a GateStream buffer
static uint64_t gate_buffer_bytes(const SparseFfn & sparse, const std::vector<int> & layers) {
    uint64_t largest = 0;
    for (int il : layers) {
        const WeightMatrix & g = sparse.layer(il).gate;
        largest = std::max<uint64_t>(largest, g.row_bytes * (uint64_t) g.rows + 2 * kDirectAlign);
    }
    return largest;
}

int gate_layers_to_stream(const MemoryPlan & plan, const Engine & engine, bool room_for_region_stream) {
    const SparseFfn * sparse = engine.sparse();
    // what the region stream needs beyond the minimum, when auto would choose it with the room
    uint64_t stream_room = 0;
    if (room_for_region_stream && sparse && sparse->stream_buffer_bytes() > sparse->layer_read_bytes()) {
        stream_room = sparse->stream_buffer_bytes() - sparse->layer_read_bytes();
        // only where the room is short does it matter whether the stream pays: an estimate that samples every
        // region (with none pinned: a few MiB of cache do not change it), not run at every load
        if (plan.budget < plan.minimum() + stream_room && sparse->options().predictor != Predictor::Dense &&
            sparse->collapsed_read_cost_ratio(0) < SparseFfn::kStreamCostRatio) {
            stream_room = 0;
        }
    }
    if (plan.budget >= plan.minimum() + stream_room) {
        return 0;
    }
    if (!sparse || sparse->gate_layers_streamed() > 0) {
        return plan.budget >= plan.minimum() ? 0 : -1;
    }
    const std::vector<int> resident = engine.resident_gate_layers();
    uint64_t minimum = plan.minimum() + kGateStreamBuffers * gate_buffer_bytes(*sparse, resident);
    int fits = plan.budget >= plan.minimum() ? 0 : -1;
    for (size_t k = 0; k < resident.size(); ++k) {
        const WeightMatrix & g = sparse->layer(resident[k]).gate;
        minimum -= std::min<uint64_t>(minimum, g.row_bytes * (uint64_t) g.rows);
        if (fits < 0 && minimum <= plan.budget) {
            fits = (int) k + 1;
        }
        if (minimum + stream_room <= plan.budget) {
            return (int) k + 1;
        }
    }
    return fits;
}

uint64_t minimum_with_gate_rows_streamed(const MemoryPlan & plan, const Engine & engine) {
    const SparseFfn * sparse = engine.sparse();
    if (!sparse || sparse->gate_layers_streamed() > 0) {
        return plan.minimum();
    }
    const std::vector<int> resident = engine.resident_gate_layers();
    uint64_t gate = 0;
    for (int il : resident) gate += sparse->layer(il).gate.row_bytes * (uint64_t) sparse->layer(il).gate.rows;
    const uint64_t streamed = plan.minimum() + kGateStreamBuffers * gate_buffer_bytes(*sparse, resident) - gate;
    return std::min(plan.minimum(), streamed);
}

} // namespace neuralink
