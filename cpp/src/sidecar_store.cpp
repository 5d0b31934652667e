#include "neuralink/sidecar_store.h"

#include "neuralink/checksum.h"
#include "neuralink/errors.h"
#include "neuralink/gguf_model.h"
#include "neuralink/names.h"

#include "gguf.h"

#include <cmath>
#include <cstring>
#include <sys/stat.h>

namespace neuralink {

// as the converter writes them (neuralink.placement.criterion)
static constexpr Named<Criterion> kCriterionNames[] = {
    { Criterion::NativeZero, "relu" }, { Criterion::GateMagnitude, "gate_magnitude" },
    { Criterion::OutputMagnitude, "magnitude" }, { Criterion::Contribution, "contribution" },
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

static void verify_checksums(const DirectFile & file, const GgufModel & dir, const Reader & r) {
    const TensorInfo * sums = dir.find("neuralink.checksums");
    if (!sums || sums->type != GGML_TYPE_I64 || sums->nbytes != 16) {
        r.fail("tensor 'neuralink.checksums' (I64 [2]) is missing or malformed");
    }
    uint64_t stored[2];
    {
        const uint8_t * start = nullptr;
        AlignedBuffer buf = file.read_range(sums->offset, sums->nbytes, &start);
        std::memcpy(stored, start, sizeof(stored));
    }
    const uint8_t * start = nullptr;
    AlignedBuffer header = file.read_range(0, dir.data_offset(), &start);
    if (block_checksum64(start, dir.data_offset()) != stored[0]) {
        r.fail("header checksum mismatch: the metadata or tensor directory is corrupt");
    }
    // every table (all tensors but the record regions and the checksums), in file order
    std::vector<uint64_t> tables;
    for (const TensorInfo & t : dir.tensors()) {
        const bool records = t.name.size() > 8 && (t.name.compare(t.name.size() - 8, 8, ".bundles") == 0 ||
                                                   t.name.find(".down_columns") != std::string::npos);
        if (records || t.name == "neuralink.checksums") {
            continue;
        }
        const uint8_t * p = nullptr;
        AlignedBuffer data = file.read_range(t.offset, t.nbytes, &p);
        tables.push_back(block_checksum64(p, t.nbytes));
    }
    if (checksum64(tables.data(), tables.size() * sizeof(uint64_t)) != stored[1]) {
        r.fail("table checksum mismatch: a neuron order, frequency, threshold, checksum or predictor table is corrupt");
    }
}

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
               std::to_string(kSidecarVersion) + (version < kSidecarVersion
                   ? ": it was written by an older neuralink, convert the model again (neuralink convert)"
                   : ": it was written by a newer neuralink, update this one"));
    }
    if (gguf_get_alignment(h.ctx) != kSidecarAlignment) {
        r.fail("general.alignment is " + std::to_string(gguf_get_alignment(h.ctx)) + ", expected " +
               std::to_string(kSidecarAlignment));
    }
    file_ = std::make_unique<DirectFile>(path, direct_io);
    verify_checksums(*file_, dir, r);
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

    const std::string layout = r.str("neuralink.bundle.layout");
    if (layout != "joint" && layout != "split") {
        r.fail("neuralink.bundle.layout is '" + layout + "', expected 'joint' or 'split'");
    }
    split_ = layout == "split";
    const uint32_t * down_record_bytes = split_
            ? (const uint32_t *) r.array("neuralink.bundle.down_record_bytes", GGUF_TYPE_UINT32, n_layer) : nullptr;
    const bool contribution = criterion_kind_ == Criterion::Contribution;
    if (contribution && !gated_) {
        r.fail("criterion 'contribution' needs a gated FFN");
    }
    // the thresholds in use: (activity, candidate) per layer, chosen by the conversion's quality search
    std::vector<float> runtime((size_t) n_layer * 2);
    {
        const TensorInfo & ti = dir.require("neuralink.runtime_thresholds");
        if (ti.type != GGML_TYPE_F32 || ti.nbytes != runtime.size() * 4) {
            r.fail("tensor 'neuralink.runtime_thresholds' must be F32 [2, n_layer]");
        }
        const uint8_t * start = nullptr;
        AlignedBuffer buf = file_->read_range(ti.offset, ti.nbytes, &start);
        std::memcpy(runtime.data(), start, ti.nbytes);
    }
    {
        const TensorInfo & ti = dir.require("neuralink.default_predictor");
        if (ti.type != GGML_TYPE_I8 || ti.nbytes != 16) {
            r.fail("tensor 'neuralink.default_predictor' must be I8 [16]");
        }
        const uint8_t * start = nullptr;
        AlignedBuffer buf = file_->read_range(ti.offset, ti.nbytes, &start);
        default_predictor_.assign((const char *) start, strnlen((const char *) start, ti.nbytes));
        if (default_predictor_ != "dense" && default_predictor_ != "gate" && default_predictor_ != "lowrank") {
            r.fail("default predictor '" + default_predictor_ + "', expected 'dense', 'gate' or 'lowrank'");
        }
        if (default_predictor_ == "lowrank" && predictor_rank_ == 0) {
            r.fail("default predictor 'lowrank', but the sidecar has no low-rank predictor");
        }
    }
    if (const TensorInfo * ti = dir.find("neuralink.model_checksums")) {
        // (offset, nbytes, checksum) triples; optional in format version 2 (older conversions lack it)
        if (ti->type != GGML_TYPE_I64 || ti->nbytes == 0 || ti->nbytes % sizeof(ModelRange) != 0) {
            r.fail("tensor 'neuralink.model_checksums' must be I64 [3, n]");
        }
        model_ranges_.resize(ti->nbytes / sizeof(ModelRange));
        const uint8_t * start = nullptr;
        AlignedBuffer buf = file_->read_range(ti->offset, ti->nbytes, &start);
        std::memcpy(model_ranges_.data(), start, ti->nbytes);
    }
    if (const TensorInfo * ti = dir.find("neuralink.down_row_checksums")) {
        // (offset, nbytes, checksum) of each layer's ffn_down; optional (conversions before it lack it)
        if (ti->type != GGML_TYPE_I64 || ti->nbytes != n_layer * sizeof(ModelRange)) {
            r.fail("tensor 'neuralink.down_row_checksums' must be I64 [3, n_layer]");
        }
        down_row_ranges_.resize(n_layer);
        const uint8_t * start = nullptr;
        AlignedBuffer buf = file_->read_range(ti->offset, ti->nbytes, &start);
        std::memcpy(down_row_ranges_.data(), start, ti->nbytes);
    }
    layers_.resize(n_layer);
    for (uint64_t il = 0; il < n_layer; ++il) {
        SidecarLayer & L = layers_[il];
        const std::string where = "layer " + std::to_string(il) + ": ";
        (void) thresholds; // the profile's, kept in the metadata for the record; runtime ones are used
        L.threshold = runtime[2 * il];
        L.candidate_threshold = runtime[2 * il + 1];
        for (float t : { L.threshold, L.candidate_threshold }) {
            if (!std::isfinite(t) || t < 0.0f) {
                r.fail(where + "threshold " + std::to_string(t) + " is not a finite value >= 0");
            }
        }
        L.region.record_bytes = record_bytes[il];
        L.region.n_records = (uint32_t) n_ff_;
        if (split_) {
            L.down_region.record_bytes = down_record_bytes[il];
            L.down_region.n_records = (uint32_t) n_ff_;
        }
        RecordPart * parts[3] = { &L.gate, &L.up, &L.down };
        size_t end = 0;
        for (int part = bundle_gate_ ? 0 : 1; part < 3; ++part) {
            if (part == 2 && split_) {
                end = 0; // the down part is laid out in the down region's records
            }
            const size_t record = part == 2 && split_ ? L.down_region.record_bytes : L.region.record_bytes;
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
            if (p.offset < end || p.offset + p.nbytes > record) {
                r.fail(where + "bundle parts overlap or overflow the record of " + std::to_string(record) + " bytes");
            }
            end = p.offset + p.nbytes;
        }
        auto place_region = [&](const std::string & name, BundleRegion & region) {
            const TensorInfo & t = dir.require(name);
            if (t.nbytes != region.record_bytes * (uint64_t) n_ff_) {
                r.fail("tensor '" + name + "' holds " + std::to_string(t.nbytes) + " bytes, expected n_ff x record_bytes = " +
                       std::to_string(region.record_bytes * (uint64_t) n_ff_));
            }
            if (t.offset % kSidecarAlignment) {
                r.fail("tensor '" + name + "' is not aligned to " + std::to_string(kSidecarAlignment) + " bytes");
            }
            region.offset = t.offset;
        };
        place_region("blk." + std::to_string(il) + ".bundles", L.region);
        if (split_) {
            place_region("blk." + std::to_string(il) + ".down_columns", L.down_region);
        }
        // the small per-layer tables are read once, through the same file
        auto read_table = [&](const std::string & name, ggml_type type, void * dst, size_t count) {
            const TensorInfo & ti = dir.require(name);
            if (ti.type != type || ti.nbytes != count * ggml_type_size(type)) {
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
        auto check_range = [&](const std::vector<float> & v, const char * what, float hi) {
            for (float x : v) {
                if (!std::isfinite(x) || x < 0.0f || x > hi) {
                    r.fail(where + what + " holds " + std::to_string(x) + ", outside [0, " + std::to_string(hi) + "]");
                }
            }
        };
        std::vector<bool> seen((size_t) n_ff_, false);
        for (int32_t o : L.order) {
            if (o < 0 || o >= n_ff_ || seen[(size_t) o]) {
                r.fail(where + "neuron order is not a permutation of 0.." + std::to_string(n_ff_ - 1));
            }
            seen[(size_t) o] = true;
        }
        check_range(L.frequency, "neuron_frequency", 1.0f);
        L.candidate_frequency = L.frequency;
        if (contribution) {
            L.candidate_scale.resize((size_t) n_ff_);
            L.down_norm.resize((size_t) n_ff_);
            read_table("blk." + std::to_string(il) + ".candidate_scale", GGML_TYPE_F32, L.candidate_scale.data(), (size_t) n_ff_);
            read_table("blk." + std::to_string(il) + ".down_norm", GGML_TYPE_F32, L.down_norm.data(), (size_t) n_ff_);
            read_table("blk." + std::to_string(il) + ".candidate_frequency", GGML_TYPE_F32, L.candidate_frequency.data(), (size_t) n_ff_);
            check_range(L.candidate_scale, "candidate_scale", INFINITY);
            check_range(L.down_norm, "down_norm", INFINITY);
            check_range(L.candidate_frequency, "candidate_frequency", 1.0f);
        }
        L.record_hash.resize((size_t) n_ff_);
        read_table("blk." + std::to_string(il) + ".bundle_hash", GGML_TYPE_I64, L.record_hash.data(), (size_t) n_ff_);
        if (split_) {
            L.down_hash.resize((size_t) n_ff_);
            read_table("blk." + std::to_string(il) + ".down_hash", GGML_TYPE_I64, L.down_hash.data(), (size_t) n_ff_);
        }
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

void SidecarStore::check_record(int il, bool down, uint32_t pos, const uint8_t * record) const {
    const SidecarLayer & L = layers_[(size_t) il];
    const BundleRegion & region = down ? L.down_region : L.region;
    const uint64_t want = (down ? L.down_hash : L.record_hash)[pos];
    if (checksum64(record, region.record_bytes) != want) {
        throw IoError(file_->path() + ": layer " + std::to_string(il) + ", neuron " + std::to_string(pos) + ": " +
                      (down ? "down column" : "bundle") + " record at offset " +
                      std::to_string(region.record_offset(pos)) + " fails its checksum (corrupt sidecar or a bad read)");
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
