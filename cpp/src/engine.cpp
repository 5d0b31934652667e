#include "neuralink/engine.h"

#include "neuralink/checksum.h"
#include "neuralink/errors.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace neuralink {

void Engine::capture_inputs(int64_t max_tokens) {
    if (sparse_) {
        throw std::invalid_argument("input capture needs the dense engine (no sidecar)");
    }
    capture_max_tokens_ = max_tokens;
    captured_.assign(status_.size(), {});
}

std::pair<int64_t, int64_t> Engine::layer_shape(int il) const {
    if (sparse_) {
        if (!sparse_->has_layer(il)) {
            throw std::out_of_range("layer " + std::to_string(il) + " is not served from the sidecar");
        }
        return { sparse_->layer(il).n_embd, sparse_->layer(il).n_out };
    }
    const FfnLayer & L = layer(il);
    return { L.n_embd, L.n_out };
}

static bool same_name(const char * a, const std::string & b) {
    return a ? b == a : b.empty();
}

static int32_t hook_take(void * user_data, const llama_ffn_hook_layer * layer, int32_t * n_phases) {
    try {
        return ((Engine *) user_data)->take(*layer, n_phases);
    } catch (const std::exception &) {
        return -1; // leave the layer to llama.cpp rather than let an exception cross the C boundary
    }
}

static void hook_compute(void * user_data, int32_t handle, int32_t phase, const float * x, float * y,
                         int64_t n_tokens, int32_t ith, int32_t nth) {
    ((Engine *) user_data)->compute(handle, phase, x, y, n_tokens, ith, nth);
}

Engine::Engine(const std::string & model_path, const EngineOptions & options) : model_(model_path) {
    init_ggml_cpu();
    hook_.take = hook_take;
    hook_.compute = hook_compute;
    hook_.user_data = this;

    const std::string & arch = model_.architecture();
    const int64_t n_layer = model_.get_int(arch + ".block_count", -1);
    if (n_layer <= 0) {
        throw ModelFileError(model_.path() + ": metadata has no positive " + arch + ".block_count");
    }
    if (model_.get_int(arch + ".expert_count", 0) > 0) {
        throw UnsupportedModelError(model_.path() + ": architecture '" + arch +
                "' has mixture-of-experts FFNs, which neuralink does not support");
    }
    DirectFile file(model_path, options.direct_io);
    model_path_ = model_path;
    direct_io_ = file.direct();
    io_note_ = file.note();
    status_.resize((size_t) n_layer);
    layers_.resize((size_t) n_layer);
    if (!options.sidecar_path.empty()) {
        const std::string model_id = model_.get_string("neuralink.model_id");
        if (model_id.empty()) {
            throw ModelFileError(model_.path() + ": not a model converted by neuralink (no neuralink.model_id); "
                                 "a sidecar belongs to the converted GGUF written with it");
        }
        auto store = std::make_shared<SidecarStore>(options.sidecar_path, model_id, options.direct_io);
        if (store->n_layer() != n_layer) {
            throw ModelFileError(options.sidecar_path + ": holds " + std::to_string(store->n_layer()) +
                                 " layers, the model " + std::to_string(n_layer));
        }
        const Predictor predictor = options.sparse.predictor;
        const Criterion criterion = store->criterion_kind();
        if (predictor == Predictor::Gate && (!store->gated() || criterion == Criterion::OutputMagnitude)) {
            throw UnsupportedModelError(options.sidecar_path + ": the gate predictor needs a gated FFN profiled with a "
                    "criterion it can decide from the gate (contribution, gate_magnitude or relu), this sidecar has " +
                    (store->gated() ? "criterion '" + store->criterion() + "'" : std::string("a non-gated FFN")) +
                    "; use predictor 'dense' or 'oracle', or convert again with the gate criterion");
        }
        if (predictor == Predictor::LowRank && store->predictor_rank() == 0) {
            throw UnsupportedModelError(options.sidecar_path + ": has no low-rank predictor; convert with "
                                        "--lowrank-rank to fit one, or use another predictor");
        }
        if (predictor == Predictor::LowRank && criterion == Criterion::OutputMagnitude) {
            throw UnsupportedModelError(options.sidecar_path + ": the low-rank predictor needs a criterion it can "
                                        "decide from the gate (contribution, gate_magnitude or relu), not '" +
                                        store->criterion() + "'");
        }
        sparse_ = std::make_unique<SparseFfn>(std::move(store), options.sparse);
        for (int il = 0; il < (int) n_layer; ++il) {
            status_[il].il = il;
            load_sparse_layer(il, file);
        }
        return;
    }
    for (int il = 0; il < (int) n_layer; ++il) {
        status_[il].il = il;
        load_layer(il, file);
    }
}

