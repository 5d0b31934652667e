#include "neuralink/replay.h"

#include "neuralink/errors.h"
#include "neuralink/names.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace neuralink {

static constexpr Named<ReplayPlan> kReplayPlanNames[] = {
    { ReplayPlan::Runs, "runs" }, { ReplayPlan::Collapse, "collapse" }, { ReplayPlan::Whole, "whole" },
    { ReplayPlan::Adaptive, "adaptive" },
};

const char * replay_plan_name(ReplayPlan plan) { return name_in(kReplayPlanNames, plan); }
ReplayPlan replay_plan_from_name(const std::string & name) { return value_in(kReplayPlanNames, name, "replay plan"); }

std::vector<PlannedRead> plan_runs(const BundleRegion & region, const uint32_t * needed, size_t n_needed,
                                   uint64_t max_read_bytes, size_t align) {
    std::vector<PlannedRead> out;
    const uint64_t max_records = max_read_bytes == 0 ? UINT64_MAX
            : std::max<uint64_t>(1, max_read_bytes / std::max<size_t>(region.record_bytes, 1));
    size_t i = 0;
    while (i < n_needed) {
        const uint32_t first = needed[i];
        size_t j = i + 1;
        for (; j < n_needed; ++j) {
            if (needed[j] <= needed[j - 1]) {
                throw std::invalid_argument("plan_runs: positions must be sorted and unique (position " +
                                            std::to_string(needed[j]) + " at index " + std::to_string(j) + ")");
            }
            if (needed[j] != needed[j - 1] + 1 || (uint64_t) (j - i) >= max_records) break;
        }
        const uint32_t last = needed[j - 1];
        if (last >= region.n_records) {
            throw std::invalid_argument("plan_runs: position " + std::to_string(last) + " is not below " +
                                        std::to_string(region.n_records));
        }
        const uint64_t begin = align_down(region.record_offset(first), align);
        const uint64_t end = align_up(region.record_offset(last) + region.record_bytes, align);
        out.push_back({ begin, end - begin, first, last + 1 - first, last + 1 - first });
        i = j;
    }
    return out;
}

// ---------------------------------------------------------------- the sliding window

WindowCache::WindowCache(uint32_t window_tokens, size_t capacity_bytes, std::vector<size_t> record_bytes)
    : window_(window_tokens), capacity_(capacity_bytes), record_bytes_(std::move(record_bytes)) {
    if (window_ == 0) throw std::invalid_argument("a window cache needs a window of at least one token");
    if (record_bytes_.empty() || record_bytes_.size() > 65536) {
        throw std::invalid_argument("a window cache needs 1 to 65536 layers");
    }
}

size_t WindowCache::charge(uint32_t layer) const {
    return align_up(record_bytes_.at(layer), BundleCache::kSlotAlign) + BundleCache::kLiveEntryBytes;
}

void WindowCache::drop_back() {
    const Entry & e = lru_.back();
    used_ -= charge((uint32_t) (e.key >> 32));
    map_.erase(e.key);
    lru_.pop_back();
}

void WindowCache::start_token(uint64_t token) {
    token_ = token;
    while (!lru_.empty() && lru_.back().last_token + window_ < token) drop_back();
}

bool WindowCache::lookup(uint32_t layer, uint32_t pos, uint8_t * dst) {
    ++lookups_;
    const auto it = map_.find((uint64_t) layer << 32 | pos);
    if (it == map_.end()) return false;
    std::memcpy(dst, it->second->record.data(), it->second->record.size());
    it->second->last_token = token_;
    lru_.splice(lru_.begin(), lru_, it->second);
    ++hits_;
    return true;
}

void WindowCache::admit(uint32_t layer, uint32_t pos, const uint8_t * record) {
    const uint64_t key = (uint64_t) layer << 32 | pos;
    const auto it = map_.find(key);
    if (it != map_.end()) {
        it->second->last_token = token_;
        lru_.splice(lru_.begin(), lru_, it->second);
        return;
    }
    const size_t c = charge(layer);
    if (c > capacity_) return;
    while (used_ + c > capacity_) drop_back();
    const size_t n = record_bytes_[layer];
    lru_.push_front(Entry { key, token_, std::vector<uint8_t>(record, record + n) });
    map_[key] = lru_.begin();
    used_ += c;
}

// ---------------------------------------------------------------- the replayer

