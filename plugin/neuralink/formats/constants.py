"""Names shared across neuralink: metadata keys, tensor names, format constants."""

from __future__ import annotations

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

# kv override understood by the patched loader (LLAMA_FFN_HOOK_LAZY_WEIGHTS_KEY in llama-ffn-hook.h)
LAZY_FFN_WEIGHTS_KEY = "ffn_hook.lazy_weights"
# and for an untied output matrix an output screen serves (LLAMA_FFN_HOOK_LAZY_OUTPUT_KEY)
LAZY_OUTPUT_KEY = "ffn_hook.lazy_output"

# per-layer FFN tensor names, from gguf's own table ("blk.{bid}.ffn_up" ...)
FFN_GATE = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE] + ".weight"
FFN_UP = TENSOR_NAMES[MODEL_TENSOR.FFN_UP] + ".weight"
FFN_DOWN = TENSOR_NAMES[MODEL_TENSOR.FFN_DOWN] + ".weight"


def ffn_tensor_name(template: str, layer: int) -> str:
    """The name of an FFN tensor of `layer`, e.g. ``ffn_tensor_name(FFN_UP, 3)``."""
    return template.format(bid=layer)

# --- converted GGUF and sidecar (docs/sidecar.md) ---

# a sidecar is a GGUF container whose general.architecture is this name, so llama.cpp refuses to load it as a model
SIDECAR_ARCHITECTURE = "neuralink_sidecar"
# 2: the split layout, the contribution criterion, checksums of every record, header and table
SIDECAR_VERSION = 2
# every tensor's data starts on this boundary: direct I/O reads need offsets aligned to the logical block size
SIDECAR_ALIGNMENT = 4096
# each part of a bundle record starts on this boundary inside the record, so f32 parts are naturally aligned
BUNDLE_PART_ALIGNMENT = 4

# default output names next to the source model: <stem>.neuralink.gguf and <stem>.neuralink.sidecar
CONVERTED_SUFFIX = ".neuralink.gguf"
SIDECAR_SUFFIX = ".neuralink.sidecar"

# keys written into both the converted GGUF and the sidecar
KEY_MODEL_ID = "neuralink.model_id"
KEY_SIDECAR_VERSION = "neuralink.sidecar.version"
KEY_SOURCE_SHA256 = "neuralink.source.sha256"
KEY_PLACEMENT_METHOD = "neuralink.placement.method"
# converted GGUF only: the sidecar's file name (a hint for finding it beside the model)
KEY_SIDECAR_NAME = "neuralink.sidecar.name"

# sidecar only: the model the bundles belong to
KEY_SOURCE_ARCHITECTURE = "neuralink.source.architecture"
KEY_N_LAYER = "neuralink.n_layer"
KEY_N_EMBD = "neuralink.n_embd"
KEY_N_FF = "neuralink.n_ff"
KEY_GATED = "neuralink.gated"
# whether each record holds the gate row (gated models); without it the engine keeps gate rows resident
KEY_BUNDLE_GATE = "neuralink.bundle.gate"
KEY_ACTIVATION = "neuralink.activation"
KEY_PLACEMENT_CRITERION = "neuralink.placement.criterion"
KEY_PLACEMENT_N_TOKENS = "neuralink.placement.n_tokens"
KEY_PLACEMENT_THRESHOLDS = "neuralink.placement.thresholds"
# sidecar only: per-layer arrays (one entry per layer) describing a bundle record
KEY_BUNDLE_RECORD_BYTES = "neuralink.bundle.record_bytes"
KEY_BUNDLE_GATE_TYPE = "neuralink.bundle.gate_type"
KEY_BUNDLE_GATE_OFFSET = "neuralink.bundle.gate_offset"
KEY_BUNDLE_UP_TYPE = "neuralink.bundle.up_type"
KEY_BUNDLE_UP_OFFSET = "neuralink.bundle.up_offset"
KEY_BUNDLE_DOWN_TYPE = "neuralink.bundle.down_type"
KEY_BUNDLE_DOWN_OFFSET = "neuralink.bundle.down_offset"
KEY_BUNDLE_DOWN_SOURCE_TYPE = "neuralink.bundle.down_source_type"
# "joint": one record per neuron [gate | up | down]; "split": [gate | up] records and down columns in a region of
# their own, read only for the neurons whose up row showed they are needed (docs/sidecar.md)
KEY_BUNDLE_LAYOUT = "neuralink.bundle.layout"
KEY_BUNDLE_DOWN_RECORD_BYTES = "neuralink.bundle.down_record_bytes"

