"""The sidecar: bundles decode to the original neurons, runs map to single byte ranges, bad files are refused."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from hypothesis import given
from hypothesis import strategies as st
from test_convert import random_placement

from neuralink import ModelFileError, _engine
from neuralink.convert.writer import ConversionResult, convert_model
from neuralink.formats.constants import KEY_SIDECAR_VERSION, SIDECAR_ALIGNMENT, SIDECAR_DEFAULT_PREDICTOR
from neuralink.formats.ffn_tensors import DownEncoding
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.placement import Placement
from neuralink.formats.sidecar import BundleLayout, ByteRange, Sidecar
from neuralink.formats.sidecar_records import encode_predictor_name
from neuralink.formats.sidecar_writer import seal_sidecar

from conftest import ModelFactory

# relative RMS error allowed for one re-encoded down column, by the type it is stored in
DOWN_TOLERANCE = {QType.F32: 0.0, QType.F16: 0.0, QType.BF16: 0.0, QType.Q8_0: 0.01, QType.Q6_K: 0.03, QType.Q5_K: 0.06,
                  QType.Q4_1: 0.15}


def source_rows(path: Path, name: str) -> tuple[np.ndarray, QType, int]:
    """A tensor's raw rows (rows, row_bytes), type and row length."""
    t = read_gguf_directory(path).tensors[name]
    raw = np.fromfile(path, dtype=np.uint8)[t.offset:t.offset + t.nbytes]
    return raw.reshape(t.rows, t.row_bytes), t.type, t.shape[0]


def decode_rows(rows: np.ndarray, qtype: QType, length: int) -> np.ndarray:
    return _engine.dequantize(ggml_type_name(qtype), rows, length)


def convert(
    path: Path, out: Path, seed: int = 0, bundle_down_type: DownEncoding = "auto"
) -> tuple[ConversionResult, Placement]:
    placement = random_placement(path, seed=seed)
    output = out / f"{path.stem}.neuralink.gguf"
    return convert_model(path, placement, output, bundle_down_type=bundle_down_type), placement


@pytest.mark.parametrize(
    ("arch", "weight_type", "bundle_down_type"),
    [("llama", "f32", "auto"), ("llama", "f16", "auto"), ("arcee", "f16", "auto"), ("llama", "bf16", "auto"),
     ("llama", "q8_0", "auto"), ("llama", "q4_1", "auto"), ("llama", "q4_1", "same"), ("gemma3", "q4_K", "auto"),
     ("arcee", "q5_K", "same")],
)
def test_bundles_decode_to_the_original_neurons(
    synthetic_model: ModelFactory, tmp_path: Path, arch: str, weight_type: str, bundle_down_type: DownEncoding
) -> None:
    source = synthetic_model(arch, weight_type)
    result, placement = convert(source, tmp_path, bundle_down_type=bundle_down_type)
    rng = np.random.default_rng(1)
    with Sidecar.open(result.sidecar, result.output) as sidecar:
        header = sidecar.header
        assert (header.n_layer, header.n_embd, header.n_ff) == (2, 256, 512)
        assert header.gated == (arch != "arcee")
        assert header.activation == {"llama": "silu", "gemma3": "gelu", "arcee": "relu_sqr"}[arch]
        for il in range(header.n_layer):
            order = placement.orders[il]
            np.testing.assert_array_equal(sidecar.order(il), order)
            np.testing.assert_array_equal(sidecar.frequencies(il), placement.frequencies[il][order])
            np.testing.assert_array_equal(sidecar.chain_starts(il), placement.chain_starts[il])
            layout, store = sidecar.layouts[il], sidecar.bundle_store(il)

            down_raw, down_type, n_ff = source_rows(source, f"blk.{il}.ffn_down.weight")
            down = decode_rows(down_raw, down_type, n_ff)  # (n_embd, n_ff): neuron i is column i
            kept = weight_type in ("f32", "f16", "bf16", "q8_0") or bundle_down_type == "same"
            # q5_K blocks of 256 fit n_embd = 256: "same" keeps it; "auto" stores K-quant columns that fit in
            # q5_K, other quantized ones in q8_0
            assert layout.down.type == (down_type if kept else QType.Q5_K if weight_type.endswith("_K") else QType.Q8_0)
            parts = {"up": source_rows(source, f"blk.{il}.ffn_up.weight")}
            if header.gated:
                parts["gate"] = source_rows(source, f"blk.{il}.ffn_gate.weight")

            for position in [0, n_ff - 1, *rng.choice(n_ff, 16, replace=False)]:
                neuron = sidecar.decode(il, position)
                record = store[position]
                for name, (rows, qtype, n_embd) in parts.items():
                    part = layout.parts[name]
                    # gate and up rows are the GGUF's bytes, verbatim
                    assert record[part.offset:part.offset + part.nbytes].tobytes() == rows[order[position]].tobytes()
                    original = decode_rows(rows[[order[position]]], qtype, n_embd)[0]
                    np.testing.assert_array_equal(getattr(neuron, name), original)
                column = down[:, order[position]]
                # exactly ggml's encoding of the original column, and close to it
                encoded = _engine.quantize(ggml_type_name(layout.down.type), column[None])
                np.testing.assert_array_equal(neuron.down, decode_rows(encoded, layout.down.type, len(column))[0])
                error = np.linalg.norm(neuron.down - column) / np.linalg.norm(column)
                assert error <= DOWN_TOLERANCE.get(layout.down.type, 0.15), (il, position, error)
            assert sidecar.down_errors[il] == pytest.approx(result.bundle_down_errors[il])
            assert sidecar.down_errors[il] <= DOWN_TOLERANCE.get(layout.down.type, 0.15)