Replayer::Replayer(const std::string & path, std::vector<BundleRegion> regions,
                   std::vector<std::vector<uint32_t>> steps, const ReplayOptions & options)
    : regions_(std::move(regions)), steps_(std::move(steps)), options_(options) {
    if (regions_.empty() || steps_.empty()) throw std::invalid_argument("a replay needs regions and steps");
    if (options_.queue_depth < 1) throw std::invalid_argument("the queue depth must be at least 1");
    file_ = std::make_unique<DirectFile>(path, options_.direct);
    for (size_t i = 0; i < regions_.size(); ++i) {
        const BundleRegion & r = regions_[i];
        if (r.record_bytes == 0 || r.n_records == 0 || r.offset % kDirectAlign) {
            throw std::invalid_argument(path + ": region " + std::to_string(i) +
                                        " needs records and a 4096-aligned offset");
        }
        // reads are aligned up to whole blocks: the region's last block must be in the file
        if (align_up(r.offset + (uint64_t) r.record_bytes * r.n_records, kDirectAlign) > align_up(file_->size(), kDirectAlign)) {
            throw ModelFileError(path + ": region " + std::to_string(i) + " [" + std::to_string(r.offset) + ", +" +
                                 std::to_string((uint64_t) r.record_bytes * r.n_records) + ") runs past the end of the file (" +
                                 std::to_string(file_->size()) + " bytes)");
        }
    }
    for (size_t s = 0; s < steps_.size(); ++s) {
        if (steps_[s].empty()) throw std::invalid_argument("step " + std::to_string(s) + " reads no region");
        for (uint32_t r : steps_[s]) {
            if (r >= regions_.size() || regions_[r].n_records != regions_[steps_[s][0]].n_records) {
                throw std::invalid_argument("step " + std::to_string(s) + ": region " + std::to_string(r) +
                                            " is out of range or differs from the step's others in records");
            }
        }
    }

    std::string why;
    if (options_.io_backend == IoBackend::Pread || !uring_available(&why)) {
        if (options_.io_backend == IoBackend::Uring) {
            throw IoError(path + ": io_uring was asked for but is not available: " + why);
        }
        backend_note_ = options_.io_backend == IoBackend::Pread ? "pread pool chosen" : why + "; using the pread pool";
    } else {
        queue_ = make_uring_queue(*file_, (unsigned) options_.queue_depth, faults_, &why);
        if (queue_) {
            backend_ = IoBackend::Uring;
        } else if (options_.io_backend == IoBackend::Uring) {
            throw IoError(path + ": cannot set up io_uring: " + why);
        } else {
            backend_note_ = why + "; using the pread pool";
        }
    }
    if (!queue_) {
        pool_ = std::make_unique<IoPool>(*file_, options_.queue_depth, &faults_);
        queue_ = make_pool_queue(*pool_);
    }

    std::vector<size_t> record_bytes;
    size_t n_records = 0, largest = 0;
    for (const BundleRegion & r : regions_) {
        record_bytes.push_back(r.record_bytes);
        n_records += r.n_records;
        largest = std::max(largest, r.record_bytes);
    }
    record_copy_.resize(largest);
    if (options_.plan == ReplayPlan::Adaptive) {
        DeviceCost prior;
        prior.bandwidth_bytes_s = options_.bandwidth_bytes_s;
        collapse_ = std::make_unique<AdaptiveCollapse>(prior.with_gap(options_.collapse_gap_bytes));
    }
    if (options_.window_tokens > 0) {
        window_ = std::make_unique<WindowCache>(options_.window_tokens, options_.cache_bytes, record_bytes);
    } else {
        BundleCacheOptions cache_options;
        cache_options.p_run = options_.p_run;
        cache_options.max_entries = n_records;
        cache_ = std::make_unique<BundleCache>(options_.cache_policy, options_.cache_bytes, record_bytes, cache_options);
    }
}

Replayer::~Replayer() {
    if (queue_) queue_->drain();
}

