"""Profile which FFN neurons a GGUF model activates, token by token, over calibration text.

Runs the model in llama.cpp over the text (plain .txt files, or .jsonl files
with a "text" or "prompt" field per line), in windows of --window tokens, and
records for every token and every layer which neurons were active:

  ReLU-family FFNs (ReLU, ReLU^2, ReGLU): active = activation != 0 (native zeros);
  gated FFNs (SwiGLU, GeGLU), --criterion
    contribution (default):              active = |act(gate) * up| * |down_i| > t_l
                                         among the candidates |act(gate)| *
                                         E|up_i| * |down_i| > c_l, which the
                                         engine's gate predictor decides from
                                         resident gate rows, then the up row;
    gate_magnitude (CATS):               active = |act(gate)| > t_l, which the
                                         engine's gate predictor decides
                                         exactly from resident gate rows;
    magnitude:                           active = |act(gate) * up| > t_l (the
                                         input of ffn_down; for analysis: a
                                         runtime cannot know it before reading
                                         the up rows);
  t_l is chosen per layer so that a fraction --density of the neurons is
  active on the calibration text.

Profile held-out text with --thresholds-from CALIBRATION_STATS so that
"active" means the same as on the calibration text (and at run time).
Writes a co-activation stats file (.npz, see docs/profile.md) for
`neuralink place` and `neuralink plot`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from neuralink.errors import ProfileError, UnsupportedModelError
from neuralink.formats.coactivation import CoactivationStats, Criterion, SelectionStats, pack_masks
from neuralink.formats.files import file_sha256
from neuralink.profile.contribution import PilotScores, candidate_scale, down_column_norms
from neuralink.profile.text import calibration_documents, split_windows
from neuralink.profile.thresholds import MAX_THRESHOLD_SAMPLES, check_finite, density_threshold

if TYPE_CHECKING:
    from neuralink.profile.activations import ActivationReader

log = logging.getLogger(__name__)

# tensors build_ffn (src/llama-graph.cpp) names between the up/gate products and ffn_down
ACTIVATION_TENSORS = frozenset({
    "ffn_swiglu", "ffn_geglu", "ffn_reglu", "ffn_relu", "ffn_sqr(relu)", "ffn_silu", "ffn_gelu",
    "ffn_gate_par", "ffn_swiglu_oai", "ffn_swiglu_limited",
})
# a ReLU anywhere in the FFN zeroes the neurons it turns off, through sqr and the up product alike
NATIVE_ZERO_TENSORS = frozenset({"ffn_relu", "ffn_sqr(relu)", "ffn_reglu"})

DEFAULT_DENSITY = 0.2
# the contribution criterion's profile keeps what the engine runs near (its thresholds are chosen later, by
# the conversion's quality search); placement orders neurons by co-activation at this density
DEFAULT_CONTRIBUTION_DENSITY = 0.45
DEFAULT_WINDOW = 512
DEFAULT_MIN_TOKENS = 256
DEFAULT_THRESHOLD_TOKENS = 2048
_PROBE_TOKENS = 4

# called with (tokens done, tokens to do); pilot tokens for thresholds count too
ProgressCallback = Callable[[int, int], None]
# what --criterion may ask of a gated FFN; ReLU-family FFNs always use their native zeros
GatedCriterion = Literal["contribution", "magnitude", "gate_magnitude"]
GATED_CRITERIA: tuple[GatedCriterion, ...] = get_args(GatedCriterion)
DEFAULT_CRITERION: GatedCriterion = "contribution"
UP_TENSOR = "ffn_up"


def default_density(criterion: str) -> float:
    """The profile density when none is given: what placement's co-activation is measured at."""
    return DEFAULT_CONTRIBUTION_DENSITY if criterion == "contribution" else DEFAULT_DENSITY
