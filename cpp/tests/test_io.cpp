// The read planner, the pread pool and the region stream.

#include "test_util.h"

#include "neuralink/errors.h"
#include "neuralink/io_pool.h"
#include "neuralink/memory_plan.h"
#include "neuralink/read_planner.h"
#include "neuralink/read_queue.h"
#include "neuralink/region_stream.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <set>
#include <thread>

using namespace neuralink;

namespace {

// checks the planner's contract for one set of needed positions
void check_plan(const BundleRegion & region, const std::vector<uint32_t> & needed, const CollapsePolicy & policy) {
    const auto reads = plan_reads(region, needed.data(), needed.size(), policy);
    std::set<uint32_t> covered_needed;
    uint32_t n_needed = 0;
    for (size_t i = 0; i < reads.size(); ++i) {
        const PlannedRead & r = reads[i];
        CHECK(r.offset % kDirectAlign == 0);
        CHECK(r.length % kDirectAlign == 0 && r.length > 0);
        CHECK(r.offset <= region.record_offset(r.first));
        CHECK(region.record_offset(r.first + r.count - 1) + region.record_bytes <= r.offset + r.length);
        if (i > 0) {
            CHECK(reads[i - 1].first + reads[i - 1].count <= r.first);
        }
        if (policy.max_read_bytes) {
            // a capped read holds at most the cap plus the alignment slack at both ends
            CHECK(r.length <= policy.max_read_bytes + 2 * kDirectAlign || r.count == 1);
        }
        n_needed += r.n_needed;
        for (uint32_t p : needed) {
            if (p >= r.first && p < r.first + r.count) {
                covered_needed.insert(p);
            }
        }
    }
    CHECK(covered_needed.size() == needed.size());
    CHECK(n_needed == needed.size());
}

std::string write_pattern_file(const std::string & name, size_t size) {
    const std::string path = nltest::tmp_dir() + "/" + name;
    std::vector<uint8_t> data(size);
    for (size_t i = 0; i < size; ++i) data[i] = (uint8_t) (i * 131 + (i >> 12));
    std::ofstream(path, std::ios::binary).write((const char *) data.data(), (std::streamsize) size);
    return path;
}

uint8_t pattern(size_t i) { return (uint8_t) (i * 131 + (i >> 12)); }

} // namespace

TEST(plan_reads_merges_runs_within_the_gap_and_aligns) {
    BundleRegion region { 8192, 1000, 100 };
    const std::vector<uint32_t> needed = { 3, 4, 5, 9, 40, 41, 99 };
    CollapsePolicy tight;
    auto reads = plan_reads(region, needed.data(), needed.size(), tight);
    // 3-5 and 9 share 4 KiB blocks (records are 1000 bytes), 40-41 and 99 stand alone
    CHECK(reads.size() == 3);
    CHECK(reads[0].first == 3 && reads[0].count == 7 && reads[0].n_needed == 4);
    CHECK(reads[1].first == 40 && reads[1].count == 2);
    CHECK(reads[2].first == 99 && reads[2].count == 1);
    CollapsePolicy loose;
    loose.max_gap = 60;
    reads = plan_reads(region, needed.data(), needed.size(), loose);
    CHECK(reads.size() == 1 && reads[0].n_needed == needed.size());
    CHECK(reads[0].offset == 8192 + 3000 / 4096 * 4096);
}

TEST(plan_reads_covers_random_masks_with_aligned_reads) {
    std::mt19937 rng(5);
    for (int trial = 0; trial < 300; ++trial) {
        BundleRegion region;
        region.offset = 4096 * (1 + rng() % 50);
        region.record_bytes = 64 + rng() % 9000;
        region.n_records = 1 + rng() % 3000;
        const double density = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
        std::vector<uint32_t> needed;
        for (uint32_t p = 0; p < region.n_records; ++p) {
            if (std::uniform_real_distribution<double>(0.0, 1.0)(rng) < density) needed.push_back(p);
        }
        CollapsePolicy policy;
        policy.max_gap = rng() % 20;
        policy.max_read_bytes = rng() % 3 == 0 ? 0 : 4096 * (1 + rng() % 64);
        check_plan(region, needed, policy);
    }
}

TEST(plan_reads_rejects_unsorted_or_out_of_range_positions) {
    BundleRegion region { 0, 100, 10 };
    const std::vector<uint32_t> unsorted = { 3, 2 }, too_far = { 1, 10 };
    CHECK_THROWS(std::invalid_argument, plan_reads(region, unsorted.data(), 2, CollapsePolicy {}), "sorted, unique");
    CHECK_THROWS(std::invalid_argument, plan_reads(region, too_far.data(), 2, CollapsePolicy {}), "below 10");
}