void Replayer::pin(const std::vector<std::vector<float>> & frequency) {
    if (!cache_ || cache_->policy() != CachePolicy::Pinned) {
        throw std::invalid_argument("pin() needs the pinned cache policy");
    }
    if (frequency.size() != regions_.size()) {
        throw std::invalid_argument("pin(): one frequency array per region is needed");
    }
    for (size_t i = 0; i < regions_.size(); ++i) {
        if (frequency[i].size() != regions_[i].n_records) {
            throw std::invalid_argument("pin(): region " + std::to_string(i) + " needs " +
                                        std::to_string(regions_[i].n_records) + " frequencies");
        }
    }
    cache_->pin_hottest(frequency, [this](uint32_t region, uint32_t pos, uint8_t * dst) {
        const BundleRegion & r = regions_[region];
        const uint8_t * start = nullptr;
        AlignedBuffer buf = file_->read_range(r.record_offset(pos), r.record_bytes, &start);
        std::memcpy(dst, start, r.record_bytes);
    });
}

size_t Replayer::cache_used_bytes() const {
    return window_ ? window_->used_bytes() : cache_->stats().used_bytes;
}

uint64_t Replayer::collapse_gap_bytes() const {
    if (collapse_) return (uint64_t) collapse_->cost().gap_bytes();
    return options_.plan == ReplayPlan::Collapse ? options_.collapse_gap_bytes : 0;
}

uint32_t Replayer::max_gap_records(const BundleRegion & region) const {
    // the engine's rule: gaps of at most the collapse gap are read through
    return (uint32_t) std::min<uint64_t>(collapse_gap_bytes() / region.record_bytes, region.n_records);
}

bool Replayer::cache_lookup(uint32_t region, uint32_t pos) {
    return window_ ? window_->lookup(region, pos, record_copy_.data())
                   : cache_->lookup(region, pos, record_copy_.data());
}

void Replayer::cache_admit(uint32_t region, uint32_t pos, const uint8_t * record, bool isolated) {
    if (window_) {
        window_->admit(region, pos, record);
    } else {
        cache_->admit(region, pos, record, isolated);
    }
}

void Replayer::check_trace(const uint32_t * positions, size_t n_positions, const uint64_t * offsets,
                           size_t n_offsets, size_t token_end) const {
    const size_t n_steps = steps_.size();
    if (n_offsets == 0 || (n_offsets - 1) % n_steps != 0) {
        throw std::invalid_argument("trace offsets must hold n_tokens * " + std::to_string(n_steps) + " + 1 entries, not " +
                                    std::to_string(n_offsets));
    }
    if (token_end > (n_offsets - 1) / n_steps) {
        throw std::invalid_argument("token " + std::to_string(token_end) + " is past the trace's " +
                                    std::to_string((n_offsets - 1) / n_steps) + " tokens");
    }
    if (offsets[0] != 0 || offsets[n_offsets - 1] != n_positions) {
        throw std::invalid_argument("trace offsets must start at 0 and end at the number of positions");
    }
    for (size_t i = 1; i < n_offsets; ++i) {
        if (offsets[i] < offsets[i - 1]) throw std::invalid_argument("trace offsets must not decrease");
    }
    (void) positions;
}

std::vector<ReplayTokenStats> Replayer::replay(const uint32_t * positions, size_t n_positions, const uint64_t * offsets,
                                               size_t n_offsets, size_t token_begin, size_t token_end) {
    check_trace(positions, n_positions, offsets, n_offsets, token_end);
    const size_t n_steps = steps_.size();
    std::vector<ReplayTokenStats> out;
    for (size_t t = token_begin; t < token_end; ++t) {
        ReplayTokenStats st;
        if (window_) window_->start_token(token_);
        if (!file_->direct()) {
            // buffered fallback: start every token from a cold page cache
            evict_from_page_cache(file_->path());
        }
        for (size_t s = 0; s < n_steps; ++s) {
            const uint64_t a = offsets[t * n_steps + s], b = offsets[t * n_steps + s + 1];
            replay_step((uint32_t) s, positions + a, (size_t) (b - a), st);
        }
        ++token_;
        out.push_back(st);
    }
    return out;
}

