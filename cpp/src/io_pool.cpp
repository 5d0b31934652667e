#include "neuralink/io_pool.h"

#include "neuralink/errors.h"

#include <chrono>
#include <memory>
#include <random>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NL_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define NL_CPU_RELAX() asm volatile("yield")
#else
#define NL_CPU_RELAX() ((void) 0)
#endif

namespace neuralink {

uint64_t steady_now_ns() {
    return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(
            std::chrono::steady_clock::now().time_since_epoch()).count();
}

void FaultPlan::inject(InjectedFault fault, uint64_t after) {
    std::lock_guard<std::mutex> lock(mutex_);
    fault_ = fault;
    countdown_ = fault == InjectedFault::None ? -1 : (int64_t) after;
}

InjectedFault FaultPlan::next() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (countdown_ < 0) {
        return InjectedFault::None;
    }
    return countdown_-- == 0 ? fault_ : InjectedFault::None;
}

IoPool::IoPool(const DirectFile & file, int queue_depth, FaultPlan * faults)
    : file_(file), faults_(faults ? faults : &own_faults_) {
    if (queue_depth < 1) {
        throw std::invalid_argument("queue depth must be at least 1, got " + std::to_string(queue_depth));
    }
    workers_.reserve((size_t) queue_depth);
    for (int i = 0; i < queue_depth; ++i) {
        workers_.emplace_back([this] { run(); });
    }
}

IoPool::~IoPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    cv_.notify_all();
    for (auto & t : workers_) {
        t.join();
    }
}

void IoPool::submit(PendingRead * const * reads, size_t n) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t i = 0; i < n; ++i) {
            reads[i]->state.store(PendingRead::kQueued, std::memory_order_relaxed);
            queue_.push_back(reads[i]);
        }
    }
    if (n == 1) {
        cv_.notify_one();
    } else if (n > 1) {
        cv_.notify_all();
    }
}

void IoPool::fail(PendingRead & read, const std::string & what) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (error_.empty()) {
            error_ = what;
        }
    }
    read.done_ns = steady_now_ns();
    read.state.store(PendingRead::kFailed, std::memory_order_release);
}

void IoPool::run() {
    for (;;) {
        PendingRead * read = nullptr;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
            if (stopping_ && queue_.empty()) {
                return;
            }
            read = queue_.front();
            queue_.pop_front();
        }
        const InjectedFault fault = faults_->next();
        if (fault == InjectedFault::Eio) {
            fail(*read, read_error_message(file_, read->offset, read->length, "Input/output error (injected)"));
            continue;
        }
        if (fault == InjectedFault::ShortRead) {
            fail(*read, short_read_message(file_, read->offset, read->length, read->length / 2) + " (injected)");
            continue;
        }
        try {
            file_.read_exact(read->offset, read->dst, read->length);
        } catch (const std::exception & e) {
            fail(*read, e.what());
            continue;
        }
        reads_done_.fetch_add(1, std::memory_order_relaxed);
        bytes_read_.fetch_add(read->length, std::memory_order_relaxed);
        read->done_ns = steady_now_ns();
        read->state.store(PendingRead::kDone, std::memory_order_release);
    }
}

void IoPool::wait(const PendingRead & read) const {
    // reads take tens of microseconds: spin briefly, then yield the core to the readers
    for (int spins = 0;; ++spins) {
        const int state = read.state.load(std::memory_order_acquire);
        if (state == PendingRead::kDone) {
            return;
        }
        if (state == PendingRead::kFailed) {
            throw IoError(error());
        }
        if (spins < 256) {
            NL_CPU_RELAX();
        } else {
            std::this_thread::yield();
        }
    }
}

std::string IoPool::error() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
}

void IoPool::clear_error() {
    std::lock_guard<std::mutex> lock(mutex_);
    error_.clear();
}

ProbeResult probe_reads(const std::string & path, size_t read_size, int queue_depth, uint64_t n_reads,
                        uint64_t seed, bool direct, bool in_order) {
    if (read_size == 0 || read_size % kDirectAlign) {
        throw std::invalid_argument("read size must be a positive multiple of " + std::to_string(kDirectAlign));
    }
    DirectFile file(path, direct);
    if (file.size() < read_size) {
        throw std::invalid_argument(path + ": " + std::to_string(file.size()) + " bytes, smaller than one read of " +
                                    std::to_string(read_size));
    }
    const uint64_t slots = (file.size() - read_size) / kDirectAlign + 1;
    std::mt19937_64 rng(seed);
    // a ring of buffers twice the queue depth: a buffer is reused only once its read completed
    const size_t ring = (size_t) std::min<uint64_t>(n_reads, 2 * (uint64_t) queue_depth);
    std::vector<AlignedBuffer> buffers;
    for (size_t i = 0; i < ring; ++i) buffers.emplace_back(read_size);
    std::vector<std::unique_ptr<PendingRead>> reads(ring);
    for (auto & r : reads) r = std::make_unique<PendingRead>();
    IoPool pool(file, queue_depth);
    ProbeResult result;
    result.direct = file.direct();
    const uint64_t start = steady_now_ns();
    for (uint64_t i = 0; i < n_reads + ring; ++i) {
        PendingRead & r = *reads[i % ring];
        if (i >= ring) {
            pool.wait(r);
        }
        if (i < n_reads) {
            // in order: the blocks that fit whole, one after the other, over and over
            r.offset = in_order ? (i % (file.size() / read_size)) * read_size : (rng() % slots) * kDirectAlign;
            r.length = read_size;
            r.dst = buffers[i % ring].data();
            PendingRead * batch[] = { &r };
            pool.submit(batch, 1);
        }
    }
    result.seconds = (double) (steady_now_ns() - start) * 1e-9;
    result.reads = n_reads;
    result.bytes = n_reads * read_size;
    return result;
}

} // namespace neuralink