GateFunction = Literal["silu", "gelu"]
# the gate projection before its activation (build_ffn names it for parallel gates)
GATE_TENSOR = "ffn_gate"
# the activation a gated FFN applies to its gate, by the tensors it computes
GATE_FUNCTIONS: dict[str, GateFunction] = {
    "ffn_swiglu": "silu", "ffn_silu": "silu", "ffn_geglu": "gelu", "ffn_gelu": "gelu",
}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class FfnActivation:
    """Which llama.cpp tensor defines a neuron's activity, and how."""

    tensor: str  # base name of the tensor thresholded: the input of ffn_down ("ffn_swiglu") or "ffn_gate"
    criterion: Criterion
    gate_function: GateFunction | None = None  # applied to ffn_gate for "gate_magnitude"

    @property
    def name(self) -> str:
        """What is thresholded, as the stats file records it: "ffn_swiglu", "silu(ffn_gate)"."""
        return f"{self.gate_function}({self.tensor})" if self.gate_function else self.tensor

    def activate(self, rows: np.ndarray) -> np.ndarray:
        """act(rows) for the gate function (identity without one), float32, a new array."""
        if self.gate_function == "silu":
            # x * sigmoid(x), with sigmoid through tanh: no overflow for large |x|
            return rows * (0.5 + 0.5 * np.tanh(0.5 * rows))
        if self.gate_function == "gelu":
            # ggml's gelu: the tanh approximation
            return 0.5 * rows * (1.0 + np.tanh(_SQRT_2_OVER_PI * (rows + 0.044715 * rows**3)))
        return np.array(rows)

    def magnitudes(self, rows: np.ndarray) -> np.ndarray:
        """|value| of what is thresholded, from the tensor's rows (float32, a new array)."""
        if self.gate_function == "silu":
            # x * sigmoid(x), with sigmoid through tanh: no overflow for large |x|
            return np.abs(rows * (0.5 + 0.5 * np.tanh(0.5 * rows)))
        if self.gate_function == "gelu":
            # ggml's gelu: the tanh approximation
            return np.abs(0.5 * rows * (1.0 + np.tanh(_SQRT_2_OVER_PI * (rows + 0.044715 * rows**3))))
        return np.abs(rows)


def probe_ffn_activation(
    reader: ActivationReader, tokens: np.ndarray, criterion: GatedCriterion = DEFAULT_CRITERION,
) -> tuple[FfnActivation, int]:
    """What defines activity in every layer under `criterion`, and n_ff; UnsupportedModelError if layers differ."""
    seen: dict[int, list[str]] = {}
    gates: set[int] = set()
    widths: set[int] = set()

    def record(name: str, layer: int, rows: np.ndarray) -> None:
        if name == GATE_TENSOR:
            gates.add(layer)
            return
        seen.setdefault(layer, []).append(name)
        widths.add(rows.shape[1])

    reader.evaluate(tokens[:_PROBE_TOKENS], (ACTIVATION_TENSORS | {GATE_TENSOR}).__contains__, record)
    missing = sorted(set(range(reader.n_layer)) - set(seen))
    if missing:
        raise UnsupportedModelError(
            f"{reader.path}: architecture '{reader.architecture}': layers {missing[:8]} compute no dense FFN "
            "activation that neuralink recognises (mixture-of-experts FFNs are not supported)"
        )
    # the last activation computed in a layer is the one ffn_down consumes
    forms = {FfnActivation(names[-1], "relu" if NATIVE_ZERO_TENSORS & set(names) else "magnitude")
             for names in seen.values()}
    if len(forms) != 1 or len(widths) != 1:
        raise UnsupportedModelError(
            f"{reader.path}: layers differ in FFN form or width ({sorted(map(str, forms))}, n_ff {sorted(widths)})"
        )
    form, n_ff = forms.pop(), widths.pop()
    if form.criterion == "relu" or criterion == "magnitude":
        return form, n_ff
    functions = {GATE_FUNCTIONS.get(name) for names in seen.values() for name in names} - {None}
    if gates != set(seen) or len(functions) != 1:
        raise UnsupportedModelError(
            f"{reader.path}: architecture '{reader.architecture}': criterion {criterion} needs a parallel gate "
            f"with SiLU or GELU in every layer; this FFN computes {sorted(set(seen[0]))}"
        )
    return FfnActivation(GATE_TENSOR, criterion, functions.pop()), n_ff


_GATE_AND_UP = frozenset({GATE_TENSOR, UP_TENSOR})


def _paired(consume: Callable[[int, np.ndarray, np.ndarray], None]) -> Callable[[str, int, np.ndarray], None]:
    """An ActivationReader consumer that calls consume(layer, gate_rows, up_rows) once a layer showed both."""
    first: dict[int, tuple[str, np.ndarray]] = {}

    def on_tensor(name: str, layer: int, rows: np.ndarray) -> None:
        if layer not in first:
            first[layer] = (name, rows.copy())  # the view is valid only during this call
            return
        other_name, other = first.pop(layer)
        gate, up = (other, rows) if other_name == GATE_TENSOR else (rows, other)
        consume(layer, gate, up)

    return on_tensor


