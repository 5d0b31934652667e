"""What neuralink.Llama's engine did: its counters (``ffn_stats``) and the one-line account a verbose completion
ends with (``ffn_summary``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from neuralink import _engine

# The most recent layer evaluations ffn_stats() keeps, 104 bytes each: 32,768 (~3.3 MiB, ~1,170 decoded tokens
# of a 28-layer model), as many as the engine keeps untaken. A long-running process (`neuralink serve`) had kept
# every one, ~2.9 KB a token on Qwen2.5-Coder-1.5B, growing past any memory budget; the summaries count from
# running totals instead.
FFN_STATS_KEPT_ROWS = _engine.STATS_KEPT

# the counters a summary adds up (summary_line)
SUMMED_FIELDS = ("n_tokens", "computed_pairs", "predicted_pairs", "reads", "bytes_read", "cache_hits", "io_ns",
                 "stall_ns")
_TOTALS = np.dtype([(name, np.uint64) for name in SUMMED_FIELDS])


def summary_line(rows: np.ndarray, n_layer: int) -> str:
    """Tokens, neurons, reads, bytes, cache hits and I/O time per token of ``ffn_stats`` rows (or of their
    totals, one row of SUMMED_FIELDS)."""
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
    Llama's ``engine``, ``ffn``, ``verbose`` and ``_draft_gate``; ``_start_reporting`` sets up its own state)."""

    def _start_reporting(self) -> None:
        self._stats: list[np.ndarray] = []  # the most recent rows, at most FFN_STATS_KEPT_ROWS
        self._stats_rows = 0
        self._since_summary = np.zeros(1, dtype=_TOTALS)  # totals of the rows since the last summary

    def _record_stats(self, rows: np.ndarray) -> np.ndarray:
        """Keep `rows` (the engine's counters since it was last asked) and add them to the summary's totals."""
        if rows.size:
            self._stats.append(rows)
            self._stats_rows += len(rows)
            while self._stats_rows - len(self._stats[0]) >= FFN_STATS_KEPT_ROWS:
                self._stats_rows -= len(self._stats.pop(0))
            for name in SUMMED_FIELDS:
                self._since_summary[name] += rows[name].sum(dtype=np.uint64)
        return rows

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.create_completion``; with ``verbose=True`` and a sidecar, it also prints the
        FFN statistics of the completion (``ffn_summary``; where llama.cpp computes the FFNs, that it does) to
        stderr when it is done (after the last chunk when streaming). ``__call__`` and ``create_chat_completion`` go through here."""
        result = super().create_completion(*args, **kwargs)
        # (the sparse engine's work, or that llama.cpp computes the FFNs: a server's log says which)
        if not self.verbose or not (self.ffn == "llama" or self._engine is not None and self._engine.sparse):
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
        if self.ffn == "llama":
            return "neuralink FFN: computed by llama.cpp itself (ffn='llama', or 'auto' with the model fitting in memory)"
        self._record_stats(self.engine.take_stats())
        # (every row evaluates a token or more)
        totals = self._since_summary if self._since_summary["n_tokens"][0] else np.zeros(0, dtype=_TOTALS)
        self._since_summary = np.zeros(1, dtype=_TOTALS)
        return summary_line(totals, max(self.engine.n_layer, 1)) + down_trial_note(self.engine.down_trial)

    def ffn_stats(self, reset: bool = False) -> np.ndarray:
        """Counters of the layer evaluations since the start (or the last reset), one row each: the most
        recent FFN_STATS_KEPT_ROWS (32,768) of them.

        Fields: il, n_tokens, predicted (neurons evaluated), truly_active (by
        the criterion; -1 if unknown), reads, cache_hits, bytes_read,
        active_bytes (record bytes of the evaluated neurons), io_ns (first
        read issued to last completed), stall_ns (the longest wait of a
        compute thread for its reads: I/O not hidden by compute), layer_ns
        (the layer's wall time), predicted_pairs and computed_pairs ((token,
        neuron) pairs selected by the predictor and entering the down
        projection: the per-token density of a batch).
        Empty for the dense engine and where llama.cpp computes the FFNs (``ffn``).
        """
        if self.ffn == "llama":
            return np.zeros(0, dtype=_engine.STATS_DTYPE)
        self._record_stats(self.engine.take_stats())
        # (the kept arrays may hold up to one array more than the bound: the oldest rows beyond it go here)
        stats = np.concatenate(self._stats)[-FFN_STATS_KEPT_ROWS:] if self._stats else np.array([])
        self._stats = [] if reset or not stats.size else [stats]
        self._stats_rows = 0 if reset else len(stats)
        return stats
