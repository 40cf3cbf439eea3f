"""The markdown files on disk: a run's REPORT.md, and BENCHMARKS.md from several runs
(`python -m skipjack.bench.benchmarks_md DIR --benchmarks-md F`).

BENCHMARKS.md is the main run's report, then each `--extra` run as a section, then the quality comparison
(`skipjack.bench.analysis.quality`), then the hand-written notes verbatim. Notes must not type figures:
every number in BENCHMARKS.md comes from a results.json, headroom.json or quality.json, copied beside it
under docs/bench/ so the raw data is under version control.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from skipjack.bench import agreement, render
from skipjack.bench.analysis.loops import loop_split
from skipjack.bench.render import PLOTS
from skipjack.bench.schema import Results, read_results


def read_headroom(results: Results, results_dir: Path) -> dict | None:
    """results_dir/headroom.json (`skipjack.bench.analysis.headroom`) if it was computed from this very run."""
    try:
        h = json.loads((Path(results_dir) / "headroom.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if h.get("run_date") != results["machine"]["date"]:
        print(f"skipjack: ignoring {Path(results_dir) / 'headroom.json'}: computed from another run", file=sys.stderr)
        return None
    return h


def write_report(results: Results, out: Path) -> None:
    """REPORT.md and the PNG plots into `out`."""
    from skipjack.bench.plots import write_plots

    write_plots(results, Path(out))
    md = render.render_markdown(results, headroom=read_headroom(results, Path(out)), split=loop_split(results))
    (Path(out) / "REPORT.md").write_text(md + "\n")


def render_extra(results: Results, heading: str) -> str:
    """A second run (e.g. the draft-sizing sweep) as one more section: its command, targets and tables."""
    summary = results["summary"]
    parts = [f"## {heading}", "", *render.partial(results)]
    m = results["machine"]
    parts += [f"Separate run, {m['date']}, on {m['cpu']} ({m['cores']} cores): `{results['command']}`", ""]
    checks = render.targets(summary, (results.get("model") or {}).get("name"))
    bound = render.prefill_bound(results) if checks else ""
    parts += [checks, ""] if checks else []
    parts += [bound, ""] if bound else []
    in_dtype = render.in_dtype(summary)
    parts += [render.overall(summary, render.ran_peers(summary)), ""] + ([in_dtype, ""] if in_dtype else [])
    parts += [render.COLD_WARM, ""] if render.cold(summary) else []
    parts += [render.by_category(summary, "speedup_vs_plain", "{:.2f}×"), ""]
    if any(s.get("draft_share") for s in summary.values()):
        parts += [render.acceptance(summary), ""]
    chose = render.drafters_line(results)
    parts += ["What the warm drafters chose by the end of the run:", "", *chose, ""] if chose else []
    split = loop_split(results)
    parts += [render.table(*split[:2]), ""] if split else []  # the split is defined in the main run's section
    return "\n".join(parts)


def _read_text(path: Path, what: str) -> str:
    from skipjack.errors import SkipjackError

    try:
        return Path(path).read_text()
    except OSError as e:
        raise SkipjackError(f"cannot read {what}{path}: {e}") from None


def _copy_plots(results: Results, results_dir: Path, docs: Path) -> None:
    """The run's plots into docs/, drawn first if the run folder lacks any."""
    if not all((Path(results_dir) / png).exists() for png in PLOTS):
        from skipjack.bench.plots import write_plots

        write_plots(results, Path(results_dir))
    for png in PLOTS:
        shutil.copyfile(Path(results_dir) / png, docs / png)


