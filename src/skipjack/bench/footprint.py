"""Peak resident memory of one engine alone, each measured in its own child process (load, prefill a prompt,
decode 32 tokens), so engines that share the benchmark's process do not add up. `skipjack(spec, dtype)` and
`llamacpp(gguf)` return the child's peak RSS in MB (`VmHWM`: unlike `ru_maxrss`, it does not carry the
parent's peak across exec), or None when it could not run."""

from __future__ import annotations

import json
import subprocess
import sys

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

_OURS = """
import json, sys
_hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
from skipjack.engine import Engine, Request
from skipjack.decoding.sampling import SamplingParams
e = Engine.load(sys.argv[1] or None, sys.argv[2], tune=False)
e.complete(Request(e.tokenizer.prompt_ids(sys.argv[3]), SamplingParams(max_new_tokens=32)))
print(json.dumps(_hwm()))
"""

_LLAMA = """
import json, sys
_hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)
llm(sys.argv[3], max_tokens=32, temperature=0.0)
print(json.dumps(_hwm()))
"""


def _child(code: str, *args: str) -> float | None:
    try:
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    try:
        return round(float(json.loads(r.stdout.strip().splitlines()[-1])), 1)
    except (ValueError, IndexError):
        return None


def skipjack(spec: str | None, dtype: str) -> float | None:
    return _child(_OURS, spec or "", dtype, PROMPT)


def llamacpp(gguf: str) -> float | None:
    return _child(_LLAMA, gguf, "", PROMPT)


def measure(spec: str | None, dtypes: list[str], gguf: str | None) -> dict[str, float | None]:
    """{"skipjack <dtype>": MB for each dtype, "llamacpp": MB where a GGUF is given}."""
    out = {f"skipjack {d}": skipjack(spec, d) for d in dict.fromkeys(dtypes)}
    if gguf:
        out["llamacpp"] = llamacpp(gguf)
    return out
