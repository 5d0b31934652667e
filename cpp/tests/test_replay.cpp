// The trace replayer of `neuralink bench io`: run planning, the sliding window, replays of a file.

#include "test_util.h"

#include "neuralink/errors.h"
#include "neuralink/replay.h"

#include <fstream>
#include <vector>

using namespace neuralink;

namespace {

std::string write_zero_file(const std::string & name, size_t size) {
    const std::string path = nltest::tmp_dir() + "/" + name;
    std::vector<char> data(size, 1);
    std::ofstream(path, std::ios::binary).write(data.data(), (std::streamsize) size);
    return path;
}

} // namespace

TEST(plan_runs_reads_each_run_once_without_merging_neighbouring_blocks) {
    const BundleRegion region { 8192, 1000, 64 };
    // runs {1,2,3}, {5}, {40}: 1-3 and 5 share a block but stay separate reads
    const std::vector<uint32_t> needed { 1, 2, 3, 5, 40 };
    const auto reads = plan_runs(region, needed.data(), needed.size(), 0);
    CHECK(reads.size() == 3);
    CHECK(reads[0].first == 1 && reads[0].count == 3 && reads[0].n_needed == 3);
    CHECK(reads[1].first == 5 && reads[1].count == 1);
    CHECK(reads[2].first == 40);
    for (const auto & r : reads) {
        CHECK(r.offset % kDirectAlign == 0 && r.length % kDirectAlign == 0);
        CHECK(r.offset <= region.record_offset(r.first));
        CHECK(region.record_offset(r.first + r.count - 1) + region.record_bytes <= r.offset + r.length);
    }
    // a cap of 2 records splits the first run
    CHECK(plan_runs(region, needed.data(), needed.size(), 2000).size() == 4);
    const std::vector<uint32_t> unsorted { 3, 2 };
    CHECK_THROWS(std::invalid_argument, plan_runs(region, unsorted.data(), unsorted.size(), 0), "sorted");
    const std::vector<uint32_t> outside { 64 };
    CHECK_THROWS(std::invalid_argument, plan_runs(region, outside.data(), outside.size(), 0), "not below 64");
}

TEST(window_cache_forgets_neurons_idle_for_longer_than_the_window) {
    // records of 100 B cost 112 + 32 B: room for three
    WindowCache cache(2, 3 * 144, { 100 });
    std::vector<uint8_t> rec(100, 7), out(100);
    cache.start_token(0);
    cache.admit(0, 1, rec.data());
    cache.admit(0, 2, rec.data());
    cache.start_token(1);
    CHECK(cache.lookup(0, 1, out.data()) && out[0] == 7);  // neuron 1 active again at token 1
    cache.start_token(2);
    CHECK(cache.entries() == 2);                            // both active within the last two tokens
    cache.start_token(3);
    CHECK(cache.entries() == 1);                            // neuron 2 last active at token 0: gone
    CHECK(!cache.lookup(0, 2, out.data()));
    // over budget, the least recently active goes first
    cache.admit(0, 3, rec.data());
    cache.admit(0, 4, rec.data());
    cache.admit(0, 5, rec.data());
    CHECK(cache.used_bytes() <= 3 * 144);
    CHECK(!cache.lookup(0, 1, out.data()));
    CHECK(cache.lookup(0, 5, out.data()));
}

TEST(replayer_counts_reads_hits_and_bytes_of_a_trace) {
    const size_t rec = 1024, n = 64;
    const std::string path = write_zero_file("replay.bin", 4096 + rec * n);
    const std::vector<BundleRegion> regions { { 4096, rec, (uint32_t) n } };
    // two tokens, one step each: {0,1,2, 10, 12} then the same again
    const std::vector<uint32_t> positions { 0, 1, 2, 10, 12, 0, 1, 2, 10, 12 };
    const std::vector<uint64_t> offsets { 0, 5, 10 };

    ReplayOptions runs;
    runs.plan = ReplayPlan::Runs;
    Replayer a(path, regions, { { 0 } }, runs);
    const auto sa = a.replay(positions.data(), positions.size(), offsets.data(), offsets.size(), 0, 2);
    CHECK(sa.size() == 2 && sa[0].reads == 3 && sa[0].needed == 5 && sa[0].needed_read == 5 && sa[0].hits == 0);
    CHECK(sa[0].needed_bytes == 5 * rec && sa[0].records_spanned == 5);

    ReplayOptions collapse;
    collapse.plan = ReplayPlan::Collapse;
    collapse.collapse_gap_bytes = 8 * rec;      // gaps of up to 8 records are read through
    collapse.cache_policy = CachePolicy::Lru;
    collapse.cache_bytes = 1 << 20;
    Replayer b(path, regions, { { 0 } }, collapse);
    const auto sb = b.replay(positions.data(), positions.size(), offsets.data(), offsets.size(), 0, 2);
    CHECK(sb[0].reads == 1 && sb[0].records_spanned == 13 && sb[0].needed_read == 5);
    CHECK(sb[1].hits == 5 && sb[1].reads == 0 && sb[1].io_ns == 0);  // all cached by the first token

    ReplayOptions whole;
    whole.plan = ReplayPlan::Whole;
    Replayer c(path, regions, { { 0 } }, whole);
    const auto sc = c.replay(positions.data(), positions.size(), offsets.data(), offsets.size(), 1, 2);
    CHECK(sc.size() == 1 && sc[0].bytes_read == rec * n && sc[0].needed_read == 5 && sc[0].records_spanned == n);

    const std::vector<uint64_t> bad { 0, 11, 10 };
    CHECK_THROWS(std::invalid_argument, a.replay(positions.data(), positions.size(), bad.data(), bad.size(), 0, 1),
                 "must not decrease");
    CHECK_THROWS(ModelFileError, Replayer(path, { { 4096, rec, (uint32_t) n + 8 } }, { { 0 } }, runs), "past the end");
}
