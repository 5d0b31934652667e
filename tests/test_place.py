"""Placement: the paper's greedy against a networkx reference, planted groups, the cost model, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from neuralink.cli import main as cli_main
from neuralink.formats.coactivation import CoactivationStats, coactivation_counts, pack_masks
from neuralink.formats.files import file_sha256
from neuralink.formats.placement import Placement
from neuralink.models.synthetic import write_synthetic_model
from neuralink.place import linking
from neuralink.place.orders import (
    METHODS,
    order_layer,
    place,
    place_layers,
)
from neuralink.place.read_cost import ReadCounts, count_reads, dense_reads, quality_table
from neuralink.profile.activity import profile_model
from neuralink.runtime.device_profile import DeviceCostModel

from conftest import carried_text

N_EMBD, N_FF, GROUP = 128, 256, 16
N_GROUPS = N_FF // GROUP



# ---------------------------------------------------------------- greedy against networkx


def reference_greedy(counts: np.ndarray, min_count: float = 1.0) -> nx.Graph:
    """The paper's rule, written plainly with networkx: pairs by (-C, i, j), degree <= 2, no cycles."""
    n = len(counts)
    pairs = sorted(
        ((float(counts[i, j]), i, j) for i in range(n) for j in range(i + 1, n) if counts[i, j] >= min_count),
        key=lambda p: (-p[0], p[1], p[2]),
    )
    components = nx.utils.UnionFind(range(n))
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    for weight, i, j in pairs:
        if graph.degree(i) < 2 and graph.degree(j) < 2 and components[i] != components[j]:
            graph.add_edge(i, j, weight=weight)
            components.union(i, j)
    return graph


def chain_edges(chains: list[np.ndarray]) -> set[tuple[int, int]]:
    return {tuple(sorted((int(c[k]), int(c[k + 1])))) for c in chains for k in range(len(c) - 1)}


def random_counts(rng: np.random.Generator, n: int, high: int) -> np.ndarray:
    upper = np.triu(rng.integers(0, high, (n, n)), 1)
    counts = (upper + upper.T).astype(np.float32)
    np.fill_diagonal(counts, counts.max(axis=1) + 1)
    return counts


