"""neuralink convert: permuted GGUF that stock llama.cpp runs like the original, refusals that leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from neuralink import ModelFileError, UnsupportedModelError, _engine
from neuralink.cli import main as cli_main
from neuralink.convert.plan import default_output_paths, plan_conversion
from neuralink.convert.writer import convert_model
from neuralink.formats.constants import KEY_MODEL_ID, KEY_SIDECAR_NAME, KEY_SOURCE_SHA256
from neuralink.formats.ffn_tensors import choose_bundle_down_type, choose_down_type, inspect_ffn_model
from neuralink.formats.files import file_sha256
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.placement import Placement
from neuralink.formats.sidecar import Sidecar

from conftest import REPO_ROOT, ModelFactory, corpus

PROMPT = (
    b"The quick brown fox jumps over the lazy dog, and then it writes tokens to flash memory; "
    b"the model reads the neuron of the layer in time, and we have more people for the first token"
)
N_PROMPT = 48


def random_placement(model_path: Path, seed: int = 0, method: str = "random") -> Placement:
    """A random neuron order for every layer of `model_path`, with made-up statistics."""
    model = inspect_ffn_model(model_path)
    rng = np.random.default_rng(seed)
    n_ff = model.n_ff
    return Placement(
        method=method,
        orders=[rng.permutation(n_ff) for _ in range(model.n_layer)],
        chain_starts=[np.concatenate([[0], np.sort(rng.choice(np.arange(1, n_ff), 7, replace=False))])
                      for _ in range(model.n_layer)],
        frequencies=[rng.random(n_ff).astype(np.float32) for _ in range(model.n_layer)],
        thresholds=rng.random(model.n_layer).astype(np.float32),
        criterion="magnitude" if model.gated else "relu",  # full bundles: gate, up and down
        n_tokens=1000,
        model_sha256=file_sha256(model_path),
    )


def prompt_logits(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT)[:N_PROMPT]
        assert len(tokens) == N_PROMPT
        llm.eval(tokens)
        return np.array(llm.scores[:llm.n_tokens])
    finally:
        llm.close()


def relative_max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# F16 weights make llama.cpp round activations to f16 before every matmul: the ~1e-7 change a
# permuted summation order makes flips a few of those roundings by one f16 ulp (5e-4 relative).
# Stock llama.cpp moves the ORIGINAL F16 model's logits by 3.5-5.7e-4 just by evaluating token by
# token instead of in one batch, so F16 is held to 1e-4 on average and 1e-3 at worst; F32 to 1e-4.
MAX_LOGIT_ERROR = {"f32": 1e-4, "f16": 1e-3}


@pytest.mark.parametrize("weight_type", ["f32", "f16"])
@pytest.mark.parametrize("arch", ["llama", "arcee", "gemma3", "qwen2"])
def test_converted_model_computes_what_the_original_does(
    synthetic_model: ModelFactory, tmp_path: Path, arch: str, weight_type: str
) -> None:
    source = synthetic_model(arch, weight_type)
    result = convert_model(source, random_placement(source), tmp_path / "m.neuralink.gguf")
    assert result.gguf_down_errors == (0.0, 0.0)  # float types are permuted, never re-encoded

    original, converted = prompt_logits(source), prompt_logits(result.output)
    assert relative_max_abs(original, converted) <= MAX_LOGIT_ERROR[weight_type]
    assert np.abs(original - converted).mean() / np.abs(original).max() <= 1e-4


def test_wrong_permutation_is_visible_in_logits(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    # guards the test above: permuting gate/up but not down must move the logits far beyond the tolerance
    source = synthetic_model("llama", "f32")
    placement = random_placement(source)
    result = convert_model(source, placement, tmp_path / "m.gguf")
    directory = read_gguf_directory(result.output)
    down = directory.tensors["blk.0.ffn_down.weight"]
    original_down = read_gguf_directory(source).tensors["blk.0.ffn_down.weight"]
    with open(source, "rb") as f:
        f.seek(original_down.offset)
        unpermuted = f.read(original_down.nbytes)
    with open(result.output, "r+b") as f:
        f.seek(down.offset)
        f.write(unpermuted)
    assert relative_max_abs(prompt_logits(source), prompt_logits(result.output)) > 1e-2


@pytest.mark.parametrize("weight_type", ["f32", "f16", "q8_0", "q4_1", "q4_K"])
def test_tensors_and_metadata_are_kept_or_permuted_exactly(
    synthetic_model: ModelFactory, tmp_path: Path, weight_type: str
) -> None:
    source = synthetic_model("llama", weight_type)
    placement = random_placement(source, seed=3)
    result = convert_model(source, placement, tmp_path / "m.gguf")
    before, after = read_gguf_directory(source), read_gguf_directory(result.output)
    raw_before, raw_after = np.fromfile(source, dtype=np.uint8), np.fromfile(result.output, dtype=np.uint8)

    # every original metadata entry, byte for byte, plus the neuralink keys
    for key, entry in before.metadata.items():
        moved = after.metadata[key]
        assert raw_before[entry.start:entry.end].tobytes() == raw_after[moved.start:moved.end].tobytes(), key
    assert set(after.metadata) - set(before.metadata) >= {KEY_MODEL_ID, KEY_SOURCE_SHA256, KEY_SIDECAR_NAME}
    assert after.get(KEY_MODEL_ID) == result.model_id
    assert after.get(KEY_SIDECAR_NAME) == result.sidecar.name
    assert list(after.tensors) == list(before.tensors)  # same tensors, same order: llama.cpp counts them

    def rows(raw: np.ndarray, t) -> np.ndarray:
        return raw[t.offset:t.offset + t.nbytes].reshape(t.rows, t.row_bytes)

    for name, t in before.tensors.items():
        u = after.tensors[name]
        assert u.shape == t.shape
        il = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name.endswith(("ffn_gate.weight", "ffn_up.weight")):
            np.testing.assert_array_equal(rows(raw_after, u), rows(raw_before, t)[placement.orders[il]])
        elif name.endswith("ffn_down.weight"):
            values = _engine.dequantize(ggml_type_name(t.type), rows(raw_before, t), t.shape[0])
            permuted = _engine.dequantize(ggml_type_name(u.type), rows(raw_after, u), u.shape[0])
            expected = values[:, placement.orders[il]]
            if weight_type in ("f32", "f16"):
                assert u.type == t.type
                np.testing.assert_array_equal(permuted, expected)
            elif weight_type == "q4_K":
                assert u.type == QType.Q5_K  # the measured default for a K-quant ffn_down of whole blocks
                assert np.linalg.norm(permuted - expected) / np.linalg.norm(expected) < 0.05
            else:
                assert u.type == QType.Q8_0  # the measured default for other quantized ffn_down
                assert np.linalg.norm(permuted - expected) / np.linalg.norm(expected) < 0.01
        else:
            assert u.type == t.type
            np.testing.assert_array_equal(rows(raw_after, u), rows(raw_before, t))

    # gguf-py reads it, and stock llama.cpp loads and runs it
    assert len(gguf.GGUFReader(result.output).tensors) == len(before.tensors)
    assert np.isfinite(prompt_logits(result.output)).all()


def test_ffn_biases_are_permuted_with_their_neurons(tmp_path: Path) -> None:
    # no synthetic architecture has FFN biases: add an up bias to a converted-by-hand llama
    from neuralink.models.synthetic import write_synthetic_model

    plain = write_synthetic_model(tmp_path / "plain.gguf", "llama", n_layer=1)
    reader = gguf.GGUFReader(plain)
    path = tmp_path / "biased.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            sub = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    bias = np.arange(512, dtype=np.float32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data))
        if tensor.name == "blk.0.ffn_up.weight":
            writer.add_tensor("blk.0.ffn_up.bias", bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    placement = random_placement(path)
    result = convert_model(path, placement, tmp_path / "out.gguf")
    converted = {t.name: t for t in gguf.GGUFReader(result.output).tensors}
    np.testing.assert_array_equal(converted["blk.0.ffn_up.bias"].data, bias[placement.orders[0]])


@pytest.mark.parametrize(
    ("source", "row_length", "policy", "expected"),
    [
        (QType.F16, 576, "auto", QType.F16),
        (QType.BF16, 576, "auto", QType.BF16),
        (QType.Q8_0, 576, "auto", QType.Q8_0),
        (QType.Q4_1, 576, "auto", QType.Q8_0),
        (QType.Q4_K, 8960, "auto", QType.Q5_K),  # Qwen2.5-Coder-1.5B's rows: 196 MB smaller, same perplexity
        (QType.Q6_K, 8960, "auto", QType.Q5_K),
        (QType.Q4_K, 992, "auto", QType.Q8_0),  # not whole 256-value blocks
        (QType.Q8_0, 8960, "auto", QType.Q8_0),
        (QType.Q4_1, 576, "same", QType.Q4_1),
        (QType.Q4_K, 1536, "same", QType.Q4_K),
        (QType.Q4_K, 576, "same", QType.Q8_0),  # K-quant blocks of 256 do not fit 576
        (QType.Q6_K, 100, "same", QType.F16),  # neither do q8_0's blocks of 32
        (QType.IQ2_XXS, 512, "same", QType.Q8_0),  # ggml needs an importance matrix for it
        (QType.Q4_1, 576, "f32", QType.F32),
    ],
)
def test_down_type_choice(source: QType, row_length: int, policy: str, expected: QType) -> None:
    assert choose_down_type(source, row_length, policy) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("down_type", "bundle_down_type", "expected"),
    [
        ("auto", "q4_K", QType.Q4_K),  # the rows the quality search scores are encoded as the columns are
        ("auto", "q6_K", QType.Q6_K),
        ("q8_0", "q4_K", QType.Q8_0),  # the rows' own type, where one is given
        ("auto", "auto", QType.Q8_0),  # a q8_0 source keeps q8_0
    ],
)
def test_converted_rows_follow_an_explicit_column_type(synthetic_model: ModelFactory, tmp_path: Path,
                                                       down_type: str, bundle_down_type: str,
                                                       expected: QType) -> None:
    model = synthetic_model("llama", "q8_0")
    plan = plan_conversion(model, random_placement(model), tmp_path / "out.gguf", down_type=down_type,
                           bundle_down_type=bundle_down_type)  # type: ignore[arg-type]
    assert set(plan.gguf_down_types) == {expected}
    assert {lay.down.type for lay in plan.layouts} == {QType[bundle_down_type.upper()] if bundle_down_type != "auto"
                                                       else QType.Q8_0}


def test_default_output_names(tmp_path: Path) -> None:
    expected = (tmp_path / "m.neuralink.gguf", tmp_path / "m.neuralink.sidecar")
    assert default_output_paths(tmp_path / "m.gguf") == expected
    assert default_output_paths(tmp_path / "m.neuralink.gguf") == expected


# --- refusals: clear error, non-zero exit, nothing left behind ---


@pytest.fixture
def workdir(synthetic_model: ModelFactory, tmp_path: Path) -> Path:
    """A folder holding a model and its placement, and nothing else."""
    source = synthetic_model("llama", "q8_0")
    model = tmp_path / "model.gguf"
    model.write_bytes(source.read_bytes())
    random_placement(model).save(tmp_path / "placement.npz")
    return tmp_path


def run_convert(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = cli_main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_converts_and_reports(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["convert", str(workdir / "model.gguf"), "--placement", str(workdir / "placement.npz")])
    out = capsys.readouterr().out
    assert code == 0
    assert files_in(workdir) == ["model.gguf", "model.neuralink.gguf", "model.neuralink.sidecar", "placement.npz"]
    assert "relative RMS error" in out and "q8_0" in out


def test_truncated_model_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = workdir / "model.gguf"
    model.write_bytes(model.read_bytes()[:-5000])
    code, err = run_convert(capsys, model, "--placement", workdir / "placement.npz")
    assert code == 1
    assert "model.gguf" in err and "truncated" in err
    assert files_in(workdir) == ["model.gguf", "placement.npz"]


@pytest.mark.parametrize("contents", [b"", b"GGUF", b"not a model at all, just some text\n" * 10])
def test_non_gguf_file_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str], contents: bytes) -> None:
    bogus = workdir / "bogus.gguf"
    bogus.write_bytes(contents)
    code, err = run_convert(capsys, bogus, "--placement", workdir / "placement.npz")
    assert code == 1
    assert "bogus.gguf" in err and "GGUF" in err
    assert files_in(workdir) == ["bogus.gguf", "model.gguf", "placement.npz"]


def test_missing_model_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_convert(capsys, workdir / "absent.gguf", "--placement", workdir / "placement.npz")
    assert code == 1 and "absent.gguf: no such file" in err


def test_fused_gate_up_architecture_is_refused(
    synthetic_model: ModelFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = synthetic_model("phi3", "f32")
    with pytest.raises(UnsupportedModelError, match="fused gate/up"):
        inspect_ffn_model(source)
    code, err = run_convert(capsys, source, "--placement", tmp_path / "any.npz", "-o", tmp_path / "out.gguf")
    assert code == 1 and "fused gate/up" in err
    assert files_in(tmp_path) == []


def test_mixture_of_experts_is_refused(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_expert_count(8)
    writer.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((8, 4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        plan_conversion(path, tmp_path / "any.npz")


def test_unknown_ffn_tensors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "subnorm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    for name, shape in (("ffn_up", (64, 32)), ("ffn_down", (32, 64)), ("ffn_sub_norm", (64,))):
        writer.add_tensor(f"blk.0.{name}.weight", np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="blk.0.ffn_sub_norm.weight"):
        inspect_ffn_model(path)


@pytest.mark.parametrize("where", ["missing-dir/out.gguf", "model.gguf/out.gguf", "."])
def test_unwritable_output_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    code, err = run_convert(capsys, workdir / "model.gguf", "--placement", workdir / "placement.npz",
                            "-o", workdir / where)
    assert code == 1
    assert "cannot write the output there" in err or "is a directory" in err
    assert files_in(workdir) == ["model.gguf", "placement.npz"]


def test_output_over_the_input_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = workdir / "model.gguf"
    before = model.read_bytes()
    for flag in ("-o", "--sidecar"):
        code, err = run_convert(capsys, model, "--placement", workdir / "placement.npz", flag, model)
        assert code == 1 and "is the input model" in err
    assert model.read_bytes() == before


def test_placement_for_another_model_is_refused(
    workdir: Path, synthetic_model: ModelFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    other = synthetic_model("llama", "q8_0", seed=5)  # same shapes, other weights
    random_placement(other).save(workdir / "other.npz")
    code, err = run_convert(capsys, workdir / "model.gguf", "--placement", workdir / "other.npz")
    assert code == 1 and "placement was made for the model with sha256" in err

    wider = synthetic_model("llama", "q8_0", n_ff=768)
    random_placement(wider).save(workdir / "wider.npz")
    code, err = run_convert(capsys, workdir / "model.gguf", "--placement", workdir / "wider.npz")
    assert code == 1 and "768" in err and "another model" in err
    assert files_in(workdir) == ["model.gguf", "other.npz", "placement.npz", "wider.npz"]


def test_already_converted_model_needs_force(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = convert_model(workdir / "model.gguf", workdir / "placement.npz")
    random_placement(first.output, seed=9).save(workdir / "again.npz")
    listing = files_in(workdir)
    code, err = run_convert(capsys, first.output, "--placement", workdir / "again.npz", "-o", workdir / "twice.gguf")
    assert code == 1 and "already converted" in err and first.model_id in err
    assert files_in(workdir) == listing

    second = convert_model(first.output, workdir / "again.npz", workdir / "twice.gguf", force=True)
    directory = read_gguf_directory(second.output)
    assert directory.get(KEY_MODEL_ID) == second.model_id != first.model_id
    assert [k for k in directory.metadata if k == KEY_MODEL_ID] == [KEY_MODEL_ID]  # replaced, not duplicated


def test_failure_midway_leaves_no_output_and_keeps_old_files(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuralink.convert import writer as convert_module

    output, sidecar = default_output_paths(workdir / "model.gguf")
    output.write_bytes(b"previous model")
    sidecar.write_bytes(b"previous sidecar")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "down_columns", fail)  # the sidecar pass, after the GGUF is written
    with pytest.raises(ModelFileError, match="No space left"):
        convert_model(workdir / "model.gguf", workdir / "placement.npz")
    assert output.read_bytes() == b"previous model" and sidecar.read_bytes() == b"previous sidecar"
    assert files_in(workdir) == ["model.gguf", "model.neuralink.gguf", "model.neuralink.sidecar", "placement.npz"]


def test_input_is_never_modified(workdir: Path) -> None:
    model = workdir / "model.gguf"
    digest, mtime = file_sha256(model), os.stat(model).st_mtime_ns
    convert_model(model, workdir / "placement.npz")
    assert file_sha256(model) == digest and os.stat(model).st_mtime_ns == mtime


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    script = REPO_ROOT / "scripts" / "convert_gguf.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_one_command_from_calibration_text(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(synthetic_model("llama", "f32").read_bytes())
    text = tmp_path / "calibration.txt"
    text.write_text(PROMPT.decode() * 40, encoding="utf-8")

    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox", encoding="utf-8")
    refused = run_script(model, "--calibration", short, "--workers", "1")
    assert refused.returncode == 1 and "short.txt" in refused.stderr and "tokens" in refused.stderr
    assert files_in(tmp_path) == ["calibration.txt", "model.gguf", "short.txt"]

    done = run_script(model, "--calibration", text, "--max-tokens", "512", "--workers", "1",
                      "--save-placement", tmp_path / "placement.npz")
    assert done.returncode == 0, done.stderr
    assert files_in(tmp_path) == ["calibration.txt", "model.gguf", "model.neuralink.gguf", "model.neuralink.sidecar",
                                  "placement.npz", "short.txt"]
    placement = Placement.load(tmp_path / "placement.npz")
    assert placement.method == "neuralink" and placement.n_tokens == 512
    with Sidecar.open(tmp_path / "model.neuralink.sidecar", tmp_path / "model.neuralink.gguf") as sidecar:
        assert (sidecar.header.placement_method, sidecar.header.n_tokens) == ("neuralink", 512)
        np.testing.assert_array_equal(sidecar.order(1), placement.orders[1])
    assert relative_max_abs(prompt_logits(model), prompt_logits(tmp_path / "model.neuralink.gguf")) <= 1e-4


@pytest.mark.slow
def test_converted_smollm2_perplexity_within_half_a_percent(smollm2_path: Path, tmp_path: Path) -> None:
    from neuralink.evaluate.perplexity import paired_nll_difference, perplexity

    text = corpus("emma.txt").read_text(encoding="utf-8")
    result = convert_model(smollm2_path, random_placement(smollm2_path), tmp_path / "smollm2.neuralink.gguf")
    assert set(result.gguf_down_types) == {"q8_0"} and max(result.gguf_down_errors) < 0.01

    settings = dict(n_ctx=512, stride=512, max_tokens=3072)
    original = perplexity(smollm2_path, text, **settings)
    converted = perplexity(result.output, text, **settings)
    assert original.n_scored > 3000
    assert converted.perplexity <= original.perplexity * 1.005
    mean, _ = paired_nll_difference(converted, original)
    assert abs(mean) < 0.005  # and not suspiciously better either: the weights barely moved


@pytest.mark.parametrize(("source", "length", "policy", "stored"), [
    (QType.Q4_K, 1536, "auto", QType.Q5_K),   # Qwen2.5-Coder-1.5B: 16 % fewer bytes than q6_K, +0-0.7 % perplexity
    (QType.Q6_K, 1536, "auto", QType.Q5_K),
    (QType.Q4_K, 576, "auto", QType.Q8_0),    # SmolLM2's n_embd does not fit 256-value blocks
    (QType.Q4_1, 1536, "auto", QType.Q8_0),
    (QType.Q8_0, 1536, "auto", QType.Q8_0),
    (QType.F16, 1536, "auto", QType.F16),
    (QType.Q4_K, 1536, "q8_0", QType.Q8_0),
    (QType.Q4_K, 1536, "same", QType.Q4_K),
])
def test_sidecar_down_columns_auto_type(source: QType, length: int, policy: str, stored: QType) -> None:
    assert choose_bundle_down_type(source, length, policy) == stored  # type: ignore[arg-type]
