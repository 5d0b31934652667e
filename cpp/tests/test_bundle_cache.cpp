// Checks of the bundle cache: the byte budget under any access sequence, each
// policy's choices, record integrity, and concurrent use.

#include "test_util.h"

#include "neuralink/bundle_cache.h"
#include "neuralink/store_arena.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>

using namespace neuralink;

namespace {

const CachePolicy kAllPolicies[] = { CachePolicy::None, CachePolicy::Lru, CachePolicy::S3Fifo, CachePolicy::Linking,
                                     CachePolicy::Pinned, CachePolicy::Stream };

// the content of record (layer, pos): distinct for every key and byte, so any mix-up shows
std::vector<uint8_t> make_record(uint32_t layer, uint32_t pos, size_t n) {
    std::vector<uint8_t> r(n);
    uint64_t x = ((uint64_t) layer << 32 | pos) * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; ++i) {
        x ^= x >> 29;
        x *= 0xbf58476d1ce4e5b9ull;
        r[i] = (uint8_t) (x >> 56);
    }
    return r;
}

bool record_is(const std::vector<uint8_t> & got, uint32_t layer, uint32_t pos, size_t n) {
    const auto want = make_record(layer, pos, n);
    return std::memcmp(got.data(), want.data(), n) == 0;
}

// capacity holding exactly n entries of slot_bytes (plus malloc's chunk header, and kLiveEntryBytes of tables
// each; no ghost)
size_t capacity_for(size_t n, size_t slot_bytes) {
    return n * (slot_bytes + BundleCache::kMallocChunkOverhead + BundleCache::kLiveEntryBytes);
}

void pin_all(BundleCache & cache, const std::vector<std::vector<float>> & freq) {
    cache.pin_hottest(freq, [&](uint32_t l, uint32_t p, uint8_t * dst) {
        const auto r = make_record(l, p, cache.record_bytes(l));
        std::memcpy(dst, r.data(), r.size());
    });
}

// Looks each key up, admitting misses as the engine would; returns the number of hits.
// Checks the budget and the bytes of every hit along the way (a lookup right after
// admission would count as a reuse and skew S3-FIFO, so admitted bytes show up as later hits).
size_t replay(BundleCache & cache, const std::vector<std::pair<uint32_t, uint32_t>> & keys,
              const std::function<bool(uint32_t, uint32_t)> & isolated) {
    size_t hits = 0;
    std::vector<uint8_t> buf;
    for (const auto & [l, p] : keys) {
        const size_t n = cache.record_bytes(l);
        buf.assign(n, 0);
        if (cache.lookup(l, p, buf.data())) {
            CHECK(record_is(buf, l, p, n));
            ++hits;
        } else {
            cache.admit(l, p, make_record(l, p, n).data(), isolated(l, p));
        }
        const CacheStats s = cache.stats();
        CHECK(s.used_bytes <= s.capacity_bytes);
        CHECK(s.entries <= cache.max_entries());
    }
    return hits;
}

bool cached(BundleCache & cache, uint32_t layer, uint32_t pos) {
    std::vector<uint8_t> buf(cache.record_bytes(layer));
    return cache.lookup(layer, pos, buf.data());
}

} // namespace

TEST(cache_policy_names_round_trip_and_unknown_names_are_refused) {
    for (CachePolicy p : kAllPolicies) {
        CHECK(cache_policy_from_name(cache_policy_name(p)) == p);
    }
    CHECK(std::string(cache_policy_name(CachePolicy::S3Fifo)) == "s3fifo");
    CHECK_THROWS(std::invalid_argument, cache_policy_from_name("LRU"),
                 "unknown cache policy 'LRU' (expected one of 'none', 'lru', 's3fifo', 'linking', 'pinned', 'stream')");
}

TEST(cache_constructor_refuses_bad_arguments) {
    CHECK_THROWS(std::invalid_argument, BundleCache(CachePolicy::Lru, 1 << 20, {}), "record_bytes is empty");
    CHECK_THROWS(std::invalid_argument, BundleCache(CachePolicy::Lru, 1 << 20, { 64, 0 }), "record_bytes[1] = 0");
    BundleCacheOptions o;
    o.p_run = 1.5;
    CHECK_THROWS(std::invalid_argument, BundleCache(CachePolicy::Linking, 1 << 20, { 64 }, o), "p_run = 1.5");
    o.p_run = std::nan("");
    CHECK_THROWS(std::invalid_argument, BundleCache(CachePolicy::Linking, 1 << 20, { 64 }, o), "not a probability");
    BundleCache cache(CachePolicy::Lru, 1 << 20, { 64, 64 });
    std::vector<uint8_t> buf(64);
    CHECK_THROWS(std::invalid_argument, cache.lookup(2, 0, buf.data()), "layer 2 is out of range: the cache has 2 layers");
    CHECK_THROWS(std::invalid_argument, cache.admit(7, 0, buf.data(), true), "layer 7 is out of range");
}

