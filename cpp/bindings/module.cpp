// pybind11 bindings of the engine: wiring only, no logic.

#include "neuralink/column_axpy.h"
#include "neuralink/contribution_mask.h"
#include "neuralink/token_nll.h"
#include "neuralink/defaults.h"
#include "neuralink/direct_file.h"
#include "neuralink/checksum.h"
#include "neuralink/engine.h"
#include "neuralink/errors.h"
#include "neuralink/gguf_model.h"
#include "neuralink/model_integrity.h"
#include "planned_reads.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

namespace py = pybind11;
using namespace neuralink;

void register_cache(py::module_ & m); // cache_bindings.cpp
void register_replay(py::module_ & m); // replay_bindings.cpp
void register_memory(py::module_ & m); // memory_bindings.cpp

static void register_errors() {
    // the Python classes live in neuralink.errors so that they can be caught without the extension
    // released on purpose: the module outlives every translation, and no decref may run at exit
    static py::handle errors = py::module_::import("neuralink.errors").release();
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const ModelFileError & e) {
            py::set_error(errors.attr("ModelFileError"), e.what());
        } catch (const UnsupportedModelError & e) {
            py::set_error(errors.attr("UnsupportedModelError"), e.what());
        } catch (const IoError & e) {
            py::set_error(errors.attr("EngineIOError"), e.what());
        } catch (const NumericError & e) {
            py::set_error(errors.attr("EngineNumericError"), e.what());
        } catch (const std::invalid_argument & e) {
            // an option or input the engine refuses: a neuralink error, and still a ValueError
            py::set_error(errors.attr("OptionError"), e.what());
        }
    });
}

// (layers, row bytes, column bytes) of an Engine::down_row_layers / down_row_trial_layers plan
static py::tuple down_row_tuple(const DownRowPlan & plan) {
    return py::make_tuple(plan.layers, plan.row_bytes, plan.column_bytes);
}

