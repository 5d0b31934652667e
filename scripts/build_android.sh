#!/usr/bin/env bash
# Build neuralink for Android arm64-v8a with the Android NDK: the patched
# libllama + ggml, the engine as a shared library (libneuralink.so), the runner
# neuralink-run and the engine's C++ tests, then print the adb commands to push
# and run them. See docs/android.md.
#
#   ANDROID_NDK=/path/to/ndk bash scripts/build_android.sh [--out DIR] [--dry-run]
#
#   --out DIR   build directory (default build/android); the files to push land in DIR/arm64-v8a
#   --dry-run   check the NDK and print the CMake invocation, build nothing
#
# Environment:
#   ANDROID_NDK            the NDK (r26 or newer; required)
#   NEURALINK_ANDROID_API  minimum Android API level (default 28: Android 9)
#   NEURALINK_ARM_ARCH     ggml's -march (default armv8-a: the arm64-v8a baseline, as tested
#                          under qemu by build_aarch64.sh; armv8.2-a+dotprod+fp16 is faster on
#                          phones from ~2018 on, untested here)
#
# Sources: only the pinned llama.cpp vendored by llama-cpp-python's sdist (sha256
# checked, scripts/llama_source.sh) with patches/ applied, and this checkout.
# OpenMP, KleidiAI and everything CMake could download at configure time are off.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEURALINK_VENV:-$ROOT/.venv}"
CACHE="${NEURALINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neuralink}"
API="${NEURALINK_ANDROID_API:-28}"
ARM_ARCH="${NEURALINK_ARM_ARCH:-armv8-a}"
ABI=arm64-v8a
MIN_NDK_MAJOR=26
DEVICE_DIR=/data/local/tmp/neuralink

say() { printf '\033[1m[android]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[android] error:\033[0m %s\n' "$*" >&2; exit 1; }

out="$ROOT/build/android" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a directory"; out="$2"; shift ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (expected --out DIR, --dry-run)" ;;
  esac
  shift
done