void Engine::load_sparse_layer(int il, DirectFile & file) {
    LayerStatus & st = status_[il];
    const SidecarStore & store = sparse_->store();
    const TensorInfo * up   = model_.find(layer_tensor(il, "ffn_up", "weight"));
    const TensorInfo * down = model_.find(layer_tensor(il, "ffn_down", "weight"));
    const TensorInfo * gate = model_.find(layer_tensor(il, "ffn_gate", "weight"));
    if (!up || !down || (gate != nullptr) != store.gated()) {
        st.reason = "the model's FFN tensors do not match the sidecar (gated " + std::string(store.gated() ? "yes" : "no") + ")";
        return;
    }
    SparseLayerWeights L;
    L.il = il;
    L.act = store.activation();
    L.gated = store.gated();
    L.n_embd = up->ne[0];
    L.n_ff = up->ne[1];
    L.n_out = down->ne[1];
    if (L.n_embd != store.n_embd() || L.n_ff != store.n_ff()) {
        throw ModelFileError(store.path() + ": layer " + std::to_string(il) + " sizes differ from " + model_.path());
    }
    const Predictor predictor = sparse_->options().predictor;
    try {
        // the gate and oracle predictors compute the gate up front; records without gate rows need them too
        const bool gate_first = predictor == Predictor::Gate || predictor == Predictor::Oracle;
        if (L.gated && (gate_first || !store.bundle_gate())) {
            L.gate = load_matrix(*gate, file);
            gate_storage_.resize((size_t) model_.get_int(model_.architecture() + ".block_count", 0));
            gate_storage_.at((size_t) il) = std::move(storage_.back());
            storage_.pop_back();
            if (store.bundle_gate() && L.gate.wt != store.layer(il).gate.wt) {
                throw std::invalid_argument("the sidecar's gate rows are not in the model's gate type");
            }
        }
        // the oracle knows the true active set: from resident up rows (non-gated, or the contribution criterion)
        if (predictor == Predictor::Oracle && (!L.gated || store.criterion_kind() == Criterion::Contribution)) {
            L.up = load_matrix(*up, file);
        }
        if (const TensorInfo * b = model_.find(layer_tensor(il, "ffn_up", "bias"))) {
            L.up_bias = load_vector(*b, L.n_ff, file);
        }
        if (const TensorInfo * b = model_.find(layer_tensor(il, "ffn_gate", "bias"))) {
            L.gate_bias = load_vector(*b, L.n_ff, file);
        }
        if (const TensorInfo * b = model_.find(layer_tensor(il, "ffn_down", "bias"))) {
            L.down_bias = load_vector(*b, L.n_out, file);
        }
    } catch (const std::invalid_argument & e) {
        st.reason = e.what();
        return;
    }
    sparse_->add_layer(std::move(L));
    st.loaded = true;
}

std::vector<int> Engine::resident_gate_layers() const {
    std::vector<int> out;
    // the copies this engine holds (a streamed layer's rows point into a GateStream buffer between evaluations)
    for (int il = 0; il < (int) gate_storage_.size(); ++il) {
        if (gate_storage_[(size_t) il].data()) out.push_back(il);
    }
    return out;
}

