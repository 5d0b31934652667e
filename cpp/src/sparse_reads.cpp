// SparseFfn's reading side: each thread's share of the candidates looked up in
// the cache or the store arena, the misses read in collapsed runs, each read's
// records checked and computed as it completes (see sparse_ffn.h).

#include "sparse_ffn_state.h"

#include "neuralink/errors.h"
#include "neuralink/threads.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>

namespace neuralink {

// a gap is worth reading through when its bytes cost less time than one more read: the gap of the read cost
// `device` (the adaptive fit's or the options'), unless a fixed gap was given
uint64_t SparseFfn::gap_bytes(const DeviceCost & device) const {
    return collapse_ || options_.collapse_gap_bytes == UINT64_MAX ? (uint64_t) device.gap_bytes()
                                                                   : options_.collapse_gap_bytes;
}

uint64_t SparseFfn::collapse_gap_bytes() const { return gap_bytes(read_cost()); }

// this thread's equal share of the candidates all threads predicted, in position order
void SparseFfn::take_share(int nth, int ith, ThreadState & ts) const {
    int64_t total = 0;
    for (int j = 0; j < nth; ++j) total += (int64_t) threads_[j]->active.size();
    const auto [k0, k1] = split_range(total, ith, nth);
    ts.work.clear();
    int64_t base = 0;
    for (int j = 0; j < nth && base < k1; ++j) {
        const std::vector<uint32_t> & a = threads_[j]->active;
        const int64_t lo = std::max(base, k0), hi = std::min(base + (int64_t) a.size(), k1);
        if (lo < hi) ts.work.insert(ts.work.end(), a.begin() + (lo - base), a.begin() + (hi - base));
        base += (int64_t) a.size();
    }
}

// phase 2: this thread's share of the candidates looked up in the cache, read, and computed into h as reads
// complete; with the split layout, then the down columns of the neurons that passed
void SparseFfn::read_and_compute(int il, int64_t n_tokens, int ith, int nth, ThreadState & ts) {
    ts.truly_active = 0;
    ts.predicted_pairs = 0;
    ts.computed_pairs = 0;
    ts.stall_ns = 0;
    ts.first_issue_ns = 0;
    ts.last_done_ns = 0;
    ts.finals.clear();
    ts.wave[1].cache_hits = ts.wave[1].reads = 0; // the down wave runs with the split layout only
    ts.wave[1].bytes_read = 0;
    take_share(nth, ith, ts);
    Wave & bundles = ts.wave[0];
    gather(il, false, ts.work, n_tokens, ts, bundles);
    compute_h(il, n_tokens, bundles.hit_records.data(), bundles.hit_positions.data(), bundles.hit_positions.size(), ts);
    // neurons of each read as it completes; misses stay sorted along the reads
    complete(il, false, ts, bundles, [&](const uint8_t * const * recs, const uint32_t * pos, size_t n) {
        compute_h(il, n_tokens, recs, pos, n, ts);
    });
    // cache hits come in order, and with the whole store cached nothing else does: sorted already, then
    if (!std::is_sorted(ts.finals.begin(), ts.finals.end())) std::sort(ts.finals.begin(), ts.finals.end());
    if (!store_->split() || rows_now(*layers_[(size_t) il])) {
        return; // joint records held the down columns; rows need none
    }
    Wave & downs = ts.wave[1];
    gather(il, true, ts.finals, n_tokens, ts, downs);
    for (size_t k = 0; k < downs.hit_positions.size(); ++k) {
        down_of_[downs.hit_positions[k]] = downs.hit_records[k];
    }
    complete(il, true, ts, downs, [&](const uint8_t * const * recs, const uint32_t * pos, size_t n) {
        for (size_t k = 0; k < n; ++k) down_of_[pos[k]] = recs[k];
    });
}

// Looks up `positions` of one region in the cache and submits collapsed reads for the misses.
// I/O and cache-copy buffers grow to what a wave needs, in 64 KiB steps and never beyond: each thread's
// positions are a contiguous share of the layer, so the threads' buffers together stay within the
// memory plan's scratch (twice a layer's records)
static size_t scratch_size(uint64_t need) { return (size_t) align_up(need, (uint64_t) 64 << 10); }

// streamed records checked ahead of the one being hashed whose lines are requested (2 and 4 did alike)
static constexpr size_t kCheckAhead = 4;

void SparseFfn::gather(int il, bool down, const std::vector<uint32_t> & positions, int64_t n_tokens, ThreadState & ts,
                       Wave & w) {
    const SidecarLayer & S = store_->layer(il);
    const BundleRegion & region = down ? S.down_region : S.region;
    const uint32_t key = down ? (uint32_t) (store_->n_layer() + il) : (uint32_t) il;
    const size_t rec = region.record_bytes;
    if (stream_) {
        // the region read whole, ahead of time, less its head held in DRAM: every record is in place, a streamed
        // one checked as it is used (the head's were checked once, when read); the head's records count as cache
        // hits
        const RegionHead & head = stream_heads_[key];
        const uint64_t wait_start = steady_now_ns();
        const uint8_t * base = stream_->wait(stream_item(il, down));
        ts.stall_ns += steady_now_ns() - wait_start;
        w.misses.clear();
        w.hit_positions.assign(positions.begin(), positions.end());
        w.hit_records.resize(positions.size());
        uint32_t held = 0;
        auto record_of = [&](uint32_t p) {
            return p < head.count ? head.data + (size_t) p * rec : base + (size_t) (p - head.count) * rec;
        };
        for (size_t k = 0; k < positions.size(); ++k) {
            const uint32_t p = positions[k];
            const bool in_head = p < head.count;
            const uint8_t * record = record_of(p);
            held += in_head;
            if (!in_head && options_.verify_checksums) {
                // the records just arrived in DRAM and lie apart: ask for a later one's lines while this one is
                // hashed (Qwen2.5-Coder-1.5B under a 760 MB budget: 4.9 -> 5.3 tok/s; the checks then cost ~6 %)
                if (k + kCheckAhead < positions.size()) {
                    const uint8_t * later = record_of(positions[k + kCheckAhead]);
                    for (size_t at = 0; at < rec; at += 64) __builtin_prefetch(later + at, 0, 0);
                }
                store_->check_record(il, down, p, record);
            }
            w.hit_records[k] = record;
        }
        w.cache_hits = held;
        w.n_pending = 0;
        w.reads = 0;
        w.bytes_read = 0;
        w.first_issue_ns = w.last_done_ns = 0;
        return;
    }
    // cache hits are copied out, so eviction by another thread cannot pull them from under us (records of
    // the arena and of the pinned cache never move: used in place)
    const bool in_place = arena_ || cache_->records_stay_put();
    const size_t need = in_place ? 0 : positions.size() * rec;
    if (w.cache_copies.size() < need) {
        w.cache_copies = AlignedBuffer(scratch_size(need));
    }
    w.misses.clear();
    w.hit_positions.clear();
    w.hit_records.clear();
    // each position a hit (the record `find` gives) or a miss
    auto split = [&](auto && find) {
        for (uint32_t p : positions) {
            if (const uint8_t * record = find(p)) {
                w.hit_positions.push_back(p);
                w.hit_records.push_back(record);
            } else {
                w.misses.push_back(p);
            }
        }
    };
    if (arena_) {
        split([&](uint32_t p) { return arena_->find(key, p); });
        arena_->count(positions.size(), w.hit_positions.size());
    } else if (in_place) {
        split([&](uint32_t p) { return cache_->lookup_in_place(key, p); });
    } else {
        uint8_t * slot = w.cache_copies.data();
        split([&](uint32_t p) -> const uint8_t * {
            if (!cache_->lookup(key, p, slot)) return nullptr;
            slot += rec;
            return slot - rec;
        });
    }
    w.cache_hits = (uint32_t) w.hit_positions.size();

    // reads for the misses: collapsed runs, or the whole range when the cost model says that is cheaper
    const DeviceCost device = read_cost();
    CollapsePolicy policy;
    policy.max_gap = (uint32_t) std::min<uint64_t>(gap_bytes(device) / std::max<size_t>(rec, 1), region.n_records);
    policy.max_read_bytes = options_.max_read_bytes;
    std::vector<PlannedRead> reads = plan_reads(region, w.misses.data(), w.misses.size(), policy);
    if (!w.misses.empty() && (n_tokens > 1 || options_.predictor == Predictor::Dense)) {
        CollapsePolicy all = policy;
        all.max_gap = region.n_records;
        const uint32_t first = w.misses.front(), last = w.misses.back();
        std::vector<uint32_t> span(last - first + 1);
        for (uint32_t i = 0; i < span.size(); ++i) span[i] = first + i;
        std::vector<PlannedRead> whole = plan_reads(region, span.data(), span.size(), all);
        uint64_t bytes = 0, whole_bytes = 0;
        for (const auto & r : reads) bytes += r.length;
        for (const auto & r : whole) whole_bytes += r.length;
        if (device.cost(whole.size(), whole_bytes) < device.cost(reads.size(), bytes)) {
            for (auto & r : whole) r.n_needed = 0; // the needed count is only used for admission below
            reads = std::move(whole);
        }
    }

    uint64_t arena = 0;
    for (const auto & r : reads) arena += r.length;
    if (w.read_arena.size() < arena) {
        w.read_arena = AlignedBuffer(scratch_size(arena));
    }
    while (w.pending.size() < reads.size()) w.pending.push_back(std::make_unique<Pending>());
    std::vector<PendingRead *> & batch = ts.batch;
    batch.resize(reads.size());
    uint64_t at = 0;
    for (size_t i = 0; i < reads.size(); ++i) {
        Pending & pd = *w.pending[i];
        pd.plan = reads[i];
        pd.read.offset = reads[i].offset;
        pd.read.length = reads[i].length;
        pd.read.dst = w.read_arena.data() + at;
        at += reads[i].length;
        batch[i] = &pd.read;
    }
    w.n_pending = reads.size();
    w.reads = (uint32_t) reads.size();
    w.bytes_read = at;
    w.first_issue_ns = w.last_done_ns = 0;
    if (!batch.empty()) {
        w.first_issue_ns = steady_now_ns();
        if (ts.first_issue_ns == 0) ts.first_issue_ns = w.first_issue_ns;
        if (!ts.queue) {
            std::string why;
            ts.queue = backend_ == IoBackend::Uring
                    ? make_uring_queue(store_->file(), (unsigned) options_.queue_depth, faults_, &why)
                    : make_pool_queue(*pool_);
            if (!ts.queue) {
                throw IoError(store_->path() + ": cannot set up io_uring for a compute thread: " + why);
            }
        }
        ts.queue->submit(batch.data(), batch.size());
    }
}

// Waits for a wave's reads one by one; each completed read's needed records are checked,
// handed to on_records(records, positions, n) and offered to the cache.
template <class OnRecords>
void SparseFfn::complete(int il, bool down, ThreadState & ts, Wave & w, OnRecords on_records) {
    const SidecarLayer & S = store_->layer(il);
    const BundleRegion & region = down ? S.down_region : S.region;
    const uint32_t key = down ? (uint32_t) (store_->n_layer() + il) : (uint32_t) il;
    size_t m = 0;
    std::vector<const uint8_t *> & recs = ts.read_records;
    std::vector<uint32_t> & pos = ts.read_positions;
    for (size_t i = 0; i < w.n_pending; ++i) {
        Pending & pd = *w.pending[i];
        const uint64_t wait_start = steady_now_ns();
        ts.queue->wait(pd.read);
        ts.stall_ns += steady_now_ns() - wait_start;
        ts.last_done_ns = std::max(ts.last_done_ns, pd.read.done_ns);
        w.last_done_ns = std::max(w.last_done_ns, pd.read.done_ns);
        recs.clear();
        pos.clear();
        const uint32_t end = pd.plan.first + pd.plan.count;
        for (; m < w.misses.size() && w.misses[m] < end; ++m) {
            const uint32_t p = w.misses[m];
            if (p < pd.plan.first) continue;
            const uint8_t * record = pd.read.dst + (region.record_offset(p) - pd.read.offset);
            if (options_.verify_checksums) {
                store_->check_record(il, down, p, record);
            }
            pos.push_back(p);
            recs.push_back(record);
        }
        on_records(recs.data(), pos.data(), pos.size());
        const bool isolated = pos.size() == 1;
        for (size_t k = 0; k < pos.size(); ++k) {
            if (arena_) {
                arena_->admit(key, pos[k], recs[k]);
            } else {
                cache_->admit(key, pos[k], recs[k], isolated);
            }
        }
    }
    w.n_pending = 0;
}

// The whole store read up front: every region in chunks of kFillChunkBytes, the chunks shared among the
// threads in order, each chunk's records checked and copied to their places in the arena.
static constexpr uint64_t kFillChunkBytes = 8ull << 20;

uint64_t SparseFfn::fill_arena(int threads) {
    if (!arena_) {
        return 0;
    }
    struct Chunk { int il; bool down; uint32_t first, count; };
    std::vector<Chunk> chunks;
    const int n_layer = store_->n_layer();
    for (int k = 0; k < (store_->split() ? 2 : 1); ++k) {
        for (int il = 0; il < n_layer; ++il) {
            const bool down = k == 1;
            if (down && down_by_rows(il)) continue; // its down columns are never read
            const BundleRegion & region = down ? store_->layer(il).down_region : store_->layer(il).region;
            const uint32_t per = (uint32_t) std::max<uint64_t>(1, kFillChunkBytes / std::max<size_t>(region.record_bytes, 1));
            for (uint32_t first = 0; first < region.n_records; first += per) {
                chunks.push_back({ il, down, first, std::min(per, region.n_records - first) });
            }
        }
    }
    std::atomic<size_t> next { 0 };
    std::atomic<uint64_t> bytes { 0 };
    std::atomic<bool> stop { false };
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&]() {
        try {
            for (size_t c; !stop.load(std::memory_order_relaxed) && (c = next.fetch_add(1)) < chunks.size();) {
                const Chunk & ch = chunks[c];
                const BundleRegion & region = ch.down ? store_->layer(ch.il).down_region : store_->layer(ch.il).region;
                const uint32_t key = ch.down ? (uint32_t) (n_layer + ch.il) : (uint32_t) ch.il;
                const uint8_t * start = nullptr;
                const size_t len = (size_t) ch.count * region.record_bytes;
                AlignedBuffer buf = store_->file().read_range(region.record_offset(ch.first), len, &start);
                for (uint32_t i = 0; i < ch.count; ++i) {
                    const uint8_t * record = start + (size_t) i * region.record_bytes;
                    if (options_.verify_checksums) {
                        store_->check_record(ch.il, ch.down, ch.first + i, record);
                    }
                    arena_->admit(key, ch.first + i, record);
                }
                bytes.fetch_add(len, std::memory_order_relaxed);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
            stop.store(true);
        }
    };
    run_on_threads(threads, [&](int) { work(); });
    if (error) {
        std::rethrow_exception(error);
    }
    return bytes.load();
}

} // namespace neuralink
