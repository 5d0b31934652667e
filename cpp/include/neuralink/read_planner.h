#pragma once

// Turning a layer's needed neurons into few long direct-I/O reads. A layer's
// bundle records sit back to back in placed order, so a run of consecutive
// positions is one byte range; two runs separated by a short gap are worth
// reading as one when the gap costs less than another I/O operation.

#include "neuralink/direct_file.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace neuralink {

// Where one layer's records live in the sidecar.
struct BundleRegion {
    uint64_t offset = 0;       // file offset of record 0
    size_t   record_bytes = 0;
    uint32_t n_records = 0;    // n_ff

    uint64_t record_offset(uint32_t pos) const { return offset + (uint64_t) pos * record_bytes; }
};

struct CollapsePolicy {
    uint32_t max_gap = 0;          // merge runs separated by at most this many unneeded records
    uint64_t max_read_bytes = 0;   // split reads longer than this (0: unlimited)
};

// One read: [offset, offset + length), aligned, covering records [first, first + count).
struct PlannedRead {
    uint64_t offset = 0;
    uint64_t length = 0;
    uint32_t first = 0;
    uint32_t count = 0;
    uint32_t n_needed = 0; // how many of the covered records were asked for
};

// `needed`: sorted, unique positions below region.n_records (std::invalid_argument otherwise).
// Reads are aligned to `align` in offset and length and together cover every
// needed record; reads whose aligned ranges touch are merged unless that breaks
// max_read_bytes, so only the pieces of a split run may share one block.
std::vector<PlannedRead> plan_reads(const BundleRegion & region, const uint32_t * needed, size_t n_needed,
                                    const CollapsePolicy & policy, size_t align = kDirectAlign);

// The whole layer as a few long sequential reads (for batches that need most of it).
std::vector<PlannedRead> plan_whole_region(const BundleRegion & region, uint64_t max_read_bytes,
                                           size_t align = kDirectAlign);

} // namespace neuralink
