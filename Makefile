# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?=

.PHONY: demo test install lint bench bench-q4 bench-stepcost bench-quick bench-llamacpp bench-sizing bench-outputs bench-bf16 bench-quality benchmarks-md bench-peers bench-layers adapters bench-selfspec bench-serve bench-fleet bench-eval bench-longctx bench-superposed bench-lookahead clean

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
	$(BIN)/pip install --quiet 'llama-cpp-python[server]==0.3.36'  # llama_cpp.server (no rebuild)
	BIN=$(BIN) bash tools/build-llama-server.sh  # llama.cpp's own llama-server, for bench-serve

# Lossy methods' quality against speed (`skipjack eval`, quick mode): each setting on SmolLM2-135M and
# Qwen2.5-Coder-1.5B, and layer-wise quantization's order against random and reverse at equal bits (~1.5 h).
EVAL_SMOL = plain ffn-skip:threshold=0.995 ffn-skip:threshold=0.99 ffn-skip:threshold=0.98,max_share=0.1 \
	layer-skip:ratio=0.05 layer-skip:ratio=0.1 skipdecode:hi=0.1
EVAL_QWEN = plain ffn-skip:threshold=0.99 ffn-skip:threshold=0.98 layer-skip:ratio=0.1 skipdecode:hi=0.1
LWQ = importance random reverse
bench-eval: install
	for m in $(EVAL_SMOL); do $(BIN)/skipjack eval --quick --model smollm2-135m --method $$m --out bench-out/eval || exit 1; done
	for m in $(EVAL_QWEN); do $(BIN)/skipjack eval --quick --model qwen2.5-coder-1.5b --method $$m --out bench-out/eval || exit 1; done
	for o in $(LWQ); do \
		art=$$($(BIN)/skipjack quantize --model qwen2.5-coder-1.5b --bits 5 --order $$o | sed -n 's/^use it with: --model //p'); \
		$(BIN)/skipjack eval --quick --model "$$art" --reference qwen2.5-coder-1.5b --task none --out bench-out/eval || exit 1; \
	done

# KV cache policies at long contexts: SmolLM2-135M's speed and memory at 2k/4k/8k (~15 min), its task accuracy and
# long-document perplexity at 2k (budgets 5-25%), and Qwen2.5-Coder-0.5B's task accuracy at 2k and a 10% budget
# (SmolLM2 retrieves little even with the full cache) (~45 min). `make benchmarks-md` merges the runs.
# Superposed Decoding (#38): superposed:k=3 against 3 independent streams in one batch and plain greedy, on the
# quick suite (speed, each completion's perplexity under the plain model, distinct-1/2).
bench-superposed: install
	$(BIN)/python -m skipjack.bench.superposed --model smollm2-135m --k 3 --max-new-tokens 128 --out bench-out/superposed

bench-longctx: install
	$(BIN)/python -m skipjack.bench.longctx --model smollm2-135m --lengths 2048,4096,8192 \
		--policies streaming,h2o,snapkv,pyramidkv,cake,actqkv,tidal,snapkv:chunk=1024 --speed-budgets 0.1 \
		--speed-tokens 64 --methods triforce --skip accuracy,perplexity --out bench-out/longctx/speed
	$(BIN)/python -m skipjack.bench.longctx --model smollm2-135m --lengths 2048 --budgets 0.05,0.1,0.25 \
		--policies streaming,h2o,snapkv,pyramidkv,cake,actqkv,tidal --kinds niah_single,niah_multikey,vt --n 1 \
		--ppl-tokens 64 --skip speed,memory --out bench-out/longctx/quality-2k
	$(BIN)/python -m skipjack.bench.longctx --model qwen2.5-coder-0.5b --lengths 2048 --budgets 0.1 \
		--policies streaming,h2o,snapkv,pyramidkv,cake,actqkv,tidal --kinds niah_single,niah_multikey,vt --n 1 \
		--skip speed,memory,perplexity --out bench-out/longctx/quality-qwen