static void register_engine(py::module_ & m) {
    PYBIND11_NUMPY_DTYPE(LayerStepStats, il, n_tokens, predicted, truly_active, reads, cache_hits, bytes_read,
                         active_bytes, io_ns, stall_ns, layer_ns, predicted_pairs, computed_pairs, final_neurons,
                         down_reads, down_cache_hits, down_bytes_read);
    m.attr("STATS_DTYPE") = py::dtype::of<LayerStepStats>(); // take_stats' rows, for an empty array of them

    py::class_<LayerStatus>(m, "LayerStatus")
        .def_readonly("il", &LayerStatus::il)
        .def_readonly("loaded", &LayerStatus::loaded)
        .def_readonly("offered", &LayerStatus::offered)
        .def_readonly("taken", &LayerStatus::taken)
        .def_readonly("reason", &LayerStatus::reason)
        .def("__repr__", [](const LayerStatus & s) {
            return "LayerStatus(il=" + std::to_string(s.il) + ", loaded=" + (s.loaded ? "True" : "False") +
                   ", offered=" + (s.offered ? "True" : "False") + ", taken=" + (s.taken ? "True" : "False") +
                   ", reason='" + s.reason + "')";
        });

    py::class_<Engine>(m, "Engine")
        .def(py::init([](const std::string & model_path, bool direct_io, std::optional<std::string> sidecar,
                         const std::string & predictor, const std::string & cache_policy, size_t cache_bytes,
                         int queue_depth, std::optional<uint64_t> collapse_gap_bytes, uint64_t max_read_bytes,
                         double read_latency_s, double bandwidth_bytes_s, const std::string & io_backend,
                         std::optional<std::vector<float>> thresholds, std::optional<std::vector<float>> predictor_thresholds,
                         std::optional<std::vector<float>> candidate_thresholds, bool verify_checksums,
                         bool adaptive_collapse) {
                 EngineOptions opts;
                 opts.direct_io = direct_io;
                 if (sidecar) {
                     opts.sidecar_path = *sidecar;
                     opts.sparse.predictor = predictor_from_name(predictor);
                     opts.sparse.cache_policy = cache_policy_from_name(cache_policy);
                     opts.sparse.cache_bytes = cache_bytes;
                     opts.sparse.queue_depth = queue_depth;
                     opts.sparse.collapse_gap_bytes = collapse_gap_bytes.value_or(UINT64_MAX);
                     opts.sparse.max_read_bytes = max_read_bytes;
                     opts.sparse.device.read_latency_s = read_latency_s;
                     opts.sparse.device.bandwidth_bytes_s = bandwidth_bytes_s;
                     opts.sparse.direct_io = direct_io;
                     opts.sparse.io_backend = io_backend_from_name(io_backend);
                     opts.sparse.thresholds = thresholds.value_or(std::vector<float>());
                     opts.sparse.predictor_thresholds = predictor_thresholds.value_or(std::vector<float>());
                     opts.sparse.candidate_thresholds = candidate_thresholds.value_or(std::vector<float>());
                     opts.sparse.verify_checksums = verify_checksums;
                     opts.sparse.adaptive_collapse = adaptive_collapse;
                 } else if (thresholds || predictor_thresholds || candidate_thresholds) {
                     throw std::invalid_argument("thresholds apply to the sparse engine: pass a sidecar");
                 }
                 // reading the weights takes a while and touches no Python object
                 py::gil_scoped_release release;
                 return std::make_unique<Engine>(model_path, opts);
             }),
             py::arg("model_path"), py::arg("direct_io") = true, py::arg("sidecar") = py::none(),
             py::arg("predictor") = "gate", py::arg("cache_policy") = "linking", py::arg("cache_bytes") = 0,
             py::arg("queue_depth") = kDefaultQueueDepth, py::arg("collapse_gap_bytes") = py::none(),
             py::arg("max_read_bytes") = kDefaultMaxReadBytes, py::arg("read_latency_s") = kDefaultReadLatencyS,
             py::arg("bandwidth_bytes_s") = kDefaultBandwidthBytesS, py::arg("io_backend") = "auto",
             py::arg("thresholds") = py::none(), py::arg("predictor_thresholds") = py::none(),
             py::arg("candidate_thresholds") = py::none(), py::arg("verify_checksums") = true,
             py::arg("adaptive_collapse") = false)
        .def_property_readonly("hook_address", [](const Engine & e) { return (uintptr_t) e.hook(); })
        .def_property_readonly("architecture", [](const Engine & e) { return e.model().architecture(); })
        .def_property_readonly("n_layer", &Engine::n_layer)
        .def_property_readonly("weight_bytes", &Engine::weight_bytes)
        .def_property_readonly("direct_io", &Engine::direct_io)
        .def_property_readonly("io_note", &Engine::io_note)
        .def_property_readonly("tokens_computed", &Engine::tokens_computed)
        .def("layer_status", &Engine::layer_status)
        .def_property_readonly("sparse", [](const Engine & e) { return e.sparse() != nullptr; })
        .def_property_readonly("predictor", [](const Engine & e) {
            return e.sparse() ? std::string(predictor_name(e.sparse()->options().predictor)) : std::string("dense");
        })
        .def_property_readonly("thresholds", [](const Engine & e) {
            std::vector<float> t;
            for (int il = 0; e.sparse() && il < e.n_layer(); ++il) t.push_back(e.sparse()->threshold(il));
            return t;
        }, "per-layer activity thresholds in use (the sidecar's unless overridden); empty for the dense engine")
        .def_property_readonly("candidate_thresholds", [](const Engine & e) {
            std::vector<float> t;
            const bool contribution = e.sparse() && e.sparse()->store().criterion_kind() == Criterion::Contribution;
            for (int il = 0; contribution && il < e.n_layer(); ++il) t.push_back(e.sparse()->candidate_threshold(il));
            return t;
        }, "per-layer candidate thresholds of the contribution criterion in use; empty for other criteria")
        .def("set_thresholds", [](Engine & e, std::optional<std::vector<float>> thresholds,
                                  std::optional<std::vector<float>> candidate_thresholds,
                                  std::optional<std::vector<float>> predictor_thresholds) {
            if (!e.sparse()) throw std::invalid_argument("thresholds apply to the sparse engine: pass a sidecar");
            e.sparse()->set_thresholds(thresholds.value_or(std::vector<float>()),
                                       candidate_thresholds.value_or(std::vector<float>()),
                                       predictor_thresholds.value_or(std::vector<float>()));
        }, py::arg("thresholds") = py::none(), py::arg("candidate_thresholds") = py::none(),
           py::arg("predictor_thresholds") = py::none(),
           "Replace the per-layer thresholds between evaluations (None: the sidecar's).")
        .def_property_readonly("collapse_gap_bytes", [](const Engine & e) -> std::optional<uint64_t> {
            if (!e.sparse()) return std::nullopt;
            return e.sparse()->collapse_gap_bytes();
        }, "the largest gap the sparse engine reads through now (adaptive: the current fit's); None when dense")
        .def_property_readonly("read_cost", [](const Engine & e) -> std::optional<std::pair<double, double>> {
            if (!e.sparse()) return std::nullopt;
            const DeviceCost c = e.sparse()->read_cost();
            return std::make_pair(c.read_latency_s, c.bandwidth_bytes_s);
        }, "(seconds per read, bytes per second) reads are planned with now; None when dense")
        .def_property_readonly("criterion", [](const Engine & e) {
            return e.sparse() ? e.sparse()->store().criterion() : std::string();
        }, "the sidecar's activity criterion; empty for the dense engine")
        .def_property_readonly("split_layout", [](const Engine & e) {
            return e.sparse() && e.sparse()->store().split();
        }, "down columns in a region of their own, read once up rows show they are needed")
        .def_property_readonly("predictor_thresholds", [](const Engine & e) {
            std::vector<float> t;
            const bool lowrank = e.sparse() && e.sparse()->store().predictor_rank() > 0;
            for (int il = 0; lowrank && il < e.n_layer(); ++il) t.push_back(e.sparse()->predictor_threshold(il));
            return t;
        }, "per-layer low-rank predictor thresholds in use; empty without a low-rank predictor")
        .def_property_readonly("io_backend", [](const Engine & e) {
            return e.sparse() ? std::string(io_backend_name(e.sparse()->io_backend())) : std::string("none");
        }, "how bundles are read: 'uring', 'pread' (a pool of reader threads), or 'none' for the dense engine")
        .def_property_readonly("io_backend_note", [](const Engine & e) {
            return e.sparse() ? e.sparse()->io_note() : std::string();
        }, "why the pread pool is used when it is")
        .def_property_readonly("resident_bytes", [](const Engine & e) {
            return e.sparse() ? e.sparse()->resident_bytes() : e.weight_bytes();
        }, "bytes of FFN data the engine keeps in RAM (all weights when dense; gates, biases when sparse)")
        .def_property_readonly("scratch_bytes", [](const Engine & e) {
            return e.sparse() ? e.sparse()->scratch_bytes() : (size_t) 0;
        })
        .def("error", [](const Engine & e) {
            std::string what = e.sparse() ? e.sparse()->error() : std::string();
            if (what.empty() && e.output_screen()) what = e.output_screen()->error();
            return what;
        }, "The first read or compute failure since the last clear_error(), empty if none.")
        .def("error_is_numeric", [](const Engine & e) { return e.sparse() && e.sparse()->error_is_numeric(); },
             "Whether that failure is a non-finite FFN output rather than a read.")
        .def("clear_error", [](Engine & e) {
            if (e.sparse()) e.sparse()->clear_error();
            if (e.output_screen()) e.output_screen()->clear_error();
        })
        .def("screen_output", [](Engine & e, const std::string & coarse_type, float margin, int n_threads) {
            if (!(margin > 0.0f)) throw std::invalid_argument("the output screen's margin must be positive");
            OutputScreenOptions o;
            o.coarse_type = type_from_name(coarse_type);
            o.margin = margin;
            o.n_threads = n_threads;
            py::gil_scoped_release release;
            e.screen_output(o);
        }, py::arg("coarse_type") = std::string(ggml_type_name(OutputScreenOptions {}.coarse_type)),
           py::arg("margin") = OutputScreenOptions {}.margin, py::arg("n_threads") = 1,
           "Keep a coarse copy of the untied output matrix and take llama.cpp's output product (output_screen.h): "
           "before llama.cpp loads the model, which must then map the output matrix lazily.")
        .def("drop_output_screen", &Engine::drop_output_screen,
             "Free the output screen (llama.cpp computes the output product itself once its graphs are rebuilt).")
        .def_property_readonly("output_taken", &Engine::output_taken,
                               "whether llama.cpp handed the output product to the screen")
        .def_property_readonly("output_screen", [](const Engine & e) -> py::object {
            const OutputScreen * s = e.output_screen();
            if (!s) return py::none();
            const OutputScreenStats st = s->stats();
            py::dict d;
            d["tensor"] = s->name();
            d["coarse_type"] = std::string(ggml_type_name(s->coarse_type()));
            d["margin"] = s->margin();
            d["resident_bytes"] = s->resident_bytes();
            d["matrix_bytes"] = s->matrix_bytes();
            d["tokens"] = st.tokens;
            d["exact_rows"] = st.exact_rows;
            d["max_exact_rows"] = st.max_exact_rows;
            d["rows_read"] = st.rows_read;
            return d;
        }, "the output screen's figures (its copy and row cache, the matrix it stands in for, rows of logits, rows "
           "multiplied exactly, the most for one row of logits, rows read from the file), or None")
        .def("take_stats", [](Engine & e) {
            std::vector<LayerStepStats> stats = e.sparse() ? e.sparse()->take_stats() : std::vector<LayerStepStats>();
            py::array_t<LayerStepStats> out((py::ssize_t) stats.size());
            std::copy(stats.begin(), stats.end(), out.mutable_data());
            return out;
        }, "Per layer evaluation counters since the last call (a numpy structured array).")
        .def("configure_cache", [](Engine & e, const std::string & policy, size_t bytes) {
            if (!e.sparse()) throw std::invalid_argument("the dense engine has no bundle cache");
            const CachePolicy p = cache_policy_from_name(policy);
            // pinning reads records from the sidecar; nothing here touches Python objects
            py::gil_scoped_release release;
            e.sparse()->configure_cache(p, bytes);
        }, py::arg("policy"), py::arg("bytes"), "Replace the bundle cache (between evaluations only).")
        .def_property_readonly("cache_holds_store", [](const Engine & e) {
            return e.sparse() && e.sparse()->holds_store();
        }, "whether the bundle cache's budget holds every record of the store (the store arena)")
        .def_property_readonly("cache_policy", [](const Engine & e) {
            return e.sparse() ? std::string(cache_policy_name(e.sparse()->options().cache_policy)) : std::string("none");
        }, "the bundle cache's policy in use ('none' for the dense engine)")
        .def("cache_would_hold_store", [](const Engine & e, size_t bytes) {
            return e.sparse() && e.sparse()->arena_fits(bytes);
        }, py::arg("bytes"), "whether a bundle cache of `bytes` would hold every record of the store")
        .def("auto_cache_policy", [](const Engine & e, size_t bytes) {
            if (!e.sparse()) throw std::invalid_argument("the dense engine has no bundle cache");
            return std::string(cache_policy_name(e.sparse()->auto_policy(bytes)));
        }, py::arg("bytes"),
           "The policy `auto` stands for with a cache of `bytes`: 'linking' (the store arena) when it holds the "
           "whole store, 'stream' when collapsed reads would cover the layers anyway (collapsed_read_cost_ratio "
           "at least STREAM_COST_RATIO) and the stream's buffers fit, else 'pinned'.")
        .def("collapsed_read_cost_ratio", [](const Engine & e, size_t bytes) {
            if (!e.sparse()) throw std::invalid_argument("the dense engine has no bundle cache");
            return e.sparse()->collapsed_read_cost_ratio(bytes);
        }, py::arg("bytes"),
           "Expected time of a decoded token's collapsed reads, with the most frequent records pinned in `bytes` "
           "(each record drawn at its profiled frequency), over the stream's reads: every region whole less the "
           "heads the same bytes hold.")
        .def_property_readonly("streams_regions", [](const Engine & e) {
            return e.sparse() && e.sparse()->streams_regions();
        }, "whether the record regions are read whole, ahead of their layer (the stream policy)")
        .def_property_readonly("layer_read_bytes", [](const Engine & e) {
            return e.sparse() ? e.sparse()->layer_read_bytes() : (uint64_t) 0;
        }, "the read scratch of one layer a memory plan counts for collapsed reads: the store's bytes per layer")
        .def_property_readonly("stream_buffer_bytes", [](const Engine & e) {
            return e.sparse() ? e.sparse()->stream_buffer_bytes() : (size_t) 0;
        }, "the two buffers the stream policy reads regions into (whether or not it is in use)")
        .def_property_readonly("stream_head_bytes", [](const Engine & e) {
            return e.sparse() ? e.sparse()->stream_head_bytes() : (uint64_t) 0;
        }, "bytes of the records the stream policy keeps in DRAM (the head of every region), 0 without it")
        .def("stream_gate_rows", &Engine::stream_gate_rows, py::arg("n_layers"),
             "Read the gate rows of the first n_layers layers that keep them resident from the model file each "
             "time the layer runs, freeing their resident copies (for a budget that cannot hold them all). "
             "Between evaluations, once.")
        .def_property_readonly("gate_layers_streamed", [](const Engine & e) {
            return e.sparse() ? e.sparse()->gate_layers_streamed() : 0;
        }, "layers whose gate rows are read each time the layer runs (0: all resident)")
        .def("down_row_layers", [](const Engine & e) { return down_row_tuple(e.down_row_layers()); },
           "(layers, row bytes, column bytes): the layers whose down projection costs less by the converted GGUF's "
           "ffn_down rows than by the sidecar's down columns, the bytes of those rows and of the columns they "
           "replace; none with the joint layout or without the rows' checksums in the sidecar")
        .def("use_down_rows", [](Engine & e, const std::vector<int> & layers) {
            py::gil_scoped_release release;
            e.use_down_rows(layers);
        }, py::arg("layers"),
           "Read the converted GGUF's down rows of `layers` (down_row_layers() says where they pay), each checked "
           "against its checksum, and compute those layers' down projections with them from now on (for a store "
           "held whole in DRAM; before fill_cache, which then skips their down columns). Between evaluations.")
        .def("down_row_trial_layers", [](const Engine & e) { return down_row_tuple(e.down_row_trial_layers()); },
           "(layers, row bytes, column bytes): every layer whose down rows could replace its down columns, "
           "whatever they would cost (try_down_rows puts them on trial)")
        .def("try_down_rows", [](Engine & e, const std::vector<int> & layers) {
            py::gil_scoped_release release;
            e.try_down_rows(layers);
        }, py::arg("layers"),
           "Read and check the down rows of `layers` as use_down_rows does, but keep the down columns too: the "
           "first decoded tokens alternate between them, timed, and the faster is kept (down_trial). Before "
           "fill_cache, whose cache must hold the columns beside the rows. Between evaluations.")
        .def("hold_down_rows", [](Engine & e, uint64_t room, bool trial) {
            DownRowChoice c;
            {
                py::gil_scoped_release release;
                c = e.hold_down_rows(room, trial);
            }
            return py::make_tuple(c.layers, c.trial, c.row_bytes, c.column_bytes);
        }, py::arg("room"), py::arg("trial") = false,
           "The converted GGUF's down rows for a cache holding the whole store, given `room`, the memory the cache may "
           "use: those that pay by the cost model in place of their columns when the store still fits, else none; "
           "with `trial`, every layer's on trial instead when the room holds them beside the store (the process "
           "keeps the faster encoding, so its outputs depend on the timing). Before fill_cache. Returns (layers, on "
           "trial, row bytes, column bytes).")
        .def_property_readonly("down_trial", [](const Engine & e) {
            py::dict out;
            if (!e.sparse()) return out;
            const SparseFfn::DownTrial t = e.sparse()->down_trial();
            out["layers"] = t.layers;
            out["tokens"] = t.tokens;
            out["rows_ms"] = (double) t.rows_ns / 1e6;
            out["columns_ms"] = (double) t.columns_ns / 1e6;
            out["settled"] = t.settled;
            out["rows_kept"] = t.rows_kept;
            return out;
        }, "the down trial (try_down_rows): layers on it, decoded tokens timed, the median token's time with rows "
           "and with columns (ms), whether it has settled and on rows")
        .def_property_readonly("down_rows_layers_in_use", [](const Engine & e) {
            std::vector<int> out;
            if (e.sparse()) {
                for (int il = 0; il < e.n_layer(); ++il) {
                    if (e.sparse()->down_by_rows(il)) out.push_back(il);
                }
            }
            return out;
        }, "the layers whose down projection reads rows (use_down_rows)")
        .def("fill_cache", [](Engine & e, int threads) {
            if (!e.sparse()) throw std::invalid_argument("the dense engine has no bundle cache");
            py::gil_scoped_release release;
            return e.sparse()->fill_arena(threads);
        }, py::arg("threads") = 2,
           "Read the whole store into the cache in long sequential reads, every record checked, when the cache "
           "holds the store (cache_holds_store); else do nothing. Between evaluations only. Returns the bytes read.")
        .def_property_readonly("store_bytes", [](const Engine & e) {
            return e.sparse() ? e.sparse()->store_bytes() : (uint64_t) 0;
        }, "bytes of all bundle records in the sidecar")
        .def("capture_inputs", &Engine::capture_inputs, py::arg("max_tokens"),
             "Record up to max_tokens FFN input rows per layer from now on (dense engine; 0 stops).")
        .def("captured_inputs", [](const Engine & e, int il) {
            const auto [n_embd, n_out] = e.layer_shape(il);
            const std::vector<float> & rows = e.captured_inputs(il);
            py::array_t<float> out({ (py::ssize_t) (rows.size() / (size_t) n_embd), (py::ssize_t) n_embd });
            std::copy(rows.begin(), rows.end(), out.mutable_data());
            return out;
        }, py::arg("il"), "The FFN input rows captured for layer il, shape (n, n_embd).")
        .def("inject_fault", [](Engine & e, const std::string & kind, uint64_t after) {
            if (!e.sparse()) throw std::invalid_argument("fault injection needs the sparse engine (a sidecar)");
            const InjectedFault fault = kind == "eio" ? InjectedFault::Eio : kind == "short_read" ? InjectedFault::ShortRead
                                      : kind == "none" ? InjectedFault::None
                                      : throw std::invalid_argument("fault must be 'eio', 'short_read' or 'none'");
            e.sparse()->inject_fault(fault, after);
        }, py::arg("kind"), py::arg("after") = 0, "Test seam: make the read `after` reads from now fail.")
        .def("cache_stats", [](Engine & e) {
            py::dict d;
            if (!e.sparse()) return d;
            const CacheStats c = e.sparse()->cache_stats();
            d["lookups"] = c.lookups; d["hits"] = c.hits; d["admissions"] = c.admissions;
            d["rejections"] = c.rejections; d["evictions"] = c.evictions; d["used_bytes"] = c.used_bytes;
            d["capacity_bytes"] = c.capacity_bytes; d["entries"] = c.entries;
            return d;
        })
        .def("forward",
             [](Engine & e, int il, py::array_t<float, py::array::c_style | py::array::forcecast> x,
                const std::string & activation) {
                 const auto [n_embd, n_out] = e.layer_shape(il);
                 if (x.ndim() != 2 || x.shape(1) != n_embd) {
                     throw std::invalid_argument("x must have shape (n_tokens, " + std::to_string(n_embd) + ")");
                 }
                 const Activation act = activation_from_name(activation);
                 const int64_t n_tokens = x.shape(0);
                 py::array_t<float> y({ (py::ssize_t) n_tokens, (py::ssize_t) n_out });
                 const float * xp = x.data();
                 float * yp = y.mutable_data();
                 {
                     // x and y stay alive in this frame; the engine calls nothing in Python
                     py::gil_scoped_release release;
                     e.forward(il, act, xp, yp, n_tokens);
                 }
                 return y;
             },
             py::arg("il"), py::arg("x"), py::arg("activation"),
             "Evaluate layer il densely on rows of x on the calling thread (reference path).");
}

