#pragma once

// Record regions read whole, ahead of the layer that needs them (the `stream`
// cache policy). When most of a layer's records are needed every token (a
// gated model at a third of its neurons: the collapsed reads cover 95 % of
// each region anyway), reading the regions whole costs about the same bytes,
// and those reads need no prediction: they can start while the layer before
// still computes. The regions of all layers form one cyclic sequence of items
// (layer 0's bundle region, its down region, layer 1's bundle region, ...);
// two buffers hold two consecutive items, and releasing one submits the reads
// of the next item into it. Reads go through io_uring (no thread of ours: on a
// 2-core machine a reader thread competes with llama.cpp's spinning compute
// threads and falls behind), or the pread pool where the kernel refuses it;
// an item is read as chunks of at most `chunk_bytes`, all in flight at once.

#include "neuralink/defaults.h"
#include "neuralink/direct_file.h"
#include "neuralink/file_range.h"
#include "neuralink/io_pool.h"
#include "neuralink/read_queue.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace neuralink {

class RegionStream {
public:
    // `file` must outlive the stream. `items` in the order they are used, cyclically; every item's bytes > 0. The
    // reads of items 0 and 1 (of item 0 with one buffer) start at once. `faults` decides which reads fail on
    // purpose (tests); may be null. `n_buffers`: 2, one item in use while the next is read; or 1, where an item's
    // use ends well before the next item is needed (the gate rows: done with after the prediction), so that
    // releasing it starts the next read in time. Throws std::invalid_argument for no items, an empty item or one
    // past the end of the file, or n_buffers not 1 or 2; IoError when io_uring was asked for and the kernel
    // refuses it.
    RegionStream(const DirectFile & file, std::vector<FileRange> items, FaultPlan * faults = nullptr,
                 IoBackend backend = IoBackend::Auto, uint64_t chunk_bytes = kStreamChunkBytes, size_t n_buffers = 2);
    ~RegionStream();

    RegionStream(const RegionStream &) = delete;
    RegionStream & operator=(const RegionStream &) = delete;

    size_t n_items() const { return items_.size(); }
    const FileRange & item(size_t k) const { return items_.at(k); }

    // Makes items k .. k + count - 1 (count 1 or 2, at most the buffers) held, read ahead or reading. When one is
    // not (taken out of order, or after a failed evaluation skipped some), the reads in flight land, the buffers
    // are dropped and the stream starts over at k. Only while no thread uses an item's bytes.
    void prepare(size_t k, size_t count);
    // Item k's bytes (from its first byte), read ahead or waited for; valid until k is released. Any number of
    // threads may wait for a held item at once. Throws IoError when the item's read failed (prepare reads it
    // again), std::logic_error when k is not held.
    const uint8_t * wait(size_t k);
    // Done with item k: its buffer takes the next item not yet held. Nothing when k is not held.
    void release(size_t k);

    // the buffers (one or two)
    size_t buffer_bytes() const { return slots_[0].buf.size() + slots_[1].buf.size(); }
    size_t n_buffers() const { return n_slots_; }
    // device time of item k's last completed read (0 before one completed)
    uint64_t read_ns(size_t k) const;
    // the buffer one item needs: its aligned span, what a direct read covers
    static size_t span_bytes(const FileRange & r);

    // the read path in use (io_uring, or the pread pool)
    IoBackend io_backend() const { return backend_; }

private:
    enum class State { Empty, Reading, Ready, Failed };
    struct Slot {
        AlignedBuffer buf;
        size_t item = SIZE_MAX;
        State state = State::Empty;
        const uint8_t * data = nullptr;
        std::string error;
        std::vector<std::unique_ptr<PendingRead>> chunks; // the reads of the item, n_chunks of them in use
        size_t n_chunks = 0;
        uint64_t submitted_ns = 0;
    };

    int held_slot(size_t k) const;     // -1 when k is not in a slot (lock held)
    void start(Slot & slot, size_t k); // submits item k's reads into `slot` (lock held)
    void land(Slot & slot);            // waits for the slot's reads: Ready or Failed (lock held)
    void start_from(size_t k);         // every buffer takes an item from k on, in order (lock held, reads landed)

    const DirectFile & file_;
    std::vector<FileRange> items_;
    uint64_t chunk_bytes_;
    FaultPlan own_faults_;
    IoBackend backend_ = IoBackend::Pread;
    std::unique_ptr<IoPool> pool_; // the pread path only
    std::unique_ptr<ReadQueue> queue_;
    Slot slots_[2];
    size_t n_slots_ = 2;   // the slots in use: 1 or 2
    size_t next_item_ = 0; // the item the next freed buffer takes
    mutable std::mutex mutex_;
    std::vector<uint64_t> read_ns_;
};

} // namespace neuralink