def test_record_layout_pads_parts_to_four_bytes() -> None:
    gated = BundleLayout.build(576, QType.Q4_1, QType.Q8_0, QType.Q4_1)
    assert (gated.gate.offset, gated.up.offset, gated.down.offset) == (0, 360, 720)  # type: ignore[union-attr]
    assert gated.record_bytes == 360 + 360 + 612
    # 96 values of q8_0 are 3 blocks of 34 bytes = 102: padded to 104 so the next part starts aligned
    odd = BundleLayout.build(96, QType.Q8_0, QType.F32)
    assert (odd.gate, odd.up.nbytes, odd.down.offset, odd.record_bytes) == (None, 102, 104, 104 + 384)
    with pytest.raises(ValueError, match="q4_K blocks of 256"):
        BundleLayout.build(576, QType.Q4_K, QType.Q8_0)


def test_a_run_of_neurons_is_one_byte_range(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    result, _ = convert(synthetic_model("llama", "q4_1"), tmp_path)
    with Sidecar.open(result.sidecar) as sidecar, open(result.sidecar, "rb") as f:
        for il in range(sidecar.header.n_layer):
            store = sidecar.bundle_store(il)
            record = sidecar.layouts[il].record_bytes
            assert sidecar.store_offset(il) % SIDECAR_ALIGNMENT == 0
            for start, stop in [(0, 1), (5, 9), (100, 357), (511, 512), (0, 512)]:
                span = sidecar.record_range(il, start, stop)
                assert span.length == (stop - start) * record
                assert os.pread(f.fileno(), span.length, span.offset) == store[start:stop].tobytes()
                # the aligned superset, read with O_DIRECT, holds the run at offset - aligned.offset
                aligned = span.aligned()
                block = os.pread(f.fileno(), aligned.length, aligned.offset)
                skip = span.offset - aligned.offset
                assert block[skip:skip + span.length] == store[start:stop].tobytes()
            with pytest.raises(IndexError):
                sidecar.record_range(il, 3, 3)
        # the aligned superset of any run, the last included, stays inside the file
        size = result.sidecar.stat().st_size
        assert size % SIDECAR_ALIGNMENT == 0
        assert sidecar.record_range(1, 511, 512).aligned().end <= size


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 24), st.sampled_from([512, 4096, 65536]))
def test_aligned_range_is_the_smallest_aligned_cover(offset: int, length: int, alignment: int) -> None:
    span = ByteRange(offset, length)
    aligned = span.aligned(alignment)
    assert aligned.offset % alignment == 0 and aligned.length % alignment == 0
    assert aligned.offset <= span.offset and aligned.end >= span.end
    assert aligned.offset > span.offset - alignment and aligned.end < span.end + alignment


