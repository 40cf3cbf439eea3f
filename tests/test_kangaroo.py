"""`kangaroo` (shallow layers + a distilled adapter) and `skipjack train-adapter`: lossless (greedy identity,
the distribution under sampling, the cache after rollback, the adapter's own cache), verification resumed from
the shallow layers' hidden states where the forward is batch-invariant, training that learns and resumes to the
same weights, and one-line errors for missing, damaged and foreign adapters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import hf_model, ours_from_hf
from drafters_mock import chi2_pvalue, decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.cache import LayerKV
from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import DraftContext
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import Session
from skipjack.drafters.base import Resources
from skipjack.drafters.kangaroo import Adapter, Kangaroo, default_path, load, save
from skipjack.errors import SkipjackError
from skipjack.tools.distil import Settings, train


def deep(family: str, weights=None, dtype=torch.float32, seed=3, layers=5, vocab=48):
    kind = "gemma3_text" if family == "gemma" else "llama"
    hf = hf_model(kind, seed=seed, vocab=vocab, num_hidden_layers=layers)
    return ours_from_hf(hf, dtype if weights is None else torch.float32, weights)


def random_adapter(model, layers: int, path, seed=0):
    """An adapter with random (non-identity) weights, so the draft really runs through its attention."""
    torch.manual_seed(seed)
    a = Adapter.for_model(model, layers)
    with torch.no_grad():
        a.wo.weight.normal_(std=0.3)
    save(a, model, path, {"model_name": "tiny"})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """5-layer tiny models (fp64: exact by precision; q4: by the batch-invariant forward), each with an adapter."""
    out = {f: deep(f, dtype=torch.float64) for f in ("llama", "gemma")}
    out |= {f + "-q4": deep(f, weights="q4") for f in ("llama", "gemma")}
    d = tmp_path_factory.mktemp("adapters")
    out["adapters"] = {name: random_adapter(m, 2, d / f"{name}.safetensors") for name, m in list(out.items())}
    return out


def prepared(drafter, model):
    drafter.prepare(Resources(model=model))
    return drafter


def kangaroo(models, family, threshold=0.0, vocab=0):
    """A kangaroo drafter with the family's adapter, prepared for the family's model."""
    return prepared(Kangaroo(threshold=threshold, vocab=vocab, adapter=str(models["adapters"][family])), models[family])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(0, 47), min_size=1, max_size=20),
    max_new=st.integers(1, 30),
    family=st.sampled_from(["llama", "gemma", "llama-q4", "gemma-q4"]),
    threshold=st.sampled_from([0.0, 0.3]),
    vocab=st.sampled_from([0, 20]),
)
def test_greedy_identity_property(models, prompt, max_new, family, threshold, vocab):
    model = models[family]
    params = SamplingParams(max_new_tokens=max_new)
    plain, _ = decode(model, prompt, params)
    got, steps = decode(model, prompt, params, kangaroo(models, family, threshold, vocab), CostModel.flat())
    assert got == plain
    if threshold == 0.0 and max_new > 3:
        assert any(s.drafted for s in steps)


@pytest.mark.parametrize("family", ["llama-q4", "gemma-q4"])
def test_cache_after_drafting_equals_plain_decodings(models, family):
    """Every layer's keys after a request equal plain decoding's, bit for bit, though the shallow layers' keys
    of accepted drafts were written by the draft and kept (the verify pass resumed above them)."""
    model = models[family]
    prompt, params = [3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(max_new_tokens=24)
    ref, got = Session(), Session()
    decode(model, prompt, params, "plain", session=ref)
    _, steps = decode(model, prompt, params, kangaroo(models, family), CostModel.flat(), session=got)
    assert got.tokens == ref.tokens and sum(s.accepted for s in steps) > 0
    for a, b in zip(got.cache, ref.cache):
        n = b.offset
        assert a.offset == n
        assert torch.equal(a.k[:, :, :n], b.k[:, :, :n]) and torch.equal(a.v[:, :, :n], b.v[:, :, :n])


def _ctx(model, tokens, budget=6):
    cache = model.make_cache(64)
    model(torch.tensor([tokens[:-1]]), cache)
    return DraftContext(list(tokens), budget, model, cache)


def test_verify_resumes_from_the_shallow_layers_only_where_the_forward_is_invariant(models):
    q4, f64 = models["llama-q4"], models["llama"]
    ctx = _ctx(q4, [7, 3, 9, 1, 4, 4, 2], budget=4)
    start = ctx.cache.offset
    prop = kangaroo(models, "llama-q4").session().propose(ctx)
    E, hidden = prop.resume
    assert E == 1 and hidden.shape[1] == len(prop) + 1
    pos = torch.arange(start, start + len(prop) + 1)
    resumed = q4(None, ctx.cache, hidden=hidden, positions=pos, layers=range(E + 1, q4.num_layers)).logits
    ctx.cache.rewind(start)
    full = q4(torch.tensor([[ctx.tokens[-1]] + prop.tokens]), ctx.cache, positions=pos).logits
    assert torch.equal(resumed, full)
    assert kangaroo(models, "llama").session().propose(_ctx(f64, [7, 3, 9, 1, 4])).resume is None


def test_the_adapters_cache_is_rolled_back_with_the_target(models):
    """After decoding, and after a rollback, the adapter's keys equal a fresh adapter pass over the shallow
    layers' hidden states of the tokens it holds."""
    model = models["llama"]
    d = kangaroo(models, "llama")
    prompt = [5, 6, 7, 8, 5, 6, 7]
    toks, _ = decode(model, prompt, SamplingParams(max_new_tokens=20), d, CostModel.flat())
    ctx = prompt + toks
    s = d.session()
    s.begin(prompt)
    cache = model.make_cache(64)
    model(torch.tensor([ctx[:-1]]), cache)
    full = DraftContext(ctx, 4, model, cache)
    s.propose(full)  # syncs from nothing (the prompt path), then drafts
    s.sync(DraftContext(ctx[:9], 4, model, cache))  # a rollback: keeps the common prefix only
    own = s.held.cache  # the adapter's one-layer cache
    assert s.held.tokens == ctx[:8] and own.offset == 8
    h = model(torch.tensor([ctx[:8]]), None, layers=range(2), logits="none").last_hidden.float()
    kv = LayerKV(1, d.adapter.kv_heads, d.adapter.head_dim, 64, torch.float32)
    with torch.inference_mode():
        d.adapter(h, torch.arange(8), kv)  # the same adapter on a fresh cache
    assert torch.allclose(own.k[:, :, :8], kv.k[:, :, :8], atol=1e-6)
    assert torch.allclose(own.v[:, :, :8], kv.v[:, :, :8], atol=1e-6)