static void register_quant(py::module_ & m) {
    m.def("column_axpy_isa", &column_axpy_isa,
          "The instruction set of the sparse down projection's loops on this CPU: 'avx512', 'avx2' or 'generic'.");
    m.def("file_block_checksum", &file_block_checksum, py::arg("path"), py::arg("offset"), py::arg("nbytes"),
          py::call_guard<py::gil_scoped_release>(),
          "block_checksum64 of nbytes bytes of the file at path from offset (ModelFileError if shorter).");
    m.def("gguf_strings_end", [](py::buffer data, uint64_t offset, uint64_t count) {
              const py::buffer_info info = data.request();
              if (info.itemsize != 1 || info.ndim != 1) throw std::invalid_argument("gguf_strings_end: a buffer of bytes");
              const auto * bytes = static_cast<const uint8_t *>(info.ptr);
              const uint64_t size = (uint64_t) info.size;
              py::gil_scoped_release release;
              return gguf_strings_end(bytes, size, offset, count);
          }, py::arg("data"), py::arg("offset"), py::arg("count"),
          "Where an array of count GGUF strings starting at offset of data ends (len(data) + 1 if truncated).");
    m.def("verify_model_file", [](const std::string & gguf, const std::string & sidecar) {
              const SidecarStore store(sidecar, "", false);
              return verify_model_file(gguf, store);
          }, py::arg("gguf"), py::arg("sidecar"), py::call_guard<py::gil_scoped_release>(),
          "Check the converted GGUF against the checksums its sidecar recorded; ModelFileError naming the first "
          "range that differs. Returns the bytes checked (0 when the sidecar records none).");
    using FloatRows = py::array_t<float, py::array::c_style>;
    m.def("zero_dropped_pairs",
          [](const std::string & activation, FloatRows gate, FloatRows h, FloatRows candidate_scale,
             FloatRows down_norm, float candidate_threshold, float threshold, int threads, bool apply) {
              if (gate.ndim() != 2 || h.ndim() != 2 || gate.shape(0) != h.shape(0) || gate.shape(1) != h.shape(1)) {
                  throw std::invalid_argument("zero_dropped_pairs: gate and h must be (tokens, n_ff) arrays of one shape");
              }
              const int64_t n_rows = h.shape(0), n_ff = h.shape(1);
              if (candidate_scale.size() != n_ff || down_norm.size() != n_ff) {
                  throw std::invalid_argument("zero_dropped_pairs: candidate_scale and down_norm need n_ff = " +
                                              std::to_string(n_ff) + " values");
              }
              const Activation act = activation_from_name(activation);
              float * hp = h.mutable_data();
              MaskCounts c;
              {
                  py::gil_scoped_release unlocked;
                  c = zero_dropped_pairs(act, gate.data(), hp, n_rows, n_ff, candidate_scale.data(), down_norm.data(),
                                         candidate_threshold, threshold, threads, apply);
              }
              return py::make_tuple(c.candidates, c.finals, c.changed);
          },
          py::arg("activation"), py::arg("gate").noconvert(), py::arg("h").noconvert(), py::arg("candidate_scale"),
          py::arg("down_norm"), py::arg("candidate_threshold"), py::arg("threshold"), py::arg("threads") = 1,
          py::arg("apply") = true,
          "The contribution criterion on dense rows, as the engine applies it: h zeroed in place (float32, C order) "
          "where a (token, neuron) pair is not final (apply=False: only counted); returns (candidate pairs, final "
          "pairs, pairs not final whose h was not 0).");
    m.def("token_nll",
          [](FloatRows logits, py::array_t<int64_t, py::array::c_style | py::array::forcecast> targets, int threads) {
              if (logits.ndim() != 2 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0)) {
                  throw std::invalid_argument("token_nll: logits must be (rows, n_vocab) and targets one per row");
              }
              const int64_t n_rows = logits.shape(0), n_vocab = logits.shape(1);
              const int64_t * t = targets.data();
              for (int64_t r = 0; r < n_rows; ++r) {
                  if (t[r] < 0 || t[r] >= n_vocab) {
                      throw std::invalid_argument("token_nll: target " + std::to_string(t[r]) + " of row " +
                                                  std::to_string(r) + " is outside the vocabulary of " +
                                                  std::to_string(n_vocab));
                  }
              }
              py::array_t<double> out(n_rows);
              double * o = out.mutable_data();
              {
                  py::gil_scoped_release unlocked;
                  token_nll(logits.data(), n_rows, n_vocab, t, o, threads);
              }
              return out;
          },
          py::arg("logits").noconvert(), py::arg("targets"), py::arg("threads") = 1,
          "NLL of each row's target under its logits (float32, C order): log-sum-exp minus the target's logit, "
          "summed in double; float64 (rows,).");
    m.def("checksum64", [](py::bytes data) {
        const std::string s = data;
        return checksum64(s.data(), s.size());
    }, py::arg("data"), "The sidecar's 64-bit record checksum of a byte string (neuralink.formats.checksum).");
    m.def("block_checksum64", [](py::bytes data) {
        const std::string s = data;
        return block_checksum64(s.data(), s.size());
    }, py::arg("data"), "The sidecar's checksum of a long range (of its 4 KiB blocks' checksums).");
    m.def("row_bytes", [](const std::string & type, int64_t n) { return ggml_row_size(type_from_name(type), n); },
          py::arg("type"), py::arg("n"), "Bytes of a row of n values of a ggml type.");
    m.def("quantize",
          [](const std::string & type, py::array_t<float, py::array::c_style | py::array::forcecast> x) {
              if (x.ndim() != 2) {
                  throw std::invalid_argument("x must be 2-D (rows, cols)");
              }
              const ggml_type t = type_from_name(type);
              const int64_t rows = x.shape(0), cols = x.shape(1);
              py::array_t<uint8_t> out({ (py::ssize_t) rows, (py::ssize_t) ggml_row_size(t, cols) });
              const float * src = x.data();
              uint8_t * dst = out.mutable_data();
              {
                  // both arrays are owned by this frame; ggml calls nothing in Python
                  py::gil_scoped_release release;
                  quantize_rows(t, src, dst, rows, cols);
              }
              return out;
          },
          py::arg("type"), py::arg("x"), "Encode rows of floats in a ggml type with ggml's quantizer.");
    m.def("dequantize",
          [](const std::string & type, py::array_t<uint8_t, py::array::c_style | py::array::forcecast> q, int64_t cols) {
              const ggml_type t = type_from_name(type);
              const size_t rb = ggml_row_size(t, cols);
              if (q.ndim() != 2 || (size_t) q.shape(1) != rb) {
                  throw std::invalid_argument("q must have shape (rows, " + std::to_string(rb) + ")");
              }
              const int64_t rows = q.shape(0);
              py::array_t<float> out({ (py::ssize_t) rows, (py::ssize_t) cols });
              dequantize_rows(t, q.data(), out.mutable_data(), rows, cols);
              return out;
          },
          py::arg("type"), py::arg("q"), py::arg("cols"), "Decode rows of a ggml type to floats.");
}