# 1. the NDK, checked before anything is fetched or built
[ -n "${ANDROID_NDK:-}" ] || die "ANDROID_NDK is not set: point it at an Android NDK r$MIN_NDK_MAJOR or newer, e.g.
  export ANDROID_NDK=\$HOME/Android/Sdk/ndk/27.2.12479018   (Android Studio's SDK manager, or
  https://developer.android.com/ndk/downloads); see docs/android.md"
[ -d "$ANDROID_NDK" ] || die "ANDROID_NDK=$ANDROID_NDK: no such directory"
NDK="$(cd "$ANDROID_NDK" && pwd)"
TOOLCHAIN="$NDK/build/cmake/android.toolchain.cmake"
[ -f "$TOOLCHAIN" ] || die "ANDROID_NDK=$NDK is not an Android NDK: build/cmake/android.toolchain.cmake is missing"
[ -f "$NDK/source.properties" ] || die "ANDROID_NDK=$NDK is not an Android NDK: source.properties is missing"
revision=$(sed -n 's/^Pkg\.Revision *= *//p' "$NDK/source.properties" | tr -d '\r')
ndk_major="${revision%%.*}"
[[ "$ndk_major" =~ ^[0-9]+$ ]] \
  || die "$NDK/source.properties: no Pkg.Revision line with the NDK version (found '${revision}')"
[ "$ndk_major" -ge "$MIN_NDK_MAJOR" ] \
  || die "ANDROID_NDK=$NDK is NDK $revision; neuralink needs r$MIN_NDK_MAJOR or newer (C++17, API $API)"
LIBCXX_SHARED=$(ls "$NDK"/toolchains/llvm/prebuilt/*/sysroot/usr/lib/aarch64-linux-android/libc++_shared.so 2> /dev/null | head -1 || true)
[ -n "$LIBCXX_SHARED" ] || die "ANDROID_NDK=$NDK has no aarch64 libc++_shared.so under toolchains/llvm/prebuilt/*/sysroot"
[[ "$API" =~ ^[0-9]+$ ]] && [ "$API" -ge 24 ] || die "NEURALINK_ANDROID_API=$API: expected an API level of 24 or more"
say "NDK $revision at $NDK, API level $API, $ABI ($ARM_ARCH)"

# host tools: the venv's cmake and ninja (scripts/setup.sh) or the system's
[ -d "$VENV/bin" ] && export PATH="$VENV/bin:$PATH"
for tool in cmake ninja; do
  command -v "$tool" > /dev/null || die "$tool not found: run 'bash scripts/setup.sh' or install $tool"
done
if [ -x "$VENV/bin/python" ]; then PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q); else PIP=(python3 -m pip --disable-pip-version-check -q); fi
# shellcheck source=scripts/llama_source.sh
. "$ROOT/scripts/llama_source.sh"
SRC_DIR="$CACHE/src/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-patched-$(llama_source_key)"
LLAMA_SRC="$SRC_DIR/vendor/llama.cpp"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
BUILD_DIR="$out/build-$ABI"
DIST="$out/$ABI"

# 2. one CMake project: cpp/ builds the patched llama.cpp as a subdirectory, so the NDK's
# toolchain finds every library by target, and one libc++ (shared) serves all of them
CMAKE_ARGS=(
  -S "$ROOT/cpp" -B "$BUILD_DIR" -G Ninja
  "-DCMAKE_TOOLCHAIN_FILE=$TOOLCHAIN" "-DANDROID_ABI=$ABI" "-DANDROID_PLATFORM=android-$API"
  -DANDROID_STL=c++_shared -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
  "-DNEURALINK_LLAMA_SRC=$LLAMA_SRC" -DNEURALINK_RUNNER=ON -DNEURALINK_TESTS=ON -DNEURALINK_PYTHON=OFF
  -DGGML_NATIVE=OFF "-DGGML_CPU_ARM_ARCH=$ARM_ARCH" -DGGML_OPENMP=OFF -DGGML_CPU_KLEIDIAI=OFF
  -DGGML_BACKEND_DL=OFF -DGGML_CCACHE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF
  -DFETCHCONTENT_FULLY_DISCONNECTED=ON
)
TARGETS=(llama neuralink neuralink-run neuralink_tests)

quoted() { local a s=""; for a in "$@"; do s+=" $(printf '%q' "$a")"; done; printf '%s' "${s# }"; }
if [ "$dry_run" = 1 ]; then
  echo "cmake $(quoted "${CMAKE_ARGS[@]}")"
  echo "cmake --build $(quoted "$BUILD_DIR") --target $(quoted "${TARGETS[@]}")"
  exit 0
fi

# 3. the pinned, patched sources, then the build
ensure_patched_source "$SRC_DIR"
t0=$(date +%s)
say "configuring in $BUILD_DIR"
cmake "${CMAKE_ARGS[@]}" > "$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log" >&2; die "configuring with the NDK failed (log: $out/configure.log)"; }
say "building ${TARGETS[*]}"
cmake --build "$BUILD_DIR" --target "${TARGETS[@]}" > "$out/build.log" 2>&1 \
  || { grep -m 5 -A 12 'error' "$out/build.log" >&2 || tail -30 "$out/build.log" >&2; die "building failed (log: $out/build.log)"; }

rm -rf "$DIST" && mkdir -p "$DIST"
cp "$BUILD_DIR/neuralink-run" "$BUILD_DIR/neuralink_tests" "$LIBCXX_SHARED" "$DIST/"
find "$BUILD_DIR" -name 'lib*.so' -exec cp {} "$DIST/" \;
for f in neuralink-run neuralink_tests libneuralink.so libllama.so libggml-base.so libggml-cpu.so libggml.so libc++_shared.so; do
  [ -f "$DIST/$f" ] || die "the build did not produce $f (log: $out/build.log)"
done
say "built in $(( $(date +%s) - t0 )) s: $DIST"

cat <<EOF

Push and run (adb on the host; a device with USB debugging on):

  adb shell mkdir -p $DEVICE_DIR
  adb push $DIST/. $DEVICE_DIR/
  # the engine's own tests (they write scratch files in the working directory)
  adb shell "cd $DEVICE_DIR && LD_LIBRARY_PATH=. ./neuralink_tests"
  # a model converted by 'neuralink convert' and its sidecar, side by side
  adb push MODEL.neuralink.gguf MODEL.neuralink.sidecar $DEVICE_DIR/
  adb shell "cd $DEVICE_DIR && LD_LIBRARY_PATH=. ./neuralink-run -m MODEL.neuralink.gguf \\
      -p 'Once upon a time' -n 64 --threads 4 --memory-budget 300MB"

Reads use pread by default on Android (io_uring is commonly refused there); the runner logs its choice.
EOF
