"""aarch64 proof under qemu, and build_android.sh's refusals (docs/android.md).

``scripts/build_aarch64.sh all`` cross-compiles the patched libllama (cached
under ~/.cache/neuralink), the engine, neuralink-run and the C++ tests for
aarch64, runs the tests and tiny synthetic models under qemu-aarch64 and fails
when the aarch64 runner departs from the x86-64 one beyond the documented
rules. The cross tools come from scripts/install_cross_tools.sh (the test job of
scripts/setup.sh runs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

# the cross build's own limit (an hour, below) applies here, not the suite's per-test limit (pyproject.toml)
pytestmark = pytest.mark.timeout(3700)

BUILD_AARCH64 = REPO_ROOT / "scripts" / "build_aarch64.sh"
BUILD_ANDROID = REPO_ROOT / "scripts" / "build_android.sh"
CASES = ["llama-q4_0-dense", "qwen2-q5_1-dense", "gemma3-f16-dense", "llama-q8_0-sparse-gate",
         "arcee-q4_1-sparse-oracle"]
ELF_MACHINE_AARCH64 = 183


def run_script(*args: object, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, errors="replace",
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def aarch64_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of one full build + check (the first build takes minutes, later ones use the cache)."""
    tools = run_script(REPO_ROOT / "scripts" / "install_cross_tools.sh", "--check")
    assert tools.returncode == 0, f"cross tools missing: run 'bash scripts/install_cross_tools.sh'\n{tools.stderr}"
    out = tmp_path_factory.mktemp("aarch64")
    result = run_script(BUILD_AARCH64, "all", "--out", out, timeout=3600)
    assert result.returncode == 0, f"build_aarch64.sh all failed:\n{result.stderr[-6000:]}"
    return out


def manifest(out: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (out / "manifest.env").read_text().splitlines())


def elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little")


def test_binaries_are_aarch64(aarch64_run: Path) -> None:
    m = manifest(aarch64_run)
    for key in ("AARCH64_RUNNER", "AARCH64_TESTS"):
        assert elf_machine(Path(m[key])) == ELF_MACHINE_AARCH64, key
    assert elf_machine(Path(m["NATIVE_RUNNER"])) != ELF_MACHINE_AARCH64


def test_cpp_engine_tests_pass_under_qemu(aarch64_run: Path) -> None:
    log = (aarch64_run / "cpp_tests.log").read_text()
    summary = re.search(r"^(\d+) tests, (\d+) failed$", log, re.MULTILINE)
    assert summary and int(summary.group(1)) > 0 and summary.group(2) == "0", log[-2000:]


def test_ggml_runs_its_neon_kernels(aarch64_run: Path) -> None:
    log = (aarch64_run / "llama-q4_0-dense.aarch64.engine.log").read_text()
    assert re.search(r"system: CPU : NEON = 1", log), log


def test_every_case_ran_and_matched(aarch64_run: Path) -> None:
    rows = [line.split("\t") for line in (aarch64_run / "results.tsv").read_text().splitlines()]
    assert [r[0] for r in rows[1:]] == CASES
    for name, greedy_equal, engine_diff, *_ in rows[1:]:
        equal, total = map(int, greedy_equal.split()[0].split("/"))
        assert total == 32 and equal >= total - 3, (name, greedy_equal)  # at most a few near-ties
        assert float(engine_diff) <= 2e-2, name
    # within the aarch64 build, quantized dense FFNs are bit-exact with llama.cpp's own
    by_name = {r[0]: r for r in rows[1:]}
    assert float(by_name["llama-q4_0-dense"][5]) == 0.0 and float(by_name["qwen2-q5_1-dense"][5]) == 0.0


def test_pread_is_the_android_default_and_logged(aarch64_run: Path) -> None:
    # the aarch64 runner is built with Android's default read path; with --io-backend auto, qemu has no
    # io_uring and the engine falls back to the pread pool, saying why
    default = (aarch64_run / "llama-q8_0-sparse-gate.aarch64.engine.log").read_text()
    assert "reads: pread, pread pool chosen (asked: pread by default" in default
    auto = (aarch64_run / "arcee-q4_1-sparse-oracle.aarch64.engine.log").read_text()
    assert re.search(r"reads: pread, io_uring_setup failed: .*; using the pread pool \(asked: --io-backend auto\)",
                     auto), auto


@pytest.fixture
def tampered(aarch64_run: Path, tmp_path: Path) -> Path:
    """A copy of the runs, to change one aarch64 result and see `compare` refuse it."""
    out = tmp_path / "runs"
    shutil.copytree(aarch64_run, out, ignore=shutil.ignore_patterns("models"))
    return out


def test_compare_fails_when_greedy_tokens_differ(tampered: Path) -> None:
    name = "qwen2-q5_1-dense"
    tokens_file = tampered / f"{name}.aarch64.engine.tokens"
    tokens = tokens_file.read_text().split()
    logits = np.fromfile(tampered / f"{name}.x86_64.engine.logits", dtype="<f4").reshape(len(tokens), -1)
    tokens[5] = str(int(np.argmin(logits[5])))  # the least likely token: no rounding explains it
    tokens_file.write_text(" ".join(tokens) + "\n")
    result = run_script(BUILD_AARCH64, "compare", "--out", tampered)
    assert result.returncode != 0
    assert f"FAIL {name} (engine): aarch64 vs x86-64: greedy tokens equal at 31 of 32 steps" in result.stderr


