"""The runtime's commands: ``neuralink serve`` (an OpenAI-compatible server) and ``neuralink device-profile``
(the storage probe, neuralink.runtime.device_probe)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from neuralink import _engine
from neuralink.command import Command, positive_float, positive_int, size_argument
from neuralink.errors import OptionError
from neuralink.formats.files import check_output_path
from neuralink.runtime import device_probe
from neuralink.runtime.device_probe import (
    DEFAULT_PROBE_BYTES,
    DEFAULT_SECONDS_PER_POINT,
    cost_table,
    describe_measurement,
    grid_table,
    load_or_measure,
    write_outputs,
)
from neuralink.runtime.device_profile import DEFAULT_DEPTHS, DEFAULT_SIZES


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", type=Path, default=Path("."), metavar="PATH",
                        help="a file or directory on the storage to profile, e.g. a model's sidecar (default: .)")
    parser.add_argument("--remeasure", action="store_true", help="measure even if the device has a cached profile")
    parser.add_argument("--sizes", nargs="+", type=size_argument, default=list(DEFAULT_SIZES), metavar="SIZE",
                        help="read sizes, multiples of 4K; K/M/G and KiB/MiB/GiB are binary, kB/MB/GB decimal "
                             "(default: 4K 8K ... 4M)")
    parser.add_argument("--depths", nargs="+", type=positive_int, default=list(DEFAULT_DEPTHS), metavar="N",
                        help="queue depths: reads in flight (default: 1 2 4 8 16 32)")
    parser.add_argument("--seconds-per-point", type=positive_float, default=DEFAULT_SECONDS_PER_POINT, metavar="S",
                        help=f"time spent on each (size, depth) (default: {DEFAULT_SECONDS_PER_POINT:g})")
    parser.add_argument("--probe-bytes", type=size_argument, default=DEFAULT_PROBE_BYTES, metavar="SIZE",
                        help="size of the temporary probe file written when PATH is a directory or a smaller "
                             "file (default: 256M)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="where profiles are cached per device (default: ~/.cache/neuralink/devices)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the profile here (JSON)")
    parser.add_argument("--png", type=Path, default=None, metavar="OUT",
                        help="draw bandwidth and IOPS against read size here (PNG)")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    json_path = check_output_path(args.json) if args.json is not None else None
    png_path = check_output_path(args.png) if args.png is not None else None
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # created on the first run only: a cached profile shows no bar
            bar = tqdm(total=total, unit="run", desc="device-profile", file=sys.stderr, disable=None)
        bar.update(done - bar.n)

    try:
        profile = load_or_measure(args.path, cache_dir=args.cache_dir, remeasure=args.remeasure, sizes=args.sizes,
                                  depths=args.depths, seconds_per_point=args.seconds_per_point,
                                  probe_bytes=args.probe_bytes, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    write_outputs(profile, json_path, png_path)
    print(describe_measurement(profile))
    print(f"\nIOPS and bandwidth of random reads\n\n{grid_table(profile)}")
    print(f"\nread cost model and access collapse (merge runs whose gap is at most the collapse gap)\n\n"
          f"{cost_table(profile)}")
    for path in (json_path, png_path):
        if path is not None:
            print(f"wrote {path}")
    return 0


DEVICE_PROFILE = Command(device_probe.__doc__, configure_parser, main)


SERVE_DOC = """Serve a model over llama-cpp-python's OpenAI-compatible HTTP API, its FFN run by neuralink.

