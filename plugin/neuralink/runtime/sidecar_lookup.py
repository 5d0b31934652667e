"""Which sidecar a converted model goes with: the one its metadata names, beside it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from neuralink.formats.constants import KEY_SIDECAR_NAME
from neuralink.formats.files import conversion_journal, recover_pair
from neuralink.formats.gguf_directory import read_gguf_directory

logger = logging.getLogger(__name__)


def find_sidecar(model_path: str | os.PathLike[str]) -> Path | None:
    """The sidecar a converted model names in its metadata, if it sits beside the model.

    A conversion interrupted between renaming its two files is completed first
    (``neuralink.formats.files.recover_pair``), so the pair found is whole.
    """
    recover_pair(conversion_journal(model_path))
    name = read_gguf_directory(model_path).get(KEY_SIDECAR_NAME)
    if not name:
        return None
    path = Path(model_path).parent / str(name)
    return path if path.is_file() else None


def named_sidecar(model_path: str | os.PathLike[str]) -> str | None:
    """The sidecar file name a converted model's metadata gives, None for an unconverted model."""
    name = read_gguf_directory(model_path).get(KEY_SIDECAR_NAME)
    return str(name) if name else None


def default_predictor(sidecar: str | os.PathLike[str], validated: str) -> str:
    """The predictor to run by default: what the conversion validated for quality, else every neuron ("dense",
    said in the log), so that a default never runs an unmeasured density."""
    if validated != "dense":
        return validated
    logger.warning("%s: no sparse setting of this sidecar was validated for quality (`neuralink convert "
                   "--calibration` runs the quality search, which keeps one only within its perplexity budget); "
                   "reading every neuron (predictor 'dense')", sidecar)
    return "dense"
