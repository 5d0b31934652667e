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
