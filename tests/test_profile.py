"""Profiling: masks against a numpy reference of the FFN, thresholds, the stats file, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from neuralink.cli import main as cli_main
from neuralink.errors import ModelFileError, ProfileError
from neuralink.formats.coactivation import CoactivationStats
from neuralink.formats.placement import Placement
from neuralink.models.synthetic import write_synthetic_model
from neuralink.profile.activations import ActivationReader
from neuralink.profile.activity import profile_model
from neuralink.profile.text import MIX_CHUNK_CHARS, calibration_documents, read_documents, split_heldout, split_windows

from conftest import carried_text

N_EMBD, N_FF, WINDOW = 128, 512, 128



@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("profile-models")
    return {
        arch: write_synthetic_model(root / f"{arch}.gguf", arch, n_embd=N_EMBD, n_ff=N_FF, n_head=4,
                                    context_length=256)
        for arch in ("arcee", "llama")
    }


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("profile-texts")
    paths = {"calibration": root / "calibration.txt", "heldout": root / "heldout.txt", "short": root / "short.txt"}
    paths["calibration"].write_text(carried_text(500, seed=1))
    paths["heldout"].write_text(carried_text(300, seed=2))
    paths["short"].write_text("The quick brown fox.")
    return paths


def ffn_reference(model: Path, text: Path) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Each layer's FFN input as llama.cpp computed it (ffn_norm), over the windows profiling uses; the weights."""
    weights: dict[str, list[np.ndarray]] = {"up": [], "gate": []}
    tensors = {t.name: t for t in gguf.GGUFReader(model).tensors}
    for layer in range(2):
        for part in weights:
            tensor = tensors.get(f"blk.{layer}.ffn_{part}.weight")
            if tensor is not None:
                weights[part].append(np.asarray(tensor.data, dtype=np.float64))  # (n_ff, n_embd)
    inputs: list[list[np.ndarray]] = [[], []]
    with ActivationReader(model, window=WINDOW) as reader:
        windows = split_windows([reader.tokenize(text.read_text())], reader.text_tokens_per_window, None)
        for tokens in windows:
            reader.evaluate(tokens, "ffn_norm".__eq__, lambda _n, layer, rows: inputs[layer].append(rows.copy()))
    return [np.concatenate(parts).astype(np.float64) for parts in inputs], weights


def test_relu_masks_are_the_native_zeros_of_relu_squared(models: dict[str, Path], texts: dict[str, Path]) -> None:
    stats = profile_model(models["arcee"], [texts["calibration"]], window=WINDOW)
    assert (stats.criterion, stats.activation) == ("relu", "ffn_sqr(relu)")
    assert np.all(stats.thresholds == 0) and math.isnan(stats.target_density)
    inputs, weights = ffn_reference(models["arcee"], texts["calibration"])
    for layer in range(2):
        up = inputs[layer] @ weights["up"][layer].T
        # float32 sums in another order may flip the sign of values within rounding of zero
        decided = np.abs(up) > 1e-4 * np.abs(up).max()
        masks = stats.layer_masks(layer)
        assert masks.shape == up.shape == (stats.n_tokens, N_FF)
        assert np.array_equal(masks[decided], (up > 0)[decided])
        assert decided.mean() > 0.999
        assert np.array_equal(stats.activation_counts[layer], masks.sum(axis=0))


def test_gated_masks_threshold_swiglu_at_the_target_density(models: dict[str, Path], texts: dict[str, Path]) -> None:
    stats = profile_model(models["llama"], [texts["calibration"]], window=WINDOW, density=0.2, criterion="magnitude")
    assert (stats.criterion, stats.activation) == ("magnitude", "ffn_swiglu")
    # thresholds placed on every token of this short text: the density is exact up to ties
    assert np.allclose(stats.densities(), 0.2, atol=1e-3)
    inputs, weights = ffn_reference(models["llama"], texts["calibration"])
    for layer in range(2):
        gate, up = inputs[layer] @ weights["gate"][layer].T, inputs[layer] @ weights["up"][layer].T
        magnitude = np.abs(gate / (1 + np.exp(-gate)) * up)
        threshold = float(stats.thresholds[layer])
        decided = np.abs(magnitude - threshold) > 1e-4 * threshold
        assert np.array_equal(stats.layer_masks(layer)[decided], (magnitude > threshold)[decided])
        assert decided.mean() > 0.99