void Engine::stream_gate_rows(int n_layers) {
    if (!sparse_) {
        throw std::invalid_argument("streaming gate rows needs the sparse engine (a sidecar)");
    }
    const std::vector<int> resident = resident_gate_layers();
    if (n_layers < 1 || n_layers > (int) resident.size()) {
        throw std::invalid_argument("cannot stream the gate rows of " + std::to_string(n_layers) + " layers: " +
                                    std::to_string(resident.size()) + " layers keep them resident");
    }
    std::vector<GateRange> ranges((size_t) n_layer());
    for (int k = 0; k < n_layers; ++k) {
        const int il = resident[(size_t) k];
        const TensorInfo * t = model_.find(layer_tensor(il, "ffn_gate", "weight"));
        ranges[(size_t) il] = GateRange { t->offset, (size_t) t->nbytes };
    }
    sparse_->stream_gate_rows(std::make_shared<const DirectFile>(model_path_, direct_io_), ranges);
    for (int k = 0; k < n_layers; ++k) {
        const int il = resident[(size_t) k];
        weight_bytes_ -= ranges[(size_t) il].bytes;
        gate_storage_.at((size_t) il) = AlignedBuffer();
    }
}

std::string Engine::check_sparse_layer(const llama_ffn_hook_layer & d) const {
    const SparseLayerWeights & L = sparse_->layer(d.il);
    const std::string up = layer_tensor(d.il, "ffn_up", "weight"), down = layer_tensor(d.il, "ffn_down", "weight"),
            gate = layer_tensor(d.il, "ffn_gate", "weight");
    if (!same_name(d.up, up) || !same_name(d.down, down) || !same_name(d.gate, L.gated ? gate : std::string())) {
        return "the graph uses tensors other than the layer's own";
    }
    if ((d.up_bias != nullptr) != !L.up_bias.empty() || (d.gate_bias != nullptr) != !L.gate_bias.empty() ||
        (d.down_bias != nullptr) != !L.down_bias.empty()) {
        return "biases differ between the graph and the model file";
    }
    if (d.gated != L.gated || d.n_embd != L.n_embd || d.n_ff != L.n_ff || d.n_out != L.n_out) {
        return "shapes or gating differ between the graph and the sidecar";
    }
    if (d.act != (int32_t) L.act) {
        return std::string("llama.cpp uses another activation than the sidecar's ") + activation_name(L.act);
    }
    return "";
}

WeightMatrix Engine::load_matrix(const TensorInfo & t, DirectFile & file, bool huge_pages) {
    std::string why;
    if (!weight_type_supported(t.type, &why)) {
        throw std::invalid_argument("tensor '" + t.name + "': " + why);
    }
    if (t.n_dims > 2) {
        throw std::invalid_argument("tensor '" + t.name + "' has " + std::to_string(t.n_dims) + " dimensions, expected 2");
    }
    WeightMatrix m;
    m.wt = &weight_type(t.type);
    m.name = t.name;
    m.cols = t.ne[0];
    m.rows = t.ne[1];
    m.row_bytes = m.wt->row_bytes(m.cols);
    if (m.row_bytes * (size_t) m.rows != t.nbytes) {
        throw ModelFileError(model_.path() + ": tensor '" + t.name + "' holds " + std::to_string(t.nbytes) +
                " bytes, expected " + std::to_string(m.row_bytes * (size_t) m.rows));
    }
    const uint8_t * start = nullptr;
    storage_.push_back(file.read_range(t.offset, t.nbytes, &start, huge_pages));
    m.data = start;
    weight_bytes_ += t.nbytes;
    return m;
}

std::vector<float> Engine::load_vector(const TensorInfo & t, int64_t n, DirectFile & file) {
    if (t.ne[0] != n || t.ne[1] != 1) {
        throw std::invalid_argument("tensor '" + t.name + "' has shape [" + std::to_string(t.ne[0]) + ", " +
                std::to_string(t.ne[1]) + "], expected [" + std::to_string(n) + "]");
    }
    std::string why;
    if (!weight_type_supported(t.type, &why)) {
        throw std::invalid_argument("tensor '" + t.name + "': " + why);
    }
    const uint8_t * start = nullptr;
    AlignedBuffer buf = file.read_range(t.offset, t.nbytes, &start);
    std::vector<float> v((size_t) n);
    weight_type(t.type).to_float(start, v.data(), n);
    return v;
}

