"""Draw one layer's co-activation matrix before and after placement (the paper's Figure 5) to PNG.

Left: P(i, j), the fraction of tokens in which neurons i and j were both
active, in the model's own order; right: the same matrix in the placement's
order (from --placement, or computed with --method). A good placement
gathers the mass along the diagonal: neighbours fire together. The diagonal
itself (P(i)) is left out; colours are clipped at the 99.5th percentile.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from neuralink.errors import PlotError
from neuralink.formats.coactivation import CoactivationStats, coactivation_counts
from neuralink.formats.files import atomic_output
from neuralink.formats.placement import Placement
from neuralink.place.orders import DEFAULT_METHOD, Method, order_layer

DEFAULT_NEURONS = 512
# methods that need no device cost model; draw "hotcold" from its placement file
PLOT_METHODS: tuple[Method, ...] = ("identity", "frequency", "neuralink")
FIGURE_INCHES = (11.0, 6.0)
FIGURE_DPI = 120


def _layer_order(stats: CoactivationStats, matrix_counts: np.ndarray, layer: int,
                 placement: str | os.PathLike[str] | None, method: Method) -> tuple[np.ndarray, str]:
    if placement is None:
        if method not in PLOT_METHODS:
            raise PlotError(f"{method} placements depend on the device: draw one from its file with placement=")
        return order_layer(method, matrix_counts, stats.packed_masks(layer)), method
    placed = Placement.load(placement)
    if placed.model_sha256 != stats.model_sha256:
        raise PlotError(f"{placement}: a placement of another model than the stats were profiled on")
    if placed.n_layer != stats.n_layer or len(placed.orders[layer]) != stats.n_ff:
        raise PlotError(f"{placement}: {placed.n_layer} layers of {len(placed.orders[0])} neurons, "
                        f"the stats have {stats.n_layer} of {stats.n_ff}")
    return placed.orders[layer].astype(np.int64), placed.method


def plot_coactivation(
    stats_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    layer: int = 0,
    placement: str | os.PathLike[str] | None = None,
    method: Method = DEFAULT_METHOD,
    neurons: int | None = DEFAULT_NEURONS,
    first: int = 0,
) -> Path:
    """Write the before/after co-activation picture of `layer` to `output` (PNG) and return its path.

    Shows stored positions [first, first + neurons) of each order, clipped to
    the layer (all with `neurons=None`); windows wider than 1024 neurons are
    averaged down to at most 1024 pixels.
    """
    # deferred: matplotlib loads only when a picture is drawn; Agg, without touching pyplot's global backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = CoactivationStats.load(stats_path)
    if not 0 <= layer < stats.n_layer:
        raise PlotError(f"{stats_path}: layer {layer} is outside 0..{stats.n_layer - 1}")
    if not 0 <= first < stats.n_ff or (neurons is not None and neurons < 1):
        raise PlotError(f"cannot show {neurons} positions from {first}: outside the layer's 0..{stats.n_ff - 1}")
    last = stats.n_ff if neurons is None else min(first + neurons, stats.n_ff)
    counts = coactivation_counts(stats.packed_masks(layer), stats.n_ff)
    order, label = _layer_order(stats, counts, layer, placement, method)
    matrix = counts / np.float32(max(stats.n_tokens, 1))
    np.fill_diagonal(matrix, 0.0)
    del counts

    panels = [("original order", np.arange(stats.n_ff)), (f"{label} order", order)]
    views = [_downsample(matrix[np.ix_(o[first:last], o[first:last])], 1024) for _, o in panels]
    vmax = max(float(np.percentile(v, 99.5)) for v in views) or 1.0
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, (title, _), view in zip(axes, panels, views, strict=True):
        image = ax.imshow(view, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest",
                          extent=(first - 0.5, last - 0.5, last - 0.5, first - 0.5))
        ax.set_title(title)
        ax.set_xlabel("stored position")
    axes[0].set_ylabel("stored position")
    figure.colorbar(image, ax=list(axes), label="co-activation frequency P(i, j)", shrink=0.9)
    figure.suptitle(f"{stats.model_name}, layer {layer}: {stats.n_tokens} tokens, {stats.criterion} on "
                    f"{stats.activation}, positions {first}..{last - 1} of {stats.n_ff}")
    output = Path(output)
    with atomic_output(output) as tmp:
        figure.savefig(tmp, format="png")
    return output


def _downsample(matrix: np.ndarray, pixels: int) -> np.ndarray:
    factor = -(-matrix.shape[0] // pixels)
    if factor == 1:
        return matrix
    n = matrix.shape[0] // factor * factor
    return matrix[:n, :n].reshape(n // factor, factor, n // factor, factor).mean(axis=(1, 3))