def write_benchmarks_md(
    results_dir: Path,
    target: Path,
    extra: list[tuple[str, Path]] = (),
    notes: Path | None = None,
    quality: Path | None = None,
    layers: Path | None = None,
    serve: Path | None = None,
    evals: Path | None = None,
    longctx: Path | None = None,
    stepcost: Path | None = None,
    loadgen: Path | None = None,
    structured: Path | None = None,
    benches: list[tuple[str, Path]] = (),
) -> Path:
    """BENCHMARKS.md at `target` from results_dir/results.json; plots and raw data are copied to docs/bench/
    beside it. `extra` runs (heading, dir) are appended as sections, then the `quality` folder's quality.json,
    then the hand-written `notes` file verbatim."""
    from skipjack.errors import SkipjackError

    results = read_results(results_dir)
    extras = [(h, read_results(d)) for h, d in extra]
    try:
        q = json.loads(_read_text(Path(quality) / "quality.json", "")) if quality else None
    except json.JSONDecodeError as e:
        raise SkipjackError(f"cannot read {Path(quality) / 'quality.json'}: {e}") from None
    note_text = _read_text(notes, "notes ") if notes else ""
    docs = target.parent / "docs" / "bench"
    docs.mkdir(parents=True, exist_ok=True)
    _copy_plots(results, results_dir, docs)
    shutil.copyfile(Path(results_dir) / "results.json", docs / "results.json")  # the raw data, under version control
    headroom = read_headroom(results, Path(results_dir))
    if headroom:
        shutil.copyfile(Path(results_dir) / "headroom.json", docs / "headroom.json")
    md = render.render_markdown(results, "docs/bench", "Benchmarks", headroom, loop_split(results))
    md += "\nRaw data: `docs/bench/results.json`.\n"
    agree = agreement.section(results)
    md += "\n" + agree if agree else ""
    for (heading, d), (_, res) in zip(extra, extras):
        raw = docs / f"results-{Path(d).resolve().name}.json"
        shutil.copyfile(Path(d) / "results.json", raw)
        md += "\n" + render_extra(res, heading) + f"\nRaw data: `docs/bench/{raw.name}`.\n"
    if q:
        shutil.copyfile(Path(quality) / "quality.json", docs / "quality.json")
        md += f"\n## Quality: {q['dtype']} against fp32 (separate run)\n\n" + render.render_quality(q)
        md += "\n\nRaw data: `docs/bench/quality.json`.\n"
    if layers:
        md += "\n" + layer_probe_section(Path(layers), docs, [results, *(r for _, r in extras)])
    sections = [(stepcost, stepcost_section), (loadgen, loadgen_section), (serve, serve_section)]
    sections += [(structured, structured_section), (evals, eval_section), (longctx, longctx_section)]
    for folder, section in sections:
        if folder:
            md += "\n" + section(Path(folder), docs)
    for name, folder in benches:
        md += "\n" + bench_section(name, Path(folder), docs)
    if note_text:
        md += "\n" + note_text.rstrip()
    target.write_text(md + "\n")
    return target


def layer_probe_section(folder: Path, docs: Path, runs: list[Results] = ()) -> str:
    """The layer probe's table and plots (`python -m skipjack.bench.layers` results under `folder`), and what
    the bench `runs` measured on the probed models beside what the probe expected."""
    from skipjack.bench.layers import table, versus

    plots = sorted(folder.glob("*.png"))
    for p in plots:
        shutil.copyfile(p, docs / f"layers-{p.name}")
    for f in sorted(folder.glob("*.json")):
        shutil.copyfile(f, docs / f"layers-{f.name}")
    md = "## Layer probe: what the models' own layers could draft (separate runs)\n\n"
    md += "`python -m skipjack.bench.layers --model M`: teacher-forced on local text (HumanEval prompts, pydoc "
    md += "topics). Value = expected tokens per plain step's time at the best draft length (> 1 pays).\n\n"
    md += table(folder) + "\n\n"
    side = versus(folder, list(runs))
    if side:
        md += "What the probe expected and what the bench measured, on the same models:\n\n" + side + "\n\n"
    md += "".join(f"![{p.stem}](docs/bench/layers-{p.name})\n" for p in plots)
    return md