def test_contribution_is_the_default_and_selects_among_gate_candidates(models: dict[str, Path],
                                                                     texts: dict[str, Path]) -> None:
    stats = profile_model(models["llama"], [texts["calibration"]], window=WINDOW, density=0.3)
    assert (stats.criterion, stats.activation) == ("contribution", "silu(ffn_gate)")
    selection = stats.selection
    assert selection is not None
    inputs, weights = ffn_reference(models["llama"], texts["calibration"])
    tensors = {t.name: t for t in gguf.GGUFReader(models["llama"]).tensors}
    for layer in range(2):
        down = np.asarray(tensors[f"blk.{layer}.ffn_down.weight"].data, dtype=np.float64)  # (n_embd, n_ff)
        down_norm = np.linalg.norm(down, axis=0)
        gate, up = inputs[layer] @ weights["gate"][layer].T, inputs[layer] @ weights["up"][layer].T
        act = gate / (1 + np.exp(-gate))
        # E|up| per neuron, measured on the same text
        np.testing.assert_allclose(selection.up_mean_abs[layer], np.abs(up).mean(axis=0), rtol=1e-3)
        candidate = np.abs(act) * selection.up_mean_abs[layer] * down_norm
        final = np.abs(act * up) * down_norm
        t_c, t_f = float(selection.candidate_thresholds[layer]), float(stats.thresholds[layer])
        decided = (np.abs(candidate - t_c) > 1e-4 * t_c) & (np.abs(final - t_f) > 1e-4 * t_f)
        want = (candidate > t_c) & (final > t_f)
        assert np.array_equal(stats.layer_masks(layer)[decided], want[decided]) and decided.mean() > 0.99
        # candidates are the up rows read: more than the final neurons, counted per neuron
        assert (candidate > t_c).mean() > want.mean()
        np.testing.assert_array_equal(selection.candidate_counts[layer][decided.all(axis=0)],
                                      (candidate > t_c).sum(axis=0)[decided.all(axis=0)])


def test_gate_criterion_thresholds_act_of_the_gate(models: dict[str, Path], texts: dict[str, Path],
                                                   tmp_path: Path) -> None:
    stats = profile_model(models["llama"], [texts["calibration"]], window=WINDOW, density=0.2,
                          criterion="gate_magnitude")
    assert (stats.criterion, stats.activation) == ("gate_magnitude", "silu(ffn_gate)")
    assert np.allclose(stats.densities(), 0.2, atol=1e-3)
    inputs, weights = ffn_reference(models["llama"], texts["calibration"])
    for layer in range(2):
        gate = inputs[layer] @ weights["gate"][layer].T
        magnitude = np.abs(gate / (1 + np.exp(-gate)))
        threshold = float(stats.thresholds[layer])
        decided = np.abs(magnitude - threshold) > 1e-4 * threshold
        assert np.array_equal(stats.layer_masks(layer)[decided], (magnitude > threshold)[decided])
    calibration = tmp_path / "gate.npz"
    stats.save(calibration)
    heldout = profile_model(models["llama"], [texts["heldout"]], window=WINDOW, thresholds_from=calibration,
                            criterion="gate_magnitude")
    assert (heldout.criterion, heldout.activation) == ("gate_magnitude", "silu(ffn_gate)")
    assert np.array_equal(heldout.thresholds, stats.thresholds)
    # a ReLU-family FFN keeps its native zeros whatever is asked
    native = profile_model(models["arcee"], [texts["heldout"]], window=WINDOW, criterion="gate_magnitude")
    assert (native.criterion, native.activation) == ("relu", "ffn_sqr(relu)")