# sidecar tensors, per layer (same "blk.{bid}." convention as gguf's own names)
SIDECAR_NEURON_ORDER = "blk.{bid}.neuron_order"
SIDECAR_NEURON_FREQUENCY = "blk.{bid}.neuron_frequency"
SIDECAR_CHAIN_STARTS = "blk.{bid}.chain_starts"
SIDECAR_BUNDLES = "blk.{bid}.bundles"
SIDECAR_DOWN_COLUMNS = "blk.{bid}.down_columns"
SIDECAR_BUNDLE_HASH = "blk.{bid}.bundle_hash"
SIDECAR_DOWN_HASH = "blk.{bid}.down_hash"
# the contribution criterion's per-neuron tables (placed order)
SIDECAR_CANDIDATE_SCALE = "blk.{bid}.candidate_scale"
SIDECAR_DOWN_NORM = "blk.{bid}.down_norm"
SIDECAR_CANDIDATE_FREQUENCY = "blk.{bid}.candidate_frequency"
# one per file, after the layers: relative RMS error of each layer's re-encoded down columns
SIDECAR_DOWN_ERROR = "neuralink.down_reencoding_error"
# F32 (n_layer, 2): the (activity, candidate) thresholds the engine runs with, chosen by the quality search
SIDECAR_RUNTIME_THRESHOLDS = "neuralink.runtime_thresholds"
# I8 [SIDECAR_QUALITY_BYTES]: what the conversion measured and chose, JSON, zero-padded
SIDECAR_QUALITY = "neuralink.quality"
SIDECAR_QUALITY_BYTES = 16384
# I8 [SIDECAR_PREDICTOR_NAME_BYTES]: the predictor neuralink.Llama and neuralink-run use by default, ASCII,
# zero-padded: the one the conversion's quality search validated, else "dense" (every neuron)
SIDECAR_DEFAULT_PREDICTOR = "neuralink.default_predictor"
SIDECAR_PREDICTOR_NAME_BYTES = 16
DEFAULT_PREDICTORS = ("dense", "gate", "lowrank")
# I64 [2]: checksum of the header (bytes before the data section) and of every table, written last
SIDECAR_CHECKSUMS = "neuralink.checksums"
# (offset, nbytes, block checksum) of the converted GGUF's header and of each tensor the sidecar does not replace
SIDECAR_MODEL_CHECKSUMS = "neuralink.model_checksums"
# (offset, nbytes, block checksum) of each layer's ffn_down in the converted GGUF, in layer order: the rows an
# engine holding the whole store multiplies instead of the sidecar's down columns (optional)
SIDECAR_DOWN_ROW_CHECKSUMS = "neuralink.down_row_checksums"

# per-layer FFN biases, permuted with their neurons
FFN_GATE_BIAS = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE] + ".bias"
FFN_UP_BIAS = TENSOR_NAMES[MODEL_TENSOR.FFN_UP] + ".bias"

# sidecar only, optional: the low-rank activity predictor (neuralink.convert.predictor), see docs/sidecar.md
KEY_PREDICTOR_RANK = "neuralink.predictor.rank"
KEY_PREDICTOR_THRESHOLDS = "neuralink.predictor.thresholds"
KEY_PREDICTOR_RECALL = "neuralink.predictor.recall"
SIDECAR_PREDICTOR_A = "blk.{bid}.predictor_a"
SIDECAR_PREDICTOR_B = "blk.{bid}.predictor_b"
