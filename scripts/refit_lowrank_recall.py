"""Fit a converted pair's contribution low-rank thresholds for another recall, into a new sidecar, and measure it.

`neuralink convert --lowrank-rank R --lowrank-recall P` fits the thresholds
once; trying another P that way means converting again. This takes the
pair as converted, captures the calibration text's FFN inputs again (the
same text, less the same held-out end, as the conversion split it), fits
the thresholds for --recall, writes a copy of the sidecar with them
(--out, beside a hard link of the converted GGUF so the pair loads), and
prints the held-out recall, the density read and the engine's perplexity
with it, as the conversion records them.

    python scripts/refit_lowrank_recall.py qlr48/qwen.neuralink.gguf --source $Q \
        --calibration code-al.jsonl ../shared/data/little_women.txt --recall 0.995 --out qlr48r995
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from neuralink.convert.pipeline import HELDOUT_CHARS_PER_TOKEN, set_contribution_thresholds
from neuralink.convert.predictor import capture_ffn_inputs
from neuralink.convert.quality import DEFAULT_HELDOUT_TOKENS, measure_predictor
from neuralink.formats.sidecar import Sidecar
from neuralink.profile.text import calibration_documents, split_heldout, write_documents
from neuralink.runtime.sidecar_lookup import find_sidecar


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="converted GGUF whose sidecar holds a contribution low-rank predictor")
    parser.add_argument("--source", type=Path, required=True, help="the GGUF it was converted from")
    parser.add_argument("--calibration", type=Path, nargs="+", required=True, help="the conversion's calibration text")
    parser.add_argument("--recall", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True, help="new folder for the pair (must not exist)")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--heldout-tokens", type=int, default=DEFAULT_HELDOUT_TOKENS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not 0.0 < args.recall <= 1.0:
        parser.error(f"--recall must lie in (0, 1], got {args.recall}")
    sidecar_path = find_sidecar(args.model)
    if sidecar_path is None:
        parser.error(f"{args.model}: names no sidecar beside it")
    with Sidecar.open(sidecar_path, args.model) as side:
        header = side.header
        if header.criterion != "contribution" or not header.predictor_rank:
            parser.error(f"{sidecar_path}: not a contribution sidecar with a low-rank predictor")
        runtime = [tuple(t) for t in header.runtime_thresholds]

    documents = calibration_documents(args.calibration)
    profile_docs, heldout = split_heldout(documents, args.heldout_tokens * HELDOUT_CHARS_PER_TOKEN)
    args.out.mkdir(parents=True, exist_ok=False)
    profile_text = args.out / "profile.jsonl"
    write_documents(profile_text, profile_docs)
    inputs = capture_ffn_inputs(args.source, [profile_text], max_tokens=args.max_tokens, threads=args.threads)
    profile_text.unlink()

    model_out = args.out / args.model.name
    os.link(args.model, model_out)
    side_out = args.out / sidecar_path.name
    shutil.copyfile(sidecar_path, side_out)
    record = set_contribution_thresholds(args.source, model_out, side_out, inputs, heldout, runtime, args.recall,
                                         heldout_tokens=args.heldout_tokens, threads=args.threads)
    measured = measure_predictor(model_out, side_out, heldout, "lowrank", threads=args.threads)
    record.update({key: measured[key] for key in ("perplexity_change", "up_density", "down_density")})
    json.dump(record, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
