#pragma once

// The engine behind llama.cpp's FFN hook: it owns the FFN weights of every
// layer (read by itself from the model file, around the page cache) and
// evaluates the layers llama.cpp hands it.

#include "neuralink/direct_file.h"
#include "neuralink/ffn_layer.h"
#include "neuralink/gguf_model.h"
#include "neuralink/output_screen.h"
#include "neuralink/residency.h"
#include "neuralink/sparse_ffn.h"

#include "llama-ffn-hook.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace neuralink {

struct EngineOptions {
    bool direct_io = true;    // read weights with O_DIRECT (falls back to buffered where refused)
    std::string sidecar_path; // empty: dense, all FFN weights in RAM; else sparse, bundles read from the sidecar
    SparseOptions sparse;     // used with a sidecar
};

// Which layers' down projections would read rows (Engine::down_row_layers): the rows' bytes and the bytes of
// the down columns they replace.
struct DownRowPlan {
    std::vector<int> layers;
    uint64_t row_bytes = 0;
    uint64_t column_bytes = 0;
};

// What Engine::hold_down_rows did: the layers given rows, on trial or in use, and the bytes of the rows and of
// the columns they replace (or sit beside, on trial).
struct DownRowChoice {
    std::vector<int> layers;
    bool trial = false;
    uint64_t row_bytes = 0;
    uint64_t column_bytes = 0;
};

struct LayerStatus {
    int         il = -1;
    bool        loaded = false;  // weights read and usable
    bool        offered = false; // llama.cpp asked the hook about this layer
    bool        taken = false;   // and the engine took it
    std::string reason;          // why not loaded or not taken
};

class Engine {
public:
    // Reads the FFN weights of all layers. Throws std::runtime_error naming
    // the file for unreadable or malformed models.
    explicit Engine(const std::string & model_path, const EngineOptions & options = {});

    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    // the hook to pass to llama_set_ffn_hook; user_data is this engine
    const llama_ffn_hook * hook() const { return &hook_; }

    // hook entry points (see llama-ffn-hook.h)
    int32_t take(const llama_ffn_hook_layer & layer, int32_t * n_phases);
    void    compute(int32_t handle, int32_t phase, const float * x, float * y,
                    int64_t n_tokens, int ith, int nth);

    const GgufModel & model() const { return model_; }
    int n_layer() const { return (int) status_.size(); }
    const std::vector<LayerStatus> & layer_status() const { return status_; }
    const FfnLayer & layer(int il) const;
    // n_embd and n_out of a layer the engine serves (dense or sparse); throws std::out_of_range
    std::pair<int64_t, int64_t> layer_shape(int il) const;
    size_t weight_bytes() const { return weight_bytes_; }
    bool direct_io() const { return direct_io_; }
    const std::string & io_note() const { return io_note_; }
    uint64_t tokens_computed() const { return tokens_computed_; }

    // Evaluates layer il on n_tokens rows of x on the calling thread, with
    // activation `act`: the reference path for tests.
    void forward(int il, Activation act, const float * x, float * y, int64_t n_tokens);

    // Records up to `max_tokens` FFN input rows per layer from now on (dense
    // engine only; 0 stops): calibration data for fitting predictors.
    void capture_inputs(int64_t max_tokens);
    // the rows captured for layer il: n rows of n_embd floats
    const std::vector<float> & captured_inputs(int il) const { return captured_.at((size_t) il); }

    // Reads the gate rows of the first `n_layers` layers that keep them resident from the model file each
    // time the layer runs, and frees their resident copies (SparseFfn::stream_gate_rows): for a memory
    // budget that cannot hold them all (gate_layers_to_stream says how many). Between evaluations, once.
    // Throws std::invalid_argument without a sparse engine, resident gate rows, or n_layers in range.
    void stream_gate_rows(int n_layers);
    // layers whose gate rows the sparse engine keeps resident, in order
    std::vector<int> resident_gate_layers() const;