TEST(cache_budget_is_kept_under_random_access_for_every_policy) {
    const std::vector<std::vector<size_t>> size_sets = { { 64 }, { 1080, 1080, 1080 }, { 24, 1001, 3000, 20480 } };
    const size_t capacities[] = { 0, 100, 5000, 64 << 10, 1 << 20 };
    std::mt19937 rng(11);
    for (CachePolicy policy : kAllPolicies) {
        for (const auto & sizes : size_sets) {
            for (size_t capacity : capacities) {
                BundleCache cache(policy, capacity, sizes);
                const uint32_t n_layers = (uint32_t) sizes.size();
                if (policy == CachePolicy::Pinned) {
                    std::vector<std::vector<float>> freq(n_layers, std::vector<float>(300));
                    for (auto & f : freq) {
                        for (auto & v : f) v = (float) (rng() % 1000);
                    }
                    pin_all(cache, freq);
                }
                // skewed popularity, and a shift halfway from the first layers to the last ones so slot sizes change
                std::vector<std::pair<uint32_t, uint32_t>> keys;
                for (int i = 0; i < 6000; ++i) {
                    const uint32_t pos = (uint32_t) std::min(299.0, std::floor(std::pow((rng() % 10000) / 10000.0, 3) * 300));
                    const uint32_t shift = i < 3000 ? 0 : n_layers / 2;
                    keys.push_back({ (uint32_t) ((rng() % (n_layers / 2 + 1) + shift) % n_layers), pos });
                }
                replay(cache, keys, [](uint32_t, uint32_t p) { return p % 2 == 0; });
                const CacheStats s = cache.stats();
                CHECK(s.hits <= s.lookups);
                CHECK(s.table_bytes <= s.used_bytes && s.used_bytes <= capacity);
                if (!cache_policy_traits(policy).holds || capacity == 0) {
                    // none, and stream (to the cache, none: SparseFfn streams whole regions instead)
                    CHECK(s.entries == 0 && s.hits == 0 && s.used_bytes == 0);
                } else if (capacity >= (64 << 10)) {
                    CHECK(s.hits > 0);
                }
            }
        }
    }
}

TEST(cache_none_holds_nothing_and_reserves_nothing) {
    BundleCache cache(CachePolicy::None, 1 << 20, { 128 });
    cache.admit(0, 3, make_record(0, 3, 128).data(), true);
    CHECK(!cached(cache, 0, 3));
    const CacheStats s = cache.stats();
    CHECK(s.used_bytes == 0 && s.table_bytes == 0 && s.rejections == 1 && s.lookups == 1);
}

TEST(cache_tables_are_charged_and_capped_by_max_entries) {
    // 100-byte records take 112-byte slots; four entries with their tables fit exactly
    BundleCache exact(CachePolicy::Lru, capacity_for(4, 112), { 100 });
    CHECK(exact.max_entries() == 4);
    CHECK(exact.stats().table_bytes == 4 * BundleCache::kLiveEntryBytes);
    BundleCache short_by_one(CachePolicy::Lru, capacity_for(4, 112) - 1, { 100 });
    CHECK(short_by_one.max_entries() == 3);
    // the S3-FIFO policies also reserve a ghost key per main-queue entry
    BundleCache s3(CachePolicy::S3Fifo, 1 << 20, { 100 });
    const size_t n = s3.max_entries(), g = n - n / 10;
    CHECK(s3.stats().table_bytes == n * BundleCache::kLiveEntryBytes + g * BundleCache::kGhostEntryBytes);
    CHECK(s3.stats().table_bytes + n * 112 <= (1u << 20));
    BundleCacheOptions o;
    o.max_entries = 10;
    BundleCache capped(CachePolicy::Lru, 1 << 20, { 100 }, o);
    CHECK(capped.max_entries() == 10 && capped.stats().table_bytes == 10 * BundleCache::kLiveEntryBytes);
}

