#pragma once

// The sidecar's bundle store, as the engine reads it: per layer, where the
// records are, how one is laid out, the threshold that defines "active" and
// the placement's statistics. Format: docs/sidecar.md.

#include "neuralink/direct_file.h"
#include "neuralink/ffn_layer.h"
#include "neuralink/read_planner.h"

#include "ggml.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace neuralink {

// One weight vector inside a record: n_embd values of `type` at byte `offset`.
struct RecordPart {
    const WeightType * wt = nullptr; // null when the part is absent (gate of a non-gated model)
    size_t offset = 0;
    size_t nbytes = 0;
};

struct SidecarLayer {
    BundleRegion region;
    RecordPart gate, up, down;
    float threshold = 0.0f;            // activation magnitude defining "active" on calibration text
    std::vector<int32_t> order;        // original index of the neuron at each position
    std::vector<float> frequency;      // activation frequency at each position
    std::vector<int32_t> chain_starts; // positions where a chain of linked neurons begins
    // the low-rank activity predictor, when the sidecar has one: scores = B (A x)
    std::vector<float> predictor_a;    // rank rows of n_embd
    std::vector<float> predictor_b;    // n_ff rows of rank, placed order
    float predictor_threshold = 0.0f;  // a score above it predicts the neuron active
};

// How "active" is judged, as the sidecar records it (neuralink.placement.criterion).
enum class Criterion { NativeZero, GateMagnitude, OutputMagnitude };
Criterion criterion_from_name(const std::string & name);  // "relu", "gate_magnitude", "magnitude"

class SidecarStore {
public:
    // Validates the container, version, alignment and every layer's layout and
    // tensor bounds before reading anything else; `expected_model_id` (when not
    // empty) must equal the sidecar's. Throws ModelFileError naming the file.
    SidecarStore(const std::string & path, const std::string & expected_model_id, bool direct_io);

    const std::string & path() const { return file_->path(); }
    const std::string & model_id() const { return model_id_; }
    int n_layer() const { return (int) layers_.size(); }
    int64_t n_embd() const { return n_embd_; }
    int64_t n_ff() const { return n_ff_; }
    bool gated() const { return gated_; }
    // records hold gate rows; when a gated model's do not, the engine keeps gate rows resident
    bool bundle_gate() const { return bundle_gate_; }
    Activation activation() const { return activation_; }
    const std::string & criterion() const { return criterion_; }
    // criterion(), resolved once when the sidecar is opened
    Criterion criterion_kind() const { return criterion_kind_; }
    const SidecarLayer & layer(int il) const { return layers_.at((size_t) il); }
    // rank of the low-rank predictor, 0 when the sidecar has none
    int predictor_rank() const { return predictor_rank_; }
    const DirectFile & file() const { return *file_; }

    // Throws IoError when the file's size or modification time changed since it was opened.
    void check_unchanged() const;

private:
    std::unique_ptr<DirectFile> file_;
    std::string model_id_;
    std::string criterion_;
    Criterion criterion_kind_ = Criterion::GateMagnitude;
    int64_t n_embd_ = 0;
    int64_t n_ff_ = 0;
    bool gated_ = false;
    bool bundle_gate_ = false;
    int predictor_rank_ = 0;
    Activation activation_ = Activation::Silu;
    std::vector<SidecarLayer> layers_;
    int64_t mtime_ns_ = 0;
    uint64_t size_ = 0;
};

// The sidecar format version this engine reads, its container name and alignment.
constexpr uint32_t kSidecarVersion = 1;
constexpr const char * kSidecarArchitecture = "neuralink_sidecar";
constexpr size_t kSidecarAlignment = 4096;

} // namespace neuralink
