#pragma once

// Turning a layer's needed neurons into few long direct-I/O reads. A layer's
// bundle records sit back to back in placed order, so a run of consecutive
// positions is one byte range; two runs separated by a short gap are worth
// reading as one when the gap costs less than another I/O operation.

#include "neuralink/defaults.h"
#include "neuralink/direct_file.h"

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace neuralink {

// Where one layer's records live in the sidecar.
struct BundleRegion {
    uint64_t offset = 0;       // file offset of record 0
    size_t   record_bytes = 0;
    uint32_t n_records = 0;    // n_ff

    uint64_t record_offset(uint32_t pos) const { return offset + (uint64_t) pos * record_bytes; }
};

// Device cost model: one read costs latency + bytes / bandwidth.
struct DeviceCost {
    double read_latency_s = kDefaultReadLatencyS;
    double bandwidth_bytes_s = kDefaultBandwidthBytesS;
    double cost(uint64_t n_reads, uint64_t bytes) const { return (double) n_reads * read_latency_s + (double) bytes / bandwidth_bytes_s; }
    // a gap is worth reading through when its bytes take less time than one more read
    double gap_bytes() const { return read_latency_s * bandwidth_bytes_s; }
    // the same bandwidth, with the latency whose gap is `gap` bytes (a gap given instead of profiled)
    DeviceCost with_gap(uint64_t gap) const { return { (double) gap / bandwidth_bytes_s, bandwidth_bytes_s }; }
};

// The paper's adaptive access collapse: the read cost learnt from the reads
// themselves while running, so that the collapse gap follows what the device
// delivers now (another process reading, a slower queue, a profile measured
// on a quieter day) instead of a number fixed at load. A wave of n reads of B
// bytes submitted together takes about n * latency + B / bandwidth of wall
// time; the pair is fitted by least squares over the recent waves (older ones
// forgotten geometrically), pulled towards the prior (the device profile)
// with the weight of `prior_weight` typical waves, so that a few waves of one
// shape cannot swing it. When the per-read latency fits to zero the device is
// bandwidth-bound: the gap is zero and runs are no longer merged.
class AdaptiveCollapse {
public:
    static constexpr double kForget = 0.99;     // weight of a wave after each newer one (~100 waves: two tokens of 28 layers)
    static constexpr double kPriorWeight = 0.5; // the prior counts as half a typical wave

    explicit AdaptiveCollapse(DeviceCost prior, double forget = kForget, double prior_weight = kPriorWeight);

    // a completed wave: n_reads reads, `bytes` in all, first submitted -> last completed in wall_ns
    void observe(uint64_t n_reads, uint64_t bytes, uint64_t wall_ns);
    DeviceCost cost() const;   // the current fit (the prior until a wave is observed)
    DeviceCost prior() const { return prior_; }
    uint64_t observations() const;

private:
    void refit(); // under mutex_

    const DeviceCost prior_;
    const double forget_, prior_weight_;
    mutable std::mutex mutex_;
    // weighted sums over the waves, in the prior's units (seconds): u = n * latency0, v = B / bandwidth0, t = wall
    double suu_ = 0, suv_ = 0, svv_ = 0, sut_ = 0, svt_ = 0, weight_ = 0;
    uint64_t observations_ = 0;
    DeviceCost fitted_;
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
