#include "neuralink/read_queue.h"

#include "neuralink/errors.h"
#include "neuralink/names.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(__linux__) && __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define NL_HAVE_URING 1
#else
#define NL_HAVE_URING 0
#endif

namespace neuralink {

static constexpr Named<IoBackend> kIoBackendNames[] = {
    { IoBackend::Auto, "auto" }, { IoBackend::Uring, "uring" }, { IoBackend::Pread, "pread" },
};

const char * io_backend_name(IoBackend b) { return name_in(kIoBackendNames, b); }
IoBackend io_backend_from_name(const std::string & name) { return value_in(kIoBackendNames, name, "I/O backend"); }

namespace {

class PoolQueue : public ReadQueue {
public:
    explicit PoolQueue(IoPool & pool) : pool_(pool) {}
    // a compute thread submits one batch per layer and waits for all of it before the next,
    // so the last batch is all that drain() may have to wait for
    void submit(PendingRead * const * reads, size_t n) override {
        submitted_.assign(reads, reads + n);
        pool_.submit(reads, n);
    }
    void wait(PendingRead & read) override { pool_.wait(read); }
    void drain() override {
        for (PendingRead * r : submitted_) {
            while (r->state.load(std::memory_order_acquire) == PendingRead::kQueued) std::this_thread::yield();
        }
        submitted_.clear();
    }

private:
    IoPool & pool_;
    std::vector<PendingRead *> submitted_;
};

#if NL_HAVE_URING

int uring_setup(unsigned entries, io_uring_params * p) { return (int) syscall(__NR_io_uring_setup, entries, p); }
int uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
    return (int) syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0);
}

// One thread's ring: reads beyond the ring's size wait in a backlog and go in as
// completions free slots, so all reads of a layer can be submitted at once.
class UringQueue : public ReadQueue {
public:
    UringQueue(const DirectFile & file, FaultPlan & faults) : file_(file), faults_(faults) {}

    bool init(unsigned entries, std::string * why) {
        io_uring_params p {};
        fd_ = uring_setup(entries, &p);
        if (fd_ < 0) {
            *why = std::string("io_uring_setup failed: ") + std::strerror(errno);
            return false;
        }
        entries_ = p.sq_entries;
        sq_size_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
        cq_size_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
        if (p.features & IORING_FEAT_SINGLE_MMAP) {
            sq_size_ = cq_size_ = std::max(sq_size_, cq_size_);
        }
        sq_ptr_ = mmap(nullptr, sq_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_SQ_RING);
        if (sq_ptr_ == MAP_FAILED) {
            sq_ptr_ = nullptr;
            *why = std::string("mapping the io_uring submission ring failed: ") + std::strerror(errno);
            return false;
        }
        if (p.features & IORING_FEAT_SINGLE_MMAP) {
            cq_ptr_ = sq_ptr_;
        } else {
            cq_ptr_ = mmap(nullptr, cq_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_CQ_RING);
            if (cq_ptr_ == MAP_FAILED) {
                cq_ptr_ = nullptr;
                *why = std::string("mapping the io_uring completion ring failed: ") + std::strerror(errno);
                return false;
            }
        }
        sqes_size_ = p.sq_entries * sizeof(io_uring_sqe);
        sqes_ = (io_uring_sqe *) mmap(nullptr, sqes_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                                      IORING_OFF_SQES);
        if (sqes_ == MAP_FAILED) {
            sqes_ = nullptr;
            *why = std::string("mapping the io_uring entries failed: ") + std::strerror(errno);
            return false;
        }
        auto * sq = (uint8_t *) sq_ptr_;
        auto * cq = (uint8_t *) cq_ptr_;
        sq_tail_ = (unsigned *) (sq + p.sq_off.tail);
        sq_mask_ = *(unsigned *) (sq + p.sq_off.ring_mask);
        sq_array_ = (unsigned *) (sq + p.sq_off.array);
        cq_head_ = (unsigned *) (cq + p.cq_off.head);
        cq_tail_ = (unsigned *) (cq + p.cq_off.tail);
        cq_mask_ = *(unsigned *) (cq + p.cq_off.ring_mask);
        cqes_ = (io_uring_cqe *) (cq + p.cq_off.cqes);
        return true;
    }

    ~UringQueue() override {
        drain();
        if (sqes_) munmap(sqes_, sqes_size_);
        if (cq_ptr_ && cq_ptr_ != sq_ptr_) munmap(cq_ptr_, cq_size_);
        if (sq_ptr_) munmap(sq_ptr_, sq_size_);
        if (fd_ >= 0) close(fd_);
    }

    void submit(PendingRead * const * reads, size_t n) override {
        for (size_t i = 0; i < n; ++i) {
            reads[i]->state.store(PendingRead::kQueued, std::memory_order_relaxed);
            backlog_.push_back(reads[i]);
        }
        flush();
    }

