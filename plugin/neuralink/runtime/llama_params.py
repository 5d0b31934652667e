"""Parameters llama-cpp-python does not expose, set on the llama_cpp.Llama objects created within a block.

llama_cpp.Llama builds its model and context parameters from llama.cpp's defaults
(``llama_model_default_params`` / ``llama_context_default_params``) and sets only
the fields it has arguments for; these blocks wrap the defaults it looks up, so
the other fields start where neuralink needs them. Not thread-safe against
another load at the same time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import llama_cpp


@contextlib.contextmanager
def _defaults_with(function: str, **fields: Any) -> Iterator[None]:
    module = llama_cpp.llama.llama_cpp  # where llama_cpp.Llama looks the default parameters up
    defaults = getattr(module, function)

    def changed() -> Any:
        params = defaults()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    setattr(module, function, changed)
    try:
        yield
    finally:
        setattr(module, function, defaults)


def without_weight_repacking() -> contextlib.AbstractContextManager[None]:
    """Models loaded within the block keep their weights in the mapped file, unrepacked.

    llama.cpp copies Q4_0, Q4_K and IQ4_NL weights into interleaved rows for
    its repacked GEMV/GEMM at load (use_extra_bufts).
    """
    return _defaults_with("llama_model_default_params", use_extra_bufts=False)


def outputs_per_micro_batch(rows: int) -> contextlib.AbstractContextManager[None]:
    """Contexts created within the block reserve llama.cpp's compute and output buffers for `rows` output rows per
    micro-batch (n_outputs_max) instead of n_batch rows of logits.

    Without logits_all, llama-cpp-python asks for the last position's logits only, so one row does (the reserve
    for n_batch rows, n_vocab floats each, is 37 MiB at n_batch 64 on a 152k vocabulary); a draft's verification
    asks for 1 + its proposals (neuralink.runtime.draft). llama.cpp refuses a batch asking for more rows than
    this with an assertion that ends the process, so the callers ask for no more.
    """
    return _defaults_with("llama_context_default_params", n_outputs_max=rows)
