#!/usr/bin/env bash
# Cross-compile neuralink for aarch64 (Debian's aarch64-linux-gnu GCC 12) and
# check it under qemu-aarch64 against the x86-64 build.
#
#   bash scripts/build_aarch64.sh [all|build|native|check|compare] [--out DIR]   (default: all, DIR build/aarch64)
#
#   native  neuralink-run for x86-64, linked against the patched libllama of
#           llama-cpp-python in the venv (the very library neuralink.Llama loads)
#   build   native, plus the patched libllama + ggml for aarch64 (cached per sources
#           and flags under $NEURALINK_CACHE/build) and, against it, the engine,
#           neuralink-run and the C++ tests for aarch64
#   check   the C++ tests under qemu-aarch64, then tiny synthetic models (dense, and
#           converted with a sidecar) through both runners and through llama.cpp's
#           own FFNs (--stock-ffn); the aarch64 runs follow the x86-64 engine's tokens
#           (--follow-tokens) so logits compare at every step; rules in docs/android.md
#   all     build, then check
#   compare the rules of docs/android.md on the runs already in DIR (check ends with it)
#
# Writes DIR/manifest.env (the binaries), DIR/results.tsv and, per case and
# build, the token ids, logits and logs. Needs the venv of scripts/setup.sh and,
# except for `native`, the cross tools (scripts/install_cross_tools.sh).
# Environment: NEURALINK_ARM_ARCH (ggml's -march, default armv8-a: the arm64-v8a baseline).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEURALINK_VENV:-$ROOT/.venv}"
CACHE="${NEURALINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neuralink}"
ARM_ARCH="${NEURALINK_ARM_ARCH:-armv8-a}"
SYSROOT=/usr/aarch64-linux-gnu
# relative to max |logit|; llama.cpp's own NEON and AVX kernels differ by up to ~1e-2 here (docs/android.md)
CROSS_TOLERANCE=2e-2
# the engine against llama.cpp's own FFNs in one build, float weights (docs/hook.md); quantized: bit-exact
FLOAT_TOLERANCE=1e-3
N_PREDICT=32
PROMPT="the quick brown fox jumps over the lazy dog"

say() { printf '\033[1m[aarch64]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[aarch64] error:\033[0m %s\n' "$*" >&2; exit 1; }

step="all" out="$ROOT/build/aarch64"
while [ $# -gt 0 ]; do
  case "$1" in
    all|build|native|check|compare) step="$1" ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; out="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (expected all, build, native, check, compare, --out DIR)" ;;
  esac
  shift
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"

PY="$VENV/bin/python"
[ -x "$PY" ] || die "no venv at $VENV: run 'bash scripts/setup.sh' first"
PIP=("$PY" -m pip --disable-pip-version-check -q)
export PATH="$VENV/bin:$PATH" # cmake and ninja
for tool in cmake ninja; do
  command -v "$tool" > /dev/null || die "$tool not found in $VENV: run 'bash scripts/setup.sh'"
done
if [ "$step" != native ] && [ "$step" != compare ]; then
  for tool in aarch64-linux-gnu-gcc-12 aarch64-linux-gnu-g++-12 qemu-aarch64; do
    command -v "$tool" > /dev/null || die "$tool not found: run 'bash scripts/install_cross_tools.sh'"
  done
fi
# shellcheck source=scripts/llama_source.sh
. "$ROOT/scripts/llama_source.sh"

hash_of() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

# cmake configure (once per directory) and build of the given targets; the log is shown on failure
cmake_build() {
  local src="$1" dir="$2" targets="$3"; shift 3
  if [ ! -f "$dir/CMakeCache.txt" ]; then
    mkdir -p "$dir"
    cmake -S "$src" -B "$dir" -G Ninja "$@" > "$dir/configure.log" 2>&1 \
      || { tail -30 "$dir/configure.log" >&2; rm -f "$dir/CMakeCache.txt"; die "configuring $dir failed (log: $dir/configure.log)"; }
  fi
  # shellcheck disable=SC2086
  cmake --build "$dir" --target $targets > "$dir/build.log" 2>&1 \
    || { grep -m 5 -A 12 'error' "$dir/build.log" >&2 || tail -30 "$dir/build.log" >&2; die "building $dir failed (log: $dir/build.log)"; }
}