def _pilot_windows(windows: list[np.ndarray], threshold_tokens: int) -> list[np.ndarray]:
    total = sum(map(len, windows))
    if total <= threshold_tokens:
        return windows
    # spread over the whole text: a text's opening is not typical of it
    count = min(len(windows), math.ceil(threshold_tokens * len(windows) / total))
    return [windows[i] for i in np.unique(np.linspace(0, len(windows) - 1, count).round().astype(int))]


def magnitude_thresholds(
    reader: ActivationReader,
    pilot: list[np.ndarray],
    activation: FfnActivation,
    density: float,
    *,
    seed: int = 0,
    progress: Callable[[int], None] = lambda _n: None,
) -> np.ndarray:
    """Per-layer t_l such that a fraction `density` of |activation| values over `pilot` exceed it."""
    pilot_tokens = sum(map(len, pilot))
    rng = np.random.default_rng(seed)
    samples: dict[int, list[np.ndarray]] = {il: [] for il in range(reader.n_layer)}

    def sample(_name: str, layer: int, rows: np.ndarray) -> None:
        quota = math.ceil(MAX_THRESHOLD_SAMPLES * len(rows) / pilot_tokens)
        values = rows.ravel()
        picked = values if values.size <= quota else values[rng.integers(0, values.size, quota)]
        samples[layer].append(activation.magnitudes(picked))

    for tokens in pilot:
        reader.evaluate(tokens, activation.tensor.__eq__, sample)
        progress(len(tokens))
    thresholds = np.empty(reader.n_layer, dtype=np.float32)
    for layer, parts in samples.items():
        thresholds[layer] = density_threshold(check_finite(np.concatenate(parts), layer), density)
    return thresholds


def _reused_thresholds(source: CoactivationStats, path: str | os.PathLike[str], model_sha256: str,
                       activation: FfnActivation, n_layer: int, n_ff: int) -> tuple[np.ndarray, float]:
    if source.model_sha256 != model_sha256:
        raise ProfileError(f"{path}: thresholds were profiled on another model (sha256 {source.model_sha256[:12]}…)")
    if (source.activation, source.criterion, source.n_layer, source.n_ff) != (
        activation.name, activation.criterion, n_layer, n_ff
    ):
        raise ProfileError(
            f"{path}: thresholds are for {source.criterion} on {source.activation} over {source.n_layer} layers "
            f"of {source.n_ff} neurons, not {activation.criterion} on {activation.name}, {n_layer} x {n_ff}"
        )
    return np.asarray(source.thresholds, dtype=np.float32), source.target_density


