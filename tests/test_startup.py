"""Start-up: `skipjack generate` imports only what generating needs (no transformers, no web stack, no plots).

Each check runs in a fresh interpreter and reads its `sys.modules` afterwards, so a module-level import added
anywhere on the path (the CLI, loading, the tokenizer, the engine, the decode loop) fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Heavy packages the generate path has no use for: transformers (its config registry and tokenizer classes alone
# take seconds to import), the server's web stack, plotting and scientific extras.
FORBIDDEN = ("transformers", "fastapi", "uvicorn", "starlette", "matplotlib", "scipy", "pandas", "sklearn")
# The modules on the generate path (and the q4 weights' modules), besides the CLI itself
GENERATE_PATH = (
    "skipjack.cli",
    "skipjack.engine",
    "skipjack.loading.load",
    "skipjack.loading.gguf_io",
    "skipjack.loading.named",
    "skipjack.models",
    "skipjack.loading.tokenizer",
    "skipjack.drafters",
    "skipjack.decoding.sequence",
    "skipjack.decoding.session",
    "skipjack.text",
    "skipjack.prompt_file",
    "skipjack.kvpolicies",
    "skipjack.weights.quant",
    "skipjack.weights.linear",
    "skipjack.weights.kernels",
    "skipjack.decoding.tuning",
)


def _imported_after(code: str, home=None) -> list[str]:
    """The forbidden packages in `sys.modules` after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if home is not None:
        env["SKIPJACK_HOME"] = str(home)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    return sorted(loaded & set(FORBIDDEN))


def test_generate_path_modules_import_nothing_heavy():
    imports = "\n".join(f"import {m}" for m in GENERATE_PATH)
    assert _imported_after(f"{imports}\nfrom skipjack.cli import build_parser\nbuild_parser(['generate', 'hi'])") == []


def _generate(model: str, *extra: str) -> str:
    argv = ["generate", "--model", model, "-n", "2", "--no-tune", "--json", *extra, "hello world"]
    return f"from skipjack.cli import main\nassert main({argv!r}) == 0"


def test_generate_from_an_hf_folder_imports_no_transformers(tiny_folder, tmp_path):
    """The whole command, tokenizer and chat template included."""
    assert _imported_after(_generate(str(tiny_folder)), tmp_path / "home") == []


def test_warm_gguf_generate_imports_no_transformers(tmp_path):
    """A GGUF converts once (that reads its metadata and tokenizer with transformers); from then on, loading it
    reads the conversion and imports no transformers."""
    from test_loading import _pick, write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, _pick)
    home = tmp_path / "home"
    assert "transformers" in _imported_after(_generate(str(path), "--dtype", "fp32"), home)  # cold: converts
    assert _imported_after(_generate(str(path), "--dtype", "fp32"), home) == []


def test_tools_load_only_when_named():
    """`skipjack --help` lists every subcommand and imports no tool's module; `skipjack serve --help` shows
    serve's own options."""
    tools = ["skipjack.server", "skipjack.bench.runner", "skipjack.evaluation.harness", "skipjack.tools.distil"]
    cases = ((["--help"], "train-adapter", []), (["serve", "--help"], "--port", ["skipjack.server"]))
    for argv, shown, loaded in cases:
        code = f"from skipjack.cli import main\nassert main({argv!r}) == 0\nimport sys\n"
        code += f"print([m for m in {tools!r} if m in sys.modules])"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and shown in r.stdout, r.stderr
        assert r.stdout.strip().splitlines()[-1] == repr(loaded)
