"""The low-rank activity predictor: fitting, storage in the sidecar, and the engine's use of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_llama_hook import rel_max_abs
from test_sparse import read_ffn

import neuralink
from neuralink import _engine
from neuralink.convert.pipeline import fit_model_predictor
from neuralink.convert.predictor import activity_score, capture_ffn_inputs, fit_layer
from neuralink.convert.writer import convert_model
from neuralink.evaluate.predictor_quality import evaluate_predictor
from neuralink.formats.files import file_sha256
from neuralink.formats.placement import Placement
from neuralink.formats.sidecar import Sidecar

from conftest import ModelFactory

# enough varied English for a few hundred calibration tokens on the synthetic vocabulary
CALIBRATION = " ".join([
    "The quick brown fox jumps over the lazy dog while the model reads its layer from flash memory.",
    "It was the first time that people could run a new model on a phone with little memory.",
    "A neuron that is active for one token is often active for the next one, and that is the point.",
    "We measure what we read, how long it takes, and which of the bytes were needed after all.",
] * 6)
HELD_OUT = "Once upon a time there was a dog that could read tokens faster than any fox in the world."


def placement_for(model: Path, criterion: str, threshold: float, n_layer: int = 2, n_ff: int = 512) -> Placement:
    rng = np.random.default_rng(11)
    return Placement("random", [rng.permutation(n_ff).astype(np.int32) for _ in range(n_layer)],
                     [np.array([0], np.int32)] * n_layer, [np.full(n_ff, 0.3, np.float32)] * n_layer,
                     np.full(n_layer, threshold, np.float32), criterion, 0, file_sha256(model))


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("texts")
    (root / "calibration.txt").write_text(CALIBRATION)
    (root / "held_out.txt").write_text(HELD_OUT * 4)
    return root / "calibration.txt", root / "held_out.txt"


def test_fit_reaches_the_recall_target_on_calibration_data() -> None:
    rng = np.random.default_rng(0)
    # inputs with a low-dimensional structure, as real hidden states have
    x = (rng.standard_normal((600, 16)) @ rng.standard_normal((16, 64))).astype(np.float32)
    w = rng.standard_normal((256, 64)).astype(np.float32) / 8
    fit = fit_layer(x, w, rank=16, activation="relu_sqr", criterion="relu", activity_threshold=0.0, recall=0.99)
    assert fit.recall >= 0.99
    assert fit.predicted_density < 0.9, "a predictor that predicts everything is no predictor"
    assert fit.a.shape == (16, 64) and fit.b.shape == (256, 16)


@pytest.mark.parametrize(("arch", "criterion", "threshold"), [("arcee", "relu", 0.0), ("llama", "gate_magnitude", 0.6)])
def test_engine_lowrank_equals_the_reference_of_what_it_predicts(
    synthetic_model: ModelFactory, texts, tmp_path: Path, arch: str, criterion: str, threshold: float
) -> None:
    calibration, held_out = texts
    source = synthetic_model(arch, "f32")
    placement = placement_for(source, criterion, threshold)
    predictor = fit_model_predictor(source, [calibration], placement, rank=64, recall=0.99, max_tokens=400)
    assert all(fit.recall >= 0.99 for fit in predictor.layers)
    result = convert_model(source, placement, tmp_path / "m.gguf", tmp_path / "m.sidecar", predictor=predictor,
                           bundle_parts="gate-up-down")
    with Sidecar.open(result.sidecar, result.output) as sidecar:
        assert sidecar.header.predictor_rank == 64
        a_b = [tuple(np.array(t) for t in sidecar.predictor(il)) for il in range(2)]
        predictor_thresholds = sidecar.header.predictor_thresholds
        activation = sidecar.header.activation

    engine = _engine.Engine(str(result.output), sidecar=str(result.sidecar), predictor="lowrank", cache_policy="none")
    # real inputs of the converted model on held-out text
    inputs = capture_ffn_inputs(result.output, [held_out], max_tokens=64)
    for il in range(2):
        x = inputs[il][:8]
        w = read_ffn(result.output, il)
        pre = x.astype(np.float64) @ (w["gate"] if arch != "arcee" else w["up"]).T
        a, b = a_b[il]
        predicted = activity_score(activation, criterion, (x @ a.T) @ b.T) > predictor_thresholds[il]
        truly = activity_score(activation, criterion, pre) > threshold
        act = activity_score(activation, "relu" if arch == "arcee" else "gate_magnitude", pre)
        if arch == "arcee":
            h = act
        else:
            h = (pre / (1 + np.exp(-pre))) * (x.astype(np.float64) @ w["up"].T)
        # the engine computes exactly the predicted neurons and keeps those the criterion accepts
        want = (h * (predicted & truly)) @ w["down"].T
        got = engine.forward(il, x, activation)
        assert rel_max_abs(got, want) <= 1e-5
        stats = engine.take_stats()
        assert stats[-1]["predicted"] == predicted.any(axis=0).sum()
        assert predicted.mean() < 0.95, "the predictor leaves neurons out"

    # the reporting command's numbers come from the same definitions
    reports = evaluate_predictor(result.output, result.sidecar, [held_out], max_tokens=64)
    assert len(reports) == 2 and all(0.5 <= r.recall <= 1.0 and 0 < r.precision <= 1.0 for r in reports)
    # converted without a quality search: no sparse setting was validated, so the default reads every neuron
    llm = neuralink.Llama(str(result.output), n_ctx=128, verbose=False, ffn="engine")
    assert llm.engine.predictor == "dense"
    llm.close()
    llm = neuralink.Llama(str(result.output), n_ctx=128, verbose=False,
                          predictor="lowrank" if arch == "arcee" else "gate")
    assert llm("The quick brown fox", max_tokens=4)["choices"][0]["text"] is not None
    llm.close()


def test_lowrank_without_a_fitted_predictor_is_refused(converted_model) -> None:
    model, sidecar = converted_model("arcee", "f32")
    with pytest.raises(neuralink.UnsupportedModelError, match="no low-rank predictor"):
        neuralink.Llama(str(model), sidecar=str(sidecar), predictor="lowrank", n_ctx=128, verbose=False)