    void wait(PendingRead & read) override {
        for (;;) {
            reap();
            const int state = read.state.load(std::memory_order_acquire);
            if (state == PendingRead::kDone) return;
            if (state == PendingRead::kFailed) throw IoError(error_);
            flush();
            if (uring_enter(fd_, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) {
                fail_all(std::string("io_uring_enter failed: ") + std::strerror(errno));
            }
        }
    }

    void drain() override {
        while (in_flight_ > 0) {
            reap();
            if (in_flight_ > 0 && uring_enter(fd_, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) break;
        }
        for (PendingRead * r : backlog_) {
            r->state.store(PendingRead::kFailed, std::memory_order_release);
        }
        backlog_.clear();
    }

private:
    void finish(PendingRead & read, int state) {
        read.done_ns = steady_now_ns();
        read.state.store(state, std::memory_order_release);
    }

    // a waiter for a failed read gets the latest failure's message: its own, as reads are waited in order
    void fail_read(PendingRead & read, const std::string & what) {
        error_ = what;
        finish(read, PendingRead::kFailed);
    }

    void fail_all(const std::string & what) {
        for (PendingRead * r : backlog_) fail_read(*r, what);
        backlog_.clear();
    }

    // moves backlog reads into free ring slots and tells the kernel
    void flush() {
        unsigned queued = 0;
        unsigned tail = *sq_tail_;
        while (!backlog_.empty() && in_flight_ < entries_) {
            PendingRead * read = backlog_.front();
            backlog_.pop_front();
            const InjectedFault fault = faults_.next();
            if (fault == InjectedFault::Eio) {
                fail_read(*read, read_error_message(file_, read->offset, read->length, "Input/output error (injected)"));
                continue;
            }
            if (fault == InjectedFault::ShortRead) {
                fail_read(*read, short_read_message(file_, read->offset, read->length, read->length / 2) + " (injected)");
                continue;
            }
            const unsigned index = tail & sq_mask_;
            io_uring_sqe & sqe = sqes_[index];
            std::memset(&sqe, 0, sizeof(sqe));
            sqe.opcode = IORING_OP_READ;
            sqe.fd = file_.fd();
            sqe.addr = (uint64_t) (uintptr_t) read->dst;
            sqe.len = (uint32_t) read->length;
            sqe.off = read->offset;
            sqe.user_data = (uint64_t) (uintptr_t) read;
            sq_array_[index] = index;
            ++tail;
            ++queued;
            ++in_flight_;
        }
        if (queued == 0) return;
        __atomic_store_n(sq_tail_, tail, __ATOMIC_RELEASE);
        int submitted;
        do {
            submitted = uring_enter(fd_, queued, 0, 0);
        } while (submitted < 0 && errno == EINTR);
        if (submitted < 0) {
            fail_all(std::string("io_uring_enter failed: ") + std::strerror(errno));
        }
    }

    // a read may run past the end of the file by less than a block (a direct read's aligned length), as
    // DirectFile::read_exact allows: what lies before the end must come back
    uint64_t expected_bytes(const PendingRead & read) const {
        const uint64_t end = file_.size();
        return read.offset >= end ? 0 : std::min<uint64_t>(read.length, end - read.offset);
    }

    void reap() {
        unsigned head = *cq_head_;
        const unsigned tail = __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE);
        for (; head != tail; ++head) {
            const io_uring_cqe & cqe = cqes_[head & cq_mask_];
            auto * read = (PendingRead *) (uintptr_t) cqe.user_data;
            --in_flight_;
            if (cqe.res < 0) {
                fail_read(*read, read_error_message(file_, read->offset, read->length, std::strerror(-cqe.res)));
            } else if ((uint64_t) cqe.res < expected_bytes(*read)) {
                fail_read(*read, short_read_message(file_, read->offset, read->length, (uint64_t) cqe.res));
            } else {
                finish(*read, PendingRead::kDone);
            }
        }
        __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
    }

    const DirectFile & file_;
    FaultPlan & faults_;
    int fd_ = -1;
    unsigned entries_ = 0;
    unsigned in_flight_ = 0;
    void * sq_ptr_ = nullptr;
    void * cq_ptr_ = nullptr;
    size_t sq_size_ = 0, cq_size_ = 0, sqes_size_ = 0;
    io_uring_sqe * sqes_ = nullptr;
    unsigned * sq_tail_ = nullptr;
    unsigned * sq_array_ = nullptr;
    unsigned sq_mask_ = 0;
    unsigned * cq_head_ = nullptr;
    unsigned * cq_tail_ = nullptr;
    unsigned cq_mask_ = 0;
    io_uring_cqe * cqes_ = nullptr;
    std::deque<PendingRead *> backlog_;
    std::string error_;
};

#endif

} // namespace

std::unique_ptr<ReadQueue> make_pool_queue(IoPool & pool) {
    return std::make_unique<PoolQueue>(pool);
}

std::unique_ptr<ReadQueue> make_uring_queue(const DirectFile & file, unsigned entries, FaultPlan & faults,
                                            std::string * why) {
#if NL_HAVE_URING
    auto q = std::make_unique<UringQueue>(file, faults);
    if (!q->init(std::max(1u, entries), why)) {
        return nullptr;
    }
    return q;
#else
    (void) file; (void) entries; (void) faults;
    *why = "io_uring is not available on this platform";
    return nullptr;
#endif
}

bool uring_available(std::string * why) {
    static std::once_flag once;
    static bool ok = false;
    static std::string reason;
#if NL_HAVE_URING
    std::call_once(once, [] {
        io_uring_params p {};
        const int fd = uring_setup(4, &p);
        if (fd < 0) {
            reason = std::string("io_uring_setup failed: ") + std::strerror(errno);
        } else {
            ok = true;
            close(fd);
        }
    });
#else
    std::call_once(once, [] { reason = "io_uring is not available on this platform"; });
#endif
    if (why) *why = reason;
    return ok;
}

} // namespace neuralink
