// SparseFfn's stream policy (see region_stream.h): every layer's record regions
// read whole, ahead of the layer, less the head of each that the cache's bytes
// hold in DRAM, and the rule by which `auto` chooses it.

#include "sparse_ffn_state.h"

#include <algorithm>
#include <random>

namespace neuralink {

// a region's records from position `first` on (0: the whole region), as one byte range of the sidecar
static FileRange tail(const BundleRegion & region, uint32_t first) {
    return { region.record_offset(first), (size_t) region.record_bytes * (region.n_records - first) };
}

std::vector<uint32_t> SparseFfn::stream_head_counts(size_t bytes) const {
    std::vector<uint32_t> none(n_keys(), 0);
    if (n_keys() == 0) return none;
    // the read buffers the memory plan counted that the stream's buffers replace (the smaller of the two
    // counts it may have made: a layer's records, or the stream's own buffers without heads)
    const uint64_t room = (uint64_t) bytes + std::min<uint64_t>(layer_read_bytes(), whole_region_buffer_bytes());
    auto counts = [&](double fraction) {
        std::vector<uint32_t> c(n_keys(), 0);
        for (uint32_t key = 0; key < n_keys(); ++key) {
            const uint32_t n = region_of_key(key).n_records;
            c[key] = n > 1 ? std::min(n - 1, (uint32_t) (fraction * n)) : 0;
        }
        return c;
    };
    auto cost = [&](const std::vector<uint32_t> & c) {
        uint64_t heads = 0;
        size_t largest = 0;
        for (uint32_t key = 0; key < n_keys(); ++key) {
            const BundleRegion & region = region_of_key(key);
            if (region.n_records == 0) continue;
            if (c[key] > 0) heads += RegionStream::span_bytes({ region.offset, (size_t) c[key] * region.record_bytes });
            largest = std::max(largest, RegionStream::span_bytes(tail(region, c[key])));
        }
        return heads + 2 * (uint64_t) largest;
    };
    if (cost(none) > room) return none;
    double lo = 0.0, hi = 1.0; // counts(lo) always fits (with many regions the cost grows with the fraction)
    for (int k = 0; k < 40; ++k) {
        const double mid = 0.5 * (lo + hi);
        (cost(counts(mid)) <= room ? lo : hi) = mid;
    }
    return counts(lo);
}

// the regions of all layers in the order the phases use them: layer 0's bundle region, its down region (split
// layout), layer 1's bundle region, ...; each less the head the stream keeps in DRAM
void SparseFfn::start_stream(bool on, size_t bytes) {
    stream_.reset();
    stream_heads_.clear();
    streamed_layer_ = -1;
    if (!on || store_->n_layer() == 0) {
        return;
    }
    const std::vector<uint32_t> heads = stream_head_counts(bytes);
    std::vector<RegionHead> held(n_keys());
    std::vector<FileRange> items;
    for (int il = 0; il < store_->n_layer(); ++il) {
        for (const bool down : { false, true }) {
            if (down && !store_->split()) continue;
            const uint32_t key = down ? (uint32_t) (store_->n_layer() + il) : (uint32_t) il;
            const BundleRegion & region = region_of_key(key);
            RegionHead & head = held[key];
            head.count = heads[key];
            if (head.count > 0) {
                // one long read, each record checked against its checksum once, here: the head then stays in DRAM
                // like a cache's records, which are checked when read and not on every use (checking the heads on
                // every use was a quarter of a capped token's samples)
                head.buf = store_->file().read_range(region.offset, (size_t) head.count * region.record_bytes, &head.data);
                if (options_.verify_checksums) {
                    for (uint32_t p = 0; p < head.count; ++p) {
                        store_->check_record(il, down, p, head.data + (size_t) p * region.record_bytes);
                    }
                }
            }
            items.push_back(tail(region, head.count));
        }
    }
    stream_ = std::make_unique<RegionStream>(store_->file(), std::move(items), &faults_, backend_, kStreamChunkBytes);
    stream_heads_ = std::move(held);
}

uint64_t SparseFfn::stream_head_bytes() const {
    uint64_t bytes = 0;
    for (const RegionHead & head : stream_heads_) bytes += head.buf.size();
    return bytes;
}

size_t SparseFfn::whole_region_buffer_bytes() const {
    size_t largest = 0;
    for (uint32_t key = 0; key < n_keys(); ++key) {
        const BundleRegion & region = region_of_key(key);
        if (region.n_records > 0) largest = std::max(largest, RegionStream::span_bytes(tail(region, 0)));
    }
    return 2 * largest;
}

size_t SparseFfn::stream_buffer_bytes() const { return stream_ ? stream_->buffer_bytes() : whole_region_buffer_bytes(); }

uint64_t SparseFfn::layer_read_bytes() const { return store_bytes() / (uint64_t) std::max(store_->n_layer(), 1); }

// the previous layer's regions, done with: their buffers take the next regions
void SparseFfn::release_streamed(int il) {
    stream_->release(stream_item(il, false));
    if (store_->split()) stream_->release(stream_item(il, true));
}

double SparseFfn::collapsed_read_cost_ratio(size_t cache_bytes) const {
    // the pinned policy's choice, approximately: the most frequent records of all regions until the bytes run out
    struct Rec { float freq; uint32_t key, pos; };
    std::vector<Rec> all;
    for (uint32_t key = 0; key < n_keys(); ++key) {
        const std::vector<float> & f = frequency_of_key(key);
        for (uint32_t p = 0; p < region_of_key(key).n_records && p < f.size(); ++p) all.push_back({ f[p], key, p });
    }
    std::sort(all.begin(), all.end(), [](const Rec & a, const Rec & b) { return a.freq > b.freq; });
    std::vector<std::vector<uint8_t>> pinned(n_keys());
    for (uint32_t key = 0; key < n_keys(); ++key) pinned[key].assign(region_of_key(key).n_records, 0);
    size_t used = 0;
    for (const Rec & r : all) {
        const size_t rec = region_of_key(r.key).record_bytes;
        if (used + rec > cache_bytes) break;
        used += rec;
        pinned[r.key][r.pos] = 1;
    }
    // a few decoded tokens drawn at the profiled frequencies, planned as gather() plans them
    constexpr int kDraws = 8;
    const DeviceCost device = read_cost();
    std::mt19937 rng(12345);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    const std::vector<uint32_t> heads = stream_head_counts(cache_bytes);
    double collapsed = 0.0, stream_cost = 0.0;
    std::vector<uint32_t> needed;
    for (uint32_t key = 0; key < n_keys(); ++key) {
        const BundleRegion & region = region_of_key(key);
        const std::vector<float> & f = frequency_of_key(key);
        if (region.n_records == 0 || f.size() < region.n_records) continue;
        CollapsePolicy policy;
        policy.max_gap = (uint32_t) std::min<uint64_t>(gap_bytes(device) / std::max<size_t>(region.record_bytes, 1),
                                                       region.n_records);
        policy.max_read_bytes = options_.max_read_bytes;
        for (int d = 0; d < kDraws; ++d) {
            needed.clear();
            for (uint32_t p = 0; p < region.n_records; ++p) {
                if (!pinned[key][p] && uniform(rng) < f[p]) needed.push_back(p);
            }
            uint64_t bytes = 0;
            const std::vector<PlannedRead> reads = plan_reads(region, needed.data(), needed.size(), policy);
            for (const PlannedRead & r : reads) bytes += r.length;
            collapsed += device.cost(reads.size(), bytes) / kDraws;
        }
        stream_cost += device.cost(1, RegionStream::span_bytes(tail(region, heads[key])));
    }
    return stream_cost > 0.0 ? collapsed / stream_cost : 0.0;
}

CachePolicy SparseFfn::auto_policy(size_t bytes) const {
    if (arena_fits(bytes)) {
        return CachePolicy::Linking;
    }
    const bool fits = (uint64_t) bytes + layer_read_bytes() >= (uint64_t) stream_buffer_bytes();
    // every neuron (the dense predictor) needs the regions whole anyway
    if (fits && (options_.predictor == Predictor::Dense || collapsed_read_cost_ratio(bytes) >= kStreamCostRatio)) {
        return CachePolicy::Stream;
    }
    return CachePolicy::Pinned;
}

} // namespace neuralink
