#pragma once

// Gate rows read every time their layer runs, instead of kept resident. When a
// memory budget cannot hold every layer's gate rows (207 MiB of
// Qwen2.5-Coder-1.5B), the rows of some layers are read from the converted
// GGUF, where each layer's gate tensor is one contiguous range, into one of two
// buffers. As soon as a layer has its rows, the read of the next streamed layer
// starts on a thread of its own, so it overlaps this layer's FFN and the next
// layer's attention: a long sequential read that no prediction has to wait for.

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

// Where one layer's gate rows lie in the model file; bytes 0: the layer's rows stay resident.
struct GateRange {
    uint64_t offset = 0;
    size_t bytes = 0;
};

class GateStream {
public:
    // layers[il]: layer il's range (bytes 0 where it is not streamed). `faults` decides which reads fail on
    // purpose (tests); may be null. Throws std::invalid_argument when no layer is streamed.
    GateStream(std::shared_ptr<const DirectFile> file, std::vector<GateRange> layers, FaultPlan * faults = nullptr);
    ~GateStream();

    GateStream(const GateStream &) = delete;
    GateStream & operator=(const GateStream &) = delete;

    bool streams(int il) const { return il >= 0 && il < (int) layers_.size() && layers_[(size_t) il].bytes > 0; }
    int n_streamed() const { return n_streamed_; }
    // Layer il's gate rows (valid until the next acquire), read now or waited for; then starts reading the next
    // streamed layer. One caller at a time. Throws IoError when the read failed (the next acquire reads again).
    const uint8_t * acquire(int il);
    // the two buffers
    size_t buffer_bytes() const;
    // bytes of the streamed layers' rows: what streaming keeps out of DRAM
    uint64_t streamed_bytes() const;
    // time acquire spent waiting for reads, in all (the part of the reads compute did not hide)
    uint64_t wait_ns() const { return wait_ns_; }

private:
    enum class State { Empty, Reading, Ready, Failed };
    struct Slot {
        AlignedBuffer buf;
        int layer = -1;
        State state = State::Empty;
        const uint8_t * data = nullptr;
        std::string error;
    };

    int next_after(int il) const;
    // reads layer il into `slot` (no lock held); sets data or error
    void read_into(Slot & slot, int il);
    void run();

    std::shared_ptr<const DirectFile> file_;
    std::vector<GateRange> layers_;
    FaultPlan * faults_;
    int n_streamed_ = 0;
    Slot slots_[2];
    std::mutex mutex_;
    std::condition_variable changed_;
    int request_ = -1; // slot the reader thread is to fill, -1: none
    bool stop_ = false;
    uint64_t wait_ns_ = 0;
    std::thread reader_;
};

} // namespace neuralink
