"""The GGUF directory reader: a file changed on disk is read again, an unchanged one is not parsed twice."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from neuralink.formats import gguf_directory
from neuralink.errors import ModelFileError
from neuralink.formats.gguf_directory import read_gguf_directory


def write_gguf(path: Path, name: str, n_tensors: int) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    for i in range(n_tensors):
        writer.add_tensor(f"t{i}", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_settled_file_is_parsed_once_and_a_replaced_one_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_directory, "_SETTLED_NS", 0)  # every file counts as settled
    path = tmp_path / "m.gguf"
    write_gguf(path, "first", 2)
    assert read_gguf_directory(path) is read_gguf_directory(path)
    tmp = tmp_path / "new.gguf"
    write_gguf(tmp, "second", 3)
    os.replace(tmp, path)  # how the converter commits a file: a new inode under the old name
    directory = read_gguf_directory(path)
    assert directory.get("general.name") == "second" and len(directory.tensors) == 3


def test_a_file_rewritten_in_place_moments_ago_is_read_again(tmp_path: Path) -> None:
    # same inode and size, file times that may not have ticked: only the settle window tells them apart
    path = tmp_path / "m.gguf"
    write_gguf(path, "first", 2)
    assert read_gguf_directory(path).get("general.name") == "first"
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(data.index(b"first"))
        f.write(b"other")
    assert read_gguf_directory(path).get("general.name") == "other"


def test_string_arrays_are_walked_over_and_a_truncated_one_is_named(tmp_path: Path) -> None:
    # a vocabulary's strings are walked in C++; what follows them must be read at the right offset, and a
    # file cut inside them must say which string is truncated
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    tokens = [f"tok{i}" * (i % 7) for i in range(5000)]
    writer.add_token_list(tokens)
    writer.add_uint32("after.vocab", 1234)
    writer.add_tensor("t0", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    directory = read_gguf_directory(path)
    assert directory.get("tokenizer.ggml.tokens", "absent") is None  # skipped, not decoded
    assert directory.get("after.vocab") == 1234 and list(directory.tensors) == ["t0"]

    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data.index(b"tok2999")])
    with pytest.raises(ModelFileError, match=r"cut.gguf: truncated or corrupt GGUF: value of "
                                             r"'tokenizer.ggml.tokens'\[2999\] at offset \d+ needs"):
        read_gguf_directory(cut)
