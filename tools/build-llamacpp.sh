#!/usr/bin/env bash
# Build the llama.cpp peer (llama-cpp-python) for this CPU and prove it runs: a native build first
# (GGML_NATIVE=ON), checked by a one-token generation with the default model in a child process; if that
# build fails or crashes (it segfaults on some AMX Xeons), a portable build with the instruction sets this
# CPU reports. The build that passed is recorded in $SKIPJACK_HOME/llamacpp-build.json; the bench header
# prints it.
set -u
BIN=${BIN:-.venv/bin}
VERSION=0.3.36
HOME_DIR=${SKIPJACK_HOME:-$HOME/.cache/skipjack}
mkdir -p "$HOME_DIR"

smoke() {
  timeout 300 "$BIN/python" - <<'PY'
from llama_cpp import Llama
from skipjack.loading import fetch_named
llm = Llama(model_path=str(fetch_named("smollm2-135m")), n_ctx=64, verbose=False)
out = llm("Hello", max_tokens=1, temperature=0.0)
assert out["choices"], out
PY
}

build() {  # $1: a label, $2: CMAKE_ARGS
  echo "llama.cpp peer: building ($1: $2)"
  CMAKE_ARGS="$2" "$BIN/pip" install --quiet --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==$VERSION" \
    && "$BIN/pip" install --quiet "llama-cpp-python==$VERSION" && smoke
}

record() {
  printf '{"build": "%s", "cmake_args": "%s", "version": "%s"}\n' "$1" "$2" "$VERSION" > "$HOME_DIR/llamacpp-build.json"
  echo "llama.cpp peer: $1 build passed its smoke run"
}

flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
PORTABLE="$PORTABLE -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"

if build native "-DGGML_NATIVE=ON"; then
  record native "-DGGML_NATIVE=ON"
elif build portable "$PORTABLE"; then
  record portable "$PORTABLE"
else
  echo "llama.cpp peer: neither build runs on this CPU" >&2
  exit 1
fi