TEST(cache_lookup_copies_exactly_the_admitted_bytes) {
    // 1001 is not a multiple of the slot alignment: the copy must stop at the record's end
    BundleCache cache(CachePolicy::Lru, 1 << 16, { 1001, 40 });
    cache.admit(0, 5, make_record(0, 5, 1001).data(), true);
    cache.admit(1, 5, make_record(1, 5, 40).data(), false);
    std::vector<uint8_t> buf(1001 + 64, 0xAB);
    CHECK(cache.lookup(0, 5, buf.data()));
    CHECK(record_is(buf, 0, 5, 1001));
    CHECK(std::all_of(buf.begin() + 1001, buf.end(), [](uint8_t b) { return b == 0xAB; }));
    std::fill(buf.begin(), buf.end(), 0xAB);
    CHECK(cache.lookup(1, 5, buf.data()));
    CHECK(record_is(buf, 1, 5, 40) && buf[40] == 0xAB);
    CHECK(!cache.lookup(0, 6, buf.data()) && !cache.lookup(1, 4, buf.data()));
    const CacheStats s = cache.stats();
    CHECK(s.lookups == 4 && s.hits == 2 && s.admissions == 2 && s.entries == 2);
}

TEST(cache_lru_evicts_the_least_recently_used) {
    BundleCache cache(CachePolicy::Lru, capacity_for(4, 112), { 100 });
    for (uint32_t p = 0; p < 4; ++p) {
        cache.admit(0, p, make_record(0, p, 100).data(), true);
    }
    CHECK(cached(cache, 0, 0)); // 0 becomes the most recently used, 1 the least
    cache.admit(0, 4, make_record(0, 4, 100).data(), true);
    CHECK(!cached(cache, 0, 1));
    CHECK(cached(cache, 0, 0) && cached(cache, 0, 2) && cached(cache, 0, 3) && cached(cache, 0, 4));
    cache.admit(0, 5, make_record(0, 5, 100).data(), true); // now 0 is the least recently used
    CHECK(!cached(cache, 0, 0) && cached(cache, 0, 5));
    CHECK(cache.stats().evictions == 2 && cache.stats().entries == 4);
}

TEST(cache_s3fifo_keeps_reused_entries_against_one_hit_wonders) {
    // 20 reused neurons, then a scan of 2000 neurons read once: LRU loses the reused ones, S3-FIFO keeps them
    for (CachePolicy policy : { CachePolicy::Lru, CachePolicy::S3Fifo }) {
        BundleCache cache(policy, capacity_for(100, 112) * 2, { 100 });
        CHECK(cache.max_entries() >= 100);
        for (uint32_t p = 0; p < 20; ++p) {
            cache.admit(0, p, make_record(0, p, 100).data(), true);
            CHECK(cached(cache, 0, p) && cached(cache, 0, p));
        }
        for (uint32_t p = 1000; p < 3000; ++p) {
            cache.admit(0, p, make_record(0, p, 100).data(), true);
        }
        int kept = 0;
        for (uint32_t p = 0; p < 20; ++p) {
            kept += cached(cache, 0, p);
        }
        CHECK(kept == (policy == CachePolicy::S3Fifo ? 20 : 0));
    }
}

TEST(cache_s3fifo_ghost_hits_go_to_main) {
    BundleCache cache(CachePolicy::S3Fifo, capacity_for(100, 112) * 2, { 100 });
    const size_t n = cache.max_entries();
    cache.admit(0, 0, make_record(0, 0, 100).data(), true); // never reused: first out of the small queue
    uint32_t next = 1000;
    for (size_t i = 0; i < n; ++i, ++next) {
        cache.admit(0, next, make_record(0, next, 100).data(), true);
    }
    CHECK(cache.stats().evictions == 1 && cache.stats().ghost_entries == 1);
    CHECK(!cached(cache, 0, 0));
    // 0 comes back while remembered by the ghost: it skips probation; 1 is new and goes through it
    cache.admit(0, 0, make_record(0, 0, 100).data(), true);
    cache.admit(0, 1, make_record(0, 1, 100).data(), true);
    for (uint32_t i = 0; i < 5 * n; ++i, ++next) {
        cache.admit(0, next, make_record(0, next, 100).data(), true);
    }
    CHECK(cached(cache, 0, 0));
    CHECK(!cached(cache, 0, 1));
    // the ghost never remembers more keys than the main queue holds entries
    CHECK(cache.stats().ghost_entries == n - n / 10);
}

