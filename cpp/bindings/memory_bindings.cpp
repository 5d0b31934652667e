// pybind11 bindings of the memory plan and the size rule: wiring only, no logic.

#include "neuralink/cpu_threads.h"
#include "neuralink/engine.h"
#include "neuralink/gguf_model.h"
#include "neuralink/memory_plan.h"
#include "neuralink/prompt_lookup.h"
#include "neuralink/residency.h"
#include "neuralink/sizes.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using namespace neuralink;

void register_memory(py::module_ & m) {
    py::class_<MemoryPlan>(m, "MemoryPlan", "Where a memory budget goes; every field in bytes (neuralink/memory_plan.h).")
        .def_readonly("budget", &MemoryPlan::budget)
        .def_readonly("process", &MemoryPlan::process)
        .def_readonly("non_ffn_weights", &MemoryPlan::non_ffn_weights)
        .def_readonly("token_embedding", &MemoryPlan::token_embedding)
        .def_readonly("engine_resident", &MemoryPlan::engine_resident)
        .def_readonly("kv_cache", &MemoryPlan::kv_cache)
        .def_readonly("llama_buffers", &MemoryPlan::llama_buffers)
        .def_readonly("engine_scratch", &MemoryPlan::engine_scratch)
        .def_readonly("store_bytes", &MemoryPlan::store_bytes)
        .def_readonly("whole_store_cache", &MemoryPlan::whole_store_cache)
        .def_property_readonly("minimum", &MemoryPlan::minimum, "the smallest budget that holds everything but the cache")
        .def_property_readonly("cache", &MemoryPlan::cache, "what the bundle cache gets")
        .def("describe", &MemoryPlan::describe, "one '  name  N MiB' line per field")
        .def("to_dict", [](const MemoryPlan & p) {
            py::dict d;
            d["budget"] = p.budget; d["process"] = p.process; d["load_heap"] = p.load_heap;
            d["code_pages"] = p.code_pages;
            d["non_ffn_weights"] = p.non_ffn_weights; d["token_embedding"] = p.token_embedding;
            d["engine_resident"] = p.engine_resident; d["kv_cache"] = p.kv_cache; d["llama_buffers"] = p.llama_buffers;
            d["engine_scratch"] = p.engine_scratch; d["store_bytes"] = p.store_bytes;
            d["whole_store_cache"] = p.whole_store_cache;
            d["minimum"] = p.minimum(); d["cache"] = p.cache();
            return d;
        }, "every field, and minimum and cache");
    m.def("plan_memory", &plan_memory, py::arg("engine"), py::arg("budget"), py::arg("process_before"),
          py::arg("llama_log"), py::arg("n_threads"), py::arg("n_ubatch"), py::arg("n_ctx"), py::arg("load_anon_growth"),
          py::arg("weights_in_heap") = false,
          "The memory plan of a sparse engine attached to a context (n_ctx tokens, n_threads threads, micro-batches of n_ubatch); "
          "llama_log: llama.cpp's log lines, which report its KV, output and compute buffers; load_anon_growth: "
          "the anonymous memory (RssAnon) opening the engine and loading the model added, of which what "
          "exceeds the KV cache and the engine's resident rows is heap nobody reports (vocabulary, tables); "
          "weights_in_heap: llama.cpp read the weights it uses into its heap (use_mmap=False), which "
          "load_anon_growth then counts: no mapped pages are planned for them.");
    m.def("plan_before_load", &plan_before_load, py::arg("engine"), py::arg("budget"), py::arg("process_before"),
          py::arg("n_threads"), py::arg("n_ubatch"), py::arg("n_ctx"), py::arg("type_k") = kKvTypeF16,
          py::arg("type_v") = kKvTypeF16, py::arg("weights_in_heap") = false,
          "The plan before llama.cpp loads: plan_memory without its log, the KV cache at the least llama.cpp "
          "allocates for n_ctx tokens (0: the model's training context) with K and V of ggml types type_k and "
          "type_v, llama.cpp's other buffers and load heap not yet known; its minimum is at most the loaded "
          "one's. process_before: what the process held before the engine was opened.");
    m.def("resolved_context", [](const Engine & engine, int n_ctx) { return resolved_context(engine.model(), n_ctx); },
          py::arg("engine"), py::arg("n_ctx"),
          "The context llama.cpp creates for n_ctx tokens: n_ctx, or the model's training context where it is 0 (0 "
          "where the model records none).");
    m.attr("KV_TYPE_F16") = kKvTypeF16;
    m.def("vocab_size", [](const Engine & engine) -> int64_t {
              const TensorInfo * embedding = engine.model().find("token_embd.weight");
              return embedding ? embedding->ne[1] : 0;
          }, py::arg("engine"), "The model's vocabulary: its token embedding's rows (0 where it has none).");
    m.def("gate_layers_to_stream", &gate_layers_to_stream, py::arg("plan"), py::arg("engine"),
          py::arg("room_for_region_stream") = false,
          "The fewest layers whose gate rows, read every time the layer runs instead of kept resident "
          "(Engine.stream_gate_rows), bring the plan's minimum within its budget: 0 when it fits as it is, -1 when "
          "streaming every layer's would not be enough. room_for_region_stream (cache policy auto or stream): "
          "as many more as leave room for the region stream's two buffers, where reading regions whole pays.");
    m.def("minimum_with_gate_rows_streamed", &minimum_with_gate_rows_streamed, py::arg("plan"), py::arg("engine"),
          "The lowest minimum streaming gate rows can reach (every resident layer's streamed); the plan's own "
          "minimum where streaming would not lower it.");
    m.def("lock_every_token_weights", [](const Engine & engine) {
              const LockedPages locked = lock_every_token_weights(engine.model(), engine.screened_tensor());
              return py::make_tuple(locked.bytes, locked.error);
          }, py::arg("engine"),
          "Lock (mlock) the pages of the tensors llama.cpp reads every token (attention, norms, output) in this "
          "process's mapping of the engine's model file; (bytes locked, why not all of them or '').");
    m.def("bound_lookup_pages", [](Engine & engine) {
              const LookupPages & pages = engine.bound_lookup_pages();
              return py::make_tuple(pages.bytes, pages.error);
          }, py::arg("engine"),
          "Bound what llama.cpp's lookups of an untied token embedding keep mapped: its pages read without read "
          "ahead and unmapped as each micro-batch reaches layer 0; (bytes of the table bounded, why not or ''). "
          "Once llama.cpp has mapped the model.");
    m.def("resident_bytes", &resident_bytes, "This process's resident set size (VmRSS).");
    m.def("prompt_lookup", [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> text, int max_tokens,
                              size_t max_ngram) {
              const std::vector<int32_t> found = prompt_lookup(text.data(), (size_t) text.size(), max_tokens, max_ngram);
              return py::array_t<int32_t>((py::ssize_t) found.size(), found.data());
          }, py::arg("text"), py::arg("max_tokens"), py::arg("max_ngram") = kLookupNgram,
          "Up to max_tokens tokens that followed the most recent earlier occurrence of the last max_ngram tokens of "
          "text (else of fewer, down to the last one), as int32; empty if none occurs earlier. neuralink-run's "
          "drafts propose the same.");
    py::class_<DraftGate>(m, "DraftGate",
                          "Whether automatic drafts are verified, by what they deliver (neuralink-run's rule): tried "
                          "once waiting for reads takes DRAFT_TRIAL_SHARE of a single decoded token, then made while "
                          "a verification's seconds over the tokens a verification produces stay below a single "
                          "decode's seconds; while one way is ahead, the other is taken once in DRAFT_RETRIAL "
                          "opportunities.")
        .def(py::init<double>(), py::arg("trial_share") = kDraftTrialShare)
        .def("observe_single", &DraftGate::observe_single, py::arg("stall_seconds"), py::arg("wall_seconds"),
             "A decode of one token: seconds spent waiting for reads, of its wall-clock seconds.")
        .def("observe_verification", &DraftGate::observe_verification, py::arg("wall_seconds"),
             py::arg("produced"), "A verification: its seconds and the tokens it produced (1 + proposals confirmed).")
        .def("draft", &DraftGate::draft, "Whether to verify the proposals a lookup found (one opportunity).")
        .def_property_readonly("stall_share", [](const DraftGate & g) -> py::object {
            return g.stall().measured() ? py::object(py::float_(g.stall().value())) : py::object(py::none());
        }, "of single decodes' time, the share spent waiting for reads (moving average); None before any")
        .def_property_readonly("single_seconds", [](const DraftGate & g) -> py::object {
            return g.single_seconds().measured() ? py::object(py::float_(g.single_seconds().value()))
                                                 : py::object(py::none());
        }, "seconds per single decoded token (moving average); None before any")
        .def_property_readonly("drafted_seconds", [](const DraftGate & g) -> py::object {
            return g.drafted_seconds() >= 0 ? py::object(py::float_(g.drafted_seconds())) : py::object(py::none());
        }, "a verification's seconds (moving average) per token a verification produces (produced_per_pass); "
           "None before any verification")
        .def_property_readonly("produced_per_pass", &DraftGate::produced_per_pass,
                               "tokens a verification produces (a moving average, each pass an eighth, from a "
                               "prior of 2)");
    m.attr("AUTO_PROPOSALS") = kAutoProposals;
    m.attr("DRAFT_TRIAL_SHARE") = kDraftTrialShare;
    m.attr("DRAFT_RETRIAL") = kDraftRetrial;
    m.def("default_thread_count", &default_thread_count, py::arg("sys_cpu") = "/sys/devices/system/cpu",
          py::arg("cgroup_root") = "/sys/fs/cgroup", py::arg("proc_cgroup") = "/proc/self/cgroup",
          "Compute threads when nobody says: one per physical core among the CPUs this process may run on (on a "
          "hybrid CPU its fast cores only), no more than its cgroup's CPU quota allows (half of the allowed CPUs "
          "where sysfs gives no topology).");
    m.def("cgroup_memory_limit", &cgroup_memory_limit, py::arg("proc_cgroup") = "/proc/self/cgroup",
          py::arg("root") = "/sys/fs/cgroup",
          "This process's cgroup memory limit in bytes (v1 or v2, found through proc_cgroup under root), or None.");
    m.def("automatic_budget", [](uint64_t rss) -> py::object {
              const auto found = automatic_budget(rss);
              return found ? py::object(py::make_tuple(found->bytes, found->source, found->cgroup_limit))
                           : py::object(py::none());
          }, py::arg("rss"),
          "What a process of resident size rss may hold without a budget: the tighter of its cgroup limit less "
          "the headroom a cgroup charges (budget_under_cgroup_limit) and rss plus the available memory less 10 % "
          "(at least 256 MiB); (bytes, where it came from, whether the cgroup limit was the tighter) or None.");
    m.def("tight_cgroup_limit", [](const Engine & engine, uint64_t budget, const std::string & source,
                                   bool cgroup_limit, uint64_t rss, int n_threads, int n_ubatch, int n_ctx) {
              return tight_cgroup_limit(engine, AutomaticBudget { budget, source, cgroup_limit }, rss, n_threads,
                                        n_ubatch, n_ctx);
          }, py::arg("engine"), py::arg("budget"), py::arg("source"), py::arg("cgroup_limit"), py::arg("rss"),
          py::arg("n_threads"), py::arg("n_ubatch"), py::arg("n_ctx"),
          "Whether an automatic budget (automatic_budget's triple) is a cgroup's limit too tight to run unbounded "
          "with the whole store cached (unbounded_need): the process then runs as under an explicit budget.");
    m.def("llama_whole_need", [](const std::string & path, uint64_t rss, int n_ctx, int type_k, int type_v,
                                 bool all_logits) {
              const GgufModel model(path);
              return llama_whole_need(model, rss, n_ctx, type_k, type_v, all_logits);
          }, py::arg("path"), py::arg("rss"), py::arg("n_ctx"), py::arg("type_k") = kKvTypeF16,
          py::arg("type_v") = kKvTypeF16, py::arg("all_logits") = false,
          "What stock llama.cpp holds running the GGUF at `path` whole, by a plan before it loads: rss, every tensor "
          "once, the KV cache for n_ctx tokens (0: the training context), what its load adds unseen and with "
          "all_logits llama-cpp-python's logits of every position.");
    m.def("unbounded_need", &unbounded_need, py::arg("engine"), py::arg("rss"), py::arg("n_threads"),
          py::arg("n_ubatch"), py::arg("n_ctx"),
          "What a process runs unbounded in with the whole store cached, by a plan before llama.cpp loads, at the "
          "most (rss: what it held before the engine was opened; n_ctx 0: the model's training context).");
    m.def("budget_under_cgroup_limit", &budget_under_cgroup_limit, py::arg("limit"),
          py::arg("fraction") = kCgroupBudgetFraction,
          "The memory budget a process under a cgroup limit of `limit` bytes may take: `fraction` of it (0.95) and "
          "at least CGROUP_HEADROOM below it.");
    m.attr("CGROUP_HEADROOM") = kCgroupHeadroom;
    m.def("anonymous_resident_bytes", &anonymous_resident_bytes, "Its anonymous part (RssAnon).");
    m.def("release_free_heap", &release_free_heap, "Hand the C heap's free pages back to the system (malloc_trim).");
    m.def("fix_malloc_thresholds", &fix_malloc_thresholds,
          "Keep glibc's mmap threshold at its default for the rest of the process (memory budgets).");
    m.def("parse_size", &parse_size, py::arg("text"), py::arg("what") = "size",
          "Bytes in '120MB', '1.5GiB', '512M' or '4096': K/M/G and KiB/MiB/GiB binary, kB/MB/GB decimal; "
          "ValueError 'cannot read <what> ...' otherwise.");
}