def stepcost_section(folder: Path, docs: Path) -> str:
    """What a pass costs (`python -m skipjack.bench.stepcost --out folder/<model>`): per model, the step's
    breakdown on both paths and the verify-cost curves beside llama.cpp's."""
    from skipjack.bench.stepcost import markdown

    runs = []
    for f in sorted(Path(folder).glob("*/stepcost.json")):
        try:
            runs.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            from skipjack.errors import SkipjackError

            raise SkipjackError(f"cannot read {f}: {e}") from None
    (docs / "stepcost.json").write_text(json.dumps(runs, indent=1) + "\n")
    md = "## What a pass costs: the native step, and passes over k tokens beside llama.cpp (separate runs)\n\n"
    md += "\n".join(markdown(r) for r in runs)
    return md + "\nRaw data: `docs/bench/stepcost.json`.\n"


def _raw(folder: Path, name: str, what: str, docs: Path) -> dict:
    """A separate run's JSON results `folder/name`, read, and copied to docs/bench/ beside BENCHMARKS.md."""
    res = json.loads(_read_text(folder / name, what))
    shutil.copyfile(folder / name, docs / name)
    return res


def bench_section(name: str, folder: Path, docs: Path) -> str:
    """A separate run of `python -m skipjack.bench.NAME --out folder`: the module's `section(results)` from its
    NAME.json, copied to docs/bench/bench-NAME--FOLDER.json (`tools/restore-runs.sh` puts it back)."""
    import importlib

    from skipjack.errors import SkipjackError

    try:
        module = importlib.import_module(f"skipjack.bench.{name}")
    except ImportError:
        raise SkipjackError(f"--bench: no benchmark module skipjack.bench.{name}") from None
    if not hasattr(module, "section"):
        raise SkipjackError(f"--bench: skipjack.bench.{name} has no section()")
    res = json.loads(_read_text(folder / f"{name}.json", f"{name} results "))
    raw = f"bench-{name}--{folder.resolve().name}.json"
    shutil.copyfile(folder / f"{name}.json", docs / raw)
    return module.section(res) + f"\nRaw data: `docs/bench/{raw}`.\n"


def serve_section(folder: Path, docs: Path) -> str:
    """The server under load (`python -m skipjack.bench.serve --out folder`): its table and plot."""
    from skipjack.bench.serve import agreement_table, table

    res = _raw(folder, "serve.json", "serve results ", docs)
    shutil.copyfile(folder / "serve.png", docs / "serve.png")
    m = res["machine"]
    md = "## The server under load (separate run)\n\n"
    md += (
        f"`python -m skipjack.bench.serve --model {res['model']} --out DIR`: {res['suite']} suite's prompts, "
        f"{res['tokens']} new tokens each, greedy, streamed; {m.get('cpu', '?')}, {m.get('cores', '?')} cores. "
        "× alone: aggregate throughput over the same server and method with one client. llama-server: "
        f"{res.get('llama_server') or res.get('peer', 'llama_cpp.server')} on the same GGUF (llama-server: llama.cpp's "
        "own, one slot per client; the skipjack server runs plain by default with its prefix cache off).\n\n"
    )
    md += table(res) + "\n![serve](docs/bench/serve.png)\n"
    if res.get("agreement"):
        md += (
            "\n### Batched against alone (greedy, plain decoding, in process)\n\n"
            "Every prompt alone, then all of them in one continuous batch. q4 and q8 run a batch-invariant "
            "forward, so they must be identical (a test checks it on tiny models); fp32 and bf16 use dense GEMMs "
            "whose rounding depends on the batch's shape, so a near-tie can go the other way.\n\n"
        )
        md += agreement_table(res["agreement"])
    return md + "\nRaw data: `docs/bench/serve.json`.\n"


def loadgen_section(folder: Path, docs: Path) -> str:
    """The server under load measured by aiperf (`python -m skipjack.bench.loadgen --out folder`)."""
    from skipjack.bench.loadgen import table

    res = _raw(folder, "loadgen.json", "load generator results ", docs)
    m = res["machine"]
    md = "## The server under load, measured by aiperf (separate run)\n\n"
    md += (
        f"`make bench-serve` (`python -m skipjack.bench.loadgen --model {res['model']}`): {res['loadgen']}, "
        f"synthetic prompts of {res['isl']} tokens, {res['osl']} generated tokens each (`ignore_eos`), greedy, "
        f"streamed; each server a fresh process (no shared cache or drafter); aiperf niced, one worker. "
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, ISA {m.get('isa', '?')}. Two chat turns: a context of "
        f"{res['context']} tokens of each conversation's own, then a question; turn 2 sends the history and a new "
        f"question. Peer: {res.get('peer') or res.get('llama_server', '?')} (llama-server: llama.cpp's own, built by "
        "`make bench-peers` from the llama.cpp llama-cpp-python vendors, one slot per stream).\n\n"
    )
    return md + table(res) + "\nRaw data: `docs/bench/loadgen.json`.\n"


