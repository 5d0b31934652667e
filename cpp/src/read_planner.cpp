#include "neuralink/read_planner.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace neuralink {

// ---------------------------------------------------------------- adaptive collapse

// the latency unit of the fit: the prior's, or 1 us when the prior has none (a bandwidth-bound device)
static double latency_unit(const DeviceCost & prior) { return std::max(prior.read_latency_s, 1e-6); }

AdaptiveCollapse::AdaptiveCollapse(DeviceCost prior, double forget, double prior_weight)
    : prior_(prior), forget_(forget), prior_weight_(prior_weight), fitted_(prior) {
    if (!(prior.read_latency_s >= 0) || !(prior.bandwidth_bytes_s > 0) || !std::isfinite(prior.bandwidth_bytes_s)) {
        throw std::invalid_argument("adaptive collapse needs a prior with latency >= 0 and a finite bandwidth > 0");
    }
    if (!(forget > 0 && forget <= 1) || !(prior_weight > 0)) {
        throw std::invalid_argument("adaptive collapse needs 0 < forget <= 1 and a prior weight > 0");
    }
}

void AdaptiveCollapse::observe(uint64_t n_reads, uint64_t bytes, uint64_t wall_ns) {
    if (n_reads == 0 || wall_ns == 0) {
        return;
    }
    const double u = (double) n_reads * latency_unit(prior_);
    const double v = (double) bytes / prior_.bandwidth_bytes_s;
    const double t = (double) wall_ns * 1e-9;
    std::lock_guard<std::mutex> lock(mutex_);
    const double f = forget_;
    suu_ = f * suu_ + u * u;
    suv_ = f * suv_ + u * v;
    svv_ = f * svv_ + v * v;
    sut_ = f * sut_ + u * t;
    svt_ = f * svt_ + v * t;
    weight_ = f * weight_ + 1;
    ++observations_;
    refit();
}

void AdaptiveCollapse::refit() {
    // ridge towards the prior (a0, 1), in each coordinate with the weight of prior_weight typical waves
    const double a0 = prior_.read_latency_s / latency_unit(prior_);
    const double mu_a = prior_weight_ * suu_ / weight_, mu_b = prior_weight_ * svv_ / weight_;
    const double m11 = suu_ + mu_a, m12 = suv_, m22 = svv_ + mu_b;
    const double r1 = sut_ + mu_a * a0, r2 = svt_ + mu_b;
    const double det = m11 * m22 - m12 * m12;
    double a = (r1 * m22 - m12 * r2) / det;
    double b = (m11 * r2 - m12 * r1) / det;
    // the bandwidth stays within a factor of 10 of the prior's; the latency is never negative
    const auto clamp_b = [](double x) { return std::min(std::max(x, 0.1), 10.0); };
    if (a < 0) {
        a = 0;
        b = clamp_b(r2 / m22);
    } else if (b != clamp_b(b)) {
        b = clamp_b(b);
        a = std::max(0.0, (r1 - m12 * b) / m11);
    }
    if (!std::isfinite(a) || !std::isfinite(b)) {
        return; // degenerate sums: keep the previous fit
    }
    fitted_.read_latency_s = a * latency_unit(prior_);
    fitted_.bandwidth_bytes_s = prior_.bandwidth_bytes_s / b;
}

DeviceCost AdaptiveCollapse::cost() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return fitted_;
}

uint64_t AdaptiveCollapse::observations() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return observations_;
}

// ---------------------------------------------------------------- planning

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
