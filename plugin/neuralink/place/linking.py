"""Neuron linking: orders in which co-activated neurons sit next to each other.

All functions take C, the symmetric (n, n) matrix of co-activation counts of
one layer (C[i, j] = tokens in which i and j were both active: whole
numbers, float32 or float64), and work in original neuron indices. The expected number of runs per token of an order pi
is sum_i P(i) - sum_k P(pi_k, pi_k+1): maximising the co-activation of
neighbours (the paper's shortest Hamiltonian path under 1 - P(ij)) is
minimising runs per token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

# pairs examined per band, per neuron still open (degree < 2)
_PAIRS_PER_OPEN_NEURON = 4
_MIN_BAND_PAIRS = 4096
# bound on the (rows x open) block held while scanning C
_BLOCK_ELEMENTS = 1 << 22


def greedy_chains(counts: np.ndarray, *, min_count: float = 1.0) -> list[np.ndarray]:
    """The paper's greedy linking: chains of neurons, each a path of co-activated neighbours.

    Pairs (i, j) are taken by decreasing C[i, j], ties by increasing (i, j);
    a pair joins two chains end to end when neither neuron has two neighbours
    yet and they are not in the same chain (union-find). Pairs with C below
    `min_count` are never joined, so the result is a set of chains, not one
    path. Exact: neurons with two neighbours never reopen, so only pairs of
    open neurons are scanned, in bands of decreasing count; O(n^2) memory-light
    scans per band, O(pairs examined) Python work.
    """
    n = counts.shape[0]
    degree = [0] * n
    parent = list(range(n))
    neighbours: list[list[int]] = [[] for _ in range(n)]

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    joins, examined, bands = 0, 0, 0
    upper = float(counts.max()) + 1.0 if n else 0.0
    while joins < n - 1:
        open_nodes = np.flatnonzero(np.asarray(degree) < 2)
        if len(open_nodes) < 2:
            break
        target = max(_PAIRS_PER_OPEN_NEURON * len(open_nodes), _MIN_BAND_PAIRS)
        lower = _band_floor(counts, open_nodes, upper, min_count, target)
        if lower is None:
            break
        first, second, weight = _band_pairs(counts, open_nodes, lower, upper)
        order = np.lexsort((second, first, -weight))
        bands += 1
        examined += len(order)
        for a, b in zip(first[order].tolist(), second[order].tolist(), strict=True):
            if degree[a] == 2 or degree[b] == 2:
                continue
            root_a, root_b = find(a), find(b)
            if root_a == root_b:
                continue
            parent[root_a] = root_b
            degree[a] += 1
            degree[b] += 1
            neighbours[a].append(b)
            neighbours[b].append(a)
            joins += 1
        upper = lower
    log.debug("greedy linking of %d neurons: %d joins, %d pairs examined in %d bands", n, joins, examined, bands)
    return _walk_chains(neighbours)


def _row_blocks(open_nodes: np.ndarray) -> range:
    return range(0, len(open_nodes), max(1, _BLOCK_ELEMENTS // max(len(open_nodes), 1)))


def _open_block(counts: np.ndarray, open_nodes: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    rows = open_nodes[start : start + max(1, _BLOCK_ELEMENTS // len(open_nodes))]
    block = counts[np.ix_(rows, open_nodes)]
    # each unordered pair once: column neuron index above the row's
    return rows, block * (open_nodes[None, :] > rows[:, None]) - (open_nodes[None, :] <= rows[:, None])


def _band_floor(counts: np.ndarray, open_nodes: np.ndarray, upper: float, min_count: float,
                target: int) -> float | None:
    # histogram of integer counts below `upper`, then the floor that takes about `target` pairs
    top = int(upper)
    hist = np.zeros(top + 1, dtype=np.int64)
    for start in _row_blocks(open_nodes):
        _, block = _open_block(counts, open_nodes, start)
        values = block[(block >= min_count) & (block < upper)]
        hist += np.bincount(values.astype(np.int64), minlength=top + 1)[: top + 1]
    if not hist.any():
        return None
    taken = np.cumsum(hist[::-1])[::-1]  # taken[v] = pairs with v <= count < upper
    enough = np.flatnonzero(taken >= target)
    return float(enough[-1]) if len(enough) else float(max(min_count, np.flatnonzero(hist)[0]))


def _band_pairs(counts: np.ndarray, open_nodes: np.ndarray, lower: float,
                upper: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    firsts, seconds, weights = [], [], []
    for start in _row_blocks(open_nodes):
        rows, block = _open_block(counts, open_nodes, start)
        r, c = np.nonzero((block >= lower) & (block < upper))
        firsts.append(rows[r])
        seconds.append(open_nodes[c])
        weights.append(block[r, c])
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(weights)


def _walk_chains(neighbours: list[list[int]]) -> list[np.ndarray]:
    seen = [False] * len(neighbours)
    chains = []
    for end, links in enumerate(neighbours):
        if len(links) == 2 or seen[end]:
            continue
        chain, previous, node = [end], -1, end
        seen[end] = True
        while True:
            following = [x for x in neighbours[node] if x != previous]
            if not following:
                break
            previous, node = node, following[0]
            seen[node] = True
            chain.append(node)
        chains.append(np.array(chain, dtype=np.int64))
    return chains


def concatenate_by_frequency(chains: Sequence[np.ndarray], activation_counts: np.ndarray) -> np.ndarray:
    """The paper's concatenation as we define it: chains by decreasing total activation count.

    Each chain starts at its more frequently active end; ties keep chain order.
    """
    oriented = [c if activation_counts[c[0]] >= activation_counts[c[-1]] else c[::-1] for c in chains]
    totals = np.array([activation_counts[c].sum() for c in oriented], dtype=np.float64)
    return np.concatenate([oriented[i] for i in np.argsort(-totals, kind="stable")])


def cut_and_sort(counts: np.ndarray, path: np.ndarray, fraction: float) -> np.ndarray:
    """`path` cut at its `fraction` weakest links, pieces ordered hot to cold.

    Pieces go by decreasing mean activation count, each from its more active
    end: fraction 0 keeps the path, fraction 1 is the frequency order (up to ties).
    """
    if len(path) < 2:
        return np.array(path, dtype=np.int64)
    activation_counts = np.diag(counts).astype(np.float64)
    links = counts[path[:-1], path[1:]]
    n_cuts = round(fraction * len(links))
    cuts = np.sort(np.argsort(links, kind="stable")[:n_cuts]) + 1
    pieces = [p if activation_counts[p[0]] >= activation_counts[p[-1]] else p[::-1] for p in np.split(path, cuts)]
    heat = np.array([activation_counts[p].mean() for p in pieces])
    return np.concatenate([pieces[i] for i in np.argsort(-heat, kind="stable")]).astype(np.int64)


def chain_starts_of(counts: np.ndarray, order: np.ndarray, min_count: float = 1.0) -> np.ndarray:
    """Positions where a chain begins: 0 and every position whose left neighbour is not co-activated."""
    if len(order) == 0:
        return np.zeros(0, dtype=np.int64)
    links = counts[order[:-1], order[1:]] >= min_count
    return np.concatenate(([0], np.flatnonzero(~links) + 1)).astype(np.int64)

