#include "neuralink/sidecar_store.h"

#include "neuralink/errors.h"
#include "neuralink/gguf_model.h"
#include "neuralink/names.h"

#include "gguf.h"

#include <cstring>
#include <sys/stat.h>

namespace neuralink {

// as the converter writes them (neuralink.placement.criterion)
static constexpr Named<Criterion> kCriterionNames[] = {
    { Criterion::NativeZero, "relu" }, { Criterion::GateMagnitude, "gate_magnitude" },
    { Criterion::OutputMagnitude, "magnitude" },
};

Criterion criterion_from_name(const std::string & name) {
    return value_in(kCriterionNames, name, "activity criterion");
}

namespace {

// a gguf context closed on scope exit
struct GgufHandle {
    gguf_context * ctx = nullptr;
    ~GgufHandle() { if (ctx) gguf_free(ctx); }
};

struct Reader {
    const std::string & path;
    gguf_context * g;

    [[noreturn]] void fail(const std::string & what) const { throw ModelFileError(path + ": " + what); }

    int64_t key(const char * name) const {
        const int64_t id = gguf_find_key(g, name);
        if (id < 0) {
            fail(std::string("metadata key '") + name + "' is missing");
        }
        return id;
    }
    std::string str(const char * name) const {
        const int64_t id = key(name);
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) fail(std::string("'") + name + "' is not a string");
        return gguf_get_val_str(g, id);
    }
    uint64_t u(const char * name) const {
        const int64_t id = key(name);
        switch (gguf_get_kv_type(g, id)) {
            case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, id);
            case GGUF_TYPE_UINT64: return gguf_get_val_u64(g, id);
            default: fail(std::string("'") + name + "' is not an unsigned integer");
        }
    }
    bool flag(const char * name) const {
        const int64_t id = key(name);
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_BOOL) fail(std::string("'") + name + "' is not a bool");
        return gguf_get_val_bool(g, id);
    }
    // a per-layer array of n values of GGUF type `type`
    const void * array(const char * name, gguf_type type, size_t n) const {
        const int64_t id = key(name);
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != type ||
            gguf_get_arr_n(g, id) != n) {
            fail(std::string("'") + name + "' must be an array of " + std::to_string(n) + " values, one per layer");
        }
        return gguf_get_arr_data(g, id);
    }
};

} // namespace

