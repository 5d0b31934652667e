#include "neuralink/gate_stream.h"

#include "neuralink/errors.h"

#include <algorithm>
#include <stdexcept>

namespace neuralink {

// the aligned span a direct read of [offset, offset + bytes) covers
static uint64_t span_bytes(const GateRange & r) {
    return align_up(r.offset + r.bytes, kDirectAlign) - align_down(r.offset, kDirectAlign);
}

GateStream::GateStream(std::shared_ptr<const DirectFile> file, std::vector<GateRange> layers, FaultPlan * faults)
    : file_(std::move(file)), layers_(std::move(layers)), faults_(faults) {
    uint64_t largest = 0;
    for (const GateRange & r : layers_) {
        if (r.bytes == 0) continue;
        if (r.offset + r.bytes > file_->size()) {
            throw std::invalid_argument(file_->path() + ": gate rows at offset " + std::to_string(r.offset) +
                                        " run past the end of the file");
        }
        ++n_streamed_;
        largest = std::max(largest, span_bytes(r));
    }
    if (n_streamed_ == 0) {
        throw std::invalid_argument("no layer's gate rows to stream");
    }
    for (Slot & s : slots_) s.buf = AlignedBuffer((size_t) largest);
    reader_ = std::thread([this] { run(); });
}

GateStream::~GateStream() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    changed_.notify_all();
    reader_.join();
}

size_t GateStream::buffer_bytes() const { return slots_[0].buf.size() + slots_[1].buf.size(); }

uint64_t GateStream::streamed_bytes() const {
    uint64_t bytes = 0;
    for (const GateRange & r : layers_) bytes += r.bytes;
    return bytes;
}

int GateStream::next_after(int il) const {
    const int n = (int) layers_.size();
    for (int k = 1; k <= n; ++k) {
        const int j = (il + k) % n;
        if (layers_[(size_t) j].bytes > 0) return j;
    }
    return il;
}

void GateStream::read_into(Slot & slot, int il) {
    const GateRange & r = layers_[(size_t) il];
    const uint64_t begin = file_->direct() ? align_down(r.offset, kDirectAlign) : r.offset;
    const uint64_t len = file_->direct() ? span_bytes(r) : r.bytes;
    try {
        const InjectedFault fault = faults_ ? faults_->next() : InjectedFault::None;
        if (fault != InjectedFault::None) {
            throw IoError(read_error_message(*file_, begin, len, fault == InjectedFault::Eio
                                                                         ? "Input/output error (injected)"
                                                                         : "short read (injected)"));
        }
        file_->read_exact(begin, slot.buf.data(), (size_t) len);
        slot.data = slot.buf.data() + (r.offset - begin);
    } catch (const std::exception & e) {
        slot.error = e.what();
        slot.data = nullptr;
    }
}

void GateStream::run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
        changed_.wait(lock, [this] { return stop_ || request_ >= 0; });
        if (stop_) return;
        Slot & slot = slots_[request_];
        request_ = -1;
        const int il = slot.layer;
        lock.unlock();
        read_into(slot, il);
        lock.lock();
        slot.state = slot.data ? State::Ready : State::Failed;
        changed_.notify_all();
    }
}

const uint8_t * GateStream::acquire(int il) {
    if (!streams(il)) {
        throw std::invalid_argument("layer " + std::to_string(il) + "'s gate rows are not streamed");
    }
    const uint64_t start = steady_now_ns();
    std::unique_lock<std::mutex> lock(mutex_);
    auto reading = [this] { return slots_[0].state == State::Reading || slots_[1].state == State::Reading; };
    int s = -1;
    for (int k = 0; k < 2; ++k) {
        if (slots_[k].layer == il && slots_[k].state != State::Empty) s = k;
    }
    if (s < 0) {
        // not read ahead (the first layer of all, or layers taken out of order): read it here, once the
        // reader is idle so that no read is writing into the slot
        changed_.wait(lock, [&] { return !reading(); });
        s = 0;
        slots_[s].layer = il;
        slots_[s].state = State::Reading;
        slots_[s].error.clear();
        lock.unlock();
        read_into(slots_[s], il);
        lock.lock();
        slots_[s].state = slots_[s].data ? State::Ready : State::Failed;
    } else {
        changed_.wait(lock, [&] { return slots_[s].state != State::Reading; });
    }
    wait_ns_ += steady_now_ns() - start;
    Slot & slot = slots_[s];
    if (slot.state == State::Failed) {
        const std::string error = slot.error;
        slot.state = State::Empty;
        slot.layer = -1;
        throw IoError(error);
    }
    // the other slot held the layer before this one (done with it now): the next streamed layer goes there
    Slot & other = slots_[1 - s];
    changed_.wait(lock, [&] { return other.state != State::Reading; });
    other.layer = next_after(il);
    other.state = State::Reading;
    other.data = nullptr;
    other.error.clear();
    request_ = 1 - s;
    changed_.notify_all();
    return slot.data;
}

} // namespace neuralink
