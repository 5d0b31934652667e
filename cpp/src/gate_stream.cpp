#include "neuralink/gate_stream.h"

#include "neuralink/errors.h"

#include <stdexcept>

namespace neuralink {

// the streamed layers' ranges in layer order (RegionStream refuses an empty list and ranges past the file's end)
static std::vector<FileRange> streamed_ranges(const std::vector<GateRange> & layers, std::vector<int> & item_of) {
    std::vector<FileRange> items;
    for (const GateRange & r : layers) {
        item_of.push_back(r.bytes == 0 ? -1 : (int) items.size());
        if (r.bytes > 0) items.push_back({ r.offset, r.bytes });
    }
    return items;
}

GateStream::GateStream(std::shared_ptr<const DirectFile> file, std::vector<GateRange> layers, FaultPlan * faults,
                       IoBackend backend)
    : file_(std::move(file)) {
    stream_ = std::make_unique<RegionStream>(*file_, streamed_ranges(layers, item_of_), faults, backend,
                                             kStreamChunkBytes, kGateStreamBuffers);
}

const uint8_t * GateStream::acquire(int il) {
    if (!streams(il)) {
        throw std::invalid_argument("layer " + std::to_string(il) + "'s gate rows are not streamed");
    }
    const int k = item_of_[(size_t) il];
    // the layer before not released (its evaluation failed part way): its buffer takes the next streamed layer
    if (held_ >= 0 && held_ != k) stream_->release((size_t) held_);
    held_ = k;
    stream_->prepare((size_t) k, 1);
    return stream_->wait((size_t) k);
}

void GateStream::release(int il) {
    if (!streams(il) || held_ != item_of_[(size_t) il]) {
        return;
    }
    stream_->release((size_t) held_);
    held_ = -1;
}

} // namespace neuralink