def test_thresholds_from_a_sample_of_the_text_land_near_the_target(models: dict[str, Path],
                                                                   texts: dict[str, Path]) -> None:
    stats = profile_model(models["llama"], [texts["calibration"]], window=WINDOW, density=0.3, threshold_tokens=200)
    assert stats.n_tokens > 600
    assert np.allclose(stats.densities(), 0.3, atol=0.03)


def test_heldout_text_reuses_the_calibration_thresholds(models: dict[str, Path], texts: dict[str, Path],
                                                        tmp_path: Path) -> None:
    calibration = profile_model(models["llama"], [texts["calibration"]], window=WINDOW, density=0.2)
    calibration.save(tmp_path / "calibration.npz")
    heldout = profile_model(models["llama"], [texts["heldout"]], window=WINDOW, density=0.5,
                            thresholds_from=tmp_path / "calibration.npz")
    assert np.array_equal(heldout.thresholds, calibration.thresholds)
    assert heldout.target_density == 0.2  # the calibration's, whatever was asked
    assert not np.allclose(heldout.densities(), 0.2, atol=1e-4)  # not re-fitted to the held-out text
    with pytest.raises(ProfileError, match="another model"):
        profile_model(models["arcee"], [texts["heldout"]], window=WINDOW, thresholds_from=tmp_path / "calibration.npz")


def test_stats_file_round_trip(models: dict[str, Path], texts: dict[str, Path], tmp_path: Path) -> None:
    stats = profile_model(models["llama"], [texts["heldout"]], window=WINDOW, max_tokens=300, min_tokens=100)
    assert stats.n_tokens == 300
    stats.save(tmp_path / "stats.npz")
    loaded = CoactivationStats.load(tmp_path / "stats.npz")
    assert loaded.model_sha256 == stats.model_sha256 and loaded.sources == (str(texts["heldout"]),)
    assert np.array_equal(loaded.thresholds, stats.thresholds)
    assert np.array_equal(loaded.activation_counts, stats.activation_counts)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.masks or [], stats.masks or [], strict=True))
    light = CoactivationStats.load(tmp_path / "stats.npz", with_masks=False)
    assert light.masks is None and light.n_tokens == 300
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "stats.npz").read_bytes()[:5000])
    (tmp_path / "text.npz").write_text("a text file, not an archive")
    for bad in ("other.npz", "truncated.npz", "text.npz"):
        with pytest.raises(ModelFileError, match=f"{bad}: not a neuralink co-activation stats file"):
            CoactivationStats.load(tmp_path / bad)
    with pytest.raises(ModelFileError, match=r"text.npz: not a neuralink placement file \(.npz archive\) \(starts with"):
        Placement.load(tmp_path / "text.npz")
    with pytest.raises(ModelFileError, match=r"missing.npz: no such neuralink co-activation stats file"):
        CoactivationStats.load(tmp_path / "missing.npz")


def test_documents_and_windows(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"prompt": "second", "id": 2}) + "\n")
    assert read_documents([prompts]) == ["first", "second"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ProfileError, match=r"bad\.jsonl:2: not a JSON line"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "field.jsonl").write_text(json.dumps({"body": "no"}) + "\n")
    with pytest.raises(ProfileError, match=r'field\.jsonl:1: expected an object with a string "text"'):
        read_documents([tmp_path / "field.jsonl"])
    with pytest.raises(ProfileError, match="no such text file"):
        read_documents([tmp_path / "missing.txt"])

    documents = [np.arange(10), np.arange(100, 125)]
    windows = split_windows(documents, per_window=8, max_tokens=30)
    assert [len(w) for w in windows] == [8, 2, 8, 8, 4]  # a window never spans two documents
    assert sum(map(len, windows)) == 30


