"""neuralink.Llama's output screen: under a memory budget, a coarse copy of the output matrix in its place.

An untied output matrix is the largest thing llama.cpp reads every token
(Qwen2.5-Coder-1.5B: 182.6 MiB of q6_K), so under a budget it takes that much
from the bundle cache. The engine's screen (output_screen.h) keeps a q3_K copy
instead (95.6 MiB, and 5.6 MiB of recently used exact rows), ranks the
vocabulary with it and multiplies exactly, as llama.cpp does, the rows within
a margin of the coarse maximum: greedy decoding takes llama.cpp's token, the
likely tokens' logits are exact, the tail keeps the copy's (docs/engine.md,
"The output screen").
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from neuralink import _engine
from neuralink.errors import OptionError, UnsupportedModelError
from neuralink.formats.constants import LAZY_OUTPUT_KEY

logger = logging.getLogger(__name__)

# the coarse copy's type and the margin (nats below the coarse maximum) within which rows are multiplied exactly:
# the engine's (OutputScreenOptions), which neuralink-run uses too
OUTPUT_SCREEN_TYPE: str = _engine.OUTPUT_SCREEN_TYPE
OUTPUT_SCREEN_MARGIN: float = _engine.OUTPUT_SCREEN_MARGIN


def check_output_screen_choice(choice: Any) -> None:
    """OptionError unless `choice` (neuralink.Llama's output_screen) is "auto", True or False (not 1 or 0)."""
    if not (choice == "auto" or isinstance(choice, bool)):
        raise OptionError(f"output_screen={choice!r}: expected 'auto', True or False")


def start_output_screen(engine: _engine.Engine, choice: Any, bounded: bool, model_path: str | os.PathLike[str],
                        n_threads: int, kv_overrides: dict[str, Any]) -> bool:
    """Make the engine's output screen before llama.cpp loads, where `choice` (neuralink.Llama's output_screen)
    asks for it: True always (UnsupportedModelError where the model's output matrix cannot be screened), "auto"
    under a budget (`bounded`) for a sparse engine where the model's can. Sets the kv override that has
    llama.cpp map the output matrix lazily. Returns whether it was made."""
    if choice is False or choice == "auto" and not (bounded and engine.sparse):
        return False
    why = _engine.output_screen_unsupported(engine, OUTPUT_SCREEN_TYPE)
    if why:
        if choice is True:
            raise UnsupportedModelError(f"{model_path}: output_screen=True, but {why}")
        logger.info("%s: no output screen: %s", model_path, why)
        return False
    start = time.perf_counter()
    engine.screen_output(OUTPUT_SCREEN_TYPE, OUTPUT_SCREEN_MARGIN, n_threads)
    screen = engine.output_screen
    logger.info("%s: the output matrix screened by a %s copy of %.1f MiB in place of its %.1f MiB (made in %.1f s)",
                model_path, screen["coarse_type"], screen["resident_bytes"] / 2**20, screen["matrix_bytes"] / 2**20,
                time.perf_counter() - start)
    kv_overrides[LAZY_OUTPUT_KEY] = True
    return True


def confirm_output_screen(engine: _engine.Engine, model_path: str | os.PathLike[str]) -> None:
    """Once llama.cpp has built its graphs: drop a screen it did not hand the output product to (a LoRA adapter
    on the output matrix, say), so that the memory plan counts and locks the matrix llama.cpp reads."""
    if engine.output_screen is not None and not engine.output_taken:
        logger.warning("%s: llama.cpp computes the output product itself (not offered to the hook); the output "
                       "screen is dropped and the output matrix counted", model_path)
        engine.drop_output_screen()
