"""Property tests of the bundle cache (neuralink._engine.BundleCache).

Random access sequences, capacities and record sizes: the byte budget holds,
lookups return exactly the bytes admitted, counters agree with what the caller
saw, and LRU and S3-FIFO make the very choices of small reference models.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralink._engine import BundleCache, cache_policy_names

POLICIES = ["none", "lru", "s3fifo", "linking", "pinned", "stream"]
SLOT_ALIGN = 16
MALLOC_CHUNK_OVERHEAD = 16  # charged per slot on top of its aligned size
MAX_FREQ = 3

Key = tuple[int, int]


def slot_bytes(record_bytes: int) -> int:
    return -(-record_bytes // SLOT_ALIGN) * SLOT_ALIGN + MALLOC_CHUNK_OVERHEAD


def record(layer: int, pos: int, n: int, version: int = 0) -> bytes:
    return random.Random(f"{layer}/{pos}/{version}").randbytes(n)


@dataclass
class Op:
    lookup: bool
    layer: int
    pos: int
    isolated: bool


Workload = tuple[list[int], int, list[Op]]  # record sizes, capacity, ops


@st.composite
def workloads(draw: st.DrawFn, max_ops: int = 400) -> Workload:
    """Record sizes of 1-4 layers, a capacity of 0-40 records, and ops over up to 4 x 40 keys: mostly more keys
    than fit, so that evictions, promotions and ghost hits all happen. The ops come from a seeded generator
    (skewed towards low positions, like hot neurons) because drawing each op through hypothesis is ~50x slower."""
    sizes = draw(st.lists(st.integers(1, 300), min_size=1, max_size=4))
    records = draw(st.integers(0, 40))
    capacity = records * (slot_bytes(sizes[0]) + 48) + draw(st.integers(0, 400))
    n_pos = draw(st.integers(4, 40))
    n_ops = draw(st.integers(max_ops // 4, max_ops))
    lookup_share = draw(st.floats(0.2, 0.8))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    ops = [
        Op(rng.random() < lookup_share, rng.randrange(len(sizes)), int(n_pos * rng.random() ** 2), rng.random() < 0.5)
        for _ in range(n_ops)
    ]
    return sizes, capacity, ops


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy", ["none", "lru", "s3fifo", "linking"])
@PROPERTY
@given(workload=workloads())
def test_budget_bytes_and_counters_hold_under_random_access(policy: str, workload: Workload) -> None:
    sizes, capacity, ops = workload
    cache = BundleCache(policy, capacity, sizes)
    admitted: dict[Key, bytes] = {}  # the bytes of each key's last effective admission
    lookups = hits = offers = 0
    for version, op in enumerate(ops):
        key = (op.layer, op.pos)
        if op.lookup:
            got = cache.lookup(*key)
            lookups += 1
            if got is not None:
                hits += 1
                assert got == admitted[key]
        else:
            data = record(*key, sizes[op.layer], version)
            before = cache.stats().admissions
            cache.admit(*key, data, op.isolated)
            offers += 1
            if cache.stats().admissions > before:
                admitted[key] = data
        s = cache.stats()
        assert s.used_bytes <= s.capacity_bytes == capacity
        assert s.table_bytes <= s.used_bytes
        assert s.entries <= cache.max_entries
    s = cache.stats()
    assert (s.lookups, s.hits) == (lookups, hits)
    assert s.admissions + s.rejections <= offers
    if policy == "none":
        assert s.entries == s.admissions == s.used_bytes == 0
    cache.reset_stats()
    s = cache.stats()
    assert (s.lookups, s.hits, s.admissions, s.rejections, s.evictions) == (0, 0, 0, 0, 0)


@dataclass
class LruModel:
    """Least recently used over record slots, within max_entries and the bytes the tables leave."""

    max_entries: int
    budget: int
    sizes: list[int]
    order: OrderedDict[Key, None] = field(default_factory=OrderedDict)  # least recent first
    used: int = 0

    def lookup(self, key: Key) -> bool:
        if key in self.order:
            self.order.move_to_end(key)
            return True
        return False

    def admit(self, key: Key, isolated: bool) -> None:
        slot = slot_bytes(self.sizes[key[0]])
        if key in self.order or self.max_entries == 0 or slot > self.budget:
            return
        while self.used + slot > self.budget or len(self.order) == self.max_entries:
            old, _ = self.order.popitem(last=False)
            self.used -= slot_bytes(self.sizes[old[0]])
        self.order[key] = None
        self.used += slot


@dataclass
class S3FifoModel:
    """S3-FIFO as specified: small FIFO (10 % of the record bytes), main FIFO with 2-bit reinsertion,
    and a ghost ring of the last evictions from small, as many as the main queue holds entries."""

    max_entries: int
    budget: int
    sizes: list[int]
    run_admission: bool = True  # linking with p_run = 0 refuses in-run neurons not in the ghost once full
    small: OrderedDict[Key, None] = field(default_factory=OrderedDict)  # oldest first
    main: OrderedDict[Key, None] = field(default_factory=OrderedDict)
    freq: dict[Key, int] = field(default_factory=dict)
    ring: list[Key | None] = field(default_factory=list)
    ghost: dict[Key, int] = field(default_factory=dict)
    cursor: int = 0
    small_bytes: int = 0
    main_bytes: int = 0

    def __post_init__(self) -> None:
        self.ring = [None] * (self.max_entries - self.max_entries // 10)

    def slot(self, key: Key) -> int:
        return slot_bytes(self.sizes[key[0]])

    def lookup(self, key: Key) -> bool:
        if key in self.freq:
            self.freq[key] = min(self.freq[key] + 1, MAX_FREQ)
            return True
        return False

    def admit(self, key: Key, isolated: bool) -> None:
        slot = self.slot(key)
        ghost_hit = key in self.ghost
        room = len(self.freq) < self.max_entries and self.small_bytes + self.main_bytes + slot <= self.budget
        if key in self.freq or (not isolated and not ghost_hit and not room and not self.run_admission):
            return
        if self.max_entries == 0 or slot > self.budget:
            return
        if ghost_hit:
            self.ring[self.ghost.pop(key)] = None
        while self.small_bytes + self.main_bytes + slot > self.budget or len(self.freq) == self.max_entries:
            self.evict()
        if ghost_hit:
            self.main[key] = None
            self.main_bytes += slot
        else:
            self.small[key] = None
            self.small_bytes += slot
        self.freq[key] = 0

    def evict(self) -> None:
        small_target = self.budget // 10
        if self.main_bytes > self.budget - small_target or not self.small:
            self.evict_main() or self.evict_small()
        else:
            self.evict_small() or self.evict_main()

    def evict_small(self) -> bool:
        while self.small:
            key, _ = self.small.popitem(last=False)
            self.small_bytes -= self.slot(key)
            if self.freq[key] > 0:
                self.freq[key] = 0
                self.main[key] = None
                self.main_bytes += self.slot(key)
                continue
            del self.freq[key]
            if self.ring:
                old = self.ring[self.cursor]
                if old is not None:
                    del self.ghost[old]
                self.ring[self.cursor] = key
                self.ghost[key] = self.cursor
                self.cursor = (self.cursor + 1) % len(self.ring)
            return True
        return False

    def evict_main(self) -> bool:
        while self.main:
            key, _ = self.main.popitem(last=False)
            if self.freq[key] > 0:
                self.freq[key] -= 1
                self.main[key] = None
                continue
            del self.freq[key]
            self.main_bytes -= self.slot(key)
            return True
        return False


@pytest.mark.parametrize(
    ("policy", "p_run", "model"),
    [("lru", 0.1, "lru"), ("s3fifo", 0.1, "s3fifo"), ("linking", 1.0, "s3fifo"), ("linking", 0.0, "s3fifo-no-runs")],
)
@PROPERTY
@given(workload=workloads())
def test_choices_match_the_reference_model(
    policy: str, p_run: float, model: str, workload: Workload
) -> None:
    sizes, capacity, ops = workload
    cache = BundleCache(policy, capacity, sizes, p_run=p_run)
    s = cache.stats()
    budget = s.capacity_bytes - s.table_bytes
    ref: LruModel | S3FifoModel
    if model == "lru":
        ref = LruModel(cache.max_entries, budget, sizes)
    else:
        ref = S3FifoModel(cache.max_entries, budget, sizes, run_admission=model == "s3fifo")
    for op in ops:
        key = (op.layer, op.pos)
        if op.lookup:
            assert (cache.lookup(*key) is not None) == ref.lookup(key), f"lookup {key}"
        else:
            cache.admit(*key, record(*key, sizes[op.layer]), op.isolated)
            ref.admit(key, op.isolated)
    cached = {(l, p) for l in range(len(sizes)) for p in range(40) if cache.lookup(l, p) is not None}
    assert cached == {k for k in (ref.order if isinstance(ref, LruModel) else ref.freq)}


def test_linking_admits_isolated_neurons_ahead_of_in_run_neurons() -> None:
    """Half the misses are neurons read alone, half neurons inside runs, equally popular."""
    rng = np.random.default_rng(5)
    stream = (rng.random(40_000) ** 2 * 4000).astype(int)
    counts = {}
    for policy in ("s3fifo", "linking"):
        cache = BundleCache(policy, 300 * (128 + 64), [128], p_run=0.1)
        for pos in stream.tolist():
            if cache.lookup(0, pos) is None:
                cache.admit(0, pos, record(0, pos, 128), pos % 2 == 0)
        cached = [pos for pos in range(4000) if cache.lookup(0, pos) is not None]
        isolated = sum(pos % 2 == 0 for pos in cached)
        counts[policy] = (isolated, len(cached) - isolated)
    iso, run = counts["linking"]
    assert iso > 3 * run, counts
    iso, run = counts["s3fifo"]
    assert run / 2 < iso < 2 * run, counts


@PROPERTY
@given(p_run=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_linking_admits_fresh_in_run_neurons_at_rate_p_run(p_run: float, seed: int) -> None:
    n = 4000
    # with free room every record is admitted: a free slot costs nothing
    roomy = BundleCache("linking", 4 << 20, [32], p_run=p_run)
    first = random.Random(seed).randrange(1 << 20)
    for pos in range(first, first + n):
        roomy.admit(0, pos, bytes(32), False)
    assert roomy.stats().admissions == n and roomy.stats().rejections == 0
    # full (isolated neurons fill it first): a fresh in-run neuron is admitted, evicting another, at rate p_run
    cache = BundleCache("linking", 200 * 128, [32], p_run=p_run)
    for pos in range(2 * cache.max_entries):
        cache.admit(0, (1 << 21) + pos, bytes(32), True)
    before = cache.stats()
    for pos in range(first, first + n):
        cache.admit(0, pos, bytes(32), False)
    s = cache.stats()
    admitted = s.admissions - before.admissions
    assert admitted + s.rejections - before.rejections == n
    sigma = (p_run * (1 - p_run) / n) ** 0.5
    assert abs(admitted / n - p_run) < 5 * sigma


@PROPERTY
@given(
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=3),
    n_ff=st.integers(1, 30),
    capacity=st.integers(0, 8000),
    seed=st.integers(0, 2**32 - 1),
)
def test_pinned_holds_the_hottest_records_that_fit(sizes: list[int], n_ff: int, capacity: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    freq = [rng.integers(0, 5, n_ff).astype(np.float32) for _ in sizes]  # ties on purpose
    cache = BundleCache("pinned", capacity, sizes)
    cache.pin_hottest(freq, lambda layer, pos: record(layer, pos, sizes[layer]))
    s = cache.stats()
    budget, room = s.capacity_bytes - s.table_bytes, cache.max_entries
    # hottest first, ties by layer then position; a record that does not fit is skipped
    order = sorted(((l, p) for l in range(len(sizes)) for p in range(n_ff)), key=lambda k: (-freq[k[0]][k[1]], k))
    want, used = set(), 0
    smallest = min(slot_bytes(b) for b in sizes)
    for layer, pos in order:
        if len(want) == room or used + smallest > budget:
            break
        if used + slot_bytes(sizes[layer]) <= budget:
            want.add((layer, pos))
            used += slot_bytes(sizes[layer])
    for layer in range(len(sizes)):
        for pos in range(n_ff):
            cache.admit(layer, pos, record(layer, pos, sizes[layer], 1), True)  # never changes the pinned set
            got = cache.lookup(layer, pos)
            assert (got is not None) == ((layer, pos) in want)
            assert got is None or got == record(layer, pos, sizes[layer])
    assert cache.stats().entries == len(want) and cache.stats().used_bytes <= capacity


def test_names_and_errors_are_clean() -> None:
    assert cache_policy_names() == POLICIES
    for name in POLICIES:
        assert BundleCache(name, 4096, [64]).policy == name
    with pytest.raises(ValueError, match=r"unknown cache policy 'LRU' \(expected one of 'none', 'lru', 's3fifo'"):
        BundleCache("LRU", 4096, [64])
    with pytest.raises(ValueError, match=r"p_run = 2\.0+ is not a probability"):
        BundleCache("linking", 4096, [64], p_run=2.0)
    cache = BundleCache("lru", 4096, [64, 32])
    with pytest.raises(ValueError, match="record must be 32 contiguous bytes, got 64"):
        cache.admit(1, 0, bytes(64), True)
    with pytest.raises(ValueError, match="layer 2 is out of range: the cache has 2 layers"):
        cache.lookup(2, 0)
    cache.admit(1, 0, np.arange(32, dtype=np.uint8), True)  # any contiguous byte buffer
    assert cache.lookup(1, 0) == bytes(range(32))
    with pytest.raises(ValueError, match="needs the 'pinned' policy; this cache is 'lru'"):
        cache.pin_hottest([np.ones(4), np.ones(4)], lambda layer, pos: bytes(64))
    pinned = BundleCache("pinned", 4096, [64])
    with pytest.raises(ValueError, match="read_record's result must be 64 contiguous bytes, got 3"):
        pinned.pin_hottest([np.ones(4)], lambda layer, pos: b"abc")
    assert pinned.stats().entries == 0
    assert "entries=0" in repr(pinned.stats())


def test_threads_share_a_cache_without_the_gil() -> None:
    """lookup and admit release the GIL: concurrent callers get intact records and the budget holds."""
    sizes = [1080, 520]
    cache = BundleCache("linking", 64 << 10, sizes)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(3000):
            layer, pos = rng.randrange(2), int(300 * rng.random() ** 2)
            got = cache.lookup(layer, pos)
            if got is None:
                cache.admit(layer, pos, record(layer, pos, sizes[layer]), pos % 3 == 0)
            elif got != record(layer, pos, sizes[layer]):
                errors.append(f"record ({layer}, {pos}) came back altered")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert not errors
    assert s.lookups == 4 * 3000 and 0 < s.hits <= s.lookups
    assert s.used_bytes <= s.capacity_bytes
