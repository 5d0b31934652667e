#pragma once

// Several direct reads in flight: a pool of reader threads doing pread on one
// file. Compute threads submit all reads of a layer at once and then wait for
// each read when they need its bytes, so computing on early reads overlaps
// the later ones. The first error is kept and reported to every waiter.

#include "neuralink/direct_file.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace neuralink {

// A read in flight; the submitter keeps it alive until it is done.
struct PendingRead {
    uint64_t offset = 0;
    uint64_t length = 0;
    uint8_t * dst = nullptr;
    std::atomic<int> state { 0 };   // kQueued, kDone, kFailed
    uint64_t done_ns = 0;           // completion time (steady clock), valid once done

    static constexpr int kQueued = 0, kDone = 1, kFailed = 2;
};

enum class InjectedFault { None, ShortRead, Eio };

// Test seam shared by the read paths: the read `after` reads from now fails.
class FaultPlan {
public:
    void inject(InjectedFault fault, uint64_t after);
    // the fault of the read about to be issued (None almost always)
    InjectedFault next();

private:
    std::mutex mutex_;
    InjectedFault fault_ = InjectedFault::None;
    int64_t countdown_ = -1;
};


class IoPool {
public:
    // `queue_depth` reader threads (reads in flight at once), at least 1;
    // `faults` (default: the pool's own) decides which reads fail on purpose.
    IoPool(const DirectFile & file, int queue_depth, FaultPlan * faults = nullptr);
    ~IoPool();

    IoPool(const IoPool &) = delete;
    IoPool & operator=(const IoPool &) = delete;

    int queue_depth() const { return (int) workers_.size(); }

    // Queues reads in order; they must stay alive until done or failed.
    void submit(PendingRead * const * reads, size_t n);

    // Blocks until `read` has completed; throws IoError if it failed.
    void wait(const PendingRead & read) const;

    // Test seam: the read `after` reads from now fails with `fault`.
    void inject_fault(InjectedFault fault, uint64_t after) { faults_->inject(fault, after); }

    // the first error met since the last clear_error(), empty if none
    std::string error() const;
    void clear_error();
    uint64_t reads_done() const { return reads_done_.load(std::memory_order_relaxed); }
    uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }

private:
    void run();
    void fail(PendingRead & read, const std::string & what);

    const DirectFile & file_;
    std::vector<std::thread> workers_;
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<PendingRead *> queue_;
    bool stopping_ = false;
    std::string error_;
    FaultPlan own_faults_;
    FaultPlan * faults_;
    std::atomic<uint64_t> reads_done_ { 0 };
    std::atomic<uint64_t> bytes_read_ { 0 };
};

uint64_t steady_now_ns();

struct ProbeResult {
    double seconds = 0.0;   // first read issued -> last completed
    uint64_t reads = 0;
    uint64_t bytes = 0;
    bool direct = false;    // O_DIRECT was in effect
};

// Reads `n_reads` blocks of `read_size` bytes at random aligned offsets of the
// file, keeping `queue_depth` in flight: the device's IOPS and bandwidth for
// that read size and depth (direct I/O unless refused). `in_order`: one block
// after the other from the file's start instead (from the start again at its
// end), as a stream reads a region.
ProbeResult probe_reads(const std::string & path, size_t read_size, int queue_depth, uint64_t n_reads,
                        uint64_t seed, bool direct, bool in_order = false);

} // namespace neuralink
