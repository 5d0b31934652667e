// pybind11 bindings of the engine: wiring only, no logic.

#include "neuralink/direct_file.h"
#include "neuralink/engine.h"
#include "neuralink/errors.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using namespace neuralink;

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
        }
    });
}

static void register_engine(py::module_ & m) {
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
        .def(py::init([](const std::string & model_path, bool direct_io) {
                 EngineOptions opts;
                 opts.direct_io = direct_io;
                 // reading the weights takes a while and touches no Python object
                 py::gil_scoped_release release;
                 return std::make_unique<Engine>(model_path, opts);
             }),
             py::arg("model_path"), py::arg("direct_io") = true)
        .def_property_readonly("hook_address", [](const Engine & e) { return (uintptr_t) e.hook(); })
        .def_property_readonly("architecture", [](const Engine & e) { return e.model().architecture(); })
        .def_property_readonly("n_layer", &Engine::n_layer)
        .def_property_readonly("weight_bytes", &Engine::weight_bytes)
        .def_property_readonly("direct_io", &Engine::direct_io)
        .def_property_readonly("io_note", &Engine::io_note)
        .def_property_readonly("tokens_computed", &Engine::tokens_computed)
        .def("layer_status", &Engine::layer_status)
        .def("forward",
             [](Engine & e, int il, py::array_t<float, py::array::c_style | py::array::forcecast> x,
                const std::string & activation) {
                 const FfnLayer & L = e.layer(il);
                 if (x.ndim() != 2 || x.shape(1) != L.n_embd) {
                     throw std::invalid_argument("x must have shape (n_tokens, " + std::to_string(L.n_embd) + ")");
                 }
                 const Activation act = activation_from_name(activation);
                 const int64_t n_tokens = x.shape(0);
                 py::array_t<float> y({ (py::ssize_t) n_tokens, (py::ssize_t) L.n_out });
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

static void register_io(py::module_ & m) {
    m.def("resident_fraction", &resident_fraction, py::arg("path"), py::arg("offset"), py::arg("length"),
          "Fraction of the pages of a file range that are in the page cache (mincore).");
    m.def("evict_from_page_cache", &evict_from_page_cache, py::arg("path"),
          "Drop a file's clean pages from the page cache (posix_fadvise DONTNEED).");
}

PYBIND11_MODULE(_engine, m) {
    m.doc() = "neuralink's C++ engine";
    m.attr("FFN_HOOK_API_VERSION") = LLAMA_FFN_HOOK_API_VERSION;
    register_errors();
    register_engine(m);
    register_quant(m);
    register_io(m);
}