@pytest.mark.parametrize("small_bands", [False, True], ids=["one-band", "many-bands"])
@pytest.mark.parametrize("seed", range(12))
def test_greedy_matches_networkx_reference(seed: int, small_bands: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if small_bands:
        # scan a handful of pairs per band and rows per block, so banding and blocking are exercised
        monkeypatch.setattr(linking, "_MIN_BAND_PAIRS", 1)
        monkeypatch.setattr(linking, "_PAIRS_PER_OPEN_NEURON", 1)
        monkeypatch.setattr(linking, "_BLOCK_ELEMENTS", 7)
    rng = np.random.default_rng(seed)
    # few distinct counts: many ties, which the rule breaks by (i, j)
    counts = random_counts(rng, int(rng.integers(2, 70)), high=int(rng.choice([3, 6, 50])))
    chains = linking.greedy_chains(counts)
    reference = reference_greedy(counts)

    assert sorted(np.concatenate(chains).tolist()) == list(range(len(counts)))
    assert chain_edges(chains) == {tuple(sorted(e)) for e in reference.edges}
    ours = sum(float(counts[a, b]) for a, b in chain_edges(chains))
    assert ours == reference.size(weight="weight")
    # every chain is one of the reference's path components
    assert len(chains) == nx.number_connected_components(reference)


def test_greedy_never_links_uncoactivated_neurons() -> None:
    counts = np.zeros((6, 6), dtype=np.float32)
    counts[0, 1] = counts[1, 0] = 3
    counts[2, 3] = counts[3, 2] = 1
    chains = linking.greedy_chains(counts)
    assert sorted(map(len, chains)) == [1, 1, 2, 2]
    order = linking.concatenate_by_frequency(chains, np.array([5, 4, 1, 2, 10, 0]))
    # chains by total activation: [4] (10), [0, 1] (9, more active end first), [3, 2] (3), [5] (0)
    assert order.tolist() == [4, 0, 1, 3, 2, 5]
    assert linking.chain_starts_of(counts, order).tolist() == [0, 1, 3, 5]


def test_cut_and_sort_spans_the_path_and_the_frequency_order() -> None:
    rng = np.random.default_rng(3)
    counts = random_counts(rng, 40, high=30)
    path = linking.concatenate_by_frequency(linking.greedy_chains(counts), np.diag(counts))
    assert linking.cut_and_sort(counts, path, 0.0).tolist() == path.tolist()
    by_heat = linking.cut_and_sort(counts, path, 1.0)
    assert np.all(np.diff(np.diag(counts)[by_heat]) <= 0)
    half = linking.cut_and_sort(counts, path, 0.5)
    assert sorted(half.tolist()) == list(range(40))


# ---------------------------------------------------------------- the cost model


def brute_force_reads(active: np.ndarray, order: np.ndarray, bundle: int, cost: DeviceCostModel,
                      gap: int) -> tuple[int, int, int]:
    runs = reads = read_bytes = 0
    for row in active[:, order]:
        positions = np.flatnonzero(row).tolist()
        segments: list[list[int]] = []
        for p in positions:
            if segments and p == segments[-1][1] + 1:
                segments[-1][1] = p
            else:
                segments.append([p, p])
        runs += len(segments)
        merged: list[list[int]] = []
        for first, last in segments:
            if merged and first - merged[-1][1] - 1 <= gap:
                merged[-1][1] = last
            else:
                merged.append([first, last])
        reads += len(merged)
        for first, last in merged:
            start, end = first * bundle, (last + 1) * bundle
            read_bytes += math.ceil(end / cost.alignment) * cost.alignment - start // cost.alignment * cost.alignment
    return runs, reads, read_bytes


@pytest.mark.parametrize("gap", [0, 1, 3, None])
def test_count_reads_matches_brute_force(gap: int | None) -> None:
    rng = np.random.default_rng(7)
    active = rng.random((300, 97)) < 0.3
    order = rng.permutation(97)
    cost = DeviceCostModel(read_latency_s=60e-6, bandwidth_bytes_per_s=1.4e9, alignment=512)
    bundle = 200
    counted = count_reads(active, order, bundle, cost, collapse_gap=gap)
    expected_gap = cost.collapse_gap(bundle) if gap is None else gap
    runs, reads, read_bytes = brute_force_reads(active, order, bundle, cost, expected_gap)
    assert (counted.runs, counted.reads, counted.read_bytes) == (runs, reads, read_bytes)
    assert counted.active == active.sum()
    assert counted.seconds == pytest.approx(reads * 60e-6 + read_bytes / 1.4e9)


def test_collapse_gap_merges_exactly_when_the_gap_is_cheaper_than_a_read() -> None:
    cost = DeviceCostModel(read_latency_s=60e-6, bandwidth_bytes_per_s=1e9)
    gap = cost.collapse_gap(1000)  # reading g bundles of 1000 B takes g us
    assert gap == 59
    assert gap * 1000 / 1e9 < 60e-6 <= (gap + 1) * 1000 / 1e9
    assert DeviceCostModel(read_latency_s=0).collapse_gap(1000) == 0


def test_dense_reads_are_one_aligned_read_per_layer() -> None:
    cost = DeviceCostModel(alignment=4096)
    dense = dense_reads(1000, [1080, 1080], n_tokens=10, cost=cost)
    layer = math.ceil(1000 * 1080 / 4096) * 4096
    assert (dense.reads, dense.read_bytes) == (20, 20 * layer)
    assert "dense" in quality_table({"dense": dense, "x": ReadCounts(n_tokens=10)}, baseline="dense")


# ---------------------------------------------------------------- planted groups, without a model


def planted_masks(n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks where groups of GROUP neurons (at scattered indices) fire together; the group of each neuron."""
    rng = np.random.default_rng(seed)
    group_of = np.random.default_rng(0).permutation(np.arange(N_FF) // GROUP)
    # two tiers of equally hot groups: frequency alone cannot tell the groups of a tier apart
    heat = np.where(np.arange(N_GROUPS) % 2 == 0, 0.1, 0.3)
    groups = rng.random((n_tokens, N_GROUPS)) < heat
    active = groups[:, group_of] & (rng.random((n_tokens, N_FF)) < 0.9)
    return active | (rng.random((n_tokens, N_FF)) < 0.01), group_of


def save_stats(path: Path, layers: list[np.ndarray], sha: str = "ab" * 32) -> Path:
    counts = np.stack([a.sum(axis=0) for a in layers]).astype(np.int64)
    CoactivationStats(
        model_sha256=sha, model_name="planted.gguf", architecture="arcee", activation="ffn_sqr(relu)",
        criterion="relu", target_density=math.nan, thresholds=np.zeros(len(layers), np.float32),
        n_ff=layers[0].shape[1], window=128, sources=("planted",), n_tokens=len(layers[0]),
        activation_counts=counts, masks=[pack_masks(a) for a in layers],
    ).save(path)
    return path


def test_neuralink_recovers_planted_groups_as_contiguous_runs() -> None:
    calibration, group_of = planted_masks(3000, seed=1)
    heldout, _ = planted_masks(1000, seed=2)
    packed = pack_masks(calibration)
    counts = coactivation_counts(packed, N_FF)
    orders = {m: order_layer(m, counts, packed, bundle_bytes=1024) for m in METHODS}

    # each group occupies GROUP consecutive positions
    groups_in_order = group_of[orders["neuralink"]].reshape(N_GROUPS, GROUP)
    assert np.all(groups_in_order == groups_in_order[:, :1])

    cost = DeviceCostModel()
    active_groups = np.mean([(np.bincount(group_of[row], minlength=N_GROUPS) > GROUP // 2).sum()
                             for row in heldout])
    # members drop out 10 % of the time: reads that bridge holes of up to 3 neurons see whole groups
    reads = count_reads(heldout, orders["neuralink"], 1024, cost, collapse_gap=3)
    # besides the groups, 1 % noise neurons (~2.6 per token) mostly cost a read each
    assert active_groups <= reads.per_token(reads.reads) <= active_groups + 3.5
    runs = {m: count_reads(heldout, o, 1024, cost, collapse_gap=0) for m, o in orders.items()}
    per_token = {m: r.per_token(r.runs) for m, r in runs.items()}
    assert per_token["neuralink"] < 0.5 * per_token["frequency"]
    assert per_token["neuralink"] < 0.3 * per_token["identity"]


def test_hotcold_is_no_slower_than_its_endpoints_on_calibration() -> None:
    calibration, _ = planted_masks(2000, seed=4)
    packed = pack_masks(calibration)
    counts = coactivation_counts(packed, N_FF)
    cost = DeviceCostModel(read_latency_s=20e-6)
    seconds = {m: count_reads(calibration, order_layer(m, counts, packed, bundle_bytes=2048, cost=cost),
                              2048, cost).seconds for m in ("frequency", "neuralink", "hotcold")}
    assert seconds["hotcold"] <= min(seconds["frequency"], seconds["neuralink"]) * (1 + 1e-9)
    with pytest.raises(ValueError, match="bundle size"):
        order_layer("hotcold", counts, packed)


def test_place_layers_in_parallel_equals_serial(tmp_path: Path) -> None:
    layers = [planted_masks(800, seed=s)[0] for s in (5, 6)]
    stats = save_stats(tmp_path / "cal.npz", layers)
    serial = place_layers(stats, ["neuralink", "hotcold"], bundle_bytes=[1024, 1024], workers=1)
    parallel = place_layers(stats, ["neuralink", "hotcold"], bundle_bytes=[1024, 1024], workers=2)
    for a, b in zip(serial, parallel, strict=True):
        assert a.layer == b.layer
        for method in ("neuralink", "hotcold"):
            assert np.array_equal(a.orders[method], b.orders[method])
            assert np.array_equal(a.chain_starts[method], b.chain_starts[method])


# ---------------------------------------------------------------- planted groups through llama.cpp


def planted_relu_model(path: Path) -> Path:
    """An arcee (ReLU^2) model whose layers' neurons come in groups sharing an input direction."""
    rng = np.random.default_rng(11)
    weights = {}
    for layer in range(2):
        directions = np.linalg.qr(rng.standard_normal((N_EMBD, N_GROUPS)))[0].T  # orthonormal rows
        group_of = rng.permutation(np.arange(N_FF) // GROUP)
        up = directions[group_of] + 0.1 * rng.standard_normal((N_FF, N_EMBD)) / np.sqrt(N_EMBD)
        down = rng.standard_normal((N_EMBD, N_FF)) / np.sqrt(N_FF)
        weights[layer] = {"up": up, "down": down}
    return write_synthetic_model(path, "arcee", n_embd=N_EMBD, n_ff=N_FF, n_head=4, context_length=256,
                                 ffn_weights=weights)


@pytest.fixture(scope="module")
def planted_profiles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("planted")
    model = planted_relu_model(root / "planted.gguf")
    (root / "cal.txt").write_text(carried_text(1500, seed=1))
    (root / "eval.txt").write_text(carried_text(600, seed=2))
    calibration = profile_model(model, [root / "cal.txt"], window=256)
    calibration.save(root / "cal.npz")
    heldout = profile_model(model, [root / "eval.txt"], window=256, thresholds_from=root / "cal.npz")
    heldout.save(root / "eval.npz")
    return model, root / "cal.npz", root / "eval.npz"


def test_planted_model_placement_beats_identity_and_frequency(planted_profiles: tuple[Path, Path, Path]) -> None:
    _, calibration, heldout = planted_profiles
    results = place_layers(calibration, METHODS, bundle_bytes=[1536, 1536], heldout=heldout, workers=1)
    for result in results:
        runs = {m: q.per_token(q.runs) for m, q in result.quality.items()}
        assert runs["neuralink"] < 0.6 * runs["frequency"], runs
        assert runs["neuralink"] < 0.6 * runs["identity"], runs
        # about half the groups fire per token; neighbouring ones merge into one run
        assert runs["neuralink"] <= N_GROUPS / 2 + 3, runs


def test_place_cli_writes_a_placement_for_the_model(planted_profiles: tuple[Path, Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model, calibration, heldout = planted_profiles
    output = tmp_path / "placement.npz"
    code = cli_main(["place", str(calibration), "--model", str(model), "-o", str(output), "--evaluate",
                     str(heldout), "--workers", "1"])
    assert code == 0
    placement = Placement.load(output)
    assert placement.method == "neuralink"
    assert placement.model_sha256 == file_sha256(model)
    assert placement.n_layer == 2 and all(len(o) == N_FF for o in placement.orders)
    assert placement.criterion == "relu"  # the name the engine and the sidecar know
    table = capsys.readouterr().out
    for method in (*METHODS, "dense"):
        assert method in table
    # the library call gives the same order
    assert np.array_equal(place(calibration, model, workers=1).orders[1], placement.orders[1])


def test_place_refuses_another_model(planted_profiles: tuple[Path, Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, calibration, _ = planted_profiles
    other = write_synthetic_model(tmp_path / "other.gguf", "arcee", n_embd=N_EMBD, n_ff=N_FF, n_head=4)
    output = tmp_path / "placement.npz"
    assert cli_main(["place", str(calibration), "--model", str(other), "-o", str(output)]) == 1
    assert "not the model" in capsys.readouterr().err
    assert not output.exists()


def test_place_refuses_heldout_profiled_with_other_thresholds(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    layers = [planted_masks(300, seed=8)[0]]
    calibration = save_stats(tmp_path / "cal.npz", layers)
    stats = CoactivationStats.load(calibration)
    stats.thresholds = np.array([0.5], np.float32)
    stats.save(tmp_path / "eval.npz")
    with pytest.raises(ValueError, match="thresholds-from"):
        place_layers(calibration, ["neuralink"], bundle_bytes=[1024], heldout=tmp_path / "eval.npz", workers=1)
    assert cli_main(["place", str(tmp_path / "missing.npz"), "--evaluate", str(calibration),
                     "--bundle-bytes", "1024"]) == 1
    assert "missing.npz" in capsys.readouterr().err


def test_coactivation_counts_equal_the_masks_product(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuralink.formats import coactivation

    monkeypatch.setattr(coactivation, "_COUNT_CHUNK_TOKENS", 64)  # several token chunks and row blocks
    rng = np.random.default_rng(9)
    active = rng.random((300, 157)) < 0.3
    counts = coactivation_counts(pack_masks(active), 157)
    assert counts.dtype == np.float32
    assert np.array_equal(counts, active.astype(np.int64).T @ active.astype(np.int64))


def test_timing_benchmark_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["place", "--timing-layer", "96", "--timing-tokens", "300", "--compare", "neuralink"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["method", "n_ff", "tokens"]
    assert table[2].split()[:3] == ["neuralink", "96", "300"]