def test_several_calibration_texts_are_interleaved_start_to_end(tmp_path: Path) -> None:
    # profiling takes the first tokens and the quality check the end: both must see every text, in proportion
    code = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(3000))  # ~96k characters
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": code}) + "\n")
    prose = "".join(f"Line {i} of a story about the sea.\n" for i in range(1500))  # ~50k characters
    (tmp_path / "prose.txt").write_text(prose)
    docs = calibration_documents([tmp_path / "code.jsonl", tmp_path / "prose.txt"])
    is_prose = ["Line" in d for d in docs]
    assert "".join(d for d, p in zip(docs, is_prose) if not p) == code  # nothing lost, each text in its order
    assert "".join(d for d, p in zip(docs, is_prose) if p) == prose
    assert all(len(d) < MIX_CHUNK_CHARS + 40 for d in docs)  # cut at the first line break past the size
    assert sum(is_prose[:6]) in (2, 3)  # the start: both texts, about 2 : 1 as their sizes
    profiled, heldout = split_heldout(docs, 8000)
    assert "def f2999" in heldout and "Line 1499" in heldout  # the end of each text is held out
    # one text is read as it is
    assert calibration_documents([tmp_path / "code.jsonl"]) == [code]


def run_profile_cli(*args: str) -> int:
    return cli_main(["profile", *args])