namespace {

// misses of a skewed stream over 4000 neurons; even positions are read alone, odd ones inside runs
struct LinkingRun {
    size_t isolated_cached = 0, in_run_cached = 0;
    CacheStats stats;
};

LinkingRun run_half_isolated_stream(CachePolicy policy, double p_run) {
    BundleCacheOptions o;
    o.p_run = p_run;
    BundleCache cache(policy, 300 * (128 + 64), { 128 }, o);
    std::mt19937 rng(5);
    std::vector<std::pair<uint32_t, uint32_t>> keys;
    for (int i = 0; i < 40000; ++i) {
        keys.push_back({ 0, (uint32_t) std::floor(std::pow((rng() % 100000) / 100000.0, 2) * 4000) });
    }
    replay(cache, keys, [](uint32_t, uint32_t p) { return p % 2 == 0; });
    LinkingRun r;
    r.stats = cache.stats();
    for (uint32_t p = 0; p < 4000; ++p) {
        (p % 2 == 0 ? r.isolated_cached : r.in_run_cached) += cached(cache, 0, p);
    }
    return r;
}

} // namespace

TEST(cache_linking_admits_isolated_neurons_ahead_of_in_run_neurons) {
    const LinkingRun linking = run_half_isolated_stream(CachePolicy::Linking, 0.1);
    const LinkingRun s3fifo = run_half_isolated_stream(CachePolicy::S3Fifo, 0.1);
    CHECK(linking.isolated_cached + linking.in_run_cached == linking.stats.entries);
    CHECK(linking.isolated_cached > 3 * linking.in_run_cached);
    // plain S3-FIFO does not tell them apart: both halves are equally popular
    CHECK(s3fifo.isolated_cached < 2 * s3fifo.in_run_cached && s3fifo.in_run_cached < 2 * s3fifo.isolated_cached);
    // p_run = 1 is S3-FIFO; p_run = 0 admits an in-run neuron only while the cache has free room
    const LinkingRun all = run_half_isolated_stream(CachePolicy::Linking, 1.0);
    CHECK(all.isolated_cached == s3fifo.isolated_cached && all.in_run_cached == s3fifo.in_run_cached);
    CHECK(all.stats.hits == s3fifo.stats.hits && all.stats.evictions == s3fifo.stats.evictions);
    const LinkingRun never = run_half_isolated_stream(CachePolicy::Linking, 0.0);
    CHECK(never.in_run_cached * 10 < never.isolated_cached);
    // the draws are reproducible
    const LinkingRun again = run_half_isolated_stream(CachePolicy::Linking, 0.1);
    CHECK(again.stats.hits == linking.stats.hits && again.in_run_cached == linking.in_run_cached);
}

TEST(cache_linking_admits_in_run_neurons_at_rate_p_run_once_full) {
    BundleCacheOptions o;
    o.p_run = 0.1;
    // with free room every record is taken: a free slot costs nothing
    BundleCache roomy(CachePolicy::Linking, 4 << 20, { 64 }, o);
    for (uint32_t p = 0; p < 20000; ++p) {
        roomy.admit(0, p, make_record(0, p, 64).data(), false);
    }
    CHECK(roomy.stats().admissions == 20000 && roomy.stats().rejections == 0);
    // full: an in-run neuron is admitted (evicting another) at rate p_run
    BundleCache full(CachePolicy::Linking, 1000 * 128, { 64 }, o);
    for (uint32_t p = 0; p < 4000; ++p) {
        full.admit(0, p, make_record(0, p, 64).data(), true); // isolated: always admitted
    }
    const CacheStats before = full.stats();
    CHECK(before.evictions > 0);
    for (uint32_t p = 100000; p < 120000; ++p) {
        full.admit(0, p, make_record(0, p, 64).data(), false);
    }
    const CacheStats s = full.stats();
    CHECK(s.admissions - before.admissions + s.rejections - before.rejections == 20000);
    CHECK_NEAR((double) (s.admissions - before.admissions) / 20000, 0.1, 0.01); // 4.7 standard deviations
}

