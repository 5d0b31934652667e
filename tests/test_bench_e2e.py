"""`neuralink bench e2e`'s table: one line per cap and neuralink variant, each against the same stock runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from neuralink.evaluate.bench.e2e import E2eSettings, RunResult, format_table
from neuralink.evaluate.bench.native import run_native, runner_command, runner_minimum


def _run(cap: str, variant: str, tok_s: float, **extra: float) -> RunResult:
    return RunResult(cap, variant, runs=[{"tok_s": tok_s, **extra}], peaks=[100 << 20])


def test_each_neuralink_variant_gets_its_line_against_the_same_stock_runs() -> None:
    results = [
        _run("800MB", "stock", 1.0), _run("800MB", "neuralink", 2.0, bytes_per_token=300 * 2**20),
        _run("800MB", "neuralink-adaptive", 3.0, bytes_per_token=200 * 2**20),
        _run("none", "stock", 10.0), _run("none", "neuralink", 9.4),
    ]
    rows = [line.split("|")[1:-1] for line in format_table(results).splitlines()[2:]]
    cells = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}
    assert list(cells) == ["800MB", "800MB (neuralink-adaptive)", "none"]
    # stock tok/s, neuralink tok/s, ratio; MiB read per token further along
    assert cells["800MB"][:3] == ["1.00", "2.00", "2.00"] and cells["800MB"][6] == "300.00"
    assert cells["800MB (neuralink-adaptive)"][:3] == ["1.00", "3.00", "3.00"]
    assert cells["800MB (neuralink-adaptive)"][6] == "200.00"
    assert cells["none"][:3] == ["10.00", "9.40", "0.94"]  # two decimals: 0.94 and 0.95 differ


def test_the_down_trial_outcome_is_noted() -> None:
    trial = dict(layers=28, tokens=32, rows_ms=25.0, columns_ms=27.0, settled=True)
    nl = RunResult("none", "neuralink", runs=[{"tok_s": 9.0, "down_trial": {**trial, "rows_kept": kept}}
                                             for kept in (True, False, True)])
    rows = format_table([_run("none", "stock", 10.0), nl]).splitlines()[2:]
    assert rows[0].split("|")[-2].strip() == "down rows kept in 2 of 3 runs"


def test_a_cap_where_only_stock_ran_still_gets_its_line() -> None:
    rows = format_table([_run("430MB", "stock", 0.5)]).splitlines()[2:]
    assert len(rows) == 1 and rows[0].split("|")[1].strip() == "430MB"


def test_the_worker_decodes_through_generate_with_and_without_drafts(converted_model, tmp_path) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["the quick brown fox jumps over the lazy dog . " * 3]))
    results = {}
    for variant in ("neuralink-nodraft", "neuralink-draft"):
        done = subprocess.run([sys.executable, "-m", "neuralink.evaluate.bench.worker", "--variant", variant,
                               "--model", str(model), "--sidecar", str(sidecar), "--prompts", str(prompts),
                               "--tokens", "12", "--n-ctx", "256", "--draft-tokens", "3"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    for result in results.values():
        assert "error" not in result and result["decode_tokens"] == 12 and result["tok_s"] > 0
    # the same greedy text either way on this model
    assert results["neuralink-draft"]["texts"] == results["neuralink-nodraft"]["texts"]


def test_the_native_runner_variants_report_what_the_worker_reports(runner, converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    settings = E2eSettings(model=model, sidecar=sidecar, stock_model=model, tokens=6, n_ctx=256, runner=runner,
                           cache_policy="stream")
    prompts = ["the quick brown fox jumps over the lazy dog . " * 3, "once upon a time"]
    results = {variant: run_native(variant, settings, prompts, budget=None, cgroup=None)
               for variant in ("runner", "runner-nodraft")}
    for result in results.values():
        assert "error" not in result, result
        # every prompt decodes `tokens` after its first token, one process each
        assert result["decode_tokens"] == 12 and result["tok_s"] > 0 and len(result["texts"]) == 2
        assert result["bytes_per_token"] > 0 and result["reads_per_token"] > 0 and 0 <= result["cache_hit_rate"] <= 1
    assert "--prompt-lookup" in runner_command("runner-nodraft", settings, "p", None)
    assert "--prompt-lookup" not in runner_command("runner", settings, "p", None)
    assert "verifications" in results["runner"] and "verifications" not in results["runner-nodraft"]
    assert results["runner"]["texts"] == results["runner-nodraft"]["texts"]


def test_a_failing_runner_is_reported_not_raised(runner, converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    settings = E2eSettings(model=model, sidecar=sidecar, stock_model=model, tokens=4, runner=runner)
    result = run_native("runner", settings, ["a prompt"], budget=2_000_000, cgroup=None)
    assert result["error"].startswith("neuralink-run exit 5: ") and "below the minimum" in result["error"]


def test_the_runner_lines_compare_with_stock_llama_cpp_in_the_same_binary_where_it_ran() -> None:
    results = [_run("120MB", "stock", 1.0), _run("120MB", "runner-stock", 2.0), _run("120MB", "runner", 8.0),
               _run("120MB", "neuralink", 4.0)]
    rows = [line.split("|")[1:-1] for line in format_table(results).splitlines()[2:]]
    cells = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}
    assert list(cells) == ["120MB (runner against runner-stock)", "120MB"]
    assert cells["120MB (runner against runner-stock)"][:3] == ["2.00", "8.00", "4.00"]
    assert cells["120MB"][:3] == ["1.00", "4.00", "4.00"]


def test_runner_stock_runs_llama_cpps_own_ffns_on_the_stock_model(runner, converted_model, synthetic_model) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    original = synthetic_model("llama", "q8_0")
    settings = E2eSettings(model=model, sidecar=sidecar, stock_model=original, tokens=6, n_ctx=256, runner=runner)
    command = runner_command("runner-stock", settings, "p", 50_000_000)
    assert "--stock-ffn" in command and str(original) in command
    # no engine, so no sidecar and no budget: the cap alone limits it
    assert str(sidecar) not in command and "--memory-budget" not in command
    result = run_native("runner-stock", settings, ["the quick brown fox"], budget=None, cgroup=None)
    assert "error" not in result, result
    assert result["decode_tokens"] == 6 and result["tok_s"] > 0 and result["bytes_per_token"] == 0


def test_the_runners_minimum_is_the_budget_it_accepts(runner, converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    settings = E2eSettings(model=model, sidecar=sidecar, stock_model=model, tokens=4, n_ctx=256, runner=runner)
    minimum = runner_minimum(settings)
    assert minimum > 0
    refused = run_native("runner", settings, ["a prompt"], budget=minimum - (2 << 20), cgroup=None)
    assert "below the minimum" in refused["error"]
    accepted = run_native("runner", settings, ["a prompt"], budget=minimum + (2 << 20), cgroup=None)
    assert "error" not in accepted, accepted


def test_the_read_rate_is_set_beside_the_disks_highest_probed_rate() -> None:
    nl = _run("800MB", "neuralink", 8.0, bytes_per_token=250e6)
    nl.disk_rates = [4.0e9, 5.0e9, 4.5e9]
    cells = format_table([_run("800MB", "stock", 1.0), nl]).splitlines()[2].split("|")[1:-1]
    # 250 MB a token at 8 tok/s is 2 GB/s, against the highest probe, 5 GB/s: a probe in a slow moment of a shared
    # disk must not make decoding look closer to the disk's peak than it is
    assert cells[8].strip() == "2.00 of 5.00 (0.40)"
    # the peak is the whole bench's: another cap's faster probe counts for this cap's line too
    other = _run("530MB", "neuralink", 4.0, bytes_per_token=500e6)
    other.disk_rates = [8.0e9]
    assert format_table([nl, other]).splitlines()[2].split("|")[9].strip() == "2.00 of 8.00 (0.25)"
    # no disk rate (direct I/O unavailable): the rate alone; nothing read: a dash
    nl.disk_rates = []
    assert format_table([nl]).splitlines()[2].split("|")[9].strip() == "2.00"
    assert format_table([_run("none", "neuralink", 9.0)]).splitlines()[2].split("|")[9].strip() == "—"


def test_the_disks_rate_is_measured_with_direct_reads(tmp_path) -> None:
    from neuralink.evaluate.bench.e2e import PEAK_READ_BYTES, disk_read_rate

    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(2 * PEAK_READ_BYTES))
    rate = disk_read_rate(data)
    if rate is None:  # a filesystem without O_DIRECT (tmpfs): the rate would be the page cache's
        pytest.skip(f"{tmp_path} does not take direct reads")
    assert rate > 1e6
    # a sidecar shorter than one read (a small model's) is read whole; an empty file has no rate
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(3 * 4096 + 100))
    assert disk_read_rate(small) > 1e5
    (tmp_path / "empty.bin").write_bytes(b"")
    assert disk_read_rate(tmp_path / "empty.bin") is None
    assert disk_read_rate(tmp_path / "missing.bin") is None
