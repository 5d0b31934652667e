"""Corrupted sidecars: every mutation is refused with a clear error or changes nothing, never a silent difference.

A few hundred random mutations of a real sidecar (flipped bytes, overwritten
runs, truncation): the engine either refuses the file (ModelFileError at
open, EngineIOError naming layer and neuron at read) or computes exactly what
it computes from the intact file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import neuralink
from neuralink import _engine

MUTATIONS = 300


def outputs(model: Path, sidecar: Path, x: np.ndarray, n_layer: int) -> np.ndarray:
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="dense", cache_policy="none")
    return np.stack([engine.forward(il, x, "silu") for il in range(n_layer)])


@pytest.mark.parametrize("criterion", ["contribution", "gate_magnitude"])
def test_mutated_sidecars_fail_loudly_or_change_nothing(converted_model, contribution_pair_for_fuzz, criterion: str,
                                                        tmp_path: Path) -> None:
    model, sidecar = contribution_pair_for_fuzz if criterion == "contribution" else converted_model("llama", "q8_0")
    data = sidecar.read_bytes()
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    want = outputs(model, sidecar, x, 2)
    rng = np.random.default_rng(1)
    mutated = tmp_path / sidecar.name
    link = tmp_path / model.name
    link.symlink_to(model)
    outcomes = {"refused": 0, "identical": 0}
    for i in range(MUTATIONS):
        blob = bytearray(data)
        kind = i % 3
        if kind == 0:  # one flipped bit anywhere
            at = int(rng.integers(len(blob)))
            blob[at] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # a run of random bytes
            at = int(rng.integers(len(blob)))
            n = int(rng.integers(1, 4097))
            blob[at:at + n] = rng.integers(0, 256, min(n, len(blob) - at), dtype=np.uint8).tobytes()
        else:  # cut short, at a 4 KiB boundary or anywhere
            blob = blob[: int(rng.integers(1, len(blob)))]
        mutated.write_bytes(bytes(blob))
        try:
            got = outputs(link, mutated, x, 2)
        except (neuralink.ModelFileError, neuralink.EngineIOError, ValueError) as e:
            assert str(mutated) in str(e) or "sidecar" in str(e), f"mutation {i}: an error that names no file: {e}"
            outcomes["refused"] += 1
            continue
        assert np.array_equal(got, want), f"mutation {i} (kind {kind}) changed the output silently"
        outcomes["identical"] += 1
    # most mutations hit covered bytes: they must have been refused, not ignored
    assert outcomes["refused"] > MUTATIONS // 2, outcomes


@pytest.fixture(scope="module")
def contribution_pair_for_fuzz(synthetic_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from neuralink.convert.pipeline import convert_from_text

    from conftest import carried_text

    root = tmp_path_factory.mktemp("fuzz")
    text = root / "calibration.txt"
    text.write_text(carried_text(2000, seed=21))
    result = convert_from_text(synthetic_model("llama", "q8_0"), [text], root / "m.gguf", root / "m.sidecar",
                               density=0.3, max_tokens=512, heldout_tokens=128, workers=1)
    return result.output, result.sidecar
