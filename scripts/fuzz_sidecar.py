#!/usr/bin/env python3
"""Fuzz a converted model's files: N random mutations, each refused loudly or changing nothing.

    python scripts/fuzz_sidecar.py MODEL.neuralink.gguf [--target sidecar|gguf] [--mutations 1000] [--seed 0]

Each mutation (a flipped bit, a run of random bytes, or a cut) is written to
a scratch copy of the sidecar (--target sidecar, the default) or of the
converted GGUF (--target gguf) and evaluated in a worker process: for the
sidecar, the engine computes every layer (predictor dense, so every record is
read); for the GGUF, neuralink.Llama loads it (llama.cpp parses it) and
evaluates a prompt. The outcome is one of: refused (ModelFileError /
EngineIOError / ValueError naming the file), identical output, SILENT
DIFFERENCE, CRASH (the worker died on a signal) or HANG (no answer within
--timeout). Prints a table of outcomes; exit status 1 if any mutation was
silent, crashed or hung.
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

WORKER = r"""
import sys, json, numpy as np
from neuralink import _engine, ModelFileError, EngineIOError
model, sidecar, n_layer, n_embd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).standard_normal((3, n_embd)).astype(np.float32)
want = None
for line in sys.stdin:
    path = line.strip() or sidecar
    try:
        engine = _engine.Engine(model, sidecar=path, predictor="dense", cache_policy="none")
        got = np.stack([engine.forward(il, x, "silu") for il in range(n_layer)])
        del engine
        if want is None:
            want = got
            outcome = "reference"
        else:
            outcome = "identical" if np.array_equal(got, want) else "SILENT DIFFERENCE"
    except (ModelFileError, EngineIOError, ValueError) as e:
        outcome = "refused" if path in str(e) or "sidecar" in str(e) else "refused, error names no file"
    print(outcome, flush=True)
"""

# the GGUF through neuralink.Llama: checked against the sidecar's model checksums, then parsed by llama.cpp
GGUF_WORKER = r"""
import sys, numpy as np
import neuralink
from neuralink import ModelFileError, EngineIOError, EngineNumericError
model, sidecar = sys.argv[1], sys.argv[2]
want = None
for line in sys.stdin:
    path = line.strip() or model
    try:
        llm = neuralink.Llama(path, sidecar=sidecar, predictor="dense", cache_policy="none", n_ctx=64,
                              logits_all=True, verbose=False)
        tokens = llm.tokenize(b"The capital of France is")
        llm.eval(tokens)
        got = np.array(llm.scores[: len(tokens)])
        llm.close()
        if want is None:
            want = got
            outcome = "reference"
        else:
            outcome = "identical" if np.array_equal(got, want) else "SILENT DIFFERENCE"
    except (ModelFileError, EngineIOError, EngineNumericError, ValueError) as e:
        outcome = "refused" if path in str(e) else "refused, error names no file"
    print(outcome, flush=True)
"""


def mutate(data: bytes, rng: np.random.Generator, kind: int) -> tuple[bytes, str]:
    """The mutated bytes, and what was done (for the report of bad outcomes)."""
    blob = bytearray(data)
    if kind == 0:
        at = int(rng.integers(len(blob)))
        blob[at] ^= 1 << int(rng.integers(8))
        return bytes(blob), f"bit flipped at {at}"
    if kind == 1:
        at, n = int(rng.integers(len(blob))), int(rng.integers(1, 4097))
        blob[at:at + n] = rng.integers(0, 256, min(n, len(blob) - at), dtype=np.uint8).tobytes()
        return bytes(blob), f"{n} random bytes at {at}"
    at = int(rng.integers(1, len(blob)))
    return bytes(blob[:at]), f"cut at {at}"


def region(path: Path, offset: int) -> str:
    """Which part of the GGUF file at `path` holds byte `offset`."""
    from neuralink.formats.gguf_directory import read_gguf_directory

    directory = read_gguf_directory(path)
    if offset < directory.data_offset:
        return "header"
    for t in directory.tensors.values():
        if t.offset <= offset < t.offset + t.nbytes:
            return f"tensor {t.name}"
    return "padding"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--sidecar", type=Path, default=None)
    parser.add_argument("--target", choices=("sidecar", "gguf"), default="sidecar", help="the file to mutate")
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mutation before calling it a hang")
    args = parser.parse_args()
    from neuralink.formats.sidecar import Sidecar
    from neuralink.runtime.sidecar_lookup import find_sidecar

    sidecar = args.sidecar or find_sidecar(args.model)
    if sidecar is None:
        parser.error(f"{args.model}: names no sidecar beside it; pass --sidecar")
    with Sidecar.open(sidecar, args.model) as opened:
        n_layer, n_embd = opened.header.n_layer, opened.header.n_embd
    target = sidecar if args.target == "sidecar" else args.model
    data = target.read_bytes()
    rng = np.random.default_rng(args.seed)
    outcomes: Counter[str] = Counter()
    bad_cases: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / target.name
        worker = None
        i = 0
        while i <= args.mutations:
            if worker is None:
                command = [WORKER, str(args.model), str(sidecar), str(n_layer), str(n_embd)] \
                    if args.target == "sidecar" else [GGUF_WORKER, str(args.model), str(sidecar)]
                errors = open(Path(tmp) / "worker.err", "w")  # what a crashed worker said last
                worker = subprocess.Popen([sys.executable, "-c", *command], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=errors, text=True)
                errors.close()
                worker.stdin.write("\n")  # the intact file first: the reference output
                worker.stdin.flush()
                assert worker.stdout.readline().strip() == "reference"
            if i == 0:
                i += 1
                continue
            blob, what = mutate(data, rng, i % 3)
            scratch.write_bytes(blob)
            worker.stdin.write(f"{scratch}\n")
            worker.stdin.flush()
            deadline = time.monotonic() + args.timeout
            line = ""
            while time.monotonic() < deadline and worker.poll() is None:
                ready, _, _ = select.select([worker.stdout], [], [], 0.5)
                if ready:
                    line = worker.stdout.readline().strip()
                    break
            if not line:
                line = "CRASH" if worker.poll() is not None else "HANG"
            outcomes[line] += 1
            if line not in ("identical", "refused"):
                at = int(what.rsplit(" ", 1)[1])
                said = ""
                if line == "CRASH":
                    tail = (Path(tmp) / "worker.err").read_text(errors="replace").strip().splitlines()[-1:]
                    said = f": {tail[0][:200]}" if tail else f": exit status {worker.returncode}"
                bad_cases.append(f"mutation {i}: {line}: {what} ({region(target, at)}){said}")
            if line in ("CRASH", "HANG"):
                worker.kill()
                worker.wait()
                worker = None
            i += 1
        if worker is not None:
            worker.stdin.close()
            worker.wait()
    seconds = time.perf_counter() - start
    print(f"{args.mutations} mutations of {target} ({len(data):,} bytes) in {seconds:.0f} s\n")
    print("| outcome | mutations |\n| --- | ---: |")
    for outcome, n in sorted(outcomes.items()):
        print(f"| {outcome} | {n} |")
    for case in bad_cases:
        print(case)
    bad = sum(n for o, n in outcomes.items() if o in ("SILENT DIFFERENCE", "CRASH", "HANG", "refused, error names no file"))
    print(json.dumps({"outcomes": dict(outcomes), "bad": bad}), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
