// pybind11 bindings of the bundle cache: wiring only, no logic.

#include "neuralink/bundle_cache.h"

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

namespace py = pybind11;
using namespace neuralink;

// a contiguous bytes-like object of exactly n bytes (bytes, bytearray, memoryview, uint8 array)
static py::buffer_info record_buffer(const py::buffer & b, size_t n, const char * what) {
    py::buffer_info info = b.request();
    const bool contiguous = info.ndim == 1 && info.itemsize == 1 && info.strides[0] == 1;
    if (!contiguous || (size_t) info.size != n) {
        throw std::invalid_argument(std::string(what) + " must be " + std::to_string(n) +
                                    " contiguous bytes, got " + std::to_string(info.size * info.itemsize) +
                                    (contiguous ? "" : " (not a contiguous 1-D byte buffer)"));
    }
    return info;
}

void register_cache(py::module_ & m) {
    py::class_<CacheStats>(m, "CacheStats")
        .def_readonly("lookups", &CacheStats::lookups)
        .def_readonly("hits", &CacheStats::hits)
        .def_readonly("admissions", &CacheStats::admissions)
        .def_readonly("rejections", &CacheStats::rejections)
        .def_readonly("evictions", &CacheStats::evictions)
        .def_readonly("used_bytes", &CacheStats::used_bytes)
        .def_readonly("capacity_bytes", &CacheStats::capacity_bytes)
        .def_readonly("table_bytes", &CacheStats::table_bytes)
        .def_readonly("entries", &CacheStats::entries)
        .def_readonly("ghost_entries", &CacheStats::ghost_entries)
        .def("__repr__", [](const CacheStats & s) {
            return "CacheStats(lookups=" + std::to_string(s.lookups) + ", hits=" + std::to_string(s.hits) +
                   ", admissions=" + std::to_string(s.admissions) + ", rejections=" + std::to_string(s.rejections) +
                   ", evictions=" + std::to_string(s.evictions) + ", used_bytes=" + std::to_string(s.used_bytes) +
                   ", capacity_bytes=" + std::to_string(s.capacity_bytes) + ", table_bytes=" +
                   std::to_string(s.table_bytes) + ", entries=" + std::to_string(s.entries) +
                   ", ghost_entries=" + std::to_string(s.ghost_entries) + ")";
        });

    py::class_<BundleCache>(m, "BundleCache")
        .def(py::init([](const std::string & policy, size_t capacity_bytes, std::vector<size_t> record_bytes,
                         double p_run, size_t max_entries) {
                 BundleCacheOptions o;
                 o.p_run = p_run;
                 o.max_entries = max_entries;
                 return std::make_unique<BundleCache>(cache_policy_from_name(policy), capacity_bytes,
                                                      std::move(record_bytes), o);
             }),
             py::arg("policy"), py::arg("capacity_bytes"), py::arg("record_bytes"),
             py::arg("p_run") = BundleCacheOptions().p_run, py::arg("max_entries") = 0,
             "A DRAM cache of neuron bundles within capacity_bytes (records plus bookkeeping).")
        .def_property_readonly("policy", [](const BundleCache & c) { return cache_policy_name(c.policy()); })
        .def_property_readonly("capacity_bytes", &BundleCache::capacity_bytes)
        .def_property_readonly("n_layers", &BundleCache::n_layers)
        .def_property_readonly("max_entries", &BundleCache::max_entries)
        .def("record_bytes", &BundleCache::record_bytes, py::arg("layer"), "Bytes of one record of a layer.")
        .def("lookup",
             [](BundleCache & c, uint32_t layer, uint32_t pos) -> py::object {
                 std::string record(c.record_bytes(layer), '\0');
                 bool hit;
                 {
                     // record is owned by this frame; the cache calls nothing in Python
                     py::gil_scoped_release release;
                     hit = c.lookup(layer, pos, (uint8_t *) record.data());
                 }
                 return hit ? py::object(py::bytes(record)) : py::object(py::none());
             },
             py::arg("layer"), py::arg("pos"), "The cached record of (layer, pos), or None on a miss.")
        .def("admit",
             [](BundleCache & c, uint32_t layer, uint32_t pos, const py::buffer & record, bool isolated) {
                 const py::buffer_info info = record_buffer(record, c.record_bytes(layer), "record");
                 const uint8_t * src = (const uint8_t *) info.ptr;
                 // info holds the buffer export, so src stays valid without the GIL
                 py::gil_scoped_release release;
                 c.admit(layer, pos, src, isolated);
             },
             py::arg("layer"), py::arg("pos"), py::arg("record"), py::arg("isolated"),
             "Offer a record just read; isolated = it was read alone rather than inside a run.")
        .def("pin_hottest",
             [](BundleCache & c, const std::vector<py::array_t<float, py::array::c_style | py::array::forcecast>> & frequency,
                const std::function<py::object(uint32_t, uint32_t)> & read_record) {
                 std::vector<std::vector<float>> freq;
                 for (const auto & f : frequency) {
                     if (f.ndim() != 1) {
                         throw std::invalid_argument("frequency[" + std::to_string(freq.size()) + "] must be 1-D, got " +
                                                     std::to_string(f.ndim()) + " dimensions");
                     }
                     freq.emplace_back(f.data(), f.data() + f.size());
                 }
                 // read_record is Python: the GIL stays held throughout
                 c.pin_hottest(freq, [&](uint32_t layer, uint32_t pos, uint8_t * dst) {
                     const py::object r = read_record(layer, pos);
                     const py::buffer_info info = record_buffer(r.cast<py::buffer>(), c.record_bytes(layer),
                                                                "read_record's result");
                     std::memcpy(dst, info.ptr, (size_t) info.size);
                 });
             },
             py::arg("frequency"), py::arg("read_record"),
             "Pinned policy: cache the most frequent neurons that fit, reading them with read_record(layer, pos).")
        .def("stats", &BundleCache::stats)
        .def("reset_stats", &BundleCache::reset_stats);

    m.def("cache_policy_names", &cache_policy_names, "Names of the bundle cache policies.");
}
