# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?=

.PHONY: demo test install lint bench bench-quick bench-llamacpp bench-sizing bench-outputs bench-bf16 bench-quality benchmarks-md bench-peers clean

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
	$(BIN)/skipjack models --fetch smollm2-135m gemma3-270m qwen2.5-coder-0.5b
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench-peers: install
	BIN=$(BIN) bash tools/build-llamacpp.sh

bench-quick: install
	$(BIN)/skipjack bench --suite quick --methods plain,pld,ngram --peers hf,hf-pld,llamacpp,llamacpp-pld --out bench-out/quick

# The full suite: our methods, the cost model against the best fixed draft sizes, and the HF peers (~75 min).
bench: install
	$(BIN)/skipjack bench --suite full --methods plain,pld,ngram,pld:k=4,pld:k=8 --peers hf,hf-pld \
		--max-new-tokens 64 --out bench-out/full
	$(BIN)/python -m skipjack.bench.analysis.headroom bench-out/full
	$(MAKE) benchmarks-md

# The llama.cpp peers beside our plain and pld (needs `make bench-peers`; full suite, ~45 min).
bench-llamacpp: install
	$(BIN)/skipjack bench --suite full --methods plain,pld --peers llamacpp,llamacpp-pld \
		--max-new-tokens 64 --out bench-out/llamacpp

# Longer outputs (256 new tokens) on 18 of the full suite's prompts (3 per category): how the end-to-end
# speedup grows as decoding outweighs the prompt's prefill (~25 min).
bench-outputs: install
	$(BIN)/skipjack bench --suite sample --methods plain,pld,ngram --max-new-tokens 256 --out bench-out/outputs

# fp32 and bf16 in one run: our methods on the model in fp32 (the reference) and in bf16 (lossy against fp32:
# see bench-quality), full suite (~40 min).
bench-bf16: install
	$(BIN)/skipjack bench --suite full --methods plain,pld,ngram,plain@bf16,pld@bf16,ngram@bf16 \
		--max-new-tokens 64 --out bench-out/bf16

# What bf16 costs in quality: perplexity, next-token agreement and KL against fp32, teacher-forced on the full
# suite's texts (~3 min).
bench-quality: install
	$(BIN)/python -m skipjack.bench.analysis.quality --dtype bf16 --out bench-out/quality

# Draft sizing on the quick suite: the cost model against every fixed draft size (~10 min).
bench-sizing: install
	$(BIN)/skipjack bench --suite quick --methods plain,pld,pld:k=2,pld:k=4,pld:k=8,pld:k=16 \
		--max-new-tokens 64 --out bench-out/sizing

# BENCHMARKS.md from the full run, plus the sizing run and the llama.cpp prompt-lookup run when they exist.
EXTRA_RUNS = $(if $(wildcard bench-out/full-amd/results.json),--extra "Earlier full run on another CPU (before the plain-layout kernel; full suite, separate run)=bench-out/full-amd") \
	$(if $(wildcard bench-out/llamacpp/results.json),--extra "llama.cpp peers (full suite, separate run)=bench-out/llamacpp") \
	$(if $(wildcard bench-out/sizing/results.json),--extra "Draft sizing (quick suite, separate run)=bench-out/sizing") \
	$(if $(wildcard bench-out/outputs/results.json),--extra "Longer outputs: 256 new tokens (18-prompt sample, separate run)=bench-out/outputs") \
	$(if $(wildcard bench-out/bf16/results.json),--extra "fp32 and bf16 in one run (full suite, separate run)=bench-out/bf16")
benchmarks-md: install
	$(BIN)/python -m skipjack.bench.benchmarks_md bench-out/full --benchmarks-md BENCHMARKS.md $(EXTRA_RUNS) \
		$(if $(wildcard bench-out/quality/quality.json),--quality bench-out/quality) --notes docs/bench/NOTES.md

clean:
	rm -rf $(VENV) bench-out