write_toolchain() {
  cat > "$1" <<EOF
# aarch64-linux-gnu with Debian's GCC 12 cross compilers; binaries run under qemu-aarch64
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc-12)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++-12)
set(CMAKE_FIND_ROOT_PATH $SYSROOT)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
# BOTH, not ONLY: the engine finds the aarch64 libllama in the cache by its absolute path
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L $SYSROOT)
EOF
}

patched_source() {
  SRC_KEY=$(llama_source_key)
  local src="$CACHE/src/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-patched-$SRC_KEY"
  ensure_patched_source "$src"
  LLAMA_SRC="$src/vendor/llama.cpp"
}

build_native() {
  local lib_dir t0
  lib_dir=$("$PY" -c 'import importlib.util as u, os; print(os.path.join(list(u.find_spec("llama_cpp").submodule_search_locations)[0], "lib"))') \
    || die "llama-cpp-python is not installed in $VENV: run 'bash scripts/setup.sh'"
  NATIVE_DIR="$CACHE/build/neuralink-x86_64-$(hash_of "$ROOT" "$lib_dir" "$SRC_KEY")"
  t0=$(date +%s)
  say "neuralink-run for x86-64 in $NATIVE_DIR"
  cmake_build "$ROOT/cpp" "$NATIVE_DIR" neuralink-run -DCMAKE_BUILD_TYPE=Release -DNEURALINK_TESTS=OFF \
    "-DNEURALINK_LLAMA_SRC=$LLAMA_SRC" "-DNEURALINK_LLAMA_LIB_DIR=$lib_dir" -DNEURALINK_RUNNER=ON
  say "  done in $(elapsed "$t0")"
}

build_aarch64() {
  # 1. libllama + ggml: only what the runner needs, nothing fetched at configure time
  local llama_flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
    -DGGML_NATIVE=OFF "-DGGML_CPU_ARM_ARCH=$ARM_ARCH" -DGGML_OPENMP=OFF -DGGML_CPU_KLEIDIAI=OFF
    -DGGML_BACKEND_DL=OFF -DGGML_CCACHE=OFF -DFETCHCONTENT_FULLY_DISCONNECTED=ON)
  local compiler llama_dir t0
  compiler=$(aarch64-linux-gnu-g++-12 --version | head -1)
  llama_dir="$CACHE/build/llama-aarch64-$(hash_of "$SRC_KEY" "$compiler" "${llama_flags[*]}")"
  t0=$(date +%s)
  mkdir -p "$llama_dir" && write_toolchain "$llama_dir/toolchain.cmake"
  say "libllama + ggml for aarch64 ($ARM_ARCH) in $llama_dir"
  cmake_build "$LLAMA_SRC" "$llama_dir" llama "-DCMAKE_TOOLCHAIN_FILE=$llama_dir/toolchain.cmake" "${llama_flags[@]}"
  say "  done in $(elapsed "$t0")"

  # 2. engine, runner and C++ tests, against that libllama (a directory per checkout: cheap to rebuild).
  # The runner gets Android's default read path, pread, so that default and its log line run here too.
  local engine_flags=(-DCMAKE_BUILD_TYPE=Release "-DNEURALINK_LLAMA_SRC=$LLAMA_SRC"
    "-DNEURALINK_LLAMA_LIB_DIR=$llama_dir/bin" -DNEURALINK_RUNNER=ON -DNEURALINK_RUNNER_DEFAULT_IO=pread)
  AARCH64_DIR="$CACHE/build/neuralink-aarch64-$(hash_of "$ROOT" "$llama_dir" "${engine_flags[*]}")"
  t0=$(date +%s)
  mkdir -p "$AARCH64_DIR" && write_toolchain "$AARCH64_DIR/toolchain.cmake"
  say "engine, neuralink-run and C++ tests for aarch64 in $AARCH64_DIR"
  cmake_build "$ROOT/cpp" "$AARCH64_DIR" "neuralink-run neuralink_tests" \
    "-DCMAKE_TOOLCHAIN_FILE=$AARCH64_DIR/toolchain.cmake" "${engine_flags[@]}"
  say "  done in $(elapsed "$t0")"
}

