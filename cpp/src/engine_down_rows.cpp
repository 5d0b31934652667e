// Engine's down rows (engine.h): which layers' converted-GGUF ffn_down rows it could multiply, the rule that gives
// them to the sparse engine (in place of the columns where they pay, or on trial beside them when asked:
// Engine::hold_down_rows, shared by neuralink.Llama and neuralink-run), and reading them checked against the
// conversion's checksums.

#include "neuralink/checksum.h"
#include "neuralink/engine.h"
#include "neuralink/errors.h"

#include <algorithm>
#include <stdexcept>

namespace neuralink {

// layer il's ffn_down when the sidecar records its checksum and the engine can multiply it, else null
static const TensorInfo * checked_down_rows(const GgufModel & model, const SparseFfn & sparse, int il) {
    const std::vector<ModelRange> & ranges = sparse.store().down_row_ranges();
    if (!sparse.store().split() || il < 0 || il >= (int) ranges.size() || !sparse.has_layer(il)) return nullptr;
    const TensorInfo * t = model.find(layer_tensor(il, "ffn_down", "weight"));
    if (!t || t->n_dims != 2 || t->ne[1] <= 0 || ranges[(size_t) il].offset != t->offset ||
        ranges[(size_t) il].nbytes != t->nbytes || !weight_type_supported(t->type)) {
        return nullptr;
    }
    return t;
}

static DownRowPlan down_row_plan(const GgufModel & model, const SparseFfn * sparse, int n_layer, bool only_paying) {
    DownRowPlan out;
    if (!sparse) return out;
    for (int il = 0; il < n_layer; ++il) {
        const TensorInfo * t = checked_down_rows(model, *sparse, il);
        if (t && (!only_paying || sparse->down_rows_pay(il, t->type, (size_t) (t->nbytes / (uint64_t) t->ne[1])))) {
            const BundleRegion & columns = sparse->store().layer(il).down_region;
            out.layers.push_back(il);
            out.row_bytes += t->nbytes;
            out.column_bytes += (uint64_t) columns.record_bytes * columns.n_records;
        }
    }
    return out;
}

DownRowPlan Engine::down_row_layers() const { return down_row_plan(model_, sparse_.get(), n_layer(), true); }

DownRowPlan Engine::down_row_trial_layers() const { return down_row_plan(model_, sparse_.get(), n_layer(), false); }

DownRowChoice Engine::hold_down_rows(uint64_t room, bool trial) {
    DownRowChoice out;
    if (!sparse_ || !sparse_->holds_store()) return out;
    auto fits = [&](int64_t bytes) { return bytes > 0 && sparse_->arena_fits((size_t) bytes); };
    const DownRowPlan all = trial ? down_row_trial_layers() : DownRowPlan{};
    if (!all.layers.empty() && fits((int64_t) room - (int64_t) all.row_bytes)) {
        try_down_rows(all.layers);
        out = { all.layers, true, all.row_bytes, all.column_bytes };
        return out;
    }
    const DownRowPlan paying = down_row_layers();
    if (!paying.layers.empty() &&
        fits((int64_t) room - std::max<int64_t>(0, (int64_t) paying.row_bytes - (int64_t) paying.column_bytes))) {
        use_down_rows(paying.layers);
        out = { paying.layers, false, paying.row_bytes, paying.column_bytes };
    }
    return out;
}

void Engine::try_down_rows(const std::vector<int> & layers) {
    use_down_rows(layers, true);
}

void Engine::use_down_rows(const std::vector<int> & layers) {
    use_down_rows(layers, false);
}

void Engine::use_down_rows(const std::vector<int> & layers, bool trial) {
    if (!sparse_) {
        throw std::invalid_argument("down rows replace the sparse engine's down columns: this engine has no sidecar");
    }
    for (int il : layers) {
        if (!checked_down_rows(model_, *sparse_, il)) {
            throw std::invalid_argument(sparse_->store().path() + ": layer " + std::to_string(il) + " has no down "
                                        "rows to use (the split layout and the rows' checksums are needed)");
        }
        // refused before the rows are read again, as the sparse engine would refuse them
        const SparseLayerWeights & L = sparse_->layer(il);
        if (trial && (L.down.data || L.trial_down.data)) {
            throw std::invalid_argument("layer " + std::to_string(il) + ": its down rows are in use or on trial already");
        }
        if (L.trial_down.data) {
            throw std::invalid_argument("layer " + std::to_string(il) + ": its down rows are on trial (try_down_rows)");
        }
    }
    DirectFile file(model_path_, direct_io_);
    const std::vector<ModelRange> & ranges = sparse_->store().down_row_ranges();
    for (int il : layers) {
        const TensorInfo & t = *checked_down_rows(model_, *sparse_, il);
        // streamed whole every token: in 2 MiB pages, as the store's columns are (StoreArena)
        WeightMatrix rows = load_matrix(t, file, true);
        if (block_checksum64(rows.data, t.nbytes) != ranges[(size_t) il].checksum) {
            storage_.pop_back();
            weight_bytes_ -= t.nbytes;
            throw ModelFileError(model_.path() + ": tensor '" + t.name + "' does not match the checksum " +
                                 sparse_->store().path() + " recorded at conversion: the model file is corrupt or "
                                 "changed since (convert it again)");
        }
        if (trial) {
            // the sparse engine owns rows on trial: it frees them if the columns win
            AlignedBuffer storage = std::move(storage_.back());
            storage_.pop_back();
            weight_bytes_ -= t.nbytes;
            sparse_->try_down_rows(il, rows, std::move(storage));
        } else {
            sparse_->use_down_rows(il, rows);
        }
    }
}

} // namespace neuralink
