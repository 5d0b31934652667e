// pybind11 bindings of the trace replayer (neuralink bench io): wiring only, no logic.

#include "neuralink/replay.h"
#include "planned_reads.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

namespace py = pybind11;
using namespace neuralink;

void register_replay(py::module_ & m) {
    PYBIND11_NUMPY_DTYPE(ReplayTokenStats, needed, hits, reads, needed_read, records_spanned, spanned_bytes, bytes_read,
                         needed_bytes, io_ns);

    py::class_<Replayer>(m, "Replayer")
        .def(py::init([](const std::string & path, const std::vector<std::tuple<uint64_t, size_t, uint32_t>> & regions,
                         std::vector<std::vector<uint32_t>> steps, const std::string & plan, uint64_t collapse_gap_bytes,
                         uint64_t max_read_bytes, int queue_depth, const std::string & io_backend, bool direct,
                         const std::string & cache_policy, size_t cache_bytes, double p_run, uint32_t window_tokens,
                         double bandwidth_bytes_s) {
                 std::vector<BundleRegion> rs;
                 for (const auto & [offset, record_bytes, n_records] : regions) rs.push_back({ offset, record_bytes, n_records });
                 ReplayOptions o;
                 o.plan = replay_plan_from_name(plan);
                 o.collapse_gap_bytes = collapse_gap_bytes;
                 o.max_read_bytes = max_read_bytes;
                 o.queue_depth = queue_depth;
                 o.io_backend = io_backend_from_name(io_backend);
                 o.direct = direct;
                 o.cache_policy = cache_policy_from_name(cache_policy);
                 o.cache_bytes = cache_bytes;
                 o.p_run = p_run;
                 o.window_tokens = window_tokens;
                 o.bandwidth_bytes_s = bandwidth_bytes_s;
                 return std::make_unique<Replayer>(path, std::move(rs), std::move(steps), o);
             }),
             py::arg("path"), py::arg("regions"), py::arg("steps"), py::arg("plan") = "collapse",
             py::arg("collapse_gap_bytes") = 0, py::arg("max_read_bytes") = kDefaultMaxReadBytes, py::arg("queue_depth") = kDefaultQueueDepth,
             py::arg("io_backend") = "auto", py::arg("direct") = true, py::arg("cache_policy") = "none",
             py::arg("cache_bytes") = 0, py::arg("p_run") = 0.1, py::arg("window_tokens") = 0,
             py::arg("bandwidth_bytes_s") = kDefaultBandwidthBytesS,
             "Replay reads of `regions` ((offset, record_bytes, n_records) each) of a file; steps[s] lists the "
             "regions one layer evaluation reads.")
        .def("pin", [](Replayer & r, const std::vector<std::vector<float>> & frequency) {
            // reads records from the file only
            py::gil_scoped_release release;
            r.pin(frequency);
        }, py::arg("frequency"), "Pinned cache: keep the most frequent records (frequency[region][pos]).")
        .def("replay",
             [](Replayer & r, py::array_t<uint32_t, py::array::c_style | py::array::forcecast> positions,
                py::array_t<uint64_t, py::array::c_style | py::array::forcecast> offsets, size_t token_begin,
                size_t token_end) {
                 if (positions.ndim() != 1 || offsets.ndim() != 1) {
                     throw std::invalid_argument("positions and offsets must be 1-D");
                 }
                 std::vector<ReplayTokenStats> stats;
                 {
                     // both arrays stay alive in this frame; the replay calls nothing in Python
                     py::gil_scoped_release release;
                     stats = r.replay(positions.data(), (size_t) positions.size(), offsets.data(),
                                      (size_t) offsets.size(), token_begin, token_end);
                 }
                 py::array_t<ReplayTokenStats> out((py::ssize_t) stats.size());
                 std::copy(stats.begin(), stats.end(), out.mutable_data());
                 return out;
             },
             py::arg("positions"), py::arg("offsets"), py::arg("token_begin"), py::arg("token_end"),
             "Replay tokens [token_begin, token_end) of a CSR trace; per-token stats (a numpy structured array).")
        .def_property_readonly("n_steps", &Replayer::n_steps)
        .def_property_readonly("direct", &Replayer::direct)
        .def_property_readonly("io_note", &Replayer::io_note)
        .def_property_readonly("io_backend", [](const Replayer & r) { return std::string(io_backend_name(r.io_backend())); })
        .def_property_readonly("io_backend_note", &Replayer::io_backend_note)
        .def_property_readonly("cache_used_bytes", &Replayer::cache_used_bytes)
        .def_property_readonly("collapse_gap_bytes", &Replayer::collapse_gap_bytes,
                               "the gap read through now (adaptive: the current fit's)");

    m.def("plan_runs",
          [](py::array_t<uint32_t, py::array::c_style | py::array::forcecast> needed, uint64_t region_offset,
             size_t record_bytes, uint32_t n_records, uint64_t max_read_bytes) {
              BundleRegion region { region_offset, record_bytes, n_records };
              const auto reads = plan_runs(region, needed.data(), (size_t) needed.size(), max_read_bytes);
              return planned_reads_array(reads);
          },
          py::arg("needed"), py::arg("region_offset"), py::arg("record_bytes"), py::arg("n_records"),
          py::arg("max_read_bytes") = 0,
          "One aligned read per run of consecutive needed positions: rows of (offset, length, first, count, n_needed).");
}