build() {
  mkdir -p "$CACHE/build"
  exec 8> "$CACHE/build/cross.lock"
  flock 8 # one build at a time per machine: two would write the same cached directories
  patched_source
  build_native
  {
    echo "NATIVE_RUNNER=$NATIVE_DIR/neuralink-run"
    if [ "$1" = aarch64 ]; then
      build_aarch64
      echo "AARCH64_RUNNER=$AARCH64_DIR/neuralink-run"
      echo "AARCH64_TESTS=$AARCH64_DIR/neuralink_tests"
      echo "SYSROOT=$SYSROOT"
      echo "ARM_ARCH=$ARM_ARCH"
    fi
  } > "$out/manifest.env.tmp"
  mv "$out/manifest.env.tmp" "$out/manifest.env"
  exec 8>&-
  say "built: $(cut -d= -f2 "$out/manifest.env" | grep -- -run | tr '\n' ' ')(manifest: $out/manifest.env)"
}

# Tiny synthetic models as "name|model|runner arguments|threads|engine vs stock|expected reads" lines.
# "engine vs stock" is how the engine must match llama.cpp's own FFNs within one build: exact, a
# relative tolerance, or - when the engine computes another model (sparse with a threshold, or down
# re-encoded in the sidecar). "expected reads" is what the aarch64 run must log about its read path.
make_models() {
  "$PY" - "$out/models" "$FLOAT_TOLERANCE" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from neuralink.convert.writer import convert_model
from neuralink.formats.files import file_sha256
from neuralink.formats.placement import Placement
from neuralink.models.synthetic import write_synthetic_model

root, float_tolerance = Path(sys.argv[1]), sys.argv[2]
root.mkdir(parents=True, exist_ok=True)

def plain(arch, weight_type):
    return write_synthetic_model(root / f"{arch}-{weight_type}.gguf", arch, weight_type=weight_type)

def converted(arch, weight_type, criterion, threshold):
    source = plain(arch, weight_type)
    rng = np.random.default_rng(0)
    n_layer, n_ff = 2, 512
    placement = Placement(
        method="random", orders=[rng.permutation(n_ff).astype(np.int32) for _ in range(n_layer)],
        chain_starts=[np.array([0], dtype=np.int32)] * n_layer,
        frequencies=[rng.random(n_ff, dtype=np.float32) for _ in range(n_layer)],
        thresholds=np.full(n_layer, threshold, dtype=np.float32), criterion=criterion, n_tokens=0,
        model_sha256=file_sha256(source))
    stem = f"{arch}-{weight_type}.neuralink"
    return convert_model(source, placement, root / f"{stem}.gguf", root / f"{stem}.sidecar", force=True).output

# the Android default read path (pread, logged as the default), then auto falling back under qemu,
# which has no io_uring; two threads once, for the engine's split of a layer across compute threads
default_reads = "reads: pread, pread pool chosen (asked: pread by default"
cases = [
    ("llama-q4_0-dense", plain("llama", "q4_0"), "--dense", 1, "exact", "-"),
    ("qwen2-q5_1-dense", plain("qwen2", "q5_1"), "--dense", 1, "exact", "-"),
    ("gemma3-f16-dense", plain("gemma3", "f16"), "--dense", 1, float_tolerance, "-"),
    ("llama-q8_0-sparse-gate", converted("llama", "q8_0", "gate_magnitude", 0.1), "--cache-bytes 64K", 2, "-",
     default_reads),
    ("arcee-q4_1-sparse-oracle", converted("arcee", "q4_1", "relu", 0.0), "--predictor oracle --io-backend auto", 1,
     "-", "using the pread pool (asked: --io-backend auto)"),
]
for case in cases:
    print("|".join(map(str, case)))
EOF
}

