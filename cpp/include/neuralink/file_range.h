#pragma once

#include <cstddef>
#include <cstdint>

namespace neuralink {

// One contiguous byte range of a file.
struct FileRange {
    uint64_t offset = 0;
    size_t bytes = 0;
};

} // namespace neuralink