void Engine::load_layer(int il, DirectFile & file) {
    LayerStatus & st = status_[il];
    const TensorInfo * up   = model_.find(layer_tensor(il, "ffn_up", "weight"));
    const TensorInfo * down = model_.find(layer_tensor(il, "ffn_down", "weight"));
    const TensorInfo * gate = model_.find(layer_tensor(il, "ffn_gate", "weight"));
    if (!up || !down) {
        st.reason = "no dense FFN tensors (" + layer_tensor(il, "ffn_up", "weight") + ", " +
                layer_tensor(il, "ffn_down", "weight") + ")";
        return;
    }
    auto L = std::make_unique<FfnLayer>();
    L->il = il;
    try {
        L->up = load_matrix(*up, file);
        L->down = load_matrix(*down, file);
        L->n_embd = L->up.cols;
        L->n_ff = L->up.rows;
        L->n_out = L->down.rows;
        if (L->down.cols != L->n_ff) {
            throw std::invalid_argument("'" + down->name + "' has rows of " + std::to_string(L->down.cols) +
                    ", expected n_ff = " + std::to_string(L->n_ff));
        }
        if (gate) {
            L->gate = load_matrix(*gate, file);
            L->gated = true;
            if (L->gate.cols != L->n_embd || L->gate.rows != L->n_ff) {
                throw std::invalid_argument("'" + gate->name + "' shape differs from '" + up->name + "'");
            }
        }
        if (const TensorInfo * b = model_.find(layer_tensor(il, "ffn_up", "bias"))) {
            L->up_bias = load_vector(*b, L->n_ff, file);
        }
        if (const TensorInfo * b = model_.find(layer_tensor(il, "ffn_gate", "bias"))) {
            L->gate_bias = load_vector(*b, L->n_ff, file);
        }
        if (const TensorInfo * b = model_.find(layer_tensor(il, "ffn_down", "bias"))) {
            L->down_bias = load_vector(*b, L->n_out, file);
        }
    } catch (const std::invalid_argument & e) {
        st.reason = e.what();
        return;
    }
    st.loaded = true;
    layers_[il] = std::move(L);
}

const FfnLayer & Engine::layer(int il) const {
    if (il < 0 || il >= n_layer() || !layers_[il]) {
        throw std::out_of_range("layer " + std::to_string(il) + " has no FFN weights in the engine" +
                (il >= 0 && il < n_layer() ? ": " + status_[il].reason : std::string()));
    }
    return *layers_[il];
}

std::string Engine::check_layer(const FfnLayer & L, const llama_ffn_hook_layer & d) const {
    if (!same_name(d.up, L.up.name) || !same_name(d.down, L.down.name) || !same_name(d.gate, L.gate.name)) {
        return std::string("the graph uses tensors (") + (d.gate ? d.gate : "-") + ", " + (d.up ? d.up : "-") +
                ", " + (d.down ? d.down : "-") + ") other than the layer's own";
    }
    if (d.gated != L.gated) {
        return "gating differs between the graph and the model file";
    }
    if ((d.up_bias != nullptr) != !L.up_bias.empty() || (d.gate_bias != nullptr) != !L.gate_bias.empty() ||
        (d.down_bias != nullptr) != !L.down_bias.empty()) {
        return "biases differ between the graph and the model file";
    }
    if (d.n_embd != L.n_embd || d.n_ff != L.n_ff || d.n_out != L.n_out) {
        return "shapes differ between the graph and the model file";
    }
    if (d.act < LLAMA_FFN_HOOK_ACT_SILU || d.act > LLAMA_FFN_HOOK_ACT_RELU_SQR) {
        return "unknown activation " + std::to_string(d.act);
    }
    return "";
}

void Engine::screen_output(const OutputScreenOptions & options) {
    output_screen_ = std::make_unique<OutputScreen>(model_, options);
    output_taken_ = false;
}

void Engine::drop_output_screen() {
    output_screen_.reset();
    output_taken_ = false;
}

bool Engine::llama_reads_every_token(const TensorInfo & t) const {
    return t.name != screened_tensor() && read_every_token(model_, t);
}

