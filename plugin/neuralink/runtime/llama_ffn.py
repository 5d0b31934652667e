"""Who computes neuralink.Llama's FFNs (its ``ffn`` argument): neuralink's engine, or llama.cpp itself.

With the whole model in RAM nothing is read from storage per token, so the engine's sparsity saves arithmetic
only, and llama.cpp's repacked kernels do that arithmetic faster on some CPUs (Qwen2.5-Coder-1.5B on a 2.6 GHz
Zen 4, `bench e2e` uncapped: the engine 0.64-0.78x stock, llama.cpp on the converted file 0.99-1.04x since
patches/0003 repacks its q5_K ffn_down on x86 as well). ``ffn="auto"`` therefore leaves the
FFNs to llama.cpp where stock llama.cpp running the whole model fits what the process may use and nobody asked
for the engine (a budget or one of its options); the converted GGUF is a valid model for llama.cpp (its FFN
tensors permuted, same outputs), so nothing of the sidecar is read then.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from neuralink import _engine
from neuralink.runtime.llama_params import without_weight_repacking
from neuralink.runtime.memory_budget import release_free_heap

# its messages are neuralink.Llama's
logger = logging.getLogger("neuralink.runtime.llama")

# the ffn argument's values
FFN_CHOICES = ("auto", "engine", "llama")


def engine_options_given(*, sidecar: Any, predictor: str | None, cache_policy: str, cache_bytes: int,
                         queue_depth: int, io_backend: str, collapse_gap: int | None, adaptive_collapse: bool,
                         memory_budget: Any, direct_io: bool, thresholds: Any, predictor_thresholds: Any,
                         candidate_thresholds: Any, down_rows: bool | str, preload: bool, lock_weights: bool | None,
                         prompt_lookup: int | None, output_screen: Any = "auto") -> list[str]:
    """The names of neuralink.Llama's engine arguments given other than their defaults: whoever gives one asks
    for the engine (ffn='auto' then runs it; ffn='llama' refuses them). prompt_lookup=0 (no drafts) is not one:
    llama.cpp's FFN drafts nothing either."""
    return [name for name, given in (
        ("sidecar=False", sidecar is False), ("predictor", predictor is not None),
        ("cache_policy", cache_policy != "auto"), ("cache_bytes", cache_bytes != 0),
        ("queue_depth", queue_depth != _engine.DEFAULT_QUEUE_DEPTH), ("io_backend", io_backend != "auto"),
        ("collapse_gap", collapse_gap is not None), ("adaptive_collapse", adaptive_collapse),
        ("memory_budget", memory_budget is not None), ("direct_io", not direct_io),
        ("thresholds", thresholds is not None), ("predictor_thresholds", predictor_thresholds is not None),
        ("candidate_thresholds", candidate_thresholds is not None), ("down_rows", down_rows is not True),
        ("preload", preload is not True), ("lock_weights", lock_weights is not None),
        ("prompt_lookup", prompt_lookup not in (None, 0)), ("output_screen", output_screen is True)) if given]


class FfnChoice:
    """neuralink.Llama's side of the ffn argument (a mixin before llama_cpp.Llama: it needs the Llama's
    ``_ffn_by_llama``, ``_closed``, ``_engine``, ``_hook_api`` and ``_vocab_only``)."""

    def _load_for_llama_ffn(self, model_path: str, args: tuple, kwargs: dict[str, Any], ffn: str,
                            sidecar: Any, repack_weights: bool | None, why: str) -> None:
        """Load as llama_cpp.Llama does, with no engine: llama.cpp computes the FFNs from its mapped weights
        (repacked where it has faster kernels, unless repack_weights=False)."""
        self._ffn_by_llama = True
        self._verification_rows = 0  # llama-cpp-python's own drafts (draft_model=), as stock runs them
        with contextlib.nullcontext() if repack_weights is not False else without_weight_repacking():
            super().__init__(model_path, *args, **kwargs)
        release_free_heap()
        self._neuralink_args = dict(ffn=ffn, sidecar=sidecar, repack_weights=repack_weights)
        self._start_reporting()
        logger.info("%s: llama.cpp computes the FFNs from the mapped weights, as stock does (%s; ffn='engine' or a "
                    "memory_budget runs neuralink's engine)", model_path, why)

    @property
    def ffn(self) -> str:
        """Who computes this model's FFNs: "engine" (neuralink's) or "llama" (llama.cpp itself: the ffn argument)."""
        return "llama" if self._ffn_by_llama else "engine"

    @property
    def engine(self) -> _engine.Engine:
        """The engine serving this model's FFNs (layer status, bytes, counters)."""
        if self._ffn_by_llama:
            raise RuntimeError(f"{self.model_path}: llama.cpp computes this model's FFNs (ffn='llama', or 'auto' "
                               "with the whole model fitting in memory): there is no engine; ffn='engine' loads one")
        if self._engine is None:
            raise RuntimeError("this Llama was loaded with vocab_only=True: the tokenizer only" if self._vocab_only
                               else "this Llama is closed")
        return self._engine

    def _check_open(self) -> None:
        """A clear error on a closed model, where llama.cpp would be handed a freed context."""
        if self._closed:
            raise RuntimeError("this Llama is closed")

    @contextlib.contextmanager
    def stock_ffn(self) -> Iterator[None]:
        """Within the block, llama.cpp computes the FFNs itself (from the mapped weights).

        For A/B checks: the rest of the model, the KV cache and the sampler are
        shared, so outputs differ only by the FFN computation. (With ffn='llama' it does already.)
        """
        self._check_open()
        if self._ffn_by_llama:
            yield
            return
        assert self._hook_api is not None and self._engine is not None, "this Llama is closed"
        self._hook_api.detach(self._ctx.ctx)
        try:
            yield
        finally:
            self._hook_api.attach(self._ctx.ctx, self._engine.hook_address)
