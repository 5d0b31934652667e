"""`neuralink bench e2e`'s table: one line per cap and neuralink variant, each against the same stock runs."""

from __future__ import annotations

from neuralink.evaluate.bench.e2e import RunResult, format_table


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


def test_a_cap_where_only_stock_ran_still_gets_its_line() -> None:
    rows = format_table([_run("430MB", "stock", 0.5)]).splitlines()[2:]
    assert len(rows) == 1 and rows[0].split("|")[1].strip() == "430MB"
