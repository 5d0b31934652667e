#include "neuralink/read_planner.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace neuralink {

// appends the aligned read of records [first, last], merging it into the previous read when their
// aligned ranges touch (one operation instead of two) and the merged read stays within max_read_bytes
static void emit(std::vector<PlannedRead> & out, const BundleRegion & region, uint32_t first, uint32_t last,
                 uint32_t n_needed, size_t align, uint64_t max_read_bytes) {
    const uint64_t begin = align_down(region.record_offset(first), align);
    const uint64_t end = align_up(region.record_offset(last) + region.record_bytes, align);
    if (!out.empty() && begin <= out.back().offset + out.back().length &&
        (max_read_bytes == 0 || end - out.back().offset <= max_read_bytes)) {
        PlannedRead & prev = out.back();
        prev.length = std::max(prev.offset + prev.length, end) - prev.offset;
        prev.count = last + 1 - prev.first;
        prev.n_needed += n_needed;
        return;
    }
    out.push_back({ begin, end - begin, first, last + 1 - first, n_needed });
}

std::vector<PlannedRead> plan_reads(const BundleRegion & region, const uint32_t * needed, size_t n_needed,
                                    const CollapsePolicy & policy, size_t align) {
    std::vector<PlannedRead> out;
    if (n_needed == 0) {
        return out;
    }
    // records per read when reads are capped (at least one)
    const uint64_t max_records = policy.max_read_bytes == 0 ? UINT64_MAX
            : std::max<uint64_t>(1, policy.max_read_bytes / std::max<size_t>(region.record_bytes, 1));
    uint32_t first = needed[0], last = needed[0], in_run = 1;
    for (size_t i = 0; i <= n_needed; ++i) {
        if (i < n_needed) {
            const uint32_t p = needed[i];
            if (p >= region.n_records || (i > 0 && p <= needed[i - 1])) {
                throw std::invalid_argument("plan_reads: positions must be sorted, unique and below " +
                        std::to_string(region.n_records) + " (position " + std::to_string(p) + " at index " +
                        std::to_string(i) + ")");
            }
            if (i == 0) {
                continue;
            }
            if (p - last - 1 <= policy.max_gap && (uint64_t) (p - first) < max_records) {
                last = p;
                ++in_run;
                continue;
            }
        }
        emit(out, region, first, last, in_run, align, policy.max_read_bytes);
        if (i < n_needed) {
            first = last = needed[i];
            in_run = 1;
        }
    }
    return out;
}

std::vector<PlannedRead> plan_whole_region(const BundleRegion & region, uint64_t max_read_bytes, size_t align) {
    std::vector<uint32_t> all(region.n_records);
    for (uint32_t p = 0; p < region.n_records; ++p) {
        all[p] = p;
    }
    CollapsePolicy policy;
    policy.max_gap = 0;
    policy.max_read_bytes = max_read_bytes;
    return plan_reads(region, all.data(), all.size(), policy, align);
}

} // namespace neuralink
