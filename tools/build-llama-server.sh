#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (llama-server: parallel slots, continuous batching) from the llama.cpp that
# llama-cpp-python vendors (the peer's version, so both run the same kernels), for `make bench-serve`. The
# binary goes to $SKIPJACK_HOME/llama-server; `llama-server --version` must run. A native build first, then a
# portable one with the instruction sets this CPU reports (as tools/build-llamacpp.sh does).
set -eu
BIN=${BIN:-.venv/bin}
VERSION=0.3.36
HOME_DIR=${SKIPJACK_HOME:-$HOME/.cache/skipjack}
OUT="$HOME_DIR/llama-server"
if [ -x "$OUT" ] && "$OUT" --version >/dev/null 2>&1; then echo "llama-server: $OUT is built"; exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN/pip" download --quiet --no-deps --no-binary :all: --dest "$WORK" "llama-cpp-python==$VERSION"
tar xzf "$WORK"/llama_cpp_python-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
PORTABLE="$PORTABLE -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
COMMON="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF"
build() {  # $1: a label, $2: cmake arguments
  echo "llama-server: building ($1)"
  rm -rf "$SRC/build"
  # shellcheck disable=SC2086
  cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release $COMMON $2 >/dev/null \
    && cmake --build "$SRC/build" --target llama-server -j "$(nproc)" >/dev/null \
    && "$SRC/build/bin/llama-server" --version >/dev/null 2>&1
}
if build native "-DGGML_NATIVE=ON" || build portable "$PORTABLE"; then
  mkdir -p "$HOME_DIR" && cp "$SRC/build/bin/llama-server" "$OUT"
  echo "llama-server: built $OUT"
else
  echo "llama-server: the build failed" >&2
  exit 1
fi
