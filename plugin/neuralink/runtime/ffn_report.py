"""What neuralink.Llama's engine did: its counters (``ffn_stats``) and the one-line account a verbose completion
ends with (``ffn_summary``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np


def summary_line(rows: np.ndarray, n_layer: int) -> str:
    """Tokens, neurons, reads, bytes, cache hits and I/O time per token of ``ffn_stats`` rows."""
    if not rows.size:
        return "neuralink FFN: no layer evaluated"
    tokens = int(rows["n_tokens"].sum()) // n_layer
    per = max(tokens, 1)
    return (f"neuralink FFN: {tokens} tokens, {rows['computed_pairs'].sum() / per / n_layer:.0f} neurons "
            f"active/layer/token (predicted {rows['predicted_pairs'].sum() / per / n_layer:.0f}), "
            f"{rows['reads'].sum() / per:.1f} reads and {rows['bytes_read'].sum() / per / 2**20:.2f} MiB "
            f"read/token, {rows['cache_hits'].sum() / per:.0f} cache hits/token, "
            f"I/O {rows['io_ns'].sum() / per / 1e6:.2f} ms/token "
            f"({rows['stall_ns'].sum() / per / 1e6:.2f} ms waited)")


def down_trial_note(trial: dict[str, Any]) -> str:
    """The down trial (Engine.try_down_rows) in a few words: what it is timing or what it kept."""
    if not trial.get("layers"):
        return ""
    timed = f"a decoded token {trial['rows_ms']:.1f} ms with rows, {trial['columns_ms']:.1f} ms with columns"
    if not trial["settled"]:
        return f"; down projection on trial after {trial['tokens']} decoded tokens ({timed})"
    return f"; down projection by {'rows' if trial['rows_kept'] else 'columns'} ({timed})"


class FfnReporting:
    """neuralink.Llama's methods that report the engine's work (a mixin before llama_cpp.Llama: it needs the
    Llama's ``engine``, ``verbose``, ``_stats``, ``_summarized`` and ``_draft_gate``)."""

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.create_completion``; with ``verbose=True`` and a sidecar, it also prints the
        FFN statistics of the completion (``ffn_summary``) to stderr when it is done (after the last chunk
        when streaming). ``__call__`` and ``create_chat_completion`` go through here."""
        result = super().create_completion(*args, **kwargs)
        if not self.verbose or self._engine is None or not self._engine.sparse:
            return result
        if isinstance(result, Iterator):
            return self._report_when_done(result)
        print(self.ffn_summary(), file=sys.stderr)
        return result

    def _report_when_done(self, chunks: Iterator[Any]) -> Iterator[Any]:
        yield from chunks
        print(self.ffn_summary(), file=sys.stderr)

    @property
    def stall_share(self) -> float | None:
        """Of recent decoded tokens' time, the share spent waiting for reads: the engine's moving average
        (``_engine.DraftGate``, each new token a quarter, as neuralink-run's), None before the first."""
        gate = getattr(self, "_draft_gate", None)
        return gate.stall_share if gate is not None else None

    def ffn_summary(self) -> str:
        """One line on the FFN work since the last summary: tokens, neurons, reads, bytes, cache, I/O time."""
        stats = self.ffn_stats()
        start = self._summarized if self._summarized <= len(stats) else 0  # ffn_stats(reset=True) restarts
        rows = stats[start:] if stats.size else stats
        self._summarized = len(stats)
        return summary_line(rows, max(self.engine.n_layer, 1)) + down_trial_note(self.engine.down_trial)

    def ffn_stats(self, reset: bool = False) -> np.ndarray:
        """Counters of every layer evaluation since the start (or the last reset), one row each.

        Fields: il, n_tokens, predicted (neurons evaluated), truly_active (by
        the criterion; -1 if unknown), reads, cache_hits, bytes_read,
        active_bytes (record bytes of the evaluated neurons), io_ns (first
        read issued to last completed), stall_ns (the longest wait of a
        compute thread for its reads: I/O not hidden by compute), layer_ns
        (the layer's wall time), predicted_pairs and computed_pairs ((token,
        neuron) pairs selected by the predictor and entering the down
        projection: the per-token density of a batch).
        Empty for the dense engine.
        """
        self._stats.append(self.engine.take_stats())
        stats = np.concatenate(self._stats) if self._stats else np.array([])
        self._stats = [] if reset else [stats]
        return stats
