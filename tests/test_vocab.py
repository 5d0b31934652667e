"""llama.cpp's vocabulary in flat tables (patches/0002-compact-vocab.patch).

After loading, llama.cpp's token and merge maps are replaced by open-addressing
tables over the token texts and one string of merges. Tokenizing, detokenizing
and every token's piece must not change, and the heap left after the load must
be smaller: that heap is part of every memory budget's floor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import corpus

# Run in a child per setting: LLAMA_VOCAB_KEEP_MAPS is read at load.
CHILD = r"""
import ctypes, glob, hashlib, json, os, sys
import llama_cpp
from neuralink.runtime.memory_budget import anonymous_resident_bytes, release_free_heap

model, texts_file = sys.argv[1], sys.argv[2]
texts = json.load(open(texts_file))
llama_cpp.llama_backend_init()
release_free_heap()
before = anonymous_resident_bytes()
llm = llama_cpp.Llama(model, vocab_only=True, verbose=False)
release_free_heap()
heap = anonymous_resident_bytes() - before
ids_hash, n_ids = hashlib.sha256(), 0
for text in texts:
    for special in (False, True):
        ids = llm.tokenize(text.encode(), add_bos=False, special=special)
        n_ids += len(ids)
        ids_hash.update(repr(ids).encode())
        ids_hash.update(llm.detokenize(ids))
vocab = llama_cpp.llama_model_get_vocab(llm.model)
pieces = hashlib.sha256()
buf = ctypes.create_string_buffer(512)
for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    pieces.update(buf.raw[:n] if n >= 0 else b"?")
print(json.dumps({"ids": ids_hash.hexdigest(), "n_ids": n_ids, "pieces": pieces.hexdigest(), "heap": heap}))
"""


def vocab_report(model: Path, texts_file: Path, keep_maps: bool) -> dict:
    env = dict(os.environ, LLAMA_VOCAB_KEEP_MAPS="1" if keep_maps else "0")
    run = subprocess.run([sys.executable, "-c", CHILD, str(model), str(texts_file)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    """Code (a slice of the standard library), prose, control characters, CJK and emoji, chat markup."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("[a-f]*.py"))]
    texts.append(corpus("emma.txt").read_text()[:200_000])
    texts.append("".join(chr(c) for c in range(1, 2000)))
    texts.append("日本語のテキスト、中文文本 🤖🧠 emoji\t\n\r   trailing   ")
    texts.append("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|endoftext|>")
    path = tmp_path_factory.mktemp("vocab") / "texts.json"
    path.write_text(json.dumps(texts))
    return path


def test_flat_vocabulary_tokenizes_like_the_maps_in_less_heap(smollm2_path, texts_file):
    flat = vocab_report(smollm2_path, texts_file, keep_maps=False)
    maps = vocab_report(smollm2_path, texts_file, keep_maps=True)
    assert flat["n_ids"] > 100_000
    assert (flat["ids"], flat["n_ids"], flat["pieces"]) == (maps["ids"], maps["n_ids"], maps["pieces"])
    # SmolLM2's 49k tokens and 48k merges: ~11 MiB of map nodes against ~1.5 MiB of tables
    assert flat["heap"] < maps["heap"] - (4 << 20), (flat["heap"] >> 20, maps["heap"] >> 20)
