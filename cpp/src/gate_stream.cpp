#include "neuralink/gate_stream.h"

#include "neuralink/errors.h"

#include <stdexcept>

namespace neuralink {

static std::vector<FileRange> streamed_ranges(const DirectFile & file, const std::vector<GateRange> & layers,
                                              std::vector<int> & item_of) {
    std::vector<FileRange> items;
    for (const GateRange & r : layers) {
        if (r.bytes == 0) {
            item_of.push_back(-1);
            continue;
        }
        if (r.offset + r.bytes > file.size()) {
            throw std::invalid_argument(file.path() + ": gate rows at offset " + std::to_string(r.offset) +
                                        " run past the end of the file");
        }
        item_of.push_back((int) items.size());
        items.push_back({ r.offset, r.bytes });
    }
    if (items.empty()) {
        throw std::invalid_argument("no layer's gate rows to stream");
    }
    return items;
}

GateStream::GateStream(std::shared_ptr<const DirectFile> file, std::vector<GateRange> layers, FaultPlan * faults,
                       IoBackend backend)
    : file_(std::move(file)) {
    stream_ = std::make_unique<RegionStream>(*file_, streamed_ranges(*file_, layers, item_of_), faults, backend);
}

const uint8_t * GateStream::acquire(int il) {
    if (!streams(il)) {
        throw std::invalid_argument("layer " + std::to_string(il) + "'s gate rows are not streamed");
    }
    const int k = item_of_[(size_t) il];
    // done with the layer before: its buffer takes the next streamed layer
    if (held_ >= 0 && held_ != k) stream_->release((size_t) held_);
    held_ = k;
    stream_->prepare((size_t) k, 1);
    return stream_->wait((size_t) k);
}

} // namespace neuralink
