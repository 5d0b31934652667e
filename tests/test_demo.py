"""`neuralink demo`, the main job: converts a model once (cached), then generates through the sparse engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neuralink.convert.quality import DEFAULT_BUDGET as QUALITY_BUDGET
from neuralink.evaluate.bench.e2e import budget_for_cap
from neuralink.formats.constants import SIDECAR_VERSION
from neuralink.formats.sidecar import Sidecar

from conftest import ModelFactory, carried_text


def run_demo(cache: Path, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NEURALINK_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "neuralink.cli", "demo", *map(str, args)], capture_output=True,
                          text=True, errors="replace", env=env, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo-text") / "calibration.txt"
    path.write_text(carried_text(3000, seed=5))
    return path


def test_demo_converts_once_then_runs_sparse(synthetic_model: ModelFactory, calibration: Path,
                                             tmp_path: Path) -> None:
    model = synthetic_model("llama", "q8_0")
    common = ("--model", model, "--calibration", calibration, "--max-tokens", 8, "--memory-budget", "2GB")
    first = run_demo(tmp_path, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    converted = list((tmp_path / "converted").glob("*/*.neuralink.gguf"))
    assert len(converted) == 1 and converted[0].with_suffix(".sidecar").is_file()
    # the cache is keyed by the sidecar format too, so an older neuralink's conversion is made again, not refused
    assert converted[0].parent.name.endswith(f"-v{SIDECAR_VERSION}-ppl{100 * QUALITY_BUDGET:g}b90")
    assert f"converting {model.name} once" in first.stderr
    # the predictor the conversion's quality search validated on held-out calibration text runs by default
    assert "quality check: " in first.stderr
    with Sidecar.open(converted[0].with_suffix(".sidecar"), converted[0]) as sidecar:
        validated = sidecar.header.default_predictor
    assert f"FFN layers served by neuralink: 2/2 (sparse, from the sidecar, predictor {validated}" in first.stderr
    for line in ("bundle cache", "active neurons", "reads per token", "I/O per token", "tok/s"):
        assert line in first.stderr, line
    png = tmp_path / "side-by-side.png"
    second = run_demo(tmp_path, *common, "--png", png)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "converted model (cached)" in second.stderr and "converting" not in second.stderr
    assert second.stdout == first.stdout  # greedy: the same text from the cached conversion
    # stock and neuralink side by side, printed and drawn
    assert "stock llama-cpp-python and neuralink, each in a fresh process" in second.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_png_needs_the_side_by_side_run(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--model", synthetic_model("llama", "q8_0"), "--dense", "--png", tmp_path / "x.png")
    assert result.returncode == 1 and "--png draws the side-by-side run" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_demo_on_a_relu_model_reads_what_the_low_rank_predictor_picks(synthetic_model: ModelFactory,
                                                                       calibration: Path, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--model", synthetic_model("arcee", "f16"), "--calibration", calibration,
                      "--max-tokens", 6, "--memory-budget", "2GB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predictor lowrank" in result.stderr  # fitted at conversion: a ReLU FFN has no gate to predict from


def test_demo_without_a_corpus_calibrates_on_text_the_model_writes(synthetic_model: ModelFactory,
                                                                    tmp_path: Path) -> None:
    alone = tmp_path / "work"  # no ../shared/data from here
    alone.mkdir()
    result = run_demo(tmp_path / "cache", "--model", synthetic_model("llama", "q8_0"), "--max-tokens", 4,
                      "--memory-budget", "2GB", cwd=alone)
    assert result.returncode == 0, result.stderr[-3000:]
    written = list((tmp_path / "cache" / "converted").glob("*/calibration.txt"))
    assert len(written) == 1 and len(written[0].read_text().split()) > 300
    assert "calibrated on calibration.txt" in result.stderr


def test_demo_dense_needs_no_conversion(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--model", synthetic_model("qwen2", "f16"), "--dense", "--max-tokens", 4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dense engine, weights in RAM" in result.stderr
    assert not (tmp_path / "converted").exists()


def test_demo_refuses_a_budget_below_the_minimum(synthetic_model: ModelFactory, calibration: Path,
                                                 tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--model", synthetic_model("llama", "q8_0"), "--calibration", calibration,
                      "--memory-budget", "1MB", "--max-tokens", 4)
    assert result.returncode != 0
    assert "is below the minimum" in result.stderr


def test_demo_runs_stock_llama_cpp_and_neuralink_natively_where_memory_is_short(
        synthetic_model: ModelFactory, calibration: Path, runner: Path, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--model", synthetic_model("llama", "q8_0"), "--calibration", calibration,
                      "--max-tokens", 6, "--memory-budget", "2GB", "--runner", runner)
    assert result.returncode == 0, result.stderr[-3000:]
    # the cap is the smallest the runner accepts for the model, a little above its minimum
    found = re.search(r"neuralink-run needs a budget of ([0-9.]+) MiB for this model at least: the native side by "
                      r"side runs under a (\d+)MB cap", result.stderr)
    assert found, result.stderr[-3000:]
    minimum, cap = float(found.group(1)) * 2**20, int(found.group(2)) * 10**6
    wanted = max(minimum * 1.02, minimum + (2 << 20))
    # (the minimum is printed to 0.1 MiB; the cap rounds up to a whole MB)
    assert wanted - 0.1 * 2**20 <= budget_for_cap(cap, 0.95) < wanted + 10**6 + 0.1 * 2**20
    native = result.stderr[result.stderr.index("natively (neuralink-run, one token at a time in both), stock "
                                               "llama.cpp and neuralink"):]
    speeds = re.search(r"decode tok/s +([0-9.]+) +([0-9.]+)", native)
    assert speeds and float(speeds.group(1)) > 0 and float(speeds.group(2)) > 0, native


def test_demo_refuses_a_runner_that_is_not_there(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--model", synthetic_model("llama", "q8_0"), "--runner", tmp_path / "nothing")
    assert result.returncode == 1 and "--runner" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "converted").exists()
