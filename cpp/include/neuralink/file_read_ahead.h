#pragma once

// Byte ranges of a file asked of the kernel (POSIX_FADV_WILLNEED: it reads them in long reads, asynchronously)
// a fixed distance ahead of a reader that consumes them in order, across the ranges' boundaries but never the
// gaps between them. The pages asked for are the ones read next: a memory cap sees at most `ahead` bytes more
// page cache. Used where a page-cache reader would otherwise wait for the kernel's own read-ahead (one stream
// of 128-256 KiB reads): the model check, and locking the weights read every token.

#include "neuralink/file_range.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace neuralink {

class FileReadAhead {
public:
    // `fd` stays the caller's; a negative one asks for nothing. Asks in pieces of `piece` bytes.
    FileReadAhead(int fd, std::vector<FileRange> ranges, uint64_t ahead, uint64_t piece);

    // `consumed` bytes of the ranges (in order) have been read: ask for what lies up to `ahead` beyond them
    void consumed(uint64_t consumed);

private:
    int fd_;
    std::vector<FileRange> ranges_;
    uint64_t ahead_, piece_;
    size_t next_ = 0;     // the range asked for next, and how far into it
    uint64_t within_ = 0;
    uint64_t issued_ = 0; // bytes asked for so far
};

} // namespace neuralink