    // The layers whose down projection would cost less by the converted GGUF's ffn_down rows than by the
    // sidecar's down columns (SparseFfn::down_rows_pay), with their bytes and the columns': none without a sparse
    // engine, with the joint layout, or when the sidecar records no checksums of the rows (conversions before
    // them). For a store held whole in DRAM, where the columns are never read once rows replace them.
    DownRowPlan down_row_layers() const;
    // Every layer whose down rows the engine could multiply (the same conditions, whatever they would cost): the
    // layers try_down_rows puts on trial.
    DownRowPlan down_row_trial_layers() const;
    // Reads the down rows of `layers` from the model file, checks each layer's against the checksum the
    // conversion recorded and hands them to the sparse engine (SparseFfn::use_down_rows). Between evaluations,
    // before the store is read into the cache. Throws std::invalid_argument for a layer whose rows the sidecar
    // has no checksum of (or with the joint layout), ModelFileError naming the file and tensor for rows that fail
    // their checksum.
    void use_down_rows(const std::vector<int> & layers);
    // The same rows, checked the same way, put on trial beside the down columns (SparseFfn::try_down_rows): the
    // first decoded tokens time both and the faster is kept, the rows freed if the columns win. The cache must
    // hold the columns as well as the rows until then.
    void try_down_rows(const std::vector<int> & layers);
    // The rule neuralink.Llama and neuralink-run share, for a sparse engine whose cache holds the whole store,
    // given `room`, the memory the cache may use (what a budget leaves beside everything else): the rows of the
    // layers where they pay by the cost model (down_row_layers) in place of their columns when the store still
    // fits with them (use_down_rows), else none. With `trial`, every layer's rows on trial instead when the room
    // holds them beside the whole store (try_down_rows): faster where the machine multiplies rows faster, but
    // rows and columns are two encodings of the weights, so which one a process keeps (by timing) changes its
    // outputs. Before the store is read into the cache. Throws as use_down_rows does.
    DownRowChoice hold_down_rows(uint64_t room, bool trial);

    // Bounds what llama.cpp's lookups of an untied token embedding keep mapped (residency.h): from now on its
    // pages are unmapped as layer 0 starts each micro-batch. Once llama.cpp has mapped the model; (bytes of
    // the table bounded, why not or '').
    const LookupPages & bound_lookup_pages();

    // Makes the coarse copy of the untied output matrix and offers to take the output product (output_screen.h),
    // for a memory budget: before llama.cpp loads the model (with the output matrix mapped lazily). Throws
    // UnsupportedModelError where OutputScreen::unsupported says why not, IoError for a failed read.
    void screen_output(const OutputScreenOptions & options);
    // Frees it (llama.cpp computes the output product itself from then on, once its graphs are rebuilt): where
    // llama.cpp did not hand the engine the product (a LoRA on the output matrix, say).
    void drop_output_screen();
    // the screen, or null
    const OutputScreen * output_screen() const { return output_screen_.get(); }
    OutputScreen * output_screen() { return output_screen_.get(); }
    // whether llama.cpp handed the output product to the screen when it built its graphs
    bool output_taken() const { return output_taken_; }
    // Whether llama.cpp reads tensor t every token, so it stays resident (residency.h's rule), less the output
    // matrix while the engine screens it.
    bool llama_reads_every_token(const TensorInfo & t) const;
    // the tensor the screen stands in for, which is not locked (lock_every_token_weights's `except`), or ""
    std::string screened_tensor() const { return output_screen_ ? output_screen_->name() : std::string(); }

    // the sparse evaluator when a sidecar is used, else null
    SparseFfn * sparse() { return sparse_.get(); }
    const SparseFfn * sparse() const { return sparse_.get(); }

private:
    void load_layer(int il, DirectFile & file);
    void load_sparse_layer(int il, DirectFile & file);
    std::string check_sparse_layer(const llama_ffn_hook_layer & d) const;
    WeightMatrix load_matrix(const TensorInfo & t, DirectFile & file, bool huge_pages = false);
    std::vector<float> load_vector(const TensorInfo & t, int64_t n, DirectFile & file);
    std::string check_layer(const FfnLayer & L, const llama_ffn_hook_layer & d) const;
    void use_down_rows(const std::vector<int> & layers, bool trial);

    GgufModel model_;
    llama_ffn_hook hook_ {};
    std::vector<LayerStatus> status_;
    std::vector<std::unique_ptr<FfnLayer>> layers_;
    std::vector<AlignedBuffer> storage_;
    std::vector<AlignedBuffer> gate_storage_; // by layer: the sparse engine's resident gate rows
    std::string model_path_;
    FfnScratch scratch_;
    std::unique_ptr<SparseFfn> sparse_;
    int64_t capture_max_tokens_ = 0;
    std::vector<std::vector<float>> captured_;
    size_t weight_bytes_ = 0;
    bool direct_io_ = false;
    std::string io_note_;
    uint64_t tokens_computed_ = 0;
    LookupPages lookup_pages_;
    std::unique_ptr<OutputScreen> output_screen_;
    bool output_taken_ = false;
};

// the hook handle of the output product (layers' handles are their indices)
constexpr int32_t kOutputHandle = 1 << 24;

} // namespace neuralink