`neuralink serve MODEL` is `python -m llama_cpp.server --model MODEL` with
neuralink.Llama behind it: the same app, routes (/v1/completions,
/v1/chat/completions, /v1/embeddings, /v1/models, ...), settings and errors,
and every llama-cpp-python server option (--n_ctx, --chat_format, --host,
--port, --api_key, ...; spelled as that server spells them). The neuralink
options (--memory-budget, --predictor, ...) are those of neuralink.Llama. A
converted model uses the sidecar beside it. See docs/serve.md.
"""


def configure_serve_parser(parser: argparse.ArgumentParser) -> None:
    from llama_cpp.server.cli import add_args_from_model  # deferred: pydantic, loaded for this command only
    from llama_cpp.server.settings import Settings

    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                        help="the GGUF to serve (a model converted by `neuralink convert` runs sparse)")
    nl = parser.add_argument_group("neuralink options (as neuralink.Llama's arguments)")
    nl.add_argument("--sidecar", default=None, help="the sidecar to use (default: the one beside a converted model)")
    nl.add_argument("--predictor", default=None,
                    help="gate, lowrank, dense or oracle (default: the one the conversion validated)")
    nl.add_argument("--memory-budget", type=size_argument, default=None, metavar="SIZE",
                    help="the whole process's memory, e.g. 800MB or 1GiB (kB/MB/GB decimal, K/M/G binary)")
    nl.add_argument("--cache-policy", default="auto", choices=("auto", *_engine.cache_policy_names()),
                    help="bundle cache policy: auto (the whole store when it fits, else stream when collapsed reads "
                         "would cover the layers anyway, else pinned), none, lru, s3fifo, linking, pinned, stream "
                         "(every layer's records read whole, ahead of the layer; no cache) (default: auto)")
    nl.add_argument("--queue-depth", type=positive_int, default=None, help="reads in flight at once")
    nl.add_argument("--io-backend", choices=("auto", "uring", "pread"), default="auto",
                    help="how bundles are read (default: auto)")
    nl.add_argument("--buffered-io", action="store_true", help="read through the page cache instead of O_DIRECT")
    nl.add_argument("--ffn", choices=("auto", "engine", "llama"), default="auto",
                    help="who computes the FFNs: neuralink's engine, llama.cpp itself, or auto: llama.cpp where the "
                         "whole model fits the memory there is and no engine option or budget is given, else the "
                         "engine (default: auto)")
    add_args_from_model(parser.add_argument_group("llama-cpp-python server options"), Settings)
    # llama-cpp-python's server keeps every position's logits by default (n_ctx x n_vocab floats: 1.2 GB for a 152k
    # vocabulary at n_ctx 2048), which only logprobs use; a server run to save memory asks for them explicitly
    parser.set_defaults(logits_all=False)
    for action in parser._actions:
        if action.dest == "logits_all":
            action.help = ("keep every position's logits, which requests' logprobs need (n_ctx x n_vocab floats, "
                           "counted in --memory-budget) (default: False, where llama-cpp-python's server says True)")


def serve_main(args: argparse.Namespace) -> int:
    import uvicorn  # deferred: the server's dependencies load for this command only
    from llama_cpp.server.cli import parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from neuralink.runtime.server import NeuralinkOptions, create_neuralink_app

    args.model = args.model_path or args.model
    if not args.model:
        raise OptionError("name the model to serve: neuralink serve MODEL")
    if not Path(args.model).is_file():
        raise OptionError(f"{args.model}: no such model file")
    if args.memory_budget is not None and args.cache and (args.cache_type or "ram") == "ram":
        # llama-cpp-python's RAM cache keeps a copy of the context's state and logits per prompt (up to
        # --cache_size, 2 GiB by default), memory no budget can plan for
        raise OptionError("--cache true keeps a copy of the context per prompt in RAM (up to --cache_size), which "
                          "--memory-budget cannot count: add --cache_type disk, or leave --cache off")
    server = parse_model_from_args(ServerSettings, args)
    if not 0 <= server.port <= 65535:
        raise OptionError(f"--port {server.port}: expected 0 to 65535")
    options = NeuralinkOptions(sidecar=args.sidecar, predictor=args.predictor, memory_budget=args.memory_budget,
                               cache_policy=args.cache_policy, queue_depth=args.queue_depth,
                               io_backend=args.io_backend, direct_io=not args.buffered_io, ffn=args.ffn,
                               default_n_batch=args.n_batch is None, default_n_threads=args.n_threads is None)
    app = create_neuralink_app(server, [(parse_model_from_args(ModelSettings, args), options)])
    uvicorn.run(app, host=server.host, port=server.port, ssl_keyfile=server.ssl_keyfile,
                ssl_certfile=server.ssl_certfile)
    return 0


SERVE = Command(SERVE_DOC, configure_serve_parser, serve_main)
