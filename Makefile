# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?=

.PHONY: demo test install lint bench bench-quick bench-sizing benchmarks-md bench-peers clean

$(BIN)/skipjack: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/skipjack

demo: install
	$(BIN)/skipjack models --fetch smollm2-135m
	$(BIN)/python -m skipjack.demo "$(PROMPT)"

test: install
	$(BIN)/skipjack models --fetch smollm2-135m
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench-peers: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install 'llama-cpp-python==0.3.36'

bench-quick: install
	$(BIN)/skipjack bench --suite quick --methods plain,pld,ngram --peers hf,hf-pld,llamacpp,llamacpp-pld --out bench-out/quick

bench: install
	$(BIN)/skipjack bench --suite full --methods plain,pld,ngram --peers hf,hf-pld,llamacpp,llamacpp-pld \
		--max-new-tokens 64 --out bench-out/full
	$(MAKE) benchmarks-md

# Draft sizing: the cost model against fixed draft sizes, with the llama.cpp peers (quick suite; ~12 min).
bench-sizing: install
	$(BIN)/skipjack bench --suite quick --methods plain,pld,pld:k=2,pld:k=4,pld:k=8,pld:k=16 --peers llamacpp,llamacpp-pld \
		--max-new-tokens 64 --out bench-out/sizing

# BENCHMARKS.md from the full run, plus the sizing run and the llama.cpp prompt-lookup run when they exist.
EXTRA_RUNS = $(if $(wildcard bench-out/sizing/results.json),--extra "Draft sizing and llama.cpp peers (quick suite)=bench-out/sizing") \
	$(if $(wildcard bench-out/llamacpp-pld/results.json),--extra "llama.cpp prompt lookup (full suite, separate run)=bench-out/llamacpp-pld")
benchmarks-md: install
	$(BIN)/python -m skipjack.bench.report bench-out/full --benchmarks-md BENCHMARKS.md $(EXTRA_RUNS) \
		--notes docs/bench/NOTES.md

clean:
	rm -rf $(VENV) bench-out
