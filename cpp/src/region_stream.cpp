#include "neuralink/region_stream.h"

#include "neuralink/errors.h"

#include <algorithm>
#include <stdexcept>

namespace neuralink {

size_t RegionStream::span_bytes(const FileRange & r) {
    return (size_t) (align_up(r.offset + r.bytes, kDirectAlign) - align_down(r.offset, kDirectAlign));
}

RegionStream::RegionStream(const DirectFile & file, std::vector<FileRange> items, FaultPlan * faults)
    : file_(file), items_(std::move(items)), faults_(faults), read_ns_(items_.size(), 0) {
    if (items_.empty()) {
        throw std::invalid_argument(file_.path() + ": no regions to stream");
    }
    size_t largest = 0;
    for (size_t k = 0; k < items_.size(); ++k) {
        const FileRange & r = items_[k];
        if (r.bytes == 0 || r.offset + r.bytes > file_.size()) {
            throw std::invalid_argument(file_.path() + ": region " + std::to_string(k) + " of the stream (" +
                                        std::to_string(r.bytes) + " bytes at offset " + std::to_string(r.offset) +
                                        ") is empty or runs past the end of the file");
        }
        largest = std::max(largest, span_bytes(r));
    }
    for (Slot & s : slots_) s.buf = AlignedBuffer(largest);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        queue(slots_[0], 0);
        queue(slots_[1], 1 % items_.size());
        next_item_ = 2 % items_.size();
    }
    reader_ = std::thread([this] { run(); });
}

RegionStream::~RegionStream() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    changed_.notify_all();
    reader_.join();
}

uint64_t RegionStream::wait_ns() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return wait_ns_;
}

uint64_t RegionStream::read_ns(size_t k) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return read_ns_.at(k);
}

int RegionStream::held_slot(size_t k) const {
    const bool in0 = slots_[0].item == k && slots_[0].state != State::Empty;
    const bool in1 = slots_[1].item == k && slots_[1].state != State::Empty;
    if (in0 && in1) {
        // (one item of all: both buffers hold it) the one that is further along
        return slots_[1].state > slots_[0].state ? 1 : 0;
    }
    return in0 ? 0 : in1 ? 1 : -1;
}

void RegionStream::queue(Slot & slot, size_t k) {
    slot.item = k;
    slot.state = State::Queued;
    slot.data = nullptr;
    slot.error.clear();
}

void RegionStream::read_into(Slot & slot) {
    const FileRange & r = items_[slot.item];
    const bool direct = file_.direct();
    const uint64_t begin = direct ? align_down(r.offset, kDirectAlign) : r.offset;
    const size_t len = direct ? span_bytes(r) : r.bytes;
    const uint64_t start = steady_now_ns();
    try {
        const InjectedFault fault = faults_ ? faults_->next() : InjectedFault::None;
        if (fault != InjectedFault::None) {
            throw IoError(read_error_message(file_, begin, len, fault == InjectedFault::Eio
                                                                         ? "Input/output error (injected)"
                                                                         : "short read (injected)"));
        }
        file_.read_exact(begin, slot.buf.data(), len);
        slot.data = slot.buf.data() + (r.offset - begin);
    } catch (const std::exception & e) {
        slot.error = e.what();
        slot.data = nullptr;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    read_ns_[slot.item] = steady_now_ns() - start;
}

void RegionStream::run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
        changed_.wait(lock, [this] {
            return stop_ || slots_[0].state == State::Queued || slots_[1].state == State::Queued;
        });
        if (stop_) return;
        // both queued (the start, a reposition): the one whose item comes first in use
        int s = slots_[0].state == State::Queued ? 0 : 1;
        if (slots_[0].state == State::Queued && slots_[1].state == State::Queued) {
            const size_t n = items_.size();
            const size_t d = (slots_[1].item + n - slots_[0].item) % n;
            s = d == 1 || d == 0 ? 0 : 1;
        }
        Slot & slot = slots_[s];
        slot.state = State::Reading;
        lock.unlock();
        read_into(slot);
        lock.lock();
        slot.state = slot.data ? State::Ready : State::Failed;
        changed_.notify_all();
    }
}

void RegionStream::prepare(size_t k, size_t count) {
    const size_t n = items_.size();
    if (k >= n || count < 1 || count > 2) {
        throw std::invalid_argument("regions " + std::to_string(k) + " + " + std::to_string(count) +
                                    " of a stream of " + std::to_string(n));
    }
    std::unique_lock<std::mutex> lock(mutex_);
    auto all_held = [&] {
        for (size_t i = 0; i < count; ++i) {
            const int s = held_slot((k + i) % n);
            if (s < 0 || slots_[s].state == State::Failed) return false;
        }
        return true;
    };
    if (all_held()) {
        return;
    }
    // let the read in flight land (it writes into a buffer), then start over at k
    changed_.wait(lock, [this] { return slots_[0].state != State::Reading && slots_[1].state != State::Reading; });
    queue(slots_[0], k);
    queue(slots_[1], (k + 1) % n);
    next_item_ = (k + 2) % n;
    changed_.notify_all();
}

const uint8_t * RegionStream::wait(size_t k) {
    const uint64_t start = steady_now_ns();
    std::unique_lock<std::mutex> lock(mutex_);
    const int s = held_slot(k);
    if (s < 0) {
        throw std::logic_error("region " + std::to_string(k) + " of the stream is not held: prepare it first");
    }
    Slot & slot = slots_[s];
    changed_.wait(lock, [&] { return slot.state == State::Ready || slot.state == State::Failed; });
    wait_ns_ += steady_now_ns() - start;
    if (slot.state == State::Failed) {
        // every waiting thread reports it; prepare() reads it again
        throw IoError(slot.error);
    }
    return slot.data;
}

void RegionStream::release(size_t k) {
    std::unique_lock<std::mutex> lock(mutex_);
    const int s = held_slot(k);
    if (s < 0) {
        return;
    }
    Slot & slot = slots_[s];
    changed_.wait(lock, [&] { return slot.state != State::Reading; });
    queue(slot, next_item_);
    next_item_ = (next_item_ + 1) % items_.size();
    changed_.notify_all();
}

} // namespace neuralink