def test_compare_fails_when_logits_drift_beyond_the_tolerance(tampered: Path) -> None:
    name = "llama-q8_0-sparse-gate"
    path = tampered / f"{name}.aarch64.engine.logits"
    logits = np.fromfile(path, dtype="<f4")
    (logits * 1.05).astype("<f4").tofile(path)
    result = run_script(BUILD_AARCH64, "compare", "--out", tampered)
    assert result.returncode != 0
    assert re.search(rf"FAIL {name} \(engine\): .*max relative logit difference 0\.0[4-9]", result.stderr)


def test_compare_fails_when_the_engine_departs_from_llama_cpp_on_aarch64(tampered: Path) -> None:
    name = "llama-q4_0-dense"
    path = tampered / f"{name}.aarch64.engine.logits"
    logits = np.fromfile(path, dtype="<f4")
    logits[7] = np.nextafter(logits[7], np.float32(np.inf))  # one ulp: quantized FFNs must be bit-exact
    logits.tofile(path)
    result = run_script(BUILD_AARCH64, "compare", "--out", tampered)
    assert result.returncode != 0
    assert f"FAIL {name}: on aarch64 the engine differs from llama.cpp's own FFNs" in result.stderr


# build_android.sh: it fails fast and clearly without a usable NDK; with one it prints its CMake invocation.

def android_env(ndk: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ANDROID_NDK"}
    if ndk is not None:
        env["ANDROID_NDK"] = ndk
    return env


def fake_ndk(root: Path, revision: str = "27.2.12479018") -> Path:
    (root / "build" / "cmake").mkdir(parents=True)
    (root / "build" / "cmake" / "android.toolchain.cmake").write_text("# not a real toolchain\n")
    (root / "source.properties").write_text(f"Pkg.Desc = Android NDK\nPkg.Revision = {revision}\n")
    lib = root / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "sysroot" / "usr" / "lib" / "aarch64-linux-android"
    lib.mkdir(parents=True)
    (lib / "libc++_shared.so").write_bytes(b"")
    return root


@pytest.mark.parametrize("ndk, message", [
    (None, "ANDROID_NDK is not set: point it at an Android NDK r26 or newer"),
    ("", "ANDROID_NDK is not set"),
    ("/nonexistent/ndk", "ANDROID_NDK=/nonexistent/ndk: no such directory"),
])
def test_android_build_without_an_ndk_fails_fast(ndk: str | None, message: str, tmp_path: Path) -> None:
    result = run_script(BUILD_ANDROID, "--out", tmp_path / "out", env=android_env(ndk), timeout=20)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out").exists()  # nothing fetched, configured or built


def test_android_build_with_a_directory_that_is_not_an_ndk(tmp_path: Path) -> None:
    result = run_script(BUILD_ANDROID, "--out", tmp_path / "out", env=android_env(str(tmp_path)), timeout=20)
    assert result.returncode != 0
    assert f"ANDROID_NDK={tmp_path} is not an Android NDK: build/cmake/android.toolchain.cmake is missing" in result.stderr


def test_android_build_with_an_old_ndk(tmp_path: Path) -> None:
    ndk = fake_ndk(tmp_path / "ndk", revision="21.4.7075529")
    result = run_script(BUILD_ANDROID, "--dry-run", env=android_env(str(ndk)), timeout=20)
    assert result.returncode != 0
    assert "is NDK 21.4.7075529; neuralink needs r26 or newer" in result.stderr


def test_android_build_cmake_invocation(tmp_path: Path) -> None:
    ndk = fake_ndk(tmp_path / "ndk")
    result = run_script(BUILD_ANDROID, "--dry-run", "--out", tmp_path / "out", env=android_env(str(ndk)), timeout=20)
    assert result.returncode == 0, result.stderr
    configure = result.stdout.splitlines()[0]
    for flag in (f"-DCMAKE_TOOLCHAIN_FILE={ndk}/build/cmake/android.toolchain.cmake", "-DANDROID_ABI=arm64-v8a",
                 "-DANDROID_PLATFORM=android-28", "-DANDROID_STL=c++_shared", "-DGGML_OPENMP=OFF",
                 "-DGGML_CPU_KLEIDIAI=OFF", "-DFETCHCONTENT_FULLY_DISCONNECTED=ON", "-DLLAMA_OPENSSL=OFF",
                 "-DNEURALINK_RUNNER=ON"):
        assert flag in configure.split(), flag
    # the pinned, patched llama.cpp from the cache, never a checkout fetched at configure time
    assert re.search(r"-DNEURALINK_LLAMA_SRC=\S+/src/llama-cpp-python-0\.3\.36-patched-[0-9a-f]{16}/vendor/llama\.cpp",
                     configure)
    assert "neuralink-run" in result.stdout.splitlines()[1]
    # docs/android.md shows the same invocation
    doc = (REPO_ROOT / "docs" / "android.md").read_text()
    for flag in ("-DANDROID_PLATFORM=android-28", "-DGGML_OPENMP=OFF", "-DGGML_CPU_KLEIDIAI=OFF",
                 "-DFETCHCONTENT_FULLY_DISCONNECTED=ON", "-DANDROID_STL=c++_shared"):
        assert flag in doc, flag