SidecarStore::SidecarStore(const std::string & path, const std::string & expected_model_id, bool direct_io) {
    GgufModel dir(path); // container parse, tensor bounds within the file
    GgufHandle h;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    h.ctx = gguf_init_from_file(path.c_str(), params);
    if (!h.ctx) {
        throw ModelFileError(path + ": not a valid GGUF file");
    }
    Reader r { path, h.ctx };
    if (dir.architecture() != kSidecarArchitecture) {
        r.fail("not a neuralink sidecar (general.architecture is '" + dir.architecture() + "')");
    }
    const uint64_t version = r.u("neuralink.sidecar.version");
    if (version != kSidecarVersion) {
        r.fail("sidecar format version " + std::to_string(version) + "; this engine reads version " +
               std::to_string(kSidecarVersion));
    }
    if (gguf_get_alignment(h.ctx) != kSidecarAlignment) {
        r.fail("general.alignment is " + std::to_string(gguf_get_alignment(h.ctx)) + ", expected " +
               std::to_string(kSidecarAlignment));
    }
    model_id_ = r.str("neuralink.model_id");
    if (!expected_model_id.empty() && model_id_ != expected_model_id) {
        r.fail("belongs to model id '" + model_id_ + "', not '" + expected_model_id +
               "': pass the sidecar written together with this converted model");
    }
    const uint64_t n_layer = r.u("neuralink.n_layer");
    n_embd_ = (int64_t) r.u("neuralink.n_embd");
    n_ff_ = (int64_t) r.u("neuralink.n_ff");
    gated_ = r.flag("neuralink.gated");
    bundle_gate_ = r.flag("neuralink.bundle.gate");
    if (bundle_gate_ && !gated_) {
        r.fail("neuralink.bundle.gate is set for a non-gated model");
    }
    activation_ = activation_from_name(r.str("neuralink.activation"));
    criterion_ = r.str("neuralink.placement.criterion");
    criterion_kind_ = criterion_from_name(criterion_);
    if (n_layer == 0 || n_embd_ <= 0 || n_ff_ <= 0 || n_layer > 4096) {
        r.fail("implausible sizes n_layer " + std::to_string(n_layer) + ", n_embd " + std::to_string(n_embd_) +
               ", n_ff " + std::to_string(n_ff_));
    }
    const auto * thresholds = (const float *) r.array("neuralink.placement.thresholds", GGUF_TYPE_FLOAT32, n_layer);
    const auto * record_bytes = (const uint32_t *) r.array("neuralink.bundle.record_bytes", GGUF_TYPE_UINT32, n_layer);
    struct PartKeys { const char * type; const char * offset; };
    const PartKeys keys[3] = { { "neuralink.bundle.gate_type", "neuralink.bundle.gate_offset" },
                               { "neuralink.bundle.up_type", "neuralink.bundle.up_offset" },
                               { "neuralink.bundle.down_type", "neuralink.bundle.down_offset" } };
    const uint32_t * types[3] = {};
    const uint32_t * offsets[3] = {};
    for (int part = bundle_gate_ ? 0 : 1; part < 3; ++part) {
        types[part] = (const uint32_t *) r.array(keys[part].type, GGUF_TYPE_UINT32, n_layer);
        offsets[part] = (const uint32_t *) r.array(keys[part].offset, GGUF_TYPE_UINT32, n_layer);
    }

    const float * predictor_thresholds = nullptr;
    if (gguf_find_key(h.ctx, "neuralink.predictor.rank") >= 0) {
        predictor_rank_ = (int) r.u("neuralink.predictor.rank");
        if (predictor_rank_ <= 0 || predictor_rank_ > n_embd_) {
            r.fail("predictor rank " + std::to_string(predictor_rank_) + " outside 1.." + std::to_string(n_embd_));
        }
        predictor_thresholds = (const float *) r.array("neuralink.predictor.thresholds", GGUF_TYPE_FLOAT32, n_layer);
    }

    file_ = std::make_unique<DirectFile>(path, direct_io);
    layers_.resize(n_layer);
    for (uint64_t il = 0; il < n_layer; ++il) {
        SidecarLayer & L = layers_[il];
        const std::string where = "layer " + std::to_string(il) + ": ";
        L.threshold = thresholds[il];
        L.region.record_bytes = record_bytes[il];
        L.region.n_records = (uint32_t) n_ff_;
        RecordPart * parts[3] = { &L.gate, &L.up, &L.down };
        size_t end = 0;
        for (int part = bundle_gate_ ? 0 : 1; part < 3; ++part) {
            const ggml_type type = (ggml_type) types[part][il];
            std::string why;
            if (!weight_type_supported(type, &why)) {
                r.fail(where + why);
            }
            RecordPart & p = *parts[part];
            p.wt = &weight_type(type);
            p.offset = offsets[part][il];
            if (n_embd_ % p.wt->block_size) {
                r.fail(where + "n_embd " + std::to_string(n_embd_) + " does not fit " + p.wt->name() + " blocks");
            }
            p.nbytes = p.wt->row_bytes(n_embd_);
            if (p.offset < end || p.offset + p.nbytes > L.region.record_bytes) {
                r.fail(where + "bundle parts overlap or overflow the record of " + std::to_string(L.region.record_bytes) + " bytes");
            }
            end = p.offset + p.nbytes;
        }
        const std::string bundles = "blk." + std::to_string(il) + ".bundles";
        const TensorInfo & t = dir.require(bundles);
        if (t.nbytes != L.region.record_bytes * (uint64_t) n_ff_) {
            r.fail("tensor '" + bundles + "' holds " + std::to_string(t.nbytes) + " bytes, expected n_ff x record_bytes = " +
                   std::to_string(L.region.record_bytes * (uint64_t) n_ff_));
        }
        if (t.offset % kSidecarAlignment) {
            r.fail("tensor '" + bundles + "' is not aligned to " + std::to_string(kSidecarAlignment) + " bytes");
        }
        L.region.offset = t.offset;
        // the small per-layer tables are read once, through the same file
        auto read_table = [&](const std::string & name, ggml_type type, void * dst, size_t count) {
            const TensorInfo & ti = dir.require(name);
            if (ti.type != type || ti.nbytes != count * 4) {
                r.fail("tensor '" + name + "' has the wrong type or size");
            }
            const uint8_t * start = nullptr;
            AlignedBuffer buf = file_->read_range(ti.offset, ti.nbytes, &start);
            std::memcpy(dst, start, ti.nbytes);
        };
        L.order.resize((size_t) n_ff_);
        L.frequency.resize((size_t) n_ff_);
        read_table("blk." + std::to_string(il) + ".neuron_order", GGML_TYPE_I32, L.order.data(), (size_t) n_ff_);
        read_table("blk." + std::to_string(il) + ".neuron_frequency", GGML_TYPE_F32, L.frequency.data(), (size_t) n_ff_);
        const TensorInfo & chains = dir.require("blk." + std::to_string(il) + ".chain_starts");
        L.chain_starts.resize(chains.nbytes / 4);
        read_table(chains.name, GGML_TYPE_I32, L.chain_starts.data(), L.chain_starts.size());
        if (predictor_rank_ > 0) {
            const size_t rank = (size_t) predictor_rank_;
            L.predictor_a.resize(rank * (size_t) n_embd_);
            L.predictor_b.resize((size_t) n_ff_ * rank);
            read_table("blk." + std::to_string(il) + ".predictor_a", GGML_TYPE_F32, L.predictor_a.data(), L.predictor_a.size());
            read_table("blk." + std::to_string(il) + ".predictor_b", GGML_TYPE_F32, L.predictor_b.data(), L.predictor_b.size());
            L.predictor_threshold = predictor_thresholds[il];
        }
    }

    struct stat st {};
    if (stat(path.c_str(), &st) == 0) {
        size_ = (uint64_t) st.st_size;
        mtime_ns_ = (int64_t) st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    }
}

void SidecarStore::check_unchanged() const {
    struct stat st {};
    if (stat(file_->path().c_str(), &st) != 0) {
        throw IoError(file_->path() + ": the sidecar disappeared while in use");
    }
    const int64_t mtime = (int64_t) st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    if ((uint64_t) st.st_size != size_ || mtime != mtime_ns_) {
        throw IoError(file_->path() + ": the sidecar changed on disk while in use (size or modification time); "
                      "reload the model");
    }
}

} // namespace neuralink
