# Sourced, not run: the pinned llama.cpp that neuralink patches, shared by
# setup.sh, build_aarch64.sh and build_android.sh. It is the copy vendored by
# llama-cpp-python's official sdist, downloaded once with pip, checked against
# its sha256, extracted and patched with patches/ into the cache.
#
# The caller defines ROOT (the repository), CACHE (~/.cache/neuralink), say
# and die, and PIP: an array that runs pip (e.g. (python3 -m pip -q)).

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

# A key for the patched sources: the sdist and every patch (extra arguments join the key).
llama_source_key() {
  (echo "$LLAMA_CPP_PYTHON_VERSION $LLAMA_CPP_PYTHON_SHA256 $*"; cat "$ROOT"/patches/*.patch) | sha256sum | cut -c1-16
}

# The sdist in the cache, downloaded when absent or not the pinned one; prints its path.
llama_sdist() {
  local sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [ ! -f "$sdist" ] || ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status; then
    say "downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    mkdir -p "$CACHE/sdist"
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/sdist" >&2
    echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status \
      || die "$sdist does not have the pinned sha256 $LLAMA_CPP_PYTHON_SHA256"
  fi
  echo "$sdist"
}

# Extracts the sdist into $1 and applies patches/ to its vendor/llama.cpp, once
# ($1/.patched marks a complete tree; a failed patch names its hunks and leaves nothing behind).
ensure_patched_source() {
  local dest="$1"
  [ -f "$dest/.patched" ] && return 0
  local sdist
  sdist=$(llama_sdist)
  local tmp="$dest.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  tar -xzf "$sdist" -C "$tmp" --strip-components=1
  local p
  for p in "$ROOT"/patches/*.patch; do
    say "applying $(basename "$p")"
    if ! (cd "$tmp/vendor/llama.cpp" && patch -p1 --forward --batch --dry-run -s < "$p" > "$tmp/patch.log" 2>&1); then
      sed 's/^/    /' "$tmp/patch.log" >&2
      rm -rf "$tmp"
      die "$(basename "$p") does not apply to llama.cpp in llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (failed hunks above)"
    fi
    (cd "$tmp/vendor/llama.cpp" && patch -p1 --forward --batch -s < "$p")
  done
  touch "$tmp/.patched"
  rm -rf "$dest" && mv "$tmp" "$dest"
}

# ggml's x86 instruction sets, chosen explicitly instead of GGML_NATIVE (-march=native):
# every SIMD level the CPU has, from SSE4.2 to AVX-512 VNNI/BF16, and never AMX. ggml's AMX
# path repacks Q4_0/Q4_1/Q8_0 weights into an AMX buffer at load and crashes on some Sapphire
# Rapids machines (upstream ggml-org/llama.cpp#20824), and -march=native would also pick
# different instructions on every machine, so a cached build could not say what it holds.
# Prints the CMake options; $1 overrides the CPU flags (for tests), then NEURALINK_CPU_FLAGS (to build for
# a CPU with fewer instruction sets than this one, named as /proc/cpuinfo's flags line names them),
# then /proc/cpuinfo.
# On other architectures it prints nothing: ggml's own defaults stand.
ggml_cpu_cmake_args() {
  local flags="${1:-${NEURALINK_CPU_FLAGS:-}}"
  if [ -z "$flags" ]; then
    [ "$(uname -m)" = x86_64 ] || return 0
    flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
  fi
  _cpu_has() { local f; for f in "$@"; do [[ " $flags " == *" $f "* ]] || return 1; done; }
  _cpu_onoff() { if _cpu_has "$@"; then echo ON; else echo OFF; fi; }
  local avx512=OFF
  _cpu_has avx512f avx512cd avx512vl avx512dq avx512bw && avx512=ON
  local sub_vbmi=OFF sub_vnni=OFF sub_bf16=OFF
  if [ "$avx512" = ON ]; then
    sub_vbmi=$(_cpu_onoff avx512vbmi) sub_vnni=$(_cpu_onoff avx512_vnni) sub_bf16=$(_cpu_onoff avx512_bf16)
  fi
  echo "-DGGML_NATIVE=OFF -DGGML_SSE42=$(_cpu_onoff sse4_2) -DGGML_AVX=$(_cpu_onoff avx) -DGGML_AVX2=$(_cpu_onoff avx2)" \
    "-DGGML_FMA=$(_cpu_onoff fma) -DGGML_F16C=$(_cpu_onoff f16c) -DGGML_BMI2=$(_cpu_onoff bmi2) -DGGML_AVX_VNNI=$(_cpu_onoff avx_vnni)" \
    "-DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$sub_vbmi -DGGML_AVX512_VNNI=$sub_vnni -DGGML_AVX512_BF16=$sub_bf16" \
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}
