#!/usr/bin/env bash
# Put back under bench-out/ the runs whose raw data BENCHMARKS.md was built from (docs/bench/), for each run
# this checkout has not measured itself, so `make benchmarks-md` can rebuild the file on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
put() {  # put SOURCE DIR: SOURCE as DIR/results.json unless DIR already holds a run
  if [ -f "$1" ] && [ ! -f "$2/results.json" ]; then mkdir -p "$2" && cp "$1" "$2/results.json"; fi
}
put docs/bench/results.json bench-out/q4-quick
for f in docs/bench/results-*.json; do
  name=$(basename "$f" .json); put "$f" "bench-out/${name#results-}"
done
if [ -f docs/bench/quality.json ] && [ ! -f bench-out/quality/quality.json ]; then
  mkdir -p bench-out/quality && cp docs/bench/quality.json bench-out/quality/
fi
if ! ls bench-out/layers/*.json >/dev/null 2>&1 && ls docs/bench/layers-*.json >/dev/null 2>&1; then
  mkdir -p bench-out/layers
  for f in docs/bench/layers-*; do cp "$f" "bench-out/layers/$(basename "$f" | sed 's/^layers-//')"; done
fi
if [ -f docs/bench/serve.json ] && [ ! -f bench-out/serve/serve.json ]; then
  mkdir -p bench-out/serve && cp docs/bench/serve.json bench-out/serve/ && cp docs/bench/serve.png bench-out/serve/
fi
if [ -f docs/bench/eval.json ] && ! ls bench-out/eval/*__*.json >/dev/null 2>&1; then  # one file per eval row
  mkdir -p bench-out/eval
  "${BIN:-.venv/bin}/python" -c "
import json, sys
from skipjack.evaluation.harness import slug
for r in json.load(open('docs/bench/eval.json')):
    open(f\"bench-out/eval/{slug(r['model'])}__{slug(r['method'])}__{r['dtype']}.json\", 'w').write(json.dumps(r, indent=1))
"
fi
if [ -f docs/bench/longctx.json ] && ! ls bench-out/longctx/*/longctx.json >/dev/null 2>&1; then  # per model
  "${BIN:-.venv/bin}/python" -c "
import json, pathlib
for i, r in enumerate(json.load(open('docs/bench/longctx.json'))):
    d = pathlib.Path(f'bench-out/longctx/restored-{i}'); d.mkdir(parents=True, exist_ok=True)
    (d / 'longctx.json').write_text(json.dumps(r, indent=1))
"
fi
if [ -f docs/bench/stepcost.json ] && ! ls bench-out/stepcost/*/stepcost.json >/dev/null 2>&1; then  # per model
  "${BIN:-.venv/bin}/python" -c "
import json, pathlib
for r in json.load(open('docs/bench/stepcost.json')):
    d = pathlib.Path('bench-out/stepcost') / r['model']; d.mkdir(parents=True, exist_ok=True)
    (d / 'stepcost.json').write_text(json.dumps(r, indent=1))
"
fi
if [ -f docs/bench/loadgen.json ] && [ ! -f bench-out/serve-aiperf/loadgen.json ]; then
  mkdir -p bench-out/serve-aiperf && cp docs/bench/loadgen.json bench-out/serve-aiperf/
fi
if [ -f docs/bench/structured.json ] && [ ! -f bench-out/structured/structured.json ]; then
  mkdir -p bench-out/structured && cp docs/bench/structured.json bench-out/structured/
fi
for f in docs/bench/bench-*--*.json; do  # `--bench NAME=DIR` runs: docs/bench/bench-NAME--DIR.json
  [ -f "$f" ] || continue
  base=$(basename "$f" .json); name=${base#bench-}; name=${name%%--*}; dir=${base#*--}
  if [ ! -f "bench-out/$dir/$name.json" ]; then mkdir -p "bench-out/$dir" && cp "$f" "bench-out/$dir/$name.json"; fi
done