TEST(plan_whole_region_reads_everything_in_capped_pieces) {
    BundleRegion region { 4096, 1536, 1000 };
    const auto reads = plan_whole_region(region, 256 * 1024);
    CHECK(reads.front().first == 0);
    CHECK(reads.back().first + reads.back().count == region.n_records);
    uint32_t needed = 0;
    for (const auto & r : reads) needed += r.n_needed;
    CHECK(needed == region.n_records);
    CHECK(reads.size() >= region.n_records * region.record_bytes / (256 * 1024));
}

namespace {

// waves of varied shape from a device that costs exactly latency per read plus bytes / bandwidth
void feed(AdaptiveCollapse & fit, double latency_s, double bandwidth, int waves, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> reads(1, 60);
    std::uniform_int_distribution<int> kib_per_read(4, 1024);
    for (int i = 0; i < waves; ++i) {
        const uint64_t n = (uint64_t) reads(rng), bytes = n * (uint64_t) kib_per_read(rng) * 1024;
        fit.observe(n, bytes, (uint64_t) ((double) n * latency_s * 1e9 + (double) bytes / bandwidth * 1e9));
    }
}

} // namespace

TEST(adaptive_collapse_starts_from_the_prior_and_learns_the_device) {
    DeviceCost prior;
    prior.read_latency_s = 20e-6;
    prior.bandwidth_bytes_s = 1e9;
    AdaptiveCollapse fit(prior);
    CHECK(fit.observations() == 0);
    CHECK_NEAR(fit.cost().read_latency_s, 20e-6, 1e-12);
    CHECK_NEAR(fit.cost().gap_bytes(), 20e3, 1e-6);
    fit.observe(0, 0, 1000); // no reads: nothing learnt
    CHECK(fit.observations() == 0);
    // a slower device than profiled: 200 us per read, 500 MB/s
    feed(fit, 200e-6, 500e6, 300, 1);
    CHECK(fit.observations() == 300);
    CHECK_NEAR(fit.cost().read_latency_s, 200e-6, 20e-6);
    CHECK_NEAR(fit.cost().bandwidth_bytes_s, 500e6, 50e6);
    CHECK_NEAR(fit.cost().gap_bytes(), 100e3, 15e3);
}

TEST(adaptive_collapse_stops_merging_on_a_bandwidth_bound_device) {
    DeviceCost prior;
    prior.read_latency_s = 50e-6;
    prior.bandwidth_bytes_s = 1e9;
    AdaptiveCollapse fit(prior);
    feed(fit, 0.0, 800e6, 300, 2); // reads cost their bytes only
    CHECK(fit.cost().gap_bytes() < 4096);
    CHECK_NEAR(fit.cost().bandwidth_bytes_s, 800e6, 40e6);
    // and follows the device when reads become expensive again (older waves forgotten)
    feed(fit, 100e-6, 800e6, 300, 3);
    CHECK_NEAR(fit.cost().gap_bytes(), 80e3, 12e3);
}

TEST(adaptive_collapse_refuses_a_meaningless_prior) {
    DeviceCost prior;
    prior.bandwidth_bytes_s = 0;
    CHECK_THROWS(std::invalid_argument, AdaptiveCollapse(prior), "bandwidth");
    prior.bandwidth_bytes_s = 1e9;
    CHECK_THROWS(std::invalid_argument, AdaptiveCollapse(prior, 0.0), "forget");
}

TEST(io_pool_reads_many_ranges_in_flight) {
    const size_t size = 64 * kDirectAlign;
    const std::string path = write_pattern_file("pool.bin", size);
    DirectFile file(path, true);
    IoPool pool(file, 4);
    std::vector<std::unique_ptr<PendingRead>> reads;
    std::vector<AlignedBuffer> buffers;
    std::vector<PendingRead *> batch;
    for (size_t i = 0; i < 32; ++i) {
        auto r = std::make_unique<PendingRead>();
        r->offset = (i * 7 % 60) * kDirectAlign;
        r->length = (1 + i % 4) * kDirectAlign;
        buffers.emplace_back(r->length);
        r->dst = buffers.back().data();
        batch.push_back(r.get());
        reads.push_back(std::move(r));
    }
    pool.submit(batch.data(), batch.size());
    for (size_t i = 0; i < reads.size(); ++i) {
        pool.wait(*reads[i]);
        for (size_t j = 0; j < reads[i]->length; j += 97) {
            CHECK(reads[i]->dst[j] == pattern(reads[i]->offset + j));
        }
    }
    CHECK(pool.reads_done() == reads.size());
    CHECK(pool.error().empty());
}

