"""The layering of docs/ARCHITECTURE.md, checked on the code: no upward import, no import cycle, small files."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "skipjack"

LAYERS = {  # module (or package) -> layer; the longest matching prefix decides (docs/ARCHITECTURE.md)
    "skipjack": 0,
    "skipjack.errors": 0,
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
    "skipjack.drafters": 4,
    "skipjack.strategies": 4,
    "skipjack.decoding.session": 5,
    "skipjack.decoding.sequence": 5,
    "skipjack.decoding.batch": 5,
    "skipjack.methods": 5,
    "skipjack.text": 6,
    "skipjack.engine": 6,
    "skipjack.prompt_file": 6,
    "skipjack.vocab": 6,
    "skipjack.corpus": 6,
    "skipjack.tools": 6,
    "skipjack.evaluation": 7,
    "skipjack.cli": 7,
    "skipjack.demo": 7,
    "skipjack.bench": 7,
    "skipjack.server": 7,
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
