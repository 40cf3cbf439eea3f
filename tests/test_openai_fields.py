"""What OpenAI clients and lm-eval send to /v1/completions and /v1/chat/completions (issue 36): `null` as the
default, an unknown model (404 model_not_found), usage counting the prompt once, `echo` with the prompt's
logprobs, scoring with max_tokens 0, `text_offset`, token-id and batched prompts, and hostile prompts."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from test_server import alone, client, engine, url  # noqa: F401 - the tiny server's fixtures, one per module

from skipjack.server.protocol import MAX_PROMPTS


def test_null_means_the_default(client, url, engine):
    """The official client sends null for a caller's None: every optional field then takes its default."""
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, logprobs=None, seed=None, stop=None)
    c = client.completions.create(model=None, prompt="def add ( a", max_tokens=None, **nulls)
    assert c.usage.completion_tokens == 16 and len(c.choices) == 1  # OpenAI's default max_tokens
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=None, messages=msgs, max_tokens=6, **nulls, top_logprobs=None)
    assert len(r.choices) == 1 and r.choices[0].message.content is not None
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0} | {k: None for k in ("echo", "stream_options")}
    raw = httpx.post(f"{url}/v1/completions", json=body | {"top_k": None, "speculative": None, "kv": None})
    assert raw.status_code == 200, raw.text
    assert raw.json()["choices"][0]["text"] == alone(engine, "hello", 4, chat=False)
    assert httpx.post(f"{url}/v1/completions", json={"prompt": None}).status_code == 400  # required stays required