# The server under load, measured by aiperf (a maintained load generator, in .venv-aiperf: its pins clash with
# ours): throughput, TTFT and inter-token latency at 1-16 streams for `serve --method plain` and `--method auto`,
# and llama.cpp's llama-server on the same GGUF (`make bench-peers` builds it), each a fresh server; a second
# chat turn's TTFT with the prefix cache on and off (~25 min). Then our own light client, which also checks batched greedy
# agreement per dtype (~15 min).
AIPERF_VENV := .venv-aiperf
$(AIPERF_VENV)/bin/aiperf:
	$(PY) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install --quiet 'aiperf==0.13.0'
bench-serve: install $(AIPERF_VENV)/bin/aiperf
	$(BIN)/python -m skipjack.bench.loadgen --model smollm2-135m --aiperf $(AIPERF_VENV)/bin/aiperf --out bench-out/serve-aiperf
	$(BIN)/python -m skipjack.bench.serve --model smollm2-135m --methods plain,pld,auto --out bench-out/serve

# Replicas on Ray Serve (#39, skipjack.deploy): 1 server x 2 threads against 2 replicas x 1 thread at 1, 4 and 8
# streams (on one machine: the layer's overhead, not a scale-out gain), then the prefix cache's hit rate on a
# multi-turn chat workload routed by prefix and by Serve's default router (~15 min).
bench-fleet: install
	$(BIN)/python -m skipjack.bench.fleet --model smollm2-135m --out bench-out/fleet

# What a pass costs (#33): the plain step's breakdown on the native and the Python path, and passes over k = 1-16
# tokens at contexts 256 and 2048 beside llama.cpp's (needs `make bench-peers`; ~10 min).
bench-stepcost: install
	for m in smollm2-135m qwen2.5-coder-1.5b; do $(BIN)/python -m skipjack.bench.stepcost --model $$m --out bench-out/stepcost/$$m || exit 1; done

# The main run (BENCHMARKS.md's first section) and the 1.5B beside it (~15 + ~30 min).
bench-q4: install
	$(BIN)/skipjack bench --suite quick --methods plain,pld,ngram,auto,swift,del --peers llamacpp,llamacpp-pld,hf \
		--max-new-tokens 256 --out bench-out/q4-quick
	$(BIN)/skipjack bench --model qwen2.5-coder-1.5b --suite quick --max-new-tokens 256 --out bench-out/q4-quick-qwen \
		--methods plain,pld,del,draft:model=qwen2.5-coder-0.5b --peers llamacpp

# Lookahead decoding (Fu et al. 2024) beside plain, pld and ngram: sized by the cost model, as published (k=64:
# the whole window and every guess each step) and with the window's n-grams alone (prompt=0), on q4 and fp32.
bench-lookahead: install
	for d in q4 fp32; do $(BIN)/skipjack bench --suite quick --dtype $$d --max-new-tokens 256 \
		--methods plain,pld,ngram,lookahead,lookahead:k=64,lookahead:prompt=0,k=64 --out bench-out/lookahead-$$d || exit 1; done

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

# Self-speculation (#18). The layer probe on the three models (~25 min), then the drafting methods and their
# peers on SmolLM2-135M (code suite: quick + 9 HumanEval prompts, ~45 min) and on Qwen2.5-Coder-1.5B with its
# 0.5B sibling as the draft model (~40 min). kangaroo needs an adapter per model: `make adapters` (~25 min).
bench-layers: install
	for m in smollm2-135m gemma3-270m qwen2.5-coder-1.5b; do $(BIN)/python -m skipjack.bench.layers --model $$m --out bench-out/layers; done

adapters: install
	$(BIN)/skipjack train-adapter --model smollm2-135m
	$(BIN)/skipjack train-adapter --model qwen2.5-coder-1.5b --vocab 16384 --tokens 12288 --prompts 32 --steps 80

