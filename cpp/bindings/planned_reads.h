// Shared by the bindings: planned reads as a numpy table.
#pragma once

#include "neuralink/read_planner.h"

#include <pybind11/numpy.h>

#include <vector>

namespace neuralink {

// rows of (offset, length, first, count, n_needed), uint64
inline pybind11::array_t<uint64_t> planned_reads_array(const std::vector<PlannedRead> & reads) {
    pybind11::array_t<uint64_t> out({ (pybind11::ssize_t) reads.size(), (pybind11::ssize_t) 5 });
    auto o = out.mutable_unchecked<2>();
    for (size_t i = 0; i < reads.size(); ++i) {
        o(i, 0) = reads[i].offset; o(i, 1) = reads[i].length; o(i, 2) = reads[i].first;
        o(i, 3) = reads[i].count; o(i, 4) = reads[i].n_needed;
    }
    return out;
}

} // namespace neuralink