TEST(io_pool_reports_injected_faults_to_the_waiter) {
    const std::string path = write_pattern_file("faults.bin", 16 * kDirectAlign);
    DirectFile file(path, true);
    for (InjectedFault fault : { InjectedFault::Eio, InjectedFault::ShortRead }) {
        IoPool pool(file, 2);
        pool.inject_fault(fault, 1);
        PendingRead a, b, c;
        AlignedBuffer buf(3 * 2 * kDirectAlign);
        PendingRead * batch[] = { &a, &b, &c };
        for (int i = 0; i < 3; ++i) {
            batch[i]->offset = i * 2 * kDirectAlign;
            batch[i]->length = 2 * kDirectAlign;
            batch[i]->dst = buf.data() + i * 2 * kDirectAlign;
        }
        // submitted one by one so that the second read is the one that fails
        pool.submit(&batch[0], 1);
        pool.wait(a);
        pool.submit(&batch[1], 2);
        int failed = 0;
        for (PendingRead * r : { &b, &c }) {
            try {
                pool.wait(*r);
            } catch (const IoError & e) {
                ++failed;
                CHECK(std::string(e.what()).find("faults.bin") != std::string::npos);
                CHECK(std::string(e.what()).find(fault == InjectedFault::Eio ? "Input/output error" : "short read") != std::string::npos);
            }
        }
        CHECK(failed >= 1);
        CHECK(!pool.error().empty());
    }
}

TEST(io_pool_reports_a_file_truncated_underneath) {
    const std::string path = write_pattern_file("shrinks.bin", 16 * kDirectAlign);
    DirectFile file(path, true);
    std::filesystem::resize_file(path, 4 * kDirectAlign);
    IoPool pool(file, 1);
    PendingRead r;
    AlignedBuffer buf(4 * kDirectAlign);
    r.offset = 8 * kDirectAlign;
    r.length = 4 * kDirectAlign;
    r.dst = buf.data();
    PendingRead * batch[] = { &r };
    pool.submit(batch, 1);
    CHECK_THROWS(IoError, pool.wait(r), "short read");
}

TEST(uring_and_pool_queues_read_the_same_bytes_and_report_faults) {
    std::string why;
    if (!uring_available(&why)) {
        std::printf("        (io_uring unavailable here: %s; checking the pool queue only)\n", why.c_str());
    }
    const std::string path = write_pattern_file("queues.bin", 96 * kDirectAlign);
    DirectFile file(path, true);
    IoPool pool(file, 3);
    FaultPlan faults;
    std::vector<std::unique_ptr<ReadQueue>> queues;
    queues.push_back(make_pool_queue(pool));
    if (auto uring = make_uring_queue(file, 4, faults, &why)) {
        queues.push_back(std::move(uring));
    }
    for (auto & queue : queues) {
        // more reads than ring entries: the backlog must feed the ring as slots free up
        std::vector<std::unique_ptr<PendingRead>> reads;
        std::vector<AlignedBuffer> buffers;
        std::vector<PendingRead *> batch;
        for (size_t i = 0; i < 40; ++i) {
            auto r = std::make_unique<PendingRead>();
            r->offset = (i * 13 % 90) * kDirectAlign;
            r->length = (1 + i % 3) * kDirectAlign;
            buffers.emplace_back(r->length);
            r->dst = buffers.back().data();
            batch.push_back(r.get());
            reads.push_back(std::move(r));
        }
        queue->submit(batch.data(), batch.size());
        for (auto & r : reads) {
            queue->wait(*r);
            for (size_t j = 0; j < r->length; j += 211) CHECK(r->dst[j] == pattern(r->offset + j));
        }
    }
    if (queues.size() == 2) {
        ReadQueue & uring = *queues[1];
        faults.inject(InjectedFault::Eio, 1);
        PendingRead a, b;
        AlignedBuffer buf(2 * kDirectAlign);
        a.offset = 0; a.length = kDirectAlign; a.dst = buf.data();
        b.offset = kDirectAlign; b.length = kDirectAlign; b.dst = buf.data() + kDirectAlign;
        PendingRead * both[] = { &a, &b };
        uring.submit(both, 2);
        uring.wait(a);
        CHECK_THROWS(IoError, uring.wait(b), "Input/output error (injected)");
    }
}