bench-selfspec: install
	$(BIN)/skipjack bench --suite code --max-new-tokens 128 --out bench-out/selfspec-smollm2 \
		--methods plain,pld,swift,del,kangaroo,kangaroo:vocab=8192,mix:of=pld+kangaroo \
		--peers hf,hf-early-exit,llamacpp,llamacpp-pld
	$(BIN)/skipjack bench --model qwen2.5-coder-1.5b --prompts src/skipjack/bench/prompts/selfspec.jsonl \
		--max-new-tokens 128 --out bench-out/selfspec-qwen \
		--methods plain,pld,swift,del,kangaroo,draft:model=qwen2.5-coder-0.5b,mix:of=pld+draft,model=qwen2.5-coder-0.5b,mix:of=pld+kangaroo \
		--peers hf,hf-assist,llamacpp,llamacpp-draft

# BENCHMARKS.md from the runs that exist: the q4 quick run with the llama.cpp peers as the main one, then the
# others as sections. `tools/restore-runs.sh` first puts back, from docs/bench/, any run this checkout has
# not measured itself, so the file can be rebuilt on any machine from the data under version control.
EXTRA = "Qwen2.5-Coder-1.5B, q4: the quick suite at 256 new tokens, cold (separate run)=bench-out/q4-quick-qwen" \
	"Lookahead decoding, q4: the quick suite (separate run; make bench-lookahead adds fp32 and the whole window)=bench-out/lookahead-q4" \
	"Self-speculation on SmolLM2-135M (code suite, separate run)=bench-out/selfspec-smollm2" \
	"Self-speculation and a draft model on Qwen2.5-Coder-1.5B (separate run)=bench-out/selfspec-qwen" \
	"Earlier full run, fp32 (Intel Xeon, full suite, 64 new tokens, separate run)=bench-out/full-xeon-fp32" \
	"Earlier full run on AMD EPYC, fp32 (separate run)=bench-out/full-amd" \
	"llama.cpp peers, fp32 (full suite, separate run)=bench-out/llamacpp" \
	"Longer outputs, fp32: 256 new tokens (18-prompt sample, separate run)=bench-out/outputs" \
	"fp32 and bf16 in one run (full suite, separate run)=bench-out/bf16"
# the separate runs whose module has a `section()`: `python -m skipjack.bench.X --out bench-out/D` writes D/X.json
SECTIONS := factual superposed fleet
benchmarks-md: install
	bash tools/restore-runs.sh
	set -- ; for e in $(EXTRA); do if [ -f "$${e##*=}/results.json" ]; then set -- "$$@" --extra "$$e"; fi; done; \
	if [ -f bench-out/quality/quality.json ]; then set -- "$$@" --quality bench-out/quality; fi; \
	if ls bench-out/layers/*.json >/dev/null 2>&1; then set -- "$$@" --layers bench-out/layers; fi; \
	if [ -f bench-out/serve/serve.json ]; then set -- "$$@" --serve bench-out/serve; fi; \
	if [ -f bench-out/serve-aiperf/loadgen.json ]; then set -- "$$@" --loadgen bench-out/serve-aiperf; fi; \
	if [ -f bench-out/structured/structured.json ]; then set -- "$$@" --structured bench-out/structured; fi; \
	if ls bench-out/eval/*__*.json >/dev/null 2>&1; then set -- "$$@" --eval bench-out/eval; fi; \
	if ls bench-out/longctx/*/longctx.json >/dev/null 2>&1; then set -- "$$@" --longctx bench-out/longctx; fi; \
	if ls bench-out/stepcost/*/stepcost.json >/dev/null 2>&1; then set -- "$$@" --stepcost bench-out/stepcost; fi; \
	for x in $(SECTIONS); do for f in bench-out/*/$$x.json; do \
		if [ -f "$$f" ]; then set -- "$$@" --bench "$$x=$$(dirname $$f)"; fi; done; done; \
	$(BIN)/python -m skipjack.bench.benchmarks_md bench-out/q4-quick --benchmarks-md BENCHMARKS.md "$$@" \
		--notes docs/bench/NOTES.md

clean:
	rm -rf $(VENV) bench-out