@pytest.mark.parametrize("case", ["missing model", "not gguf", "truncated gguf", "short text", "no output dir"])
def test_bad_input_fails_cleanly(case: str, models: dict[str, Path], texts: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    model, text, output = models["llama"], texts["calibration"], tmp_path / "stats.npz"
    expected = {"missing model": "no such model file", "not gguf": "not a GGUF file",
                "truncated gguf": "could not load", "short text": "at least 256 needed",
                "no output dir": "does not exist"}[case]
    if case == "missing model":
        model = tmp_path / "missing.gguf"
    elif case == "not gguf":
        model = texts["short"]
    elif case == "truncated gguf":
        model = tmp_path / "truncated.gguf"
        model.write_bytes(models["llama"].read_bytes()[:100_000])
    elif case == "short text":
        text = texts["short"]
    else:
        output = tmp_path / "no-such-dir" / "stats.npz"
    code = run_profile_cli(str(text), "-o", str(output), "--model", str(model), "--window", str(WINDOW))
    error = capsys.readouterr().err
    assert code == 1
    assert expected in error
    assert not output.exists()
    assert not list(output.parent.glob(".*.tmp")) if output.parent.exists() else True


def test_cli_profiles_calibration_then_heldout(models: dict[str, Path], texts: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    calibration, heldout = tmp_path / "calibration.npz", tmp_path / "heldout.npz"
    common = ["--model", str(models["llama"]), "--window", str(WINDOW), "--density", "0.1", "--criterion",
              "gate_magnitude"]
    assert run_profile_cli(str(texts["calibration"]), "-o", str(calibration), *common) == 0
    assert run_profile_cli(str(texts["heldout"]), "-o", str(heldout), *common,
                           "--thresholds-from", str(calibration)) == 0
    assert "gate_magnitude on silu(ffn_gate)" in capsys.readouterr().out
    assert np.array_equal(CoactivationStats.load(heldout).thresholds, CoactivationStats.load(calibration).thresholds)


@pytest.mark.slow
def test_smollm2_profile(tmp_path: Path) -> None:
    from neuralink import default_model_path

    text = tmp_path / "text.txt"
    text.write_text(carried_text(600, seed=3))
    stats = profile_model(default_model_path(), [text], window=256, density=0.2, max_tokens=512,
                          criterion="gate_magnitude")
    assert (stats.architecture, stats.activation, stats.criterion) == ("llama", "silu(ffn_gate)", "gate_magnitude")
    assert (stats.n_layer, stats.n_ff, stats.n_tokens) == (30, 1536, 512)
    assert np.allclose(stats.densities(), 0.2, atol=2e-3)
    # the last layer's FFN ran on every token, not only on the output rows
    assert stats.layer_masks(stats.n_layer - 1).any(axis=1).mean() > 0.95


def test_quantile_tables_follow_the_density_rule_at_every_point() -> None:
    from neuralink.profile.thresholds import density_threshold, density_thresholds

    values = np.random.default_rng(4).standard_exponential(50_001).astype(np.float32)
    densities = np.linspace(0.0, 1.0, 101)
    one_sort = density_thresholds(values, densities)
    assert [float(v) for v in one_sort] == [density_threshold(values, d) for d in densities]
    assert np.all(np.diff(one_sort) <= 0)  # denser: lower thresholds


def test_ctrl_c_during_a_decode_stops_the_work(smollm2_path: Path) -> None:
    # SIGINT lands while llama.cpp computes; Python runs its handler at the eval callback's first bytecode, where a
    # KeyboardInterrupt would be lost at the C boundary ("Exception ignored on calling ctypes callback function")
    # and profiling would go on to write its output
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, threading, time
        import numpy as np
        from neuralink.profile.activations import ActivationReader
        with ActivationReader({str(smollm2_path)!r}, window=512, threads=2) as reader:
            tokens = np.resize(reader.tokenize("It was a bright cold day in April. " * 40), 500)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            start = time.monotonic()
            try:
                while time.monotonic() - start < 5:
                    reader.evaluate(tokens, lambda name: name == "ffn_up", lambda *rows: None)
                print("finished")
            except KeyboardInterrupt:
                print("interrupted")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "interrupted" and "Exception ignored" not in done.stderr, (done.stdout, done.stderr[-2000:])


def test_no_command_writes_its_output_over_one_of_its_inputs(models: dict[str, Path], texts: dict[str, Path],
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(models["llama"].read_bytes())
    text = tmp_path / "calibration.txt"
    text.write_text(texts["calibration"].read_text())
    stats = tmp_path / "stats.npz"
    assert cli_main(["profile", "--model", str(model), "-o", str(stats), "--window", "128", str(text)]) == 0
    placement = tmp_path / "placement.npz"
    assert cli_main(["place", "--model", str(model), "-o", str(placement), str(stats)]) == 0
    capsys.readouterr()
    before = {path: path.read_bytes() for path in (model, text, stats, placement)}
    cases = [
        (["profile", "--model", str(model), "-o", str(model), "--window", "128", str(text)], "is the model"),
        (["profile", "--model", str(model), "-o", str(text), "--window", "128", str(text)],
         "is the calibration text 1"),
        (["place", "--model", str(model), "-o", str(model), str(stats)], "is the model"),
        (["place", "--model", str(model), "-o", str(stats), str(stats)], "is the stats file"),
        (["plot", "-o", str(stats), str(stats)], "is the stats file"),
        (["plot", "-o", str(placement), "--placement", str(placement), str(stats)], "is the placement file"),
        (["convert", str(model), "--calibration", str(text), "-o", str(text)], "is the calibration text 1"),
        (["convert", str(model), "--calibration", str(text), "-o", str(tmp_path / "c.gguf"),
          "--save-placement", str(model)], "is the input model"),
        (["convert", str(model), "--placement", str(placement), "-o", str(tmp_path / "c.gguf"),
          "--sidecar", str(placement)], "is the placement"),
    ]
    for argv, said in cases:
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert said in err and "an input is never overwritten" in err, (argv, err)
    assert {path: path.read_bytes() for path in before} == before
    assert not (tmp_path / "c.gguf").exists()


def test_a_model_whose_ffn_computes_nan_is_refused_by_layer(models: dict[str, Path], texts: dict[str, Path],
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "nan.gguf"
    broken.write_bytes(models["llama"].read_bytes())
    (gate,) = [t for t in gguf.GGUFReader(models["llama"]).tensors if t.name == "blk.1.ffn_gate.weight"]
    assert gate.tensor_type == gguf.GGMLQuantizationType.F32
    with open(broken, "r+b") as f:  # one row of layer 1's gate rows: NaN
        f.seek(gate.data_offset)
        f.write(np.full(N_EMBD, np.nan, dtype=np.float32).tobytes())
    output = tmp_path / "stats.npz"
    for criterion in ("contribution", "gate_magnitude"):
        code = run_profile_cli(str(texts["calibration"]), "-o", str(output), "--model", str(broken), "--window",
                               str(WINDOW), "--criterion", criterion)
        err = capsys.readouterr().err
        assert code == 1 and f"{broken}: layer 1: the FFN's activations on the calibration text hold NaN" in err, err
        assert not output.exists()