// the bytes of an item as they are in the file
static bool holds_item(const uint8_t * data, const FileRange & r) {
    for (size_t i = 0; i < r.bytes; ++i) {
        if (data[i] != pattern(r.offset + i)) return false;
    }
    return true;
}

TEST(region_stream_serves_items_in_cyclic_order_and_after_jumps) {
    const std::string path = write_pattern_file("stream.bin", 40 * kDirectAlign + 100);
    for (const auto & [direct, backend] : { std::pair{ true, IoBackend::Auto }, std::pair{ true, IoBackend::Pread },
                                           std::pair{ false, IoBackend::Auto } }) {
        DirectFile file(path, direct);
        // unaligned ranges of different sizes, as a layer's bundle and down regions are; the last one's aligned
        // span runs past the end of the file; chunks of 2 blocks, so an item is several reads in flight
        const std::vector<FileRange> items = { { 100, 3 * kDirectAlign }, { 100 + 3 * kDirectAlign, 5000 },
                                               { 20 * kDirectAlign + 7, 9 * kDirectAlign }, { 39 * kDirectAlign, kDirectAlign + 100 } };
        RegionStream stream(file, items, nullptr, backend, 2 * kDirectAlign);
        if (backend == IoBackend::Pread) CHECK(stream.io_backend() == IoBackend::Pread);
        size_t largest = 0;
        for (const FileRange & r : items) largest = std::max(largest, RegionStream::span_bytes(r));
        CHECK(stream.buffer_bytes() == 2 * largest);
        // three rounds, as three decoded tokens: each item waited for by two threads, then released
        for (int round = 0; round < 3; ++round) {
            for (size_t k = 0; k < items.size(); ++k) {
                stream.prepare(k, 1); // held already: nothing to do
                const uint8_t * a = nullptr;
                std::thread other([&] { a = stream.wait(k); });
                const uint8_t * b = stream.wait(k);
                other.join();
                CHECK(a == b);
                CHECK(holds_item(b, items[k]));
                stream.release(k);
                stream.release(k); // releasing what is not held does nothing
            }
        }
        // out of order (an evaluation that stopped part way): the stream starts over where it is asked to
        CHECK_THROWS(std::logic_error, stream.wait(2), "not held");
        stream.prepare(2, 2);
        CHECK(holds_item(stream.wait(2), items[2]));
        CHECK(holds_item(stream.wait(3), items[3]));
        stream.prepare(0, 1);
        CHECK(holds_item(stream.wait(0), items[0]));
        stream.release(0);
        CHECK(holds_item(stream.wait(1), items[1]));
        CHECK(stream.read_ns(1) > 0);
    }
}

TEST(a_one_buffer_stream_reads_the_next_item_once_the_last_is_released) {
    // the gate rows' stream: one buffer, the next layer's rows read as soon as a prediction is done with the last
    const std::string path = write_pattern_file("stream_one.bin", 24 * kDirectAlign);
    for (const IoBackend backend : { IoBackend::Auto, IoBackend::Pread }) {
        DirectFile file(path, true);
        const std::vector<FileRange> items = { { 10, 5 * kDirectAlign }, { 8 * kDirectAlign + 3, 2 * kDirectAlign },
                                               { 12 * kDirectAlign, 11 * kDirectAlign } };
        RegionStream stream(file, items, nullptr, backend, 2 * kDirectAlign, 1);
        CHECK(stream.n_buffers() == 1);
        size_t largest = 0;
        for (const FileRange & r : items) largest = std::max(largest, RegionStream::span_bytes(r));
        CHECK(stream.buffer_bytes() == largest);
        CHECK_THROWS(std::invalid_argument, stream.prepare(0, 2), "regions 0 + 2");
        for (int round = 0; round < 2; ++round) {
            for (size_t k = 0; k < items.size(); ++k) {
                stream.prepare(k, 1);
                CHECK(holds_item(stream.wait(k), items[k]));
                // not held while its successor is read into the one buffer
                const size_t next = (k + 1) % items.size();
                CHECK_THROWS(std::logic_error, stream.wait(next), "not held");
                stream.release(k);
                CHECK_THROWS(std::logic_error, stream.wait(k), "not held");
            }
        }
        // taken out of order: started over there
        stream.prepare(2, 1);
        CHECK(holds_item(stream.wait(2), items[2]));
        stream.prepare(0, 1);
        CHECK(holds_item(stream.wait(0), items[0]));
    }
    DirectFile file(path, true);
    CHECK_THROWS(std::invalid_argument, RegionStream(file, { { 0, kDirectAlign } }, nullptr, IoBackend::Auto,
                                                     kDirectAlign, 3), "1 or 2 buffers");
}