void Replayer::replay_step(uint32_t step, const uint32_t * needed, size_t n_needed, ReplayTokenStats & st) {
    const std::vector<uint32_t> & regions = steps_[step];
    const uint32_t n_records = regions_[regions[0]].n_records;
    for (size_t i = 0; i < n_needed; ++i) {
        if (needed[i] >= n_records || (i > 0 && needed[i] <= needed[i - 1])) {
            throw std::invalid_argument("step " + std::to_string(step) + ": positions must be sorted, unique and below " +
                                        std::to_string(n_records));
        }
    }
    // misses of every region of the step, back to back; misses_at[k] is where region k's start
    misses_.clear();
    std::vector<size_t> misses_at(regions.size() + 1, 0);
    std::vector<std::pair<uint32_t, PlannedRead>> plans;
    for (size_t k = 0; k < regions.size(); ++k) {
        const uint32_t r = regions[k];
        const BundleRegion & region = regions_[r];
        misses_at[k] = misses_.size();
        st.needed += (uint32_t) n_needed;
        std::vector<PlannedRead> reads;
        if (options_.plan == ReplayPlan::Whole) {
            misses_.insert(misses_.end(), needed, needed + n_needed);
            reads = plan_whole_region(region, options_.max_read_bytes);
        } else {
            for (size_t i = 0; i < n_needed; ++i) {
                if (cache_lookup(r, needed[i])) {
                    ++st.hits;
                } else {
                    misses_.push_back(needed[i]);
                }
            }
            const uint32_t * m = misses_.data() + misses_at[k];
            const size_t n_m = misses_.size() - misses_at[k];
            if (options_.plan == ReplayPlan::Runs) {
                reads = plan_runs(region, m, n_m, options_.max_read_bytes);
            } else {
                CollapsePolicy policy;
                policy.max_gap = max_gap_records(region);
                policy.max_read_bytes = options_.max_read_bytes;
                reads = plan_reads(region, m, n_m, policy);
            }
        }
        for (const PlannedRead & p : reads) plans.emplace_back((uint32_t) k, p);
    }
    misses_at[regions.size()] = misses_.size();
    if (plans.empty()) return;

    uint64_t arena = 0;
    for (const auto & [k, p] : plans) arena += p.length;
    if (arena_.size() < arena) arena_ = AlignedBuffer(std::max<uint64_t>(arena, arena_.size() * 2));
    while (slots_.size() < plans.size()) slots_.push_back(std::make_unique<Slot>());
    batch_.resize(plans.size());
    uint64_t at = 0;
    for (size_t i = 0; i < plans.size(); ++i) {
        Slot & slot = *slots_[i];
        slot.region = plans[i].first;
        slot.plan = plans[i].second;
        slot.read.offset = slot.plan.offset;
        slot.read.length = slot.plan.length;
        slot.read.dst = arena_.data() + at;
        slot.read.state.store(PendingRead::kQueued, std::memory_order_relaxed);
        slot.read.done_ns = 0;
        at += slot.plan.length;
        batch_[i] = &slot.read;
    }

    const uint64_t first_issue = steady_now_ns();
    uint64_t last_done = first_issue;
    queue_->submit(batch_.data(), batch_.size());
    try {
        for (size_t i = 0; i < plans.size(); ++i) {
            queue_->wait(slots_[i]->read);
            last_done = std::max(last_done, slots_[i]->read.done_ns);
        }
    } catch (...) {
        queue_->drain(); // no read may still write into the arena
        throw;
    }
    st.io_ns += last_done - first_issue;
    if (collapse_) collapse_->observe(plans.size(), at, last_done - first_issue);

    // count and admit what each read brought, in read order like the engine
    std::vector<size_t> cursor(misses_at.begin(), misses_at.end() - 1);
    for (size_t i = 0; i < plans.size(); ++i) {
        const Slot & slot = *slots_[i];
        const size_t k = slot.region;
        const BundleRegion & region = regions_[regions[k]];
        const uint32_t end = slot.plan.first + slot.plan.count;
        size_t & m = cursor[k];
        const size_t m_end = misses_at[k + 1];
        while (m < m_end && misses_[m] < slot.plan.first) ++m;
        const size_t from = m;
        while (m < m_end && misses_[m] < end) ++m;
        const uint32_t got = (uint32_t) (m - from);
        st.reads += 1;
        st.bytes_read += slot.plan.length;
        st.records_spanned += slot.plan.count;
        st.spanned_bytes += (uint64_t) slot.plan.count * region.record_bytes;
        st.needed_read += got;
        st.needed_bytes += (uint64_t) got * region.record_bytes;
        if (options_.plan == ReplayPlan::Whole) continue;
        for (size_t q = from; q < m; ++q) {
            const uint8_t * record = slot.read.dst + (region.record_offset(misses_[q]) - slot.read.offset);
            cache_admit(regions[k], misses_[q], record, got == 1);
        }
    }
}

} // namespace neuralink