TEST(cache_pinned_holds_exactly_the_hottest_entries_that_fit) {
    const uint32_t n_layers = 3, n_ff = 200;
    std::vector<std::vector<float>> freq(n_layers, std::vector<float>(n_ff));
    std::vector<std::pair<float, uint64_t>> ranked;
    std::mt19937 rng(3);
    for (uint32_t l = 0; l < n_layers; ++l) {
        for (uint32_t p = 0; p < n_ff; ++p) {
            freq[l][p] = (float) (rng() % 1000000) / 1000000.0f;
            ranked.push_back({ -freq[l][p], (uint64_t) l << 32 | p });
        }
    }
    std::sort(ranked.begin(), ranked.end());
    BundleCache cache(CachePolicy::Pinned, capacity_for(50, 112), { 100, 100, 100 });
    pin_all(cache, freq);
    CHECK(cache.stats().entries == 50);
    std::set<uint64_t> hottest;
    for (size_t i = 0; i < 50; ++i) {
        hottest.insert(ranked[i].second);
    }
    std::vector<uint8_t> buf(100);
    for (uint32_t l = 0; l < n_layers; ++l) {
        for (uint32_t p = 0; p < n_ff; ++p) {
            const bool hot = hottest.count((uint64_t) l << 32 | p) > 0;
            CHECK(cache.lookup(l, p, buf.data()) == hot);
            CHECK(!hot || record_is(buf, l, p, 100));
        }
    }
    // admit() never changes the pinned set
    const uint64_t cold = ranked.back().second;
    cache.admit((uint32_t) (cold >> 32), (uint32_t) cold, make_record(0, 0, 100).data(), true);
    CHECK(!cached(cache, (uint32_t) (cold >> 32), (uint32_t) cold));
    CHECK(cache.stats().rejections == 1 && cache.stats().entries == 50);
    CHECK_THROWS(std::runtime_error, pin_all(cache, freq), "already called");
}

TEST(cache_pinned_skips_records_too_large_for_what_is_left) {
    // the two hottest are large; only one fits, and small records fill the rest
    std::vector<std::vector<float>> freq = { { 1, 2, 3, 4 }, { 9, 8 } };
    BundleCacheOptions o;
    o.max_entries = 3; // tables for 3 entries; records get the other 1064 bytes
    BundleCache cache(CachePolicy::Pinned, capacity_for(1, 992) + capacity_for(2, 16) + 40, { 16, 992 }, o);
    pin_all(cache, freq);
    CHECK(cached(cache, 1, 0) && !cached(cache, 1, 1));
    CHECK(cached(cache, 0, 3) && cached(cache, 0, 2) && !cached(cache, 0, 1) && !cached(cache, 0, 0));
    CHECK(cache.stats().used_bytes <= cache.capacity_bytes());
}

TEST(cache_pin_hottest_refuses_misuse_and_rolls_back_failed_reads) {
    BundleCache lru(CachePolicy::Lru, 1 << 16, { 64 });
    CHECK_THROWS(std::invalid_argument, pin_all(lru, { { 1.0f } }), "needs the 'pinned' policy; this cache is 'lru'");
    BundleCache cache(CachePolicy::Pinned, 1 << 16, { 64, 64 });
    CHECK_THROWS(std::invalid_argument, pin_all(cache, { { 1.0f } }), "frequency lists 1 layers, the cache has 2");
    CHECK_THROWS(std::invalid_argument, pin_all(cache, { { 1.0f }, { std::nanf("") } }), "frequency[1][0] is NaN");
    int reads = 0;
    auto failing = [&](uint32_t, uint32_t, uint8_t *) {
        if (++reads == 3) throw std::runtime_error("short read at offset 4096");
    };
    CHECK_THROWS(std::runtime_error, cache.pin_hottest({ { 1, 2, 3 }, { 4, 5 } }, failing), "short read");
    CHECK(cache.stats().entries == 0 && cache.stats().used_bytes <= cache.capacity_bytes());
    pin_all(cache, { { 1, 2, 3 }, { 4, 5 } }); // a failed pin leaves the cache ready for another
    CHECK(cache.stats().entries == 5 && cached(cache, 0, 2));
}

TEST(cache_pinned_records_are_looked_up_in_place) {
    BundleCache cache(CachePolicy::Pinned, 1 << 16, { 64, 96 });
    pin_all(cache, { { 1, 2, 3 }, { 4, 5 } });
    const uint8_t * first = cache.lookup_in_place(1, 1);
    CHECK(first != nullptr && std::memcmp(first, make_record(1, 1, 96).data(), 96) == 0);
    CHECK(cache.lookup_in_place(1, 1) == first); // the same slot every time: pinned records never move
    CHECK(cache.lookup_in_place(0, 7) == nullptr);
    const CacheStats s = cache.stats();
    CHECK(s.lookups == 3 && s.hits == 2);
    BundleCache lru(CachePolicy::Lru, 1 << 16, { 64 });
    CHECK_THROWS(std::logic_error, lru.lookup_in_place(0, 0), "may evict");
}