TEST(region_stream_reports_a_failed_read_and_reads_it_again_next_time) {
    const std::string path = write_pattern_file("stream_fault.bin", 16 * kDirectAlign);
    DirectFile file(path, true);
    const std::vector<FileRange> items = { { 0, 4 * kDirectAlign }, { 4 * kDirectAlign, 4 * kDirectAlign },
                                           { 8 * kDirectAlign, 8 * kDirectAlign } };
    FaultPlan faults;
    RegionStream stream(file, items, &faults, IoBackend::Auto, 2 * kDirectAlign);
    CHECK(holds_item(stream.wait(0), items[0]));
    CHECK(holds_item(stream.wait(1), items[1]));
    faults.inject(InjectedFault::Eio, 0); // the next read: item 2's, which releasing item 0 starts
    stream.release(0);
    for (int waiter = 0; waiter < 2; ++waiter) {
        // every thread waiting for it hears of it
        CHECK_THROWS(IoError, stream.wait(2), "stream_fault.bin");
    }
    stream.prepare(2, 1); // read again
    CHECK(holds_item(stream.wait(2), items[2]));
}

TEST(region_stream_refuses_empty_and_out_of_file_items) {
    const std::string path = write_pattern_file("stream_bad.bin", 4 * kDirectAlign);
    DirectFile file(path, true);
    CHECK_THROWS(std::invalid_argument, RegionStream(file, {}), "no regions");
    CHECK_THROWS(std::invalid_argument, RegionStream(file, { { 0, 0 } }), "empty");
    CHECK_THROWS(std::invalid_argument, RegionStream(file, { { 3 * kDirectAlign, 2 * kDirectAlign } }), "past the end");
}

#if defined(__GLIBC__)
// writes every page of [p, p + n), in a way the compiler cannot drop with the malloc and free around it
static void touch(uint8_t * p, size_t n) {
    std::memset(p, 1, n);
    asm volatile("" : : "r"(p) : "memory");
}

// glibc raises its mmap threshold to the size of a large block freed; blocks below it then come from the heap,
// which kept them after free (the process grew past its memory budget under neuralink-run)
static void raise_glibc_mmap_threshold() {
    release_free_heap(); // what earlier tests left free in the heap would hide the growth
    const size_t big = (size_t) 24 << 20;
    uint8_t * p = (uint8_t *) std::malloc(big);
    CHECK(p != nullptr);
    touch(p, big);
    std::free(p);
    release_free_heap(); // where the threshold was already that high, the block came from the heap
}

// growth allowed for what else the process touches meanwhile (a huge page, where THP is "always"); the blocks kept
// without the fixes add 12 MiB and more
constexpr uint64_t kAllowedGrowth = (uint64_t) 4 << 20;

static uint64_t resident_growth_of_buffers(const std::function<void(size_t)> & use_and_free) {
    const uint64_t before = anonymous_resident_bytes();
    for (size_t mib : { 4, 8, 12 }) use_and_free(mib << 20);
    const uint64_t after = anonymous_resident_bytes();
    return after > before ? after - before : 0;
}

TEST(a_freed_large_aligned_buffer_leaves_the_process_whatever_mallocs_threshold) {
    raise_glibc_mmap_threshold();
    const uint64_t growth = resident_growth_of_buffers([](size_t bytes) {
        for (size_t alignment : { kDirectAlign, kHugePage }) {
            AlignedBuffer b(bytes, alignment);
            CHECK((uintptr_t) b.data() % alignment == 0);
            CHECK(b.size() == bytes);
            touch(b.data(), b.size());
        }
    });
    CHECK(growth < kAllowedGrowth);
}

TEST(with_malloc_thresholds_fixed_freed_large_blocks_leave_the_process) {
    fix_malloc_thresholds();
    raise_glibc_mmap_threshold();
    const uint64_t growth = resident_growth_of_buffers([](size_t bytes) {
        uint8_t * p = (uint8_t *) std::malloc(bytes);
        CHECK(p != nullptr);
        touch(p, bytes);
        std::free(p);
    });
    CHECK(growth < kAllowedGrowth);
}
#endif