def test_gguf_py_reads_the_sidecar(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    result, placement = convert(synthetic_model("llama", "q8_0"), tmp_path)
    reader = gguf.GGUFReader(result.sidecar)
    assert reader.alignment == SIDECAR_ALIGNMENT
    assert reader.get_field("general.architecture").contents() == "neuralink_sidecar"
    assert reader.get_field("neuralink.model_id").contents() == result.model_id
    tensors = {t.name: t for t in reader.tensors}
    assert all(t.data_offset % SIDECAR_ALIGNMENT == 0 for t in reader.tensors)
    np.testing.assert_array_equal(tensors["blk.1.neuron_order"].data, placement.orders[1])
    assert tensors["blk.0.bundles"].data.shape == (512, result.record_bytes[0])


def test_mismatched_pair_is_refused(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    source = synthetic_model("llama", "f16")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, _ = convert(source, tmp_path / "a")
    second, _ = convert(source, tmp_path / "b", seed=1)
    assert first.model_id != second.model_id
    with pytest.raises(ModelFileError, match=rf"sidecar {first.sidecar}.*{second.output} has model id"):
        Sidecar.open(first.sidecar, second.output)
    with pytest.raises(ModelFileError, match="no neuralink model id"):
        Sidecar.open(first.sidecar, source)
    Sidecar.open(first.sidecar, first.output).close()


def test_same_inputs_give_the_same_model_id(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    source = synthetic_model("arcee", "f32")
    placement = random_placement(source)
    ids = {convert_model(source, placement, tmp_path / f"{i}.gguf").model_id for i in range(2)}
    assert len(ids) == 1


@pytest.fixture
def sidecar_file(synthetic_model: ModelFactory, tmp_path: Path) -> Path:
    result, _ = convert(synthetic_model("llama", "q8_0"), tmp_path)
    return result.sidecar


def test_truncated_sidecar_is_refused(sidecar_file: Path) -> None:
    data = sidecar_file.read_bytes()
    sidecar_file.write_bytes(data[:-SIDECAR_ALIGNMENT - 100])
    with pytest.raises(ModelFileError, match="beyond the end of the file.*truncated"):
        Sidecar.open(sidecar_file)
    sidecar_file.write_bytes(data[:1000])  # cut inside the metadata
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        Sidecar.open(sidecar_file)


def test_model_file_is_not_a_sidecar(synthetic_model: ModelFactory) -> None:
    with pytest.raises(ModelFileError, match="not a neuralink sidecar.*'llama'"):
        Sidecar.open(synthetic_model("llama", "f32"))


def test_other_format_version_is_refused(sidecar_file: Path) -> None:
    entry = read_gguf_directory(sidecar_file).metadata[KEY_SIDECAR_VERSION]
    with open(sidecar_file, "r+b") as f:
        f.seek(entry.end - 4)  # the uint32 value closes the entry
        f.write(struct.pack("<I", 99))
    with pytest.raises(ModelFileError, match="format version 99"):
        Sidecar.open(sidecar_file)


def test_inconsistent_layout_is_refused(sidecar_file: Path) -> None:
    entry = read_gguf_directory(sidecar_file).metadata["neuralink.bundle.down_offset"]
    with open(sidecar_file, "r+b") as f:
        f.seek(entry.end - 4)  # the last layer's down offset
        f.write(struct.pack("<I", 8))
    with pytest.raises(ModelFileError, match="layer 1 bundle layout"):
        Sidecar.open(sidecar_file)


def test_corrupt_order_is_refused(sidecar_file: Path) -> None:
    order = read_gguf_directory(sidecar_file).tensors["blk.0.neuron_order"]
    with open(sidecar_file, "r+b") as f:
        f.seek(order.offset)
        f.write(struct.pack("<2i", 7, 7))
    with pytest.raises(ModelFileError, match="table checksum mismatch"):
        Sidecar.open(sidecar_file)
    seal_sidecar(sidecar_file)  # checksums that agree with the corrupt table: the order itself is still checked
    with pytest.raises(ModelFileError, match="layer 0 neuron order is not a permutation"):
        Sidecar.open(sidecar_file)


def test_default_lowrank_predictor_needs_a_predictor(sidecar_file: Path) -> None:
    assert Sidecar.open(sidecar_file).header.predictor_rank == 0  # converted without --lowrank-rank
    with open(sidecar_file, "r+b") as f:  # a writer bug: the default names a predictor the file lacks
        f.seek(read_gguf_directory(sidecar_file).tensors[SIDECAR_DEFAULT_PREDICTOR].offset)
        f.write(encode_predictor_name("lowrank").tobytes())
    seal_sidecar(sidecar_file)
    with pytest.raises(ModelFileError, match="default predictor 'lowrank', but the sidecar has no low-rank predictor"):
        Sidecar.open(sidecar_file)