static void register_planner(py::module_ & m) {
    m.def("plan_reads",
          [](py::array_t<uint32_t, py::array::c_style | py::array::forcecast> needed, uint64_t region_offset,
             size_t record_bytes, uint32_t n_records, uint32_t max_gap, uint64_t max_read_bytes) {
              BundleRegion region { region_offset, record_bytes, n_records };
              CollapsePolicy policy { max_gap, max_read_bytes };
              const auto reads = plan_reads(region, needed.data(), (size_t) needed.size(), policy);
              return planned_reads_array(reads);
          },
          py::arg("needed"), py::arg("region_offset"), py::arg("record_bytes"), py::arg("n_records"),
          py::arg("max_gap") = 0, py::arg("max_read_bytes") = 0,
          "Plan direct-I/O reads for sorted needed positions: rows of (offset, length, first, count, n_needed).");
}

static void register_io(py::module_ & m) {
    m.def("probe_reads",
          [](const std::string & path, size_t read_size, int queue_depth, uint64_t n_reads, uint64_t seed, bool direct,
             bool in_order) {
              ProbeResult r;
              {
                  // only C++ buffers and threads are involved
                  py::gil_scoped_release release;
                  r = probe_reads(path, read_size, queue_depth, n_reads, seed, direct, in_order);
              }
              py::dict d;
              d["seconds"] = r.seconds; d["reads"] = r.reads; d["bytes"] = r.bytes; d["direct"] = r.direct;
              return d;
          },
          py::arg("path"), py::arg("read_size"), py::arg("queue_depth"), py::arg("n_reads"), py::arg("seed") = 0,
          py::arg("direct") = true, py::arg("in_order") = false,
          "Random aligned reads of one size with queue_depth in flight (in_order: one after the other from the "
          "file's start): {seconds, reads, bytes, direct}.");
    m.def("resident_fraction", &resident_fraction, py::arg("path"), py::arg("offset"), py::arg("length"),
          "Fraction of the pages of a file range that are in the page cache (mincore).");
    m.def("evict_from_page_cache", &evict_from_page_cache, py::arg("path"),
          "Drop a file's clean pages from the page cache (posix_fadvise DONTNEED).");
    m.def("output_screen_unsupported", [](const Engine & e, const std::string & coarse_type) {
        return OutputScreen::unsupported(e.model(), type_from_name(coarse_type));
    }, py::arg("engine"), py::arg("coarse_type"),
          "Why the engine's model's output matrix cannot be screened by a copy in coarse_type, or ''.");
}