# Runs one build's runner on a case: the engine (with the case's arguments) or stock llama.cpp
# (--stock-ffn). Every run but the x86-64 engine's follows the tokens that run generated, so that
# logits compare at every step; each run still reports its own greedy choices.
run_case() {
  local name="$1" model="$2" args="$3" threads="$4" build="$5" mode="$6" runner follow=()
  local tag="$out/$name.$build.$mode"
  if [ "$build" = aarch64 ]; then runner=(qemu-aarch64 -L "$SYSROOT" "$AARCH64_RUNNER"); else runner=("$NATIVE_RUNNER"); fi
  [ "$mode" = stock ] && args="--stock-ffn"
  [ "$build.$mode" = x86_64.engine ] || follow=(--follow-tokens "$out/$name.x86_64.engine.tokens")
  # shellcheck disable=SC2086
  "${runner[@]}" -m "$model" $args -p "$PROMPT" -n "$N_PREDICT" -t "$threads" --ignore-eos \
    --dump-logits "$tag.logits" "${follow[@]}" < /dev/null > "$tag.out" 2> "$tag.log" \
    || { cat "$tag.log" >&2; die "$name: the $build runner failed ($mode; log: $tag.log)"; }
  if [ ${#follow[@]} -eq 0 ]; then
    sed -n 's/^generated token ids: //p' "$tag.log" > "$tag.tokens"
  else
    sed -n 's/^greedy token ids: //p' "$tag.log" > "$tag.tokens"
  fi
  [ -s "$tag.tokens" ] || die "$name: the $build runner ($mode) reported no token ids (log: $tag.log)"
}

# Applies the rules of docs/android.md to the runs of every case; writes results.tsv, fails on any miss.
compare_cases() {
  "$PY" - "$out" "$N_PREDICT" "$CROSS_TOLERANCE" <<'EOF'
import sys
from pathlib import Path

import numpy as np

out, n, cross_tolerance = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
failures = []

def load(name, tag):
    tokens = [int(t) for t in (out / f"{name}.{tag}.tokens").read_text().split()]
    logits = np.fromfile(out / f"{name}.{tag}.logits", dtype="<f4")
    if len(tokens) != n or logits.size % n or not np.isfinite(logits).all():
        failures.append(f"{name}.{tag}: expected {n} token ids and {n} rows of finite logits, got {len(tokens)} "
                        f"ids and {logits.size} values")
        return tokens + [-1] * (n - len(tokens)), np.zeros((n, 1), dtype=np.float32)
    return tokens, logits.reshape(n, -1)

def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())

def cross_isa(name, mode):
    """The aarch64 run followed the x86-64 tokens: compares logits at every step and greedy choices."""
    (tx, lx), (ta, la) = load(name, f"x86_64.{mode}"), load(name, f"aarch64.{mode}")
    tokens_x = load(name, "x86_64.engine")[0]  # the history both runs were fed
    diff = relative(lx, la)
    scale = float(np.abs(lx).max())
    # a different greedy choice must be a near-tie on x86-64: its logit within the tolerance of the best
    ties = [float(lx[i, tx[i]] - lx[i, ta[i]]) / scale for i in range(n) if tx[i] != ta[i]]
    ok = diff <= cross_tolerance and all(0 <= g <= cross_tolerance for g in ties)
    if not ok:
        failures.append(f"{name} ({mode}): aarch64 vs x86-64: greedy tokens equal at {n - len(ties)} of {n} steps "
                        f"(gaps where not: {', '.join(f'{g:.3g}' for g in ties) or '-'}), max relative logit "
                        f"difference {diff:.3g} (allowed {cross_tolerance:g})")
    if mode == "engine" and tx != tokens_x:
        failures.append(f"{name}: the x86-64 engine's greedy ids are not the ones it reported generating")
    return diff, ties, ok

def within_build(name, build, allowed):
    (te, le), (ts, ls) = load(name, f"{build}.engine"), load(name, f"{build}.stock")
    d = relative(ls, le)
    # x86-64 only reported: there llama.cpp repacks Q4_0 for AVX2, a kernel other than the engine's vec_dot
    if build == "aarch64" and (te != ts or d > (0.0 if allowed == "exact" else float(allowed))):
        failures.append(f"{name}: on {build} the engine differs from llama.cpp's own FFNs: greedy tokens equal "
                        f"{te == ts}, max relative logit difference {d:.3g} (allowed: {allowed})")
    return d

def reads_line(name):
    log = (out / f"{name}.aarch64.engine.log").read_text(errors="replace")
    return next((line.split("neuralink-run: ", 1)[1] for line in log.splitlines() if "neuralink-run: reads: " in line), "")

rows = []
for line in (out / "cases.txt").read_text().splitlines():
    name, _, _, _, vs_stock, expect_reads = line.split("|")
    diff, ties, ok = cross_isa(name, "engine")
    own = x86_stock = arm_stock = "-"
    if vs_stock != "-":
        own = f"{cross_isa(name, 'stock')[0]:.3g}"
        x86_stock = f"{within_build(name, 'x86_64', vs_stock):.3g}"
        arm_stock = f"{within_build(name, 'aarch64', vs_stock):.3g}"
    if expect_reads != "-" and expect_reads not in reads_line(name):
        failures.append(f"{name}: the aarch64 run should log '{expect_reads}', it logs '{reads_line(name)}'")
    tokens = f"{n - len(ties)}/{n}" + (f" (ties, gap <= {max(ties):.2g})" if ties else "")
    rows.append([name, tokens, f"{diff:.3g}", own, x86_stock, arm_stock])

header = ["case", "greedy_equal", "engine_x86_vs_arm", "llama_cpp_x86_vs_arm", "x86_engine_vs_llama_cpp",
          "arm_engine_vs_llama_cpp"]
with open(out / "results.tsv", "w") as f:
    for row in [header] + rows:
        f.write("\t".join(row) + "\n")
width = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
for row in [header] + rows:
    print("  " + "  ".join(c.ljust(w) for c, w in zip(row, width)), file=sys.stderr)
for failure in failures:
    print(f"FAIL {failure}", file=sys.stderr)
sys.exit(1 if failures else 0)
EOF
}

check() {
  # shellcheck disable=SC1091
  . "$out/manifest.env" 2> /dev/null || die "$out/manifest.env missing: run '$0 build --out $out' first"
  [ -n "${AARCH64_RUNNER:-}" ] || die "$out/manifest.env has no aarch64 build: run '$0 build --out $out'"
  local t0 log="$out/cpp_tests.log"
  t0=$(date +%s)
  say "C++ engine tests under qemu-aarch64"
  # the tests make their temporary files in the working directory: a real filesystem for O_DIRECT
  (cd "$out" && qemu-aarch64 -L "$SYSROOT" "$AARCH64_TESTS") > "$log" 2>&1 \
    || { cat "$log" >&2; die "C++ tests failed under qemu-aarch64 (log: $log)"; }
  say "  $(tail -1 "$log") ($(elapsed "$t0"))"

  t0=$(date +%s)
  make_models > "$out/cases.txt" || die "writing the synthetic models failed"
  local name model args threads vs_stock expect_reads
  while IFS='|' read -r name model args threads vs_stock expect_reads; do
    say "  $name"
    run_case "$name" "$model" "$args" "$threads" x86_64 engine
    run_case "$name" "$model" "$args" "$threads" aarch64 engine
    if [ "$vs_stock" != - ]; then
      run_case "$name" "$model" "$args" "$threads" x86_64 stock
      run_case "$name" "$model" "$args" "$threads" aarch64 stock
    fi
  done < "$out/cases.txt"
  say "runner cases done in $(elapsed "$t0"); results ($out/results.tsv):"
  compare_cases || die "aarch64 and x86-64 disagree beyond the rules of docs/android.md (above)"
  say "aarch64 matches x86-64"
}

case "$step" in
  native) build native ;;
  build) build aarch64 ;;
  check) check ;;
  compare) compare_cases || die "aarch64 and x86-64 disagree beyond the rules of docs/android.md (above)" ;;
  all) build aarch64 && check ;;
esac