def test_unknown_model_is_404_and_the_served_names_work(client, url, engine):
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "\n" not in r.json()["error"]["message"]
    served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    assert client.completions.create(model=served, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_n_counts_the_prompt_once(client):
    one = client.completions.create(model=None, prompt="the quick brown fox", max_tokens=3, temperature=0)
    many = client.completions.create(model=None, prompt="the quick brown fox", max_tokens=3, temperature=0, n=3)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_echo_with_logprobs_scores_the_prompt(client, engine):
    """lm-eval's log-likelihood request: echo, logprobs, max_tokens 0: the prompt's tokens and logprobs, the first
    null; each equals log-softmax of the model's logits at the position before it."""
    import torch

    text = "the quick brown fox"
    c = client.completions.create(model=None, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    ch = c.choices[0]
    ids = engine.tokenizer.prompt_ids(text, raw=True)
    assert ch.text == text and c.usage.completion_tokens == 0 and c.usage.prompt_tokens == len(ids)
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = engine.model.forward(torch.tensor([ids]), logits="all").logits[0].float()
    want = torch.log_softmax(logits, -1)
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], float(want[i - 1, ids[i]]), abs_tol=1e-4)
        assert len(lp.top_logprobs[i]) <= 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_echo_with_generation_whole_and_streamed(client, engine):
    text = "def add ( a"
    args = dict(model=None, prompt=text, max_tokens=5, echo=True, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    assert whole == text + alone(engine, text, 5, chat=False)
    parts = [c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(parts) == whole
    lp = client.completions.create(**args, logprobs=1).choices[0].logprobs
    n_prompt = len(engine.tokenizer.prompt_ids(text, raw=True))
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == n_prompt + 5 and lp.text_offset == sorted(lp.text_offset)


def test_text_offset_without_echo(client):
    lp = client.completions.create(model=None, prompt="hello", max_tokens=6, temperature=0, logprobs=0)
    offsets = lp.choices[0].logprobs.text_offset
    assert offsets == [sum(len(t) for t in lp.choices[0].logprobs.tokens[:i]) for i in range(len(offsets))]


def test_token_id_and_batched_prompts(client, engine):
    texts = ["the quick brown fox", "def add ( a", "hello world"]
    ids = [engine.tokenizer.prompt_ids(t, raw=True) for t in texts]
    want = [alone(engine, t, 4, chat=False) for t in texts]
    one = client.completions.create(model=None, prompt=ids[0], max_tokens=4, temperature=0)
    assert one.choices[0].text == want[0]
    for prompt in (texts, ids):
        c = client.completions.create(model=None, prompt=prompt, max_tokens=4, temperature=0)
        assert [x.index for x in c.choices] == [0, 1, 2] and [x.text for x in c.choices] == want
        assert c.usage.prompt_tokens == sum(len(x) for x in ids)
    c = client.completions.create(model=None, prompt=texts[:2], max_tokens=4, temperature=0, n=2)
    assert [x.index for x in c.choices] == [0, 1, 2, 3]
    assert [x.text for x in c.choices] == [want[0], want[0], want[1], want[1]]
    echo = client.completions.create(model=None, prompt=ids[:2], max_tokens=0, echo=True, logprobs=0)
    assert [x.text for x in echo.choices] == [engine.tokenizer.decode(i) for i in ids[:2]]


def test_hostile_prompts_are_one_line_400s(url, engine):
    vocab = engine.model.lm_head.out_features
    ctx = engine.model.config.max_position_embeddings
    for body in (
        {"prompt": [vocab]},
        {"prompt": [-1]},
        {"prompt": [[1, 2], [vocab + 5]]},
        {"prompt": [[]]},
        {"prompt": []},
        {"prompt": ["x"] * 100_000},
        {"prompt": [[1]] * (MAX_PROMPTS + 1)},
        {"prompt": [1] * (ctx + 1), "echo": True, "max_tokens": 0, "logprobs": 1},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": -1},
        {"prompt": [1, "a"]},
        {"prompt": [True]},
    ):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (str(body)[:80], r.text)
        assert "\n" not in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_hostile_sampling_fields_and_messages_are_one_line_400s(url, engine):
    """logit_bias ids outside the vocabulary, non-finite or out-of-range biases, keys that are not ids, a map as
    big as a body allows; two assistant messages at the end (llama-server refuses them too)."""
    vocab = engine.model.lm_head.out_features
    msgs = [{"role": "user", "content": "x"}]
    two = msgs + [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    bodies = [
        ("/v1/completions", {"prompt": "x", "logit_bias": {str(vocab): 1}}),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 1e300 * 10}}),  # inf: sent as Infinity
        ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 101}}),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}),
        ("/v1/completions", {"prompt": "x", "logit_bias": {str(vocab + i): -100 for i in range(100_000)}}),
        ("/v1/completions", {"prompt": "x", "min_tokens": -1}),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": 3}),
        ("/v1/chat/completions", {"messages": two}),
    ]
    for path, body in bodies:
        r = httpx.post(f"{url}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code in (400, 413), (str(body)[:80], r.text)
        assert "\n" not in r.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": two[:2], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{url}/health").status_code == 200


def test_tokenize_pieces_and_vllm_fields(url, engine):
    tok = engine.tokenizer
    ids = tok.encode("hello world")
    r = httpx.post(f"{url}/tokenize", json={"content": "hello world", "with_pieces": True}).json()
    assert [t["id"] for t in r["tokens"]] == ids and "".join(t["piece"] for t in r["tokens"]) == tok.decode(ids)
    v = httpx.post(f"{url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert v["tokens"] == tok.encode("hello world", add_special_tokens=False) and v["count"] == len(v["tokens"])
    s = httpx.post(f"{url}/tokenize", json={"prompt": "hello", "return_token_strs": True}).json()
    assert s["token_strs"] == [tok.decode([t]) for t in s["tokens"]]
    d = httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()
    assert d["content"] == d["prompt"] == tok.decode(ids)
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404


def test_metrics_also_under_vllm_names(client, url, engine):
    client.completions.create(model=None, prompt="hello", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    label = f'model_name="{engine.name}"'
    for name in ("num_requests_running", "num_requests_waiting", "time_to_first_token_seconds_bucket"):
        assert f"skipjack:{name}" in text and f"vllm:{name}{{{label}" in text, name
    assert f'vllm:generation_tokens_total{{{label},method="auto"}}' in text
    assert "# TYPE vllm:prompt_tokens_total counter" in text and "vllm:load_seconds" not in text
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"vllm:generation_tokens", "skipjack:generation_tokens"} <= names
