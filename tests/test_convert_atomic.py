"""Convert commits the model and its sidecar as a pair: kill -9 at any instant leaves the old pair or the new one.

Temporaries of killed conversions are removed by the next conversion to the
same place; a journaled commit a kill interrupted is completed by the next
reader (or writer) of the pair.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_convert import random_placement

from neuralink.convert.writer import convert_model
from neuralink.formats.constants import KEY_MODEL_ID
from neuralink.formats.files import commit_pair, conversion_journal, recover_pair
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.sidecar import Sidecar
from neuralink.runtime.sidecar_lookup import find_sidecar

from conftest import ModelFactory

KILLS = 12


def model_id(path: Path) -> str:
    return str(read_gguf_directory(path).get(KEY_MODEL_ID))


def test_kill_at_any_instant_leaves_a_whole_pair(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    source = synthetic_model("llama", "q8_0", n_layer=4, n_ff=1024)
    out, side = tmp_path / "m.neuralink.gguf", tmp_path / "m.neuralink.sidecar"
    old = convert_model(source, random_placement(source, seed=1), out, side)
    ids = {model_id(old.output)}
    placement = tmp_path / "new.npz"
    random_placement(source, seed=2).save(placement)
    command = [sys.executable, "-m", "neuralink", "convert", str(source), "--placement", str(placement), "-o", str(out),
               "--sidecar", str(side), "--force"]
    # how long a whole conversion takes here, to spread the kills over it
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    ids.add(model_id(out))
    duration = time.perf_counter() - start
    convert_model(source, random_placement(source, seed=1), out, side, force=True)  # back to the old pair
    rng = np.random.default_rng(0)
    for _ in range(KILLS):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.2, 1.0)) * duration)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        # a reader completes an interrupted commit first; then the pair must match, old or new
        assert find_sidecar(out) == side
        with Sidecar.open(side, out):
            pass
        assert model_id(out) in ids
    # the next conversion removes what the killed ones left
    subprocess.run(command, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.neuralink.gguf", "m.neuralink.sidecar", "new.npz"]


def test_an_interrupted_commit_is_completed_by_the_next_reader(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    new_a, new_b = tmp_path / ".a.new", tmp_path / ".b.new"
    for path, text in ((a, "old a"), (b, "old b"), (new_a, "new a"), (new_b, "new b")):
        path.write_text(text)
    journal = conversion_journal(a)
    # a commit killed after its first rename: the journal lists both, one is done
    journal.write_text(f'[["{new_a}", "{a}"], ["{new_b}", "{b}"]]')
    os.replace(new_a, a)
    assert recover_pair(journal) and (a.read_text(), b.read_text()) == ("new a", "new b")
    assert not journal.exists() and not new_b.exists()
    # a journal cut short by the kill was never complete: nothing was renamed, it is dropped
    journal.write_text('[["x", ')
    assert not recover_pair(journal) and not journal.exists()


def test_commit_pair_renames_both(tmp_path: Path) -> None:
    pairs = []
    for name in ("x", "y"):
        tmp = tmp_path / f".{name}.tmp"
        tmp.write_text(f"new {name}")
        pairs.append((tmp, tmp_path / name))
    commit_pair(pairs, conversion_journal(tmp_path / "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "y"]
    with pytest.raises(FileNotFoundError):
        conversion_journal(tmp_path / "x").read_text()