TEST(cache_concurrent_use_keeps_records_and_budget) {
    const int n_threads = 6;
    for (CachePolicy policy : { CachePolicy::Lru, CachePolicy::S3Fifo, CachePolicy::Linking }) {
        const std::vector<size_t> sizes = { 1080, 2000, 520 };
        BundleCache cache(policy, 200 << 10, sizes);
        std::atomic<int> bad_bytes { 0 }, over_budget { 0 };
        std::atomic<bool> done { false };
        std::atomic<uint64_t> lookups { 0 };
        std::thread watcher([&] {
            while (!done.load()) {
                const CacheStats s = cache.stats();
                over_budget += s.used_bytes > s.capacity_bytes || s.entries > cache.max_entries();
            }
        });
        std::vector<std::thread> workers;
        for (int t = 0; t < n_threads; ++t) {
            workers.emplace_back([&, t] {
                std::mt19937 rng(100 + t);
                std::vector<uint8_t> buf(2000);
                for (int i = 0; i < 30000; ++i) {
                    const uint32_t l = rng() % 3;
                    const uint32_t p = (uint32_t) std::floor(std::pow((rng() % 10000) / 10000.0, 2) * 1500);
                    ++lookups;
                    if (cache.lookup(l, p, buf.data())) {
                        bad_bytes += !record_is(buf, l, p, sizes[l]);
                    } else {
                        cache.admit(l, p, make_record(l, p, sizes[l]).data(), p % 3 == 0);
                    }
                }
            });
        }
        for (auto & w : workers) w.join();
        done = true;
        watcher.join();
        const CacheStats s = cache.stats();
        CHECK(bad_bytes == 0 && over_budget == 0);
        CHECK(s.lookups == lookups && s.hits > 0 && s.hits <= s.lookups);
        CHECK(s.used_bytes <= s.capacity_bytes);
    }
}

TEST(store_arena_keeps_every_record_it_admits_within_its_bytes) {
    const std::vector<size_t> sizes = { 1080, 2000, 520 };
    const size_t per_key = 1500;
    StoreArena arena(sizes, per_key, StoreArena::bytes_for(sizes, per_key));
    CHECK(arena.find(1, 7) == nullptr);
    arena.admit(1, 7, make_record(1, 7, sizes[1]).data());
    arena.admit(1, 7, make_record(2, 9, sizes[1]).data()); // already there: left as it is
    const uint8_t * r = arena.find(1, 7);
    CHECK(r != nullptr && std::memcmp(r, make_record(1, 7, sizes[1]).data(), sizes[1]) == 0);
    CHECK(arena.find(0, 7) == nullptr && arena.find(1, 8) == nullptr);
    CHECK_THROWS(std::invalid_argument, arena.admit(3, 0, r), "out of range");
    CHECK_THROWS(std::invalid_argument, arena.admit(0, (uint32_t) per_key, r), "out of range");
    CacheStats s = arena.stats();
    CHECK(s.entries == 1 && s.admissions == 1 && s.used_bytes == 3 * per_key + sizes[1]);
    CHECK(s.used_bytes <= s.capacity_bytes);
    arena.count(5, 2);
    arena.reset_stats();
    s = arena.stats();
    CHECK(s.lookups == 0 && s.entries == 1); // a reset forgets counts, not records
}

TEST(store_arena_concurrent_admissions_and_lookups_see_whole_records) {
    const std::vector<size_t> sizes = { 1080, 2000, 520 };
    const size_t per_key = 1500;
    StoreArena arena(sizes, per_key, StoreArena::bytes_for(sizes, per_key));
    std::atomic<int> bad_bytes { 0 };
    std::vector<std::thread> workers;
    for (int t = 0; t < 6; ++t) {
        workers.emplace_back([&, t] {
            std::mt19937 rng(200 + t);
            std::vector<uint8_t> buf(2000);
            for (int i = 0; i < 20000; ++i) {
                const uint32_t l = rng() % 3, p = rng() % per_key;
                if (const uint8_t * r = arena.find(l, p)) {
                    bad_bytes += std::memcmp(r, make_record(l, p, sizes[l]).data(), sizes[l]) != 0;
                } else {
                    arena.admit(l, p, make_record(l, p, sizes[l]).data());
                }
            }
        });
    }
    for (auto & w : workers) w.join();
    const CacheStats s = arena.stats();
    CHECK(bad_bytes == 0);
    CHECK(s.entries > 0 && s.entries <= 3 * per_key && s.used_bytes <= s.capacity_bytes);
}
