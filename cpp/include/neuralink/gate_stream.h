#pragma once

// Gate rows read every time their layer runs, instead of kept resident. When a
// memory budget cannot hold every layer's gate rows (207 MiB of
// Qwen2.5-Coder-1.5B), the rows of some layers are read from the converted
// GGUF, where each layer's gate tensor is one contiguous range, into one
// buffer (a RegionStream over the streamed layers' ranges). Once a layer is
// done with its rows (its prediction; phase 2's gate products for the
// predictors that compute them there) and its own records are in, the buffer
// takes the next streamed layer's rows, whose reads then overlap the down
// projection and the next layer's attention: long sequential reads that no
// prediction has to wait for, queued behind what this layer still needs. A second buffer would let them start a prediction earlier, for a
// layer's rows more in the floor (7.4 MiB on Qwen2.5-Coder-1.5B), and would
// put them ahead of the down region this layer still waits for (the region
// stream submits it at the layer's start): with it Python decoded Qwen under
// 530MB at 4.7-5.1 tok/s, with one buffer 5.5-5.7 (docs/benchmarks.md,
// twenty-sixth pass).

#include "neuralink/direct_file.h"
#include "neuralink/io_pool.h"
#include "neuralink/region_stream.h"

#include <cstdint>
#include <memory>
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
    // purpose (tests); may be null. Throws std::invalid_argument when no layer is streamed or a range runs past
    // the end of the file.
    GateStream(std::shared_ptr<const DirectFile> file, std::vector<GateRange> layers, FaultPlan * faults = nullptr,
               IoBackend backend = IoBackend::Auto);

    bool streams(int il) const { return il >= 0 && il < (int) item_of_.size() && item_of_[(size_t) il] >= 0; }
    int n_streamed() const { return (int) stream_->n_items(); }
    // Layer il's gate rows (valid until release(il) or the next acquire), read ahead or now, waited for. One
    // caller at a time. Throws IoError when the read failed (the next acquire reads again).
    const uint8_t * acquire(int il);
    // Done with layer il's rows: the buffer takes the next streamed layer's. Nothing when il's are not held.
    void release(int il);
    // the buffer
    size_t buffer_bytes() const { return stream_->buffer_bytes(); }

private:
    std::shared_ptr<const DirectFile> file_; // the stream reads it
    std::vector<int> item_of_;               // layer -> its item in the stream, -1 where not streamed
    std::unique_ptr<RegionStream> stream_;
    int held_ = -1;                          // the item acquired last
};

} // namespace neuralink
