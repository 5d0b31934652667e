"""`neuralink bench io`: the replay against a numpy count of runs, planted co-activation, the CLI, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from neuralink import _engine
from neuralink.cli import main as cli_main
from neuralink.evaluate.bench.io import bench_io
from neuralink.evaluate.bench.io_files import bundle_store_layout
from neuralink.evaluate.bench.io_variants import COLUMNS, VARIANTS, build_trace
from neuralink.formats.coactivation import CoactivationStats, pack_masks
from neuralink.formats.files import file_sha256
from neuralink.models.synthetic import write_synthetic_model
from neuralink.place.orders import build_placement, place_layers
from neuralink.place.read_cost import count_reads
from neuralink.runtime.device_profile import DeviceCostModel

from conftest import carried_text

N_EMBD, N_FF, GROUP, N_LAYER = 128, 256, 16, 2
N_GROUPS = N_FF // GROUP
RECORD = 2 * 4 * N_EMBD  # f32 up row + down column: 1 KiB bundles



def planted_relu_model(path: Path) -> Path:
    """An arcee (ReLU^2) model whose neurons come in groups sharing an input direction: they fire together."""
    rng = np.random.default_rng(11)
    weights = {}
    for layer in range(N_LAYER):
        directions = np.linalg.qr(rng.standard_normal((N_EMBD, N_GROUPS)))[0].T
        group_of = rng.permutation(np.arange(N_FF) // GROUP)
        up = directions[group_of] + 0.1 * rng.standard_normal((N_FF, N_EMBD)) / np.sqrt(N_EMBD)
        weights[layer] = {"up": up, "down": rng.standard_normal((N_EMBD, N_FF)) / np.sqrt(N_FF)}
    return write_synthetic_model(path, "arcee", n_layer=N_LAYER, n_embd=N_EMBD, n_ff=N_FF, n_head=4,
                                 context_length=256, ffn_weights=weights)


def planted_stats(model: Path, n_tokens: int, seed: int) -> CoactivationStats:
    """Masks of scattered groups of GROUP neurons firing together (90 % of members), plus 1 % noise."""
    rng = np.random.default_rng(seed)
    masks, counts = [], []
    for layer in range(N_LAYER):
        group_of = np.random.default_rng(100 + layer).permutation(np.arange(N_FF) // GROUP)
        groups = rng.random((n_tokens, N_GROUPS)) < 0.15
        active = (groups[:, group_of] & (rng.random((n_tokens, N_FF)) < 0.9)) | (rng.random((n_tokens, N_FF)) < 0.01)
        masks.append(pack_masks(active))
        counts.append(active.sum(axis=0))
    return CoactivationStats(
        model_sha256=file_sha256(model), model_name=model.name, architecture="arcee", activation="ffn_sqr(relu)",
        criterion="relu", target_density=math.nan, thresholds=np.zeros(N_LAYER, np.float32), n_ff=N_FF, window=128,
        sources=(f"planted-{seed}",), n_tokens=n_tokens, activation_counts=np.stack(counts).astype(np.int64),
        masks=masks,
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bench-io")
    model = planted_relu_model(root / "planted.gguf")
    calibration = planted_stats(model, 1500, seed=1)
    cal_path = calibration.save(root / "cal.npz")
    placement = build_placement(calibration, place_layers(cal_path, ["neuralink"], bundle_bytes=[RECORD] * N_LAYER,
                                                          workers=1), "neuralink")
    heldout = planted_stats(model, 200, seed=2)
    (root / "cal.txt").write_text(carried_text(1500, seed=1))
    (root / "eval.txt").write_text(carried_text(600, seed=2))
    return root, model, placement, heldout


def test_build_trace_lists_each_tokens_active_positions_in_stored_order(planted) -> None:
    _, _, placement, heldout = planted
    trace = build_trace(heldout, placement.orders, max_tokens=50)
    assert trace.n_tokens == 50 and len(trace.offsets) == 50 * N_LAYER + 1
    for t in (0, 17, 49):
        for il in range(N_LAYER):
            got = trace.positions[trace.offsets[t * N_LAYER + il]:trace.offsets[t * N_LAYER + il + 1]]
            placed = heldout.layer_masks(il)[t][np.asarray(placement.orders[il])]
            assert np.array_equal(got, np.flatnonzero(placed))


def test_replay_counts_match_numpy_and_planted_coactivation_cuts_reads(planted, tmp_path: Path) -> None:
    _, model, placement, heldout = planted
    no_cache = {v: "none" for v in VARIANTS}
    result = bench_io(model, heldout, placement, cache_rules=no_cache, replay_dir=tmp_path / "replay",
                      collapse_gap_bytes=3 * RECORD, max_tokens=120, chunk_tokens=7)
    assert list(result.results) == list(VARIANTS) and result.n_tokens == 120
    tokens = {name: r.tokens for name, r in result.results.items()}
    active = [heldout.layer_masks(il)[:120] for il in range(N_LAYER)]
    identity = np.arange(N_FF)
    cost = DeviceCostModel()
    runs_identity = sum(count_reads(a, identity, RECORD, cost, collapse_gap=0).runs for a in active)
    # without a cache: llmflash reads each run of adjacent bundles once; llamacpp each run twice (up, down tensors)
    assert tokens["llmflash"]["reads"].sum() == runs_identity
    assert tokens["llamacpp"]["reads"].sum() == 2 * runs_identity
    collapsed = sum(count_reads(a, np.asarray(o), RECORD, DeviceCostModel(alignment=4096), collapse_gap=3).reads
                    for a, o in zip(active, placement.orders))
    # the engine's planner also merges reads whose aligned blocks touch: never more reads than the gap rule alone
    assert 0 < tokens["neuralink"]["reads"].sum() <= collapsed
    n_active = sum(int(a.sum()) for a in active)
    for name in ("llmflash", "neuralink-s", "neuralink", "dense"):
        assert tokens[name]["needed_read"].sum() == n_active, name
        assert tokens[name]["needed_bytes"].sum() == n_active * RECORD, name
    assert tokens["dense"]["bytes_read"].sum() == 120 * N_LAYER * N_FF * RECORD
    assert all(int(t["io_ns"].sum()) > 0 for t in tokens.values())
    # planted groups: the placement stores each group contiguously
    reads = {name: r.metrics()["reads_per_token"] for name, r in result.results.items()}
    assert reads["llamacpp"] >= 3 * reads["neuralink"], reads
    assert reads["llmflash"] >= 2 * reads["neuralink"], reads
    lengths = {name: r.metrics()["active_bundles_per_read"] for name, r in result.results.items()}
    assert lengths["neuralink"] > 2 * lengths["llmflash"], lengths


def test_same_budget_caches_hit_and_replay_files_are_reused(planted, tmp_path: Path) -> None:
    _, model, placement, heldout = planted
    replay_dir = tmp_path / "replay"
    # a budget above one token's active bundles (~75), so that even LRU keeps some across tokens
    first = bench_io(model, heldout, placement, replay_dir=replay_dir, collapse_gap_bytes=0, max_tokens=60,
                     cache_fraction=0.3)
    budget = first.settings.cache_bytes
    assert budget == round(0.3 * N_LAYER * N_FF * RECORD)
    for name in ("llamacpp", "llmflash", "neuralink-s", "neuralink"):
        assert first.results[name].tokens["hits"].sum() > 0, name
    assert first.results["dense"].tokens["hits"].sum() == 0
    assert not first.reused
    second = bench_io(model, heldout, placement, replay_dir=replay_dir, collapse_gap_bytes=0, max_tokens=10,
                      variants=["llamacpp", "neuralink"])
    assert {p.name for p in second.reused} == {"identity-identity.sidecar", "placement-neuralink.sidecar",
                                              "tensors-identity.gguf"}
    layout = bundle_store_layout(replay_dir / "placement-neuralink.sidecar")
    assert [r[1] for r in layout.regions] == [RECORD] * N_LAYER
    # the LLM in a Flash window holds at most the budget; a policy with no budget holds nothing
    replayer = _engine.Replayer(str(layout.path), list(layout.regions), [[0], [1]], plan="runs",
                                window_tokens=5, cache_bytes=budget)
    trace = build_trace(heldout, placement.orders, max_tokens=20)
    replayer.replay(trace.positions, trace.offsets, 0, 20)
    assert 0 < replayer.cache_used_bytes <= budget


def test_cli_prints_the_table_and_writes_chart_and_json(planted, capsys: pytest.CaptureFixture[str]) -> None:
    root, model, _, _ = planted
    png, out = root / "io.png", root / "io.json"
    code = cli_main(["bench", "io", "--model", str(model), "--calibration", str(root / "cal.txt"), "--text",
                     str(root / "eval.txt"), "--max-tokens", "48", "--calibration-tokens", "600", "--workers", "1", "--window", "256",
                     "--collapse-gap", "3072", "--png", str(png), "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert [c.strip() for c in header.strip("|").split("|")] == [title for title, _ in COLUMNS]
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split("|")[1].strip() for r in rows] == list(VARIANTS)
    assert "neuralink vs llamacpp" in text
    assert "direct I/O (O_DIRECT)" in text or "BUFFERED" in text
    # what verifying the records' checksums costs, measured on this CPU
    assert re.search(r"record checksums: [0-9.]+ GB/s on this CPU .*: verifying neuralink's [0-9.]+ MiB per token "
                     r"costs [0-9.]+ ms of CPU", text), text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    assert [v["variant"] for v in data["variants"]] == list(VARIANTS)
    for v in data["variants"]:
        assert v["tokens"] == 48 and v["reads_per_token"] > 0 and v["io_ms_per_token"] > 0


def test_a_gated_model_replays_under_the_contribution_criterion(synthetic_model, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # the criterion gated models convert with by default: its stores need the profile's selection tables in
    # every order written (the frequency order's too)
    model = synthetic_model("llama", "q8_0")
    (tmp_path / "cal.txt").write_text(carried_text(800, seed=3))
    (tmp_path / "eval.txt").write_text(carried_text(300, seed=4))
    out = tmp_path / "io.json"
    code = cli_main(["bench", "io", "--model", str(model), "--calibration", str(tmp_path / "cal.txt"), "--text",
                     str(tmp_path / "eval.txt"), "--criterion", "contribution", "--density", "0.4",
                     "--max-tokens", "24", "--calibration-tokens", "400", "--workers", "1", "--window", "128",
                     "--variants", "neuralink-s", "neuralink", "neuralink-adaptive", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert [v["variant"] for v in data["variants"]] == ["neuralink-s", "neuralink", "neuralink-adaptive"]
    adaptive = data["variants"][2]
    assert adaptive["reads_per_token"] > 0 and any("collapse gap fitted to" in n for n in adaptive["notes"])


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    assert cli_main(["bench", "io", *args]) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_bad_input_names_the_file_and_writes_nothing(planted, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root, model, _, heldout = planted
    png, out = tmp_path / "io.png", tmp_path / "io.json"
    outputs = ["--png", str(png), "--json", str(out)]
    missing = tmp_path / "nope.txt"
    _fails(["--model", str(model), "--calibration", str(root / "cal.txt"), "--text", str(missing), *outputs],
           capsys, str(missing), "no such text")
    _fails(["--model", str(tmp_path / "absent.gguf"), "--calibration", str(root / "cal.txt"), "--text",
            str(root / "eval.txt"), *outputs], capsys, "absent.gguf")
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"not a model at all" * 10)
    _fails(["--model", str(not_gguf), "--calibration", str(root / "cal.txt"), "--text", str(root / "eval.txt"),
            *outputs], capsys, "junk.gguf")
    # a trace profiled on another model
    other = planted_stats(model, 20, seed=3)
    other.model_sha256 = "00" * 32
    trace = other.save(tmp_path / "other.npz")
    _fails(["--model", str(model), "--calibration-stats", str(root / "cal.npz"), "--trace", str(trace), *outputs],
           capsys, "other.npz")
    _fails(["--model", str(model), "--trace", str(trace), *outputs], capsys, "--calibration")
    _fails(["--model", str(model), "--calibration", str(root / "cal.txt"), "--text", str(root / "eval.txt"),
            "--png", str(tmp_path / "no-such-dir" / "io.png")], capsys, "no-such-dir")
    assert not png.exists() and not out.exists()
    assert not list(tmp_path.glob(".*.tmp"))
