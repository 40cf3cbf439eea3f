"""The layering of docs/ARCHITECTURE.md, checked on the code: no upward import, no import cycle (in the sources,
and when each module is the first one imported), small files, and one place for each thing several layers need
(the CPU's facts, atomic writes)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "skipjack"

LAYERS = {  # module (or package) -> layer; the longest matching prefix decides (docs/ARCHITECTURE.md)
    "skipjack": 0,
    "skipjack.errors": 0,
    "skipjack.schemas": 0,
    "skipjack.texts": 0,
    "skipjack.prompts": 0,
    "skipjack.limits": 0,
    "skipjack.store": 0,
    "skipjack.validate": 0,
    "skipjack.integrity": 0,
    "skipjack.machine": 0,
    "skipjack.sandbox": 0,
    "skipjack.cache": 1,
    "skipjack.kvpolicies": 1,
    "skipjack.weights": 1,
    "skipjack.models": 2,
    "skipjack.loading": 3,
    "skipjack.decoding": 4,
    "skipjack.decoding.sampling": 4,
    "skipjack.decoding.constraint": 4,
    "skipjack.drafters": 4,
    "skipjack.strategies": 4,
    "skipjack.decoding.session": 5,
    "skipjack.decoding.sequence": 5,
    "skipjack.decoding.batch": 5,
    "skipjack.decoding.plan": 5,
    "skipjack.decoding.prefix": 5,
    "skipjack.decoding.superposed": 5,
    "skipjack.methods": 5,
    "skipjack.text": 6,
    "skipjack.engine": 6,
    "skipjack.request": 6,
    "skipjack.batching": 6,
    "skipjack.prompt_file": 6,
    "skipjack.vocab": 6,
    "skipjack.corpus": 6,
    "skipjack.tools": 6,
    "skipjack.evaluation": 7,
    "skipjack.cli": 7,
    "skipjack.cli_args": 7,
    "skipjack.demo": 7,
    "skipjack.bench": 7,
    "skipjack.server": 7,
    "skipjack.deploy": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def layer(mod: str) -> int:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The skipjack modules a file imports, anywhere in it (`from pkg import sub` counts sub when it is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("skipjack")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skipjack"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            out |= subs or {node.module}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t in imports(p, known) if t != m} for m, p in known.items()}


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in modules())


def test_no_upward_imports():
    upward = [(m, t) for m, ts in graph().items() for t in ts if layer(t) > layer(m)]
    assert not upward, "upward imports (module -> import): " + ", ".join(f"{m} -> {t}" for m, t in upward)


def test_no_import_cycles():
    g, state, cycle = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(g.get(m, ())):
            if state.get(t) == "open":
                cycle.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycle, "import cycles: " + "; ".join(" -> ".join(c) for c in cycle)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check itself: a layer-1 module importing the engine would be reported."""
    bad = tmp_path / "cache.py"
    bad.write_text("def f():\n    from skipjack.engine import Engine\n")
    found = imports(bad, modules())
    assert found == {"skipjack.engine"} and layer("skipjack.engine") > layer("skipjack.cache")


def test_files_and_functions_stay_small():
    """No source file over 400 lines; no function over 60 lines unless its docstring says why ("Long: ...")."""
    big = [p.name for p in SRC.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    long = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                if "Long:" not in (ast.get_docstring(node) or ""):
                    long.append(f"{p.name}:{node.name}")
    assert not big, f"files over 400 lines: {big}"
    assert not long, f"functions over 60 lines without a reason: {long}"


# Each module imported first, in an interpreter that has imported no skipjack module: a cycle through a
# package's `__init__` (a module importing its package, whose `__init__` imports the module back) fails only
# when one of its modules is the first imported, which the source graph above cannot tell. The third-party
# packages the sources import are imported once, then every module is imported in a forked child of that
# interpreter (a fresh interpreter as far as skipjack is concerned, at a fraction of a new one's start).
IMPORT_EACH = textwrap.dedent("""
    import ast, importlib, os, sys
    from pathlib import Path

    root, package = Path(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, str(root.parent))
    mods, third = [], set()
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.Import):
                third |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                third.add(node.module.split(".")[0])
    for name in sorted(third - {package, "__future__"}):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not [m for m in sys.modules if m.split(".")[0] == package], "imported before the check"
    for m in mods:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(m)
            except BaseException as e:
                print(f"{m}: {type(e).__name__}: {' '.join(str(e).split())}", flush=True)
                os._exit(1)
            os._exit(0)
        os.waitpid(pid, 0)
""")


def import_each(root: Path) -> list[str]:
    """The modules of the package at `root` that fail to import when imported first, each with its error."""
    r = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, str(root), root.name], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()


def test_every_module_imports_first_in_a_fresh_interpreter():
    failed = import_each(SRC)
    assert not failed, "modules that fail when imported first (an import cycle?): " + "; ".join(failed)


def test_the_fresh_import_sees_a_cycle_through_a_package_init(tmp_path):
    """The check itself: `sizing` imports the package `drafters`, whose `__init__` imports `sizing` back."""
    pkg = tmp_path / "cyc"
    (pkg / "drafters").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sizing.py").write_text("from cyc.drafters import X\nS = 1\n")
    (pkg / "drafters" / "__init__.py").write_text("from cyc.sizing import S\nX = 2\n")
    (pkg / "free.py").write_text("import json\n")
    failed = import_each(pkg)
    assert {f.split(":")[0] for f in failed} == {"cyc.sizing", "cyc.drafters"}, failed


def _sources_matching(pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if rx.search(p.read_text())}


def test_the_cpu_is_read_in_one_place():
    """/proc/cpuinfo is read by `skipjack.machine` alone (its flags, its name, what the kernels are keyed by)."""
    assert _sources_matching(r"cpuinfo") <= {"machine.py"}


# Hand-written atomic writes (a temporary file or folder renamed into place) left outside `store`, for the
# lead to route through `store.atomic_file` / `store.atomic_folder` (#35); the list may only shrink.
ATOMIC_ELSEWHERE = {"drafters/kangaroo.py", "evaluation/harness.py", "tools/distil.py", "tools/lwq.py"}


def test_atomic_writes_go_through_store():
    found = _sources_matching(r"os\.replace\(|os\.rename\(|\.rename\(|mkstemp\(|mkdtemp\(|NamedTemporaryFile")
    found -= {"store.py", "sandbox.py"}  # sandbox: scratch folders of a sandboxed run, never renamed into place
    assert found <= ATOMIC_ELSEWHERE, f"atomic writes outside skipjack.store: {sorted(found - ATOMIC_ELSEWHERE)}"