int32_t Engine::take(const llama_ffn_hook_layer & d, int32_t * n_phases) {
    if (d.kind == LLAMA_FFN_HOOK_KIND_OUTPUT) {
        if (!output_screen_ || !same_name(d.up, output_screen_->name()) || d.n_embd != output_screen_->n_embd() ||
                d.n_out != output_screen_->n_vocab()) {
            return -1;
        }
        output_screen_->reserve(d.n_tokens);
        output_taken_ = true;
        *n_phases = OutputScreen::kPhases;
        return kOutputHandle;
    }
    if (d.kind != LLAMA_FFN_HOOK_KIND_FFN || d.il < 0 || d.il >= n_layer()) {
        return -1;
    }
    LayerStatus & st = status_[d.il];
    st.offered = true;
    if (sparse_) {
        if (!sparse_->has_layer(d.il)) {
            st.taken = false;
            return -1;
        }
        const std::string why = check_sparse_layer(d);
        if (!why.empty()) {
            st.taken = false;
            st.reason = why;
            return -1;
        }
        sparse_->reserve(d.il, d.n_tokens);
        st.taken = true;
        *n_phases = SparseFfn::kPhases;
        return d.il;
    }
    if (!layers_[d.il]) {
        st.taken = false;
        return -1;
    }
    FfnLayer & L = *layers_[d.il];
    const std::string why = check_layer(L, d);
    if (!why.empty()) {
        st.taken = false;
        st.reason = why;
        return -1;
    }
    L.act = (Activation) d.act;
    scratch_.reserve(L, d.n_tokens);
    st.taken = true;
    *n_phases = kDensePhases;
    return d.il;
}

const LookupPages & Engine::bound_lookup_pages() {
    lookup_pages_ = neuralink::bound_lookup_pages(model_);
    return lookup_pages_;
}

void Engine::compute(int32_t handle, int32_t phase, const float * x, float * y, int64_t n_tokens, int ith, int nth) {
    if (handle == kOutputHandle) {
        output_screen_->phase(phase, x, y, n_tokens, ith, nth);
        return;
    }
    if (handle == 0 && phase == 0 && ith == 0) {
        release_lookup_pages(lookup_pages_); // this micro-batch's rows are in its input by now
    }
    if (sparse_) {
        sparse_->phase(handle, phase, x, y, n_tokens, ith, nth);
        if (phase == SparseFfn::kPhases - 1 && ith == 0) {
            tokens_computed_ += (uint64_t) n_tokens;
        }
        return;
    }
    const FfnLayer & L = *layers_[handle];
    if (phase == 0 && ith == 0 && capture_max_tokens_ > 0) {
        // calibration rows for predictors: appended by one thread before any phase overwrites them
        std::vector<float> & rows = captured_[handle];
        const int64_t room = capture_max_tokens_ - (int64_t) rows.size() / L.n_embd;
        const int64_t take = std::min(room, n_tokens);
        if (take > 0) rows.insert(rows.end(), x, x + take * L.n_embd);
    }
    dense_ffn_phase(L, scratch_, phase, x, y, n_tokens, ith, nth);
    if (phase == kDensePhases - 1 && ith == 0) {
        tokens_computed_ += (uint64_t) n_tokens;
    }
}

void Engine::forward(int il, Activation act, const float * x, float * y, int64_t n_tokens) {
    if (sparse_) {
        // the sidecar fixes the activation; `act` applies to the dense path only
        if (!sparse_->has_layer(il)) {
            throw std::out_of_range("layer " + std::to_string(il) + " is not served from the sidecar");
        }
        sparse_->reserve(il, n_tokens);
        for (int phase = 0; phase < SparseFfn::kPhases; ++phase) {
            sparse_->phase(il, phase, x, y, n_tokens, 0, 1);
        }
        // a failed read or checksum is kept for the graph's caller; here the caller is us: rethrow it
        if (std::string what = sparse_->error(); !what.empty()) {
            const bool numeric = sparse_->error_is_numeric();
            sparse_->clear_error();
            if (numeric) throw NumericError(what);
            throw IoError(what);
        }
        return;
    }
    layer(il); // validates il
    FfnLayer & L = *layers_[il];
    L.act = act;
    scratch_.reserve(L, n_tokens);
    for (int phase = 0; phase < kDensePhases; ++phase) {
        dense_ffn_phase(L, scratch_, phase, x, y, n_tokens, 0, 1);
    }
}

} // namespace neuralink
