"""The converted GGUF is checked against the checksums its sidecar recorded, before llama.cpp parses it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import neuralink
from neuralink import ModelFileError, _engine
from neuralink.formats.gguf_directory import read_gguf_directory

SETTINGS = dict(predictor="dense", cache_policy="none", n_ctx=64, logits_all=True, verbose=False)


def copies(converted_model, tmp_path: Path) -> tuple[Path, Path]:
    model, sidecar = converted_model("llama", "q8_0")
    return Path(shutil.copy(model, tmp_path)), Path(shutil.copy(sidecar, tmp_path))


def logits(model: Path, sidecar: Path) -> np.ndarray:
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), **SETTINGS)
    tokens = llm.tokenize(b"the quick brown fox")
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)])
    llm.close()
    return out


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_every_byte_llama_cpp_reads_is_covered(converted_model, tmp_path: Path) -> None:
    model, sidecar = copies(converted_model, tmp_path)
    directory = read_gguf_directory(model)
    served = (".ffn_up.weight", ".ffn_down.weight")  # by the sidecar; gate rows, biases and ffn_norm are read
    ffn = sum(t.nbytes for t in directory.tensors.values() if any(part in t.name for part in served))
    others = sum(t.nbytes for t in directory.tensors.values() if not any(part in t.name for part in served))
    assert _engine.verify_model_file(str(model), str(sidecar)) == directory.data_offset + others
    assert ffn > 0  # the FFN tensors llama.cpp never reads (the sidecar serves them) are not hashed at load


@pytest.mark.parametrize("where", ["header", "token_embd.weight", "blk.1.attn_q.weight", "blk.0.ffn_gate.weight", "truncated"])
def test_a_corrupt_model_file_is_refused_before_llama_cpp_reads_it(converted_model, tmp_path: Path,
                                                                   where: str) -> None:
    model, sidecar = copies(converted_model, tmp_path)
    directory = read_gguf_directory(model)
    if where == "header":  # a hyperparameter that still parses: only the checksum can tell
        flip(model, directory.metadata["llama.attention.layer_norm_rms_epsilon"].end - 2)
        message = "its header .metadata and tensor directory. does not match the checksum"
    elif where == "truncated":
        with open(model, "r+b") as f:
            f.truncate(model.stat().st_size - 4096)
        message = "truncated"
    else:
        tensor = directory.tensors[where]
        flip(model, tensor.offset + tensor.nbytes // 3)
        message = f"tensor '{where}' does not match the checksum {sidecar} recorded at conversion"
    with pytest.raises(ModelFileError, match=message) as refused:
        neuralink.Llama(str(model), sidecar=str(sidecar), **SETTINGS)
    assert str(model) in str(refused.value)


def test_bytes_neuralink_never_reads_change_nothing(converted_model, tmp_path: Path) -> None:
    model, sidecar = copies(converted_model, tmp_path)
    want = logits(model, sidecar)
    up = read_gguf_directory(model).tensors["blk.0.ffn_up.weight"]
    flip(model, up.offset + 5)  # the permuted FFN weights stay for stock llama.cpp; the engine reads the sidecar
    assert np.array_equal(logits(model, sidecar), want)