def structured_section(folder: Path, docs: Path) -> str:
    """Constrained decoding's speed (`python -m skipjack.bench.structured --out folder`)."""
    from skipjack.bench.structured import table

    res = _raw(folder, "structured.json", "structured output results ", docs)
    m = res["machine"]
    md = "## Structured output: JSON schemas, jump-forward and speculation (separate run)\n\n"
    md += (
        f"`python -m skipjack.bench.structured --model {res['model']}`: greedy, at most {res['tokens']} tokens, "
        'one JSON schema per prompt; cold (each method\'s drafter fresh for every prompt), and "NAME, warm": one '
        "drafter carried from prompt to prompt (learned from earlier, different prompts). free:plain is "
        f"unconstrained. {m.get('cpu', '?')}, {m.get('cores', '?')} cores.\n\n"
    )
    md += table(res)
    return md + "\nRaw data: `docs/bench/structured.json`.\n"


def eval_section(folder: Path, docs: Path) -> str:
    """The lossy methods' quality (`skipjack eval` rows under `folder`): the table and the frontier plot."""
    from skipjack.bench import eval_report
    from skipjack.errors import SkipjackError

    rs = eval_report.rows(folder)
    if not rs:
        raise SkipjackError(f"no `skipjack eval` rows under {folder}")
    eval_report.frontier(rs, docs / "frontier.png")
    (docs / "eval.json").write_text(json.dumps(rs, indent=1))
    modes = sorted({"quick" if r["quick"] else "full" for r in rs})
    md = "## Lossy methods: speed against quality (separate runs)\n\n"
    md += (
        f"`skipjack eval --model M --method SPEC --dtype q4 --out DIR` ({' and '.join(modes)} mode), one row per "
        "method and setting, each against plain decoding of the same model at the same dtype: perplexity of "
        "local text (pydoc topics and stdlib sources the prompts do not use) teacher-forced over a continuation "
        "the method runs as it decodes, top-1 agreement and KL against plain, the share of greedy outputs "
        "identical to plain's on the benchmark prompts, speed over plain on those prompts (end to end, and the "
        "decoding phase), and a task score (HumanEval pass@1 for the code models; the self-check task for "
        "SmolLM2, whose pass@1 is near zero: `skipjack.evaluation.selfcheck`).\n\n"
    )
    return md + eval_report.table(rs) + "\n![frontier](docs/bench/frontier.png)\n\nRaw data: `docs/bench/eval.json`.\n"


