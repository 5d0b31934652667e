"""neuralink serve: a real server on a free localhost port, called with the OpenAI client.

Its answers equal neuralink.Llama called directly (greedy), streaming or not,
and bad requests get exactly what llama-cpp-python's own server answers.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

import neuralink

from conftest import ModelFactory
from test_memory_budget import every_token_weight_bytes

PROMPT = "the quick brown fox jumps over the lazy dog and the"
CHAT = [{"role": "user", "content": "the model of the flash memory"}]
N_CTX = 256
# greedy, and no repeat penalty: the server's requests default to 1.1, Llama's calls to 1.0
SAME = dict(temperature=0.0, extra_body={"repeat_penalty": 1.0})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the server processes running, by base URL
PROCESSES: dict[str, subprocess.Popen] = {}


@contextlib.contextmanager
def running(command: list[str], log: Path) -> Iterator[str]:
    """Start a server process; yield its base URL once /v1/models answers; stop it."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    PROCESSES[url] = process
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"the server did not answer within 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url
    finally:
        del PROCESSES[url]
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def converted(converted_model) -> tuple[Path, Path]:
    return converted_model("llama", "q8_0")


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve") / "neuralink-serve.log"


@pytest.fixture(scope="module")
def server(converted: tuple[Path, Path], server_log: Path) -> Iterator[str]:
    command = [sys.executable, "-m", "neuralink", "serve", str(converted[0]), "--n_ctx", str(N_CTX),
               "--memory-budget", "2GB"]
    with running(command, server_log) as url:
        yield url


@pytest.fixture(scope="module")
def direct(converted: tuple[Path, Path]) -> Iterator[neuralink.Llama]:
    llm = neuralink.Llama(str(converted[0]), n_ctx=N_CTX, memory_budget="2GB", verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    # (the client's defaults wait 10 minutes and retry twice: a stuck server would hold the suite for half an hour)
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


def test_completions_equal_the_direct_call(client: openai.OpenAI, direct: neuralink.Llama) -> None:
    expected = direct(PROMPT, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    got = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, **SAME)
    assert got.choices[0].text == expected and got.usage.completion_tokens == 12
    streamed = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, stream=True, **SAME)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected


def test_chat_completions_equal_the_direct_call(client: openai.OpenAI, direct: neuralink.Llama) -> None:
    expected = direct.create_chat_completion(CHAT, max_tokens=12, temperature=0.0)["choices"][0]["message"]["content"]
    got = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, **SAME)
    assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, stream=True, **SAME)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == expected


def test_the_server_runs_the_sparse_engine(client: openai.OpenAI, server: str, server_log: Path,
                                           converted: tuple[Path, Path]) -> None:
    models = requests.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [str(converted[0])]
    client.completions.create(model="m", prompt=PROMPT, max_tokens=4, **SAME)
    # the server is verbose by default: neuralink.Llama reports what its engine read after each completion
    log = server_log.read_text()
    assert "neuralink FFN:" in log
    # under --memory-budget, without --n_batch, the micro-batch is neuralink.Llama's (64), not the server's 512
    assert re.search(r"n_batch\s+=\s+64\b", log), log[-3000:]


def test_the_server_locks_no_ffn_weights(server: str, converted: tuple[Path, Path]) -> None:
    # llama-cpp-python's server defaults to use_mlock, which llama.cpp would apply to its whole mapping, FFN
    # weights included (Qwen2.5-Coder-1.5B served under an 800MB cap was OOM-killed at load): the weights
    # llama.cpp reads every token are locked instead, as under a budget
    status = Path(f"/proc/{PROCESSES[server].pid}/status").read_text()
    locked = int(re.search(r"VmLck:\s+(\d+) kB", status).group(1)) * 1024
    every_token, slack = every_token_weight_bytes(converted[0])
    assert every_token <= locked <= every_token + slack


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": -3}),
    ("/v1/completions", {"prompt": "the " * (N_CTX + 50), "max_tokens": 4}),  # beyond the context window
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": "hot"}),
    ("/v1/chat/completions", {"messages": "not a list"}),
    ("/v1/chat/completions", {"messages": [{"role": "nobody", "content": "x"}]}),
]


def test_bad_requests_get_what_llama_cpp_pythons_server_answers(server: str, synthetic_model: ModelFactory,
                                                                tmp_path: Path) -> None:
    stock_command = [sys.executable, "-m", "llama_cpp.server", "--model", str(synthetic_model("llama", "q8_0")),
                     "--n_ctx", str(N_CTX)]
    with running(stock_command, tmp_path / "stock-serve.log") as stock:
        for route, body in BAD_REQUESTS:
            ours = requests.post(f"{server}{route}", json=body, timeout=60)
            theirs = requests.post(f"{stock}{route}", json=body, timeout=60)
            assert ours.status_code == theirs.status_code and ours.status_code >= 400, (route, body)
            assert ours.json() == theirs.json(), (route, body)


def test_serve_refuses_a_missing_model_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "neuralink", "serve", "/nonexistent/model.gguf"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "neuralink serve: error: /nonexistent/model.gguf: no such model file"


def test_serve_refuses_a_ram_prompt_cache_under_a_budget(converted: tuple[Path, Path]) -> None:
    # llama-cpp-python's --cache keeps the context's state and logits per prompt (~37 MiB of logits a prompt on
    # Qwen2.5-Coder-1.5B, up to 2 GiB), which no budget counts: refused before anything loads
    command = [sys.executable, "-m", "neuralink", "serve", str(converted[0]), "--memory-budget", "2GB"]
    done = subprocess.run([*command, "--cache", "true"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("neuralink serve: error: --cache true keeps a copy of the context")


def test_the_server_keeps_every_positions_logits_only_when_asked() -> None:
    # llama-cpp-python's server defaults to logits_all (n_ctx x n_vocab floats: on Qwen2.5-Coder at n_ctx 2048 a
    # 1.2 GB array the memory budget then counts, and refused 800MB); logprobs need them, so they can be asked for
    from llama_cpp.server.cli import parse_model_from_args
    from llama_cpp.server.settings import ModelSettings

    from neuralink.runtime.cli import configure_serve_parser

    parser = argparse.ArgumentParser()
    configure_serve_parser(parser)
    assert parse_model_from_args(ModelSettings, parser.parse_args(["--model", "m.gguf"])).logits_all is False
    asked = parser.parse_args(["--model", "m.gguf", "--logits_all", "true"])
    assert parse_model_from_args(ModelSettings, asked).logits_all is True


@pytest.mark.parametrize("ffn", ["auto", "engine"])
def test_without_a_budget_a_model_that_fits_is_served_by_llama_cpps_ffn_unless_the_engine_is_asked_for(
        converted: tuple[Path, Path], tmp_path: Path, ffn: str) -> None:
    # neuralink.Llama's ffn='auto' (tests/test_llama_ffn.py): the whole file fits this machine's memory
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "neuralink", "serve", str(converted[0]), "--n_ctx", str(N_CTX), "--ffn", ffn]
    with running(command, log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
        assert client.completions.create(model="m", prompt=PROMPT, max_tokens=4, **SAME).choices[0].text is not None
        text = log.read_text()
    # the server is verbose: each completion ends with who computed its FFNs, and the engine's reads
    assert ("neuralink FFN: computed by llama.cpp itself" in text) == (ffn == "auto"), text[-3000:]
    assert ("neuralink FFN: " in text and "computed by llama.cpp" not in text) == (ffn == "engine"), text[-3000:]