PYBIND11_MODULE(_engine, m) {
    m.doc() = "neuralink's C++ engine";
    m.attr("FFN_HOOK_API_VERSION") = LLAMA_FFN_HOOK_API_VERSION;
    // the engine's defaults (neuralink/defaults.h): Python reads them from here, never restates them
    m.attr("DEFAULT_READ_LATENCY_S") = kDefaultReadLatencyS;
    m.attr("DEFAULT_BANDWIDTH_BYTES_S") = kDefaultBandwidthBytesS;
    m.attr("DOWN_TRIAL_TOKENS") = SparseFfn::kDownTrialTokens;
    m.attr("DOWN_TRIAL_MARGIN") = SparseFfn::kDownTrialMargin;
    m.attr("STATS_KEPT") = SparseFfn::kStatsKept;
    m.attr("DEFAULT_QUEUE_DEPTH") = kDefaultQueueDepth;
    m.attr("STREAM_COST_RATIO") = SparseFfn::kStreamCostRatio;
    m.attr("DEFAULT_MAX_READ_BYTES") = kDefaultMaxReadBytes;
    m.attr("BUDGET_N_BATCH") = kBudgetBatch;
    m.attr("DIRECT_ALIGN") = kDirectAlign;
    m.attr("OUTPUT_SCREEN_TYPE") = std::string(ggml_type_name(OutputScreenOptions {}.coarse_type));
    m.attr("OUTPUT_SCREEN_MARGIN") = OutputScreenOptions {}.margin;
    register_errors();
    register_engine(m);
    register_quant(m);
    register_planner(m);
    register_io(m);
    register_cache(m);
    register_replay(m);
    register_memory(m);
}
