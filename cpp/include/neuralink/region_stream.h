#pragma once

// Record regions read whole, ahead of the layer that needs them (the `stream`
// cache policy). When most of a layer's records are needed every token (a
// gated model at a third of its neurons: the collapsed reads cover 95 % of
// each region anyway), reading the regions whole costs about the same bytes,
// and those reads need no prediction: they can start while the layer before
// still computes. The regions of all layers form one cyclic sequence of items
// (layer 0's bundle region, its down region, layer 1's bundle region, ...);
// two buffers hold two consecutive items, and releasing one starts the read of
// the next item into it, on a thread of its own. With budgets that leave no
// room for a cache this keeps the device busy while the CPU computes, instead
// of alternating between them.

#include "neuralink/direct_file.h"
#include "neuralink/io_pool.h"

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace neuralink {

// One contiguous byte range of a file.
struct FileRange {
    uint64_t offset = 0;
    size_t bytes = 0;
};

class RegionStream {
public:
    // `file` must outlive the stream. `items` in the order they are used, cyclically; every item's bytes > 0. The reads of items 0 and 1 start
    // at once. `faults` decides which reads fail on purpose (tests); may be null. Throws std::invalid_argument
    // for no items, an empty item or one past the end of the file.
    RegionStream(const DirectFile & file, std::vector<FileRange> items, FaultPlan * faults = nullptr);
    ~RegionStream();

    RegionStream(const RegionStream &) = delete;
    RegionStream & operator=(const RegionStream &) = delete;

    size_t n_items() const { return items_.size(); }
    const FileRange & item(size_t k) const { return items_.at(k); }

    // Makes items k .. k + count - 1 (count 1 or 2) held, read ahead or reading. When one is not (taken out of
    // order, or after a failed evaluation skipped some), the read in flight lands, both buffers are dropped and
    // the stream starts over at k. Only while no thread uses an item's bytes.
    void prepare(size_t k, size_t count);
    // Item k's bytes (from its first byte), read ahead or waited for; valid until k is released. Any number of
    // threads may wait for a held item at once. Throws IoError when the item's read failed (prepare reads it
    // again), std::logic_error when k is not held.
    const uint8_t * wait(size_t k);
    // Done with item k: its buffer takes the next item not yet held. Nothing when k is not held.
    void release(size_t k);

    // the two buffers
    size_t buffer_bytes() const { return slots_[0].buf.size() + slots_[1].buf.size(); }
    // time wait() spent blocked, in all (the part of the reads compute did not hide)
    uint64_t wait_ns() const;
    // device time of item k's last completed read (0 before one completed)
    uint64_t read_ns(size_t k) const;
    // the buffer one item needs: its aligned span, what a direct read covers
    static size_t span_bytes(const FileRange & r);

private:
    enum class State { Empty, Queued, Reading, Ready, Failed };
    struct Slot {
        AlignedBuffer buf;
        size_t item = SIZE_MAX;
        State state = State::Empty;
        const uint8_t * data = nullptr;
        std::string error;
    };

    int held_slot(size_t k) const; // -1 when k is not in a slot (lock held)
    void queue(Slot & slot, size_t k);
    void read_into(Slot & slot); // no lock held
    void run();

    const DirectFile & file_;
    std::vector<FileRange> items_;
    FaultPlan * faults_;
    Slot slots_[2];
    size_t next_item_ = 0; // the item the next freed buffer takes
    mutable std::mutex mutex_;
    std::condition_variable changed_;
    bool stop_ = false;
    uint64_t wait_ns_ = 0;
    std::vector<uint64_t> read_ns_;
    std::thread reader_;
};

} // namespace neuralink