def profile_model(
    model: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    *,
    density: float | None = None,
    criterion: GatedCriterion = DEFAULT_CRITERION,
    window: int = DEFAULT_WINDOW,
    max_tokens: int | None = None,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    thresholds_from: str | os.PathLike[str] | None = None,
    threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> CoactivationStats:
    """Run `model` over `texts` and return every token's active-neuron masks per layer.

    Gated FFNs are thresholded per layer on |act(gate) * up| (`criterion`
    "magnitude") or |act(gate)| ("gate_magnitude"): at `density` on up to
    `threshold_tokens` tokens spread over the text, or with the thresholds of
    the stats file `thresholds_from` (use that for held-out text; its
    criterion then replaces `criterion`). ReLU-family FFNs use their native
    zeros. Raises ModelFileError, UnsupportedModelError or ProfileError with
    the file and the problem.
    """
    if density is None:
        density = default_density(criterion)
    if not 0.0 < density < 1.0:
        raise ProfileError(f"density must be between 0 and 1 (exclusive), got {density}")
    if criterion not in GATED_CRITERIA:
        raise ProfileError(f"criterion must be one of {GATED_CRITERIA}, got {criterion!r}")
    if max_tokens is not None and max_tokens < min_tokens:
        raise ProfileError(f"--max-tokens {max_tokens} is below --min-tokens {min_tokens}")
    # llama_cpp loads libllama on import: only commands that run a model pay for it
    from neuralink.profile.activations import ActivationReader, check_gguf_file

    model_path = check_gguf_file(model)
    source = None if thresholds_from is None else CoactivationStats.load(thresholds_from, with_masks=False)
    if source is not None and source.criterion in GATED_CRITERIA:
        criterion = source.criterion  # held-out text is judged by the calibration's criterion
    documents = calibration_documents(texts)
    with ActivationReader(model_path, window=window, threads=threads) as reader:
        token_docs = [reader.tokenize(doc) for doc in documents]
        windows = split_windows(token_docs, reader.text_tokens_per_window, max_tokens)
        n_tokens = sum(map(len, windows))
        if n_tokens < max(min_tokens, 1):
            raise ProfileError(
                f"{', '.join(map(str, texts))}: {n_tokens} tokens of text, at least {min_tokens} needed"
            )
        activation, n_ff = probe_ffn_activation(reader, windows[0], criterion)
        model_sha256 = file_sha256(model_path)
        log.info("%s: %s, %d layers, n_ff %d; %s on %s over %d tokens in %d windows", model_path.name,
                 reader.architecture, reader.n_layer, n_ff, activation.criterion, activation.name,
                 n_tokens, len(windows))

        pilot: list[np.ndarray] = []
        contribution = activation.criterion == "contribution"
        down_norms = down_column_norms(model_path) if contribution else []
        selection = None
        if source is not None:
            thresholds, density = _reused_thresholds(source, thresholds_from, model_sha256, activation,
                                                     reader.n_layer, n_ff)
            selection = source.selection
            if contribution and selection is None:
                raise ProfileError(f"{thresholds_from}: has no contribution selection tables")
        elif activation.criterion == "relu":
            thresholds, density = np.zeros(reader.n_layer, dtype=np.float32), math.nan
        else:
            pilot = _pilot_windows(windows, threshold_tokens)
        total = n_tokens + sum(map(len, pilot))
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        try:
            if pilot and contribution:
                scores = PilotScores(reader.n_layer, n_ff, down_norms, sum(map(len, pilot)))
                for tokens in pilot:
                    reader.evaluate(tokens, _GATE_AND_UP.__contains__,
                                    _paired(lambda layer, g, u: scores.add(layer, activation.activate(g), u)))
                    advance(len(tokens))
                selection, thresholds = scores.selection(density)
            elif pilot:
                thresholds = magnitude_thresholds(reader, pilot, activation, density, progress=advance)
        except ProfileError as e:  # (non-finite activations: say which model)
            raise ProfileError(f"{model_path}: {e}") from None

        masks = [np.zeros((n_tokens, math.ceil(n_ff / 8)), dtype=np.uint8) for _ in range(reader.n_layer)]
        counts = np.zeros((reader.n_layer, n_ff), dtype=np.int64)
        candidate_counts = np.zeros((reader.n_layer, n_ff), dtype=np.int64)
        scales = [candidate_scale(selection, down_norms, il) for il in range(reader.n_layer)] if contribution else []
        offset = 0

        def record_contribution(layer: int, g: np.ndarray, u: np.ndarray) -> None:
            a = activation.activate(g)
            candidates = np.abs(a) * scales[layer] > selection.candidate_thresholds[layer]  # type: ignore[union-attr]
            active = candidates & (np.abs(a * u) * down_norms[layer] > thresholds[layer])
            masks[layer][offset : offset + len(g)] = pack_masks(active)
            counts[layer] += active.sum(axis=0)
            candidate_counts[layer] += candidates.sum(axis=0)

        def record(_name: str, layer: int, rows: np.ndarray) -> None:
            if activation.criterion == "relu":
                active = rows != 0
            elif activation.gate_function is None:
                t = thresholds[layer]
                active = (rows > t) | (rows < -t)
            else:
                active = activation.magnitudes(rows) > thresholds[layer]
            masks[layer][offset : offset + len(rows)] = pack_masks(active)
            counts[layer] += active.sum(axis=0)

        for tokens in windows:
            if contribution:
                reader.evaluate(tokens, _GATE_AND_UP.__contains__, _paired(record_contribution))
            else:
                reader.evaluate(tokens, activation.tensor.__eq__, record)
            offset += len(tokens)
            advance(len(tokens))
        architecture = reader.architecture
        if selection is not None:
            selection = SelectionStats(selection.score_quantiles, selection.up_mean_abs, candidate_counts,
                                       selection.candidate_thresholds)

    stats = CoactivationStats(
        model_sha256=model_sha256, model_name=model_path.name, architecture=architecture,
        activation=activation.name, criterion=activation.criterion, target_density=float(density),
        thresholds=thresholds, n_ff=n_ff, window=window, sources=tuple(os.fspath(t) for t in texts),
        n_tokens=n_tokens, activation_counts=counts, masks=masks, selection=selection,
    )
    densities = stats.densities()
    log.info("active fraction per layer: mean %.4f, min %.4f, max %.4f",
             densities.mean(), densities.min(), densities.max())
    return stats


__all__ = [
    "ACTIVATION_TENSORS", "DEFAULT_CRITERION", "GATED_CRITERIA", "FfnActivation", "ProfileError",
    "magnitude_thresholds", "probe_ffn_activation", "profile_model",
]
