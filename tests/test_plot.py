"""The co-activation picture: a PNG of the right size, placements checked against the stats."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from neuralink.cli import main as cli_main
from neuralink.errors import PlotError
from neuralink.formats.coactivation import CoactivationStats, pack_masks
from neuralink.formats.placement import Placement
from neuralink.place.plot import FIGURE_DPI, FIGURE_INCHES, plot_coactivation

N_FF = 96
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


@pytest.fixture()
def stats_path(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    groups = rng.random((400, N_FF // 8)) < 0.3
    active = np.repeat(groups, 8, axis=1)[:, rng.permutation(N_FF)]
    CoactivationStats(
        model_sha256="cd" * 32, model_name="toy.gguf", architecture="arcee", activation="ffn_sqr(relu)",
        criterion="relu", target_density=math.nan, thresholds=np.zeros(2, np.float32), n_ff=N_FF, window=64,
        sources=("toy",), n_tokens=400, activation_counts=np.stack([active.sum(axis=0)] * 2).astype(np.int64),
        masks=[pack_masks(active)] * 2,
    ).save(tmp_path / "stats.npz")
    return tmp_path / "stats.npz"


def test_plot_writes_a_png(stats_path: Path, tmp_path: Path) -> None:
    output = plot_coactivation(stats_path, tmp_path / "layer1.png", layer=1, neurons=None)
    assert png_size(output) == tuple(round(inches * FIGURE_DPI) for inches in FIGURE_INCHES)
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_uses_a_placement_of_the_same_model(stats_path: Path, tmp_path: Path) -> None:
    order = np.arange(N_FF)[::-1].copy()
    placement = Placement(method="identity", orders=[order, order], chain_starts=[np.array([0])] * 2,
                          frequencies=[np.zeros(N_FF, np.float32)] * 2, thresholds=np.zeros(2, np.float32),
                          criterion="relu:ffn_sqr(relu)", n_tokens=400, model_sha256="cd" * 32)
    placement.save(tmp_path / "placement.npz")
    assert plot_coactivation(stats_path, tmp_path / "p.png", placement=tmp_path / "placement.npz").exists()
    placement.model_sha256 = "00" * 32
    placement.save(tmp_path / "other.npz")
    with pytest.raises(PlotError, match="another model"):
        plot_coactivation(stats_path, tmp_path / "q.png", placement=tmp_path / "other.npz")
    assert not (tmp_path / "q.png").exists()


def test_plot_rejects_bad_layers_and_windows(stats_path: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PlotError, match="layer 2 is outside"):
        plot_coactivation(stats_path, tmp_path / "x.png", layer=2)
    with pytest.raises(PlotError, match="outside the layer"):
        plot_coactivation(stats_path, tmp_path / "x.png", first=N_FF, neurons=20)
    assert cli_main(["plot", str(stats_path), "-o", str(tmp_path / "x.png"), "--layer", "5"]) == 1
    assert "layer 5 is outside" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert cli_main(["plot", str(stats_path), "-o", str(tmp_path / "ok.png"), "--neurons", "0"]) == 0
    assert png_size(tmp_path / "ok.png")[0] > 0
