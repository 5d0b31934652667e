"""neuralink.Llama frees each completion's sampler when the next one replaces it (a mixin before llama_cpp.Llama)."""

from __future__ import annotations

from typing import Any


class SamplerRelease:
    """llama-cpp-python builds a sampler chain for every completion (and a temporary one for a ``sample()`` before
    any) and drops the one before. A ``LlamaSampler`` is a reference cycle (its exit stack's callback closes over
    it), so only a full garbage collection frees it, and with it the chain's C memory, which the collector does not
    count: 1.7 MiB a completion on Qwen2.5-Coder-1.5B's 152k-token vocabulary, 0.5 on SmolLM2's 49k. A long-lived
    process's full collections are rare, so a server's memory grew with its requests. Here the sampler replaced is
    closed at once (llama_sampler_free); it is not used again, since every sample reads ``self._sampler`` afresh."""

    @property
    def _sampler(self) -> Any:
        return self.__dict__.get("_neuralink_sampler")

    @_sampler.setter
    def _sampler(self, sampler: Any) -> None:
        replaced = self.__dict__.get("_neuralink_sampler")
        self.__dict__["_neuralink_sampler"] = sampler
        if replaced is not None and replaced is not sampler:
            replaced.close()