def test_sampling_distribution_is_preserved(tmp_path):
    """χ² on the law of the 2nd and 3rd generated tokens (drawn through verification steps)."""
    model = ours_from_hf(
        hf_model("llama", seed=21, vocab=12, hidden_size=32, intermediate_size=64, num_hidden_layers=3), torch.float64
    )
    path = random_adapter(model, 1, tmp_path / "a.safetensors")
    d = prepared(Kangaroo(threshold=0.0, adapter=str(path)), model)
    assert chi2_pvalue(model, [5, 0, 7, 2, 9, 4, 11, 1], d) > 1e-3


class CharTokenizer:
    """Local text as token ids (characters modulo a tiny vocabulary), enough of a tokenizer for the engine."""

    stop_ids = frozenset()

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % self.vocab for c in text]

    def prompt_ids(self, text):
        return self.encode(text)[:200]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def _loaded(model):
    return SimpleNamespace(model=model, tokenizer=CharTokenizer(48), name="tiny")


def test_training_learns_and_a_resumed_run_makes_the_same_weights(models, tmp_path):
    loaded = _loaded(deep("llama", seed=5))
    s = Settings(layers=2, tokens=512, seq=32, batch=4, steps=24, lr=1e-2, save_every=4, prompts=3, answer=8)
    res = train(loaded, s, tmp_path / "a.safetensors", progress=False, tune=False)
    assert res["agreement"] > res["agreement_before"]  # it learns the full model's next token
    assert not any((tmp_path / f"a.{ext}").exists() for ext in ("ckpt", "teacher"))
    first = load(loaded.model, tmp_path / "a.safetensors")[0].state_dict()
    assert train(loaded, s, tmp_path / "b.safetensors", progress=False, stop_after=10, tune=False) == {"stopped_at": 10}
    assert all((tmp_path / f"b.{ext}").exists() for ext in ("ckpt", "teacher")) and list(tmp_path.glob("answers-*"))
    train(loaded, s, tmp_path / "b.safetensors", progress=False, tune=False)  # resumes at step 8 (the last checkpoint)
    second = load(loaded.model, tmp_path / "b.safetensors")[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_reduced_vocabulary_adapter_drafts_over_that_vocabulary(tmp_path):
    """FR-Spec in training: the adapter learns against the most frequent tokens' head rows, and kangaroo then
    drafts over that many tokens (unless told otherwise), still lossless."""
    loaded = _loaded(deep("llama", seed=5))
    s = Settings(layers=2, tokens=256, seq=32, batch=4, steps=4, vocab=20, prompts=2, answer=8)
    res = train(loaded, s, tmp_path / "v.safetensors", progress=False, tune=False)
    assert res["vocab"] == 20
    d = prepared(Kangaroo(threshold=0.0, adapter=str(tmp_path / "v.safetensors")), loaded.model)
    plain, _ = decode(loaded.model, [1, 2, 3, 4], SamplingParams(max_new_tokens=12))
    got, _ = decode(loaded.model, [1, 2, 3, 4], SamplingParams(max_new_tokens=12), d, CostModel.flat())
    assert got == plain and len(d.head.ids) == 20
    d = prepared(Kangaroo(threshold=0.0, vocab=0, adapter=str(tmp_path / "v.safetensors")), loaded.model)
    d.session().propose(_ctx(loaded.model, [1, 2, 3]))
    assert d.head.ids is None


def test_bad_adapters_are_one_line(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    model = models["llama"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    good = models["adapters"]["llama"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-50])
    cases = {
        "train-adapter": lambda: prepared(Kangaroo(), model),  # none trained for this model
        "damaged": lambda: prepared(Kangaroo(adapter=str(junk)), model),
        "damaged ": lambda: prepared(Kangaroo(adapter=str(cut)), model),
        "trained for tiny": lambda: prepared(Kangaroo(adapter=str(models["adapters"]["gemma"])), model),
        "threshold": lambda: Kangaroo(threshold=1.0),
        "layers": lambda: Adapter.for_model(model, 4),
        "not prepared": lambda: Kangaroo().session(),
        "another model": lambda: kangaroo(models, "llama").session().propose(_ctx(models["gemma"], [1, 2, 3])),
    }
    for want, case in cases.items():
        with pytest.raises(SkipjackError) as e:
            case()
        assert want.strip() in str(e.value) and "\n" not in str(e.value)
    assert default_path(model).parent == tmp_path / "home" / "adapters"
    with pytest.raises(SkipjackError, match="skipjack train-adapter"):
        load(model, default_path(model))


def _resaved(good, path, tensors=None, **meta):
    """`good`'s adapter file with some tensors or metadata replaced, its checksum and identity still right: a
    file damaged in a way that only checking each value read can find."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from skipjack import integrity

    with safe_open(str(good), "pt") as f:
        old, ts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    ts = ts if tensors is None else tensors(ts)
    fields = old | {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    save_file(ts, str(path), metadata=fields | {"digest": integrity.digest(ts)})
    return path


def test_adapter_files_are_checked_value_by_value(models, tmp_path):
    """Every value an adapter file gives is checked: its dimensions against the model, the layer it follows,
    its tensors' names, dtypes and shapes, its format version and its recorded vocabulary. A bad one is a
    one-line error naming the fix, never an AttributeError, KeyError or a shape error mid-request."""
    import json

    from safetensors import safe_open

    model, good = models["llama"], models["adapters"]["llama"]
    with safe_open(str(good), "pt") as f:
        shape = json.loads(f.metadata()["shape"])
    bad = {
        "layers 4": dict(shape=shape | {"layers": 4}),  # too deep for a 5-layer model
        "layers 0": dict(shape=shape | {"layers": 0}),
        "hidden": dict(shape=shape | {"hidden": shape["hidden"] * 2}),
        "kv_heads": dict(shape=shape | {"kv_heads": True}),
        "eps": dict(shape=shape | {"eps": float("nan")}),
        "shape names": dict(shape={k: v for k, v in shape.items() if k != "eps"}),
        "shape list": dict(shape=[1, 2]),
        "about": dict(about=[1]),
        "vocab": dict(about={"vocab": "20"}),
        "version": dict(version="9"),
        "float64": dict(tensors=lambda ts: ts | {"norm1": ts["norm1"].double()}),
        "wo.weight": dict(tensors=lambda ts: ts | {"wo.weight": ts["wo.weight"][:, :4].contiguous()}),
        "extra": dict(tensors=lambda ts: ts | {"extra": torch.zeros(2)}),
        "missing": dict(tensors=lambda ts: {k: v for k, v in ts.items() if k != "norm2"}),
    }
    for i, (what, change) in enumerate(bad.items()):
        path = _resaved(good, tmp_path / f"{i}.safetensors", **change)
        with pytest.raises(SkipjackError) as e:
            prepared(Kangaroo(adapter=str(path)), model)
        assert "train-adapter" in str(e.value) and "\n" not in str(e.value), (what, str(e.value))
    ok = _resaved(good, tmp_path / "ok.safetensors", about={"vocab": 0, "model_name": "tiny"})
    assert prepared(Kangaroo(adapter=str(ok)), model).layers == 2


def test_an_adapter_fits_every_precision_of_its_model(models):
    """q4 and fp64 loads of one checkpoint are the same model to an adapter (it names the weights, not the dtype)."""
    from skipjack.drafters.kangaroo import identity

    assert identity(deep("llama", weights="q4")) == identity(deep("llama", dtype=torch.float32))
    assert identity(models["llama"]) != identity(models["gemma"])


def test_cli_without_an_adapter_names_the_command(tiny_folder, tmp_path, capsys, monkeypatch):
    from skipjack.cli import main

    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path))
    rc = main(["generate", "--model", str(tiny_folder), "--no-tune", "-n", "4", "--method", "kangaroo", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "skipjack train-adapter" in err[-1] and err[-1].startswith("skipjack: error: kangaroo")


def test_training_prompts_are_reproducible_and_keep_off_the_benchmarks_sources():
    """The chat prompts come from the stdlib in a seeded order; none quotes the pydoc topics, licenses or
    HumanEval problems the benchmark prompts are made of."""
    import json
    from importlib import resources

    from skipjack import corpus

    a, b = corpus.prompts(40, seed=0), corpus.prompts(40, seed=0)
    assert a == b and a != corpus.prompts(40, seed=1) and len(set(a)) == 40
    bench = resources.files("skipjack.bench").joinpath("prompts/full.jsonl").read_text().splitlines()
    texts = [m["content"] for line in bench for m in json.loads(line)["messages"]]
    for p in corpus.prompts(400):
        body = p.split("\n", 1)[-1][:200]
        assert len(body) < 60 or not any(body in t for t in texts)
    assert "def " in corpus.source_text(5000)