def longctx_section(folder: Path, docs: Path) -> str:
    """The KV cache policies at long contexts: every `python -m skipjack.bench.longctx --out` run under `folder`
    (longctx.json files), merged per model: the targets, the tables, and the plots."""
    from skipjack.bench import longctx_report as longctx
    from skipjack.errors import SkipjackError

    runs = [json.loads(p.read_text()) for p in sorted(folder.rglob("longctx.json"))]
    if not runs:
        raise SkipjackError(f"no longctx.json under {folder}")
    models = list(dict.fromkeys(r["model"] for r in runs))
    merged = {m: longctx.merge([r for r in runs if r["model"] == m]) for m in models}
    (docs / "longctx.json").write_text(json.dumps(list(merged.values()), indent=1))
    m = runs[0]["machine"]
    md = "## KV cache policies at long contexts (`--kv`, separate runs)\n\n"
    md += (
        f"`python -m skipjack.bench.longctx` ({m.get('cpu', '?')}, {m.get('cores', '?')} cores). Accuracy: the "
        "RULER-style tasks (`skipjack.evaluation.longctx`), relative to the full cache on the same tasks. Speed: "
        "decoding tokens/s after the first token, × the full cache at the same context in the same run (the mean "
        "of its two runs, first and last). KV MB: what the cache holds at the end. Peak RSS: a fresh process that "
        "loads the model and runs one request at that context (VmHWM: weights, the prompt's pass and the cache). "
        "The budget is the kept fraction of the context; triforce is lossless (the full cache verifies).\n\n"
    )
    for name, res in merged.items():
        slug = name.replace("/", "_")
        longctx.plots(res, docs, f"longctx-{slug}-")
        md += f"### {name} ({res['dtype']})\n\nCommands: " + "; ".join(f"`{c}`" for c in res["commands"]) + ".\n\n"
        md += longctx.targets(res) + "\n" + longctx.markdown(res)
        md += f"\n![accuracy vs budget](docs/bench/longctx-{slug}-accuracy_vs_budget.png)\n"
        if res.get("speed"):
            md += f"![latency vs context](docs/bench/longctx-{slug}-latency_vs_context.png)\n"
        md += "\n"
    return md + "Raw data: `docs/bench/longctx.json`.\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.benchmarks_md", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a `skipjack bench --out` folder holding results.json")
    ap.add_argument(
        "--benchmarks-md", default=None, help="write this BENCHMARKS.md (plots go to docs/bench/ beside it)"
    )
    ap.add_argument(
        "--extra", action="append", default=[], metavar="HEADING=DIR", help="append another run as a section"
    )
    ap.add_argument("--notes", default=None, help="append this hand-written markdown file (no typed figures)")
    ap.add_argument("--quality", default=None, help="append a `skipjack.bench.analysis.quality --out` folder's results")
    ap.add_argument("--layers", default=None, help="append the layer probe's results (`skipjack.bench.layers --out`)")
    ap.add_argument("--serve", default=None, help="append the server benchmark (`skipjack.bench.serve --out`)")
    ap.add_argument("--loadgen", default=None, help="append the aiperf server benchmark (`bench.loadgen --out`)")
    ap.add_argument("--structured", default=None, help="append the structured-output run (`bench.structured --out`)")
    ap.add_argument("--eval", default=None, help="append the `skipjack eval` rows under this folder")
    ap.add_argument("--longctx", default=None, help="append the long-context runs (longctx.json) under this folder")
    ap.add_argument("--stepcost", default=None, help="append the pass-cost runs (*/stepcost.json) under this folder")
    ap.add_argument(
        "--bench", action="append", default=[], metavar="NAME=DIR", help="append `bench.NAME --out DIR`'s section"
    )
    return ap


def _pair(item: str, flag: str) -> tuple[str, Path]:
    from skipjack.errors import SkipjackError

    key, eq, d = item.partition("=")
    if not eq or not key or not d:
        raise SkipjackError(f"{flag} wants {'HEADING' if flag == '--extra' else 'NAME'}=DIR (got {item!r})")
    return key, Path(d)


def main(argv: list[str] | None = None) -> int:
    """BENCHMARKS.md with --benchmarks-md; otherwise DIR's REPORT.md and plots, redrawn from its results.json."""
    from skipjack.errors import run_command

    a = _parser().parse_args(argv)

    def body() -> None:
        extra = [_pair(item, "--extra") for item in a.extra]
        if a.benchmarks_md:
            opt = lambda v: Path(v) if v else None  # noqa: E731
            folders = [a.notes, a.quality, a.layers, a.serve, a.eval, a.longctx, a.stepcost, a.loadgen, a.structured]
            benches = [_pair(b, "--bench") for b in a.bench]
            md = write_benchmarks_md(Path(a.dir), Path(a.benchmarks_md), extra, *map(opt, folders), benches)
            print(f"wrote {md}")
        else:
            write_report(read_results(Path(a.dir)), Path(a.dir))
            print(f"wrote {Path(a.dir) / 'REPORT.md'}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
