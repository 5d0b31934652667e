#!/usr/bin/env python3
"""Time streamed completions against a running OpenAI-compatible server (`neuralink serve` or llama-cpp-python's).

    neuralink serve MODEL --memory-budget 760MB --port 8131 &
    python scripts/serve_client_bench.py --port 8131 --prompts-from code-mz.txt --tokens 32 --rounds 2

Sends the prompts `neuralink bench e2e --prompts-from` takes (words at even
offsets of a text), greedy with repeat_penalty 1, streamed, and prints for
each its time to first token and its decoding rate after that token (one
streamed chunk counted as one token), then the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from neuralink.evaluate.bench.e2e import prompts_from


def stream_completion(url: str, prompt: str, tokens: int) -> tuple[float, int, float, str]:
    """(seconds to the first chunk, chunks, seconds from the first chunk to the end, text) of one completion."""
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "repeat_penalty": 1.0,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    start, first, chunks, text = time.perf_counter(), None, 0, ""
    with urllib.request.urlopen(request, timeout=900) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            piece = json.loads(line[len(b"data: "):])["choices"][0]["text"]
            if piece:
                chunks, text = chunks + 1, text + piece
                first = first or time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: the completion streamed no text")
    return first - start, chunks, time.perf_counter() - first, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="the server's base URL (default: http://127.0.0.1:PORT)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port on localhost (default: 8000)")
    parser.add_argument("--prompts-from", type=Path, default=None,
                        help="the text the prompts are taken from (default: bench e2e's built-in prompts)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per round (default: 3)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion (default: 32)")
    parser.add_argument("--rounds", type=int, default=2, help="times every prompt is sent (default: 2)")
    args = parser.parse_args()
    if args.prompts_from is not None and not args.prompts_from.is_file():
        parser.error(f"{args.prompts_from}: no such file")
    if min(args.prompts, args.tokens, args.rounds) < 1 or args.tokens < 2:
        parser.error("--prompts and --rounds take 1 or more, --tokens 2 or more")
    url = args.url or f"http://127.0.0.1:{args.port}"
    rates, firsts = [], []
    try:
        for round_ in range(args.rounds):
            for i, prompt in enumerate(prompts_from(args.prompts_from, args.prompts)):
                first, chunks, rest, text = stream_completion(url, prompt, args.tokens)
                rate = (chunks - 1) / rest if chunks > 1 and rest > 0 else float("nan")
                rates.append(rate)
                firsts.append(first)
                print(f"round {round_} prompt {i}: first token {first:.2f} s, {chunks} chunks, {rate:.2f} tok/s "
                      f"after it: {text[:40]!r}", flush=True)
    except (urllib.error.URLError, ConnectionError) as error:
        print(f"serve_client_bench: {url}: {error}", file=sys.stderr)
        return 1
    print(f"median decoding {statistics.median(rates):.2f} tok/s ({min(rates):.2f}-{max(rates):.2f}), "
          f"median time to first token {statistics.median(firsts):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
