#pragma once

// The sidecar's bundle store, as the engine reads it: per layer, where the
// records are, how one is laid out, the thresholds that define "active", the
// placement's statistics and every record's checksum. Format: docs/sidecar.md.
//
// Two layouts: "joint" keeps one record per neuron ([gate | up | down]);
// "split" keeps the down columns in a second region of their own, so that a
// neuron's down column is read only once its up row has shown it is needed.

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
    BundleRegion region;               // records of [gate | up | down] (joint) or [gate | up] (split)
    BundleRegion down_region;          // split: one down column per record; joint: no records
    RecordPart gate, up, down;         // down's offset is within down_region's records when split
    float threshold = 0.0f;            // the criterion value above which a neuron is active
    float candidate_threshold = 0.0f;  // contribution: |act(gate)| * candidate_scale above it reads the up row
    std::vector<int32_t> order;        // original index of the neuron at each position
    std::vector<float> frequency;      // activation frequency at each position
    std::vector<float> candidate_frequency; // contribution: how often the up row is read (else = frequency)
    std::vector<int32_t> chain_starts; // positions where a chain of linked neurons begins
    // contribution: per position, E|up| * |down column| (scales the gate for candidates) and |down column|
    std::vector<float> candidate_scale;
    std::vector<float> down_norm;
    std::vector<uint64_t> record_hash; // checksum64 of each record of `region`
    std::vector<uint64_t> down_hash;   // checksum64 of each record of `down_region` (split)
    // the low-rank activity predictor, when the sidecar has one: scores = B (A x)
    std::vector<float> predictor_a;    // rank rows of n_embd
    std::vector<float> predictor_b;    // n_ff rows of rank, placed order
    float predictor_threshold = 0.0f;  // a score above it predicts the neuron active
};

// How "active" is judged, as the sidecar records it (neuralink.placement.criterion):
// relu: act(x) != 0; gate_magnitude: |act(gate)| > t; magnitude: |act(gate) * up| > t;
// contribution: |act(gate) * up| * |down column| > t, its up row read only when
// |act(gate)| * candidate_scale > candidate_threshold.
enum class Criterion { NativeZero, GateMagnitude, OutputMagnitude, Contribution };

// A byte range of the converted GGUF that llama.cpp reads (its header, a tensor the sidecar does not
// replace) and the block_checksum64 the conversion recorded for it.
struct ModelRange {
    uint64_t offset = 0;
    uint64_t nbytes = 0;
    uint64_t checksum = 0;
};
Criterion criterion_from_name(const std::string & name);  // "relu", "gate_magnitude", "magnitude", "contribution"

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
    // the predictor to run by default: the one the conversion's quality search validated, else "dense"
    const std::string & default_predictor() const { return default_predictor_; }
    // rank of the low-rank predictor, 0 when the sidecar has none
    int predictor_rank() const { return predictor_rank_; }
    // down columns in a region of their own (the "split" layout)
    bool split() const { return split_; }
    // the converted GGUF's checksummed ranges (verify_model_file); empty in sidecars written before them
    const std::vector<ModelRange> & model_ranges() const { return model_ranges_; }
    // each layer's ffn_down in the converted GGUF and its checksum (SparseFfn::use_down_rows verifies the rows it
    // holds against it); empty in sidecars written before them
    const std::vector<ModelRange> & down_row_ranges() const { return down_row_ranges_; }
    const DirectFile & file() const { return *file_; }

    // Throws IoError when the file's size or modification time changed since it was opened.
    void check_unchanged() const;
    // Throws IoError naming the layer and neuron when `record` (of the down region when `down`) fails its checksum.
    void check_record(int il, bool down, uint32_t pos, const uint8_t * record) const;

private:
    std::unique_ptr<DirectFile> file_;
    std::string model_id_;
    std::string criterion_;
    Criterion criterion_kind_ = Criterion::GateMagnitude;
    int64_t n_embd_ = 0;
    int64_t n_ff_ = 0;
    bool gated_ = false;
    bool bundle_gate_ = false;
    bool split_ = false;
    std::string default_predictor_ = "dense";
    int predictor_rank_ = 0;
    Activation activation_ = Activation::Silu;
    std::vector<SidecarLayer> layers_;
    std::vector<ModelRange> model_ranges_;
    std::vector<ModelRange> down_row_ranges_;
    int64_t mtime_ns_ = 0;
    uint64_t size_ = 0;
};

// The sidecar format version this engine reads, its container name and alignment.
constexpr uint32_t kSidecarVersion = 2;
constexpr const char * kSidecarArchitecture = "neuralink_sidecar";
constexpr size_t kSidecarAlignment = 4096;

} // namespace neuralink
