#!/usr/bin/env bash
# One-off check: llama.cpp with patches/ applied and no hook set gives logits
# bit-identical to the unpatched llama.cpp of llama-cpp-python 0.3.36, for
# models without q5_K matrices: on x86 patch 0003 multiplies those with repacked
# kernels (the same integer sums as vec_dot, the float steps in another order;
# docs/q5k-repack.md). The default models below have none.
#
#   bash scripts/check_patch_identity.sh [model.gguf ...]   (default: SmolLM2 and synthetic models)
#
# Builds libllama twice from the cached sdist with identical CMake flags
# (unpatched, patched) and runs the same prompts through llama-cpp-python with
# LLAMA_CPP_LIB_PATH pointing at each. Needs `bash scripts/setup.sh` first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEURALINK_VENV:-$ROOT/.venv}"
CACHE="${NEURALINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neuralink}"
SDIST="$CACHE/sdist/llama_cpp_python-0.3.36.tar.gz"
WORK="$CACHE/identity-check"
say() { printf '[identity] %s\n' "$*" >&2; }
die() { printf '[identity] error: %s\n' "$*" >&2; exit 1; }
# ggml_cpu_cmake_args: the instruction sets setup.sh builds with (AMX never), so both builds run here
source "$ROOT/scripts/llama_source.sh"
[ -f "$SDIST" ] || { echo "error: $SDIST missing; run bash scripts/setup.sh first" >&2; exit 1; }

build() {  # $1 = name, $2 = apply patches (yes/no)
  local dir="$WORK/$1"
  if [ ! -f "$dir/build/bin/libllama.so" ] || [ "$(cat "$dir/cpu-args.txt" 2>/dev/null)" != "$(ggml_cpu_cmake_args)" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    tar -xzf "$SDIST" -C "$dir" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
    if [ "$2" = yes ]; then
      for p in "$ROOT"/patches/*.patch; do (cd "$dir" && patch -p1 -s < "$p"); done
    fi
    PATH="$VENV/bin:$PATH" cmake -S "$dir" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF $(ggml_cpu_cmake_args) > "$dir/configure.log"
    PATH="$VENV/bin:$PATH" cmake --build "$dir/build" --target llama > "$dir/build.log"
    ggml_cpu_cmake_args > "$dir/cpu-args.txt"
  fi
  echo "$dir/build/bin"
}

echo "building unpatched and patched libllama (cached in $WORK)" >&2
unpatched=$(build unpatched no)
patched=$(build patched yes)

cd "$ROOT"
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=("$("$VENV/bin/python" -c 'import neuralink; print(neuralink.default_model_path())')")
  for spec in llama:q4_K qwen2:f16 gemma3:q8_0 arcee:q4_1; do
    models+=("$("$VENV/bin/python" -c "from neuralink.models.synthetic import write_synthetic_model as w; \
print(w('$WORK/${spec/:/-}.gguf', '${spec%%:*}', weight_type='${spec##*:}'))")")
  done
fi

PROBE='
import sys, hashlib, numpy as np, llama_cpp
text = b"It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
for path in sys.argv[1:]:
    llm = llama_cpp.Llama(path, n_ctx=256, logits_all=True, verbose=False)
    tokens = (llm.tokenize(text) * 4)[:64]
    llm.eval(tokens)
    print(path, hashlib.sha256(np.ascontiguousarray(llm.scores[:len(tokens)]).tobytes()).hexdigest())
'
LLAMA_CPP_LIB_PATH="$unpatched" "$VENV/bin/python" -c "$PROBE" "${models[@]}" > "$WORK/unpatched.txt"
LLAMA_CPP_LIB_PATH="$patched" "$VENV/bin/python" -c "$PROBE" "${models[@]}" > "$WORK/patched.txt"

printf '| model | unpatched logits sha256 | patched, no hook | identical |\n| --- | --- | --- | --- |\n'
status=0
while read -r path a && read -r _ b <&3; do
  same=yes; [ "$a" = "$b" ] || { same=NO; status=1; }
  printf '| %s | %s | %s | %s |\n' "$(basename "$path")" "${a:0:16}" "${b:0:16}" "$same"
done < "$WORK/unpatched.txt" 3< "$WORK/patched.txt"
exit $status
