"""neuralink.Llama's memory plan under a budget: what it counts of the process, and the gate rows it streams to
fit (a mixin before llama_cpp.Llama: it needs the Llama's ``engine``, ``memory_plan``, ``model_path``, its
context's parameters and its logits arrays), and the store it holds whole."""

from __future__ import annotations

import logging
import time

import llama_cpp

from neuralink.runtime.memory_budget import MemoryPlan, gate_layers_to_stream, hold_down_rows, plan_memory

# its messages are neuralink.Llama's
logger = logging.getLogger("neuralink.runtime.llama")


class MemoryPlanning:
    """The plan a budget (explicit, or the memory there is) gives neuralink.Llama, and its streamed gate rows."""

    @property
    def _weights_mapped(self) -> bool:
        """Whether llama.cpp reads its weights from its mapping of the model, not from copies in its heap
        (use_mmap=False, or a lora_path, which turns mapping off in llama-cpp-python)."""
        return self.model_params.load_mode in (llama_cpp.LLAMA_LOAD_MODE_MMAP, llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
                                               llama_cpp.LLAMA_LOAD_MODE_AUTO)

    def _plan_memory(self, budget: int, baseline: int, log: list[str], load_anon_growth: int) -> MemoryPlan:
        # as many compute threads as llama.cpp may run at once; one micro-batch of rows
        threads = max(self.n_threads, self.n_threads_batch or self.n_threads)
        # llama-cpp-python's logits for every position (logits_all) fill as the context does: the process's own;
        # llama.cpp's output buffer, logged at one row, grows to a draft's verification rows at its first one
        process = baseline + (self.scores.nbytes if self._logits_all else 0) + max(0, self._verification_rows - 1) * \
            self._n_vocab * 4
        return plan_memory(self.engine, budget, process, log, threads, self.context_params.n_ubatch,
                           self.n_ctx(), load_anon_growth, weights_in_heap=not self._weights_mapped)

    def _stream_gate_rows_to_fit(self, budget: int, baseline: int, log: list[str], load_anon_growth: int,
                                 cache_policy: str) -> None:
        """Below the minimum with every gate row resident: read the fewest layers' gate rows each token instead
        (under cache policy auto or stream, as many as also leave room for the region stream's buffers)."""
        plan = self.memory_plan
        layers = gate_layers_to_stream(plan, self.engine, room_for_region_stream=cache_policy in ("auto", "stream"))
        if layers <= 0:
            return
        before = plan.minimum
        self.engine.stream_gate_rows(layers)
        self.memory_plan = self._plan_memory(budget, baseline, log, load_anon_growth)
        logger.info("%s: gate rows of %d of %d layers read each time their layer runs, so that the minimum "
                    "(%.1f MiB with all of them resident, now %.1f MiB) fits the budget of %.1f MiB (with room for the "
                    "region stream's buffers under cache policy auto or stream)",
                    self.model_path, layers, self.engine.n_layer, before / 2**20, self.memory_plan.minimum / 2**20,
                    budget / 2**20)

    def _hold_store(self, down_rows: bool | str, preload: bool, cache_bytes: int) -> None:
        """With a cache that holds the whole store: the converted GGUF's down rows where they pay (down_rows=,
        memory_budget.hold_down_rows), then the store read in long sequential reads (preload=). A failure closes
        the Llama before it is raised."""
        engine = self.engine
        try:
            if down_rows:
                hold_down_rows(engine, self.model_path, self.memory_plan, cache_bytes, trial=down_rows == "trial")
            if preload:
                start = time.perf_counter()
                filled = engine.fill_cache()
                logger.info("%s: bundle store read into the cache: %.0f MiB in %.2f s", self.model_path,
                            filled / 2**20, time.perf_counter() - start)
        except Exception:
            self.close()
            raise
