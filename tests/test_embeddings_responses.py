"""`/v1/embeddings` and `/v1/responses` on a real loopback server (the tiny model), driven with the official
`openai` client and raw HTTP: values against the engine, both encodings, streaming, and hostile input."""

from __future__ import annotations

import math

import httpx
import torch
from test_server import alone, client, engine, url  # noqa: F401 - the tiny server's fixtures, one per module

from skipjack.server.extra import MAX_INPUTS


def reference(engine, ids: list[int]) -> torch.Tensor:
    """Mean of the final-normed last hidden states, L2-normalised, computed here from the model alone."""
    m = engine.model
    h = m(torch.tensor([ids]), logits="none").last_hidden
    h = m.math.rms_norm(h, m.norm_weight, m.config.rms_norm_eps)[0].float().mean(0)
    return h / h.norm()


def test_embed_is_pooled_normalised_and_order_dependent(engine):
    ids = engine.tokenizer.encode("the quick brown fox")
    v = engine.embed(ids)
    assert len(v) == engine.model.config.hidden_size
    assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5)
    assert torch.allclose(torch.tensor(v), reference(engine, ids), atol=1e-5)
    assert engine.embed(ids[::-1]) != v  # causal: not a bag of tokens


def test_embed_equals_transformers(engine, tiny_folder):
    """The same pooling over Hugging Face's own last hidden state (its final norm applied)."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tiny_folder, torch_dtype=torch.float32).eval()
    ids = engine.tokenizer.encode("hello world, the quick brown fox")
    with torch.no_grad():
        h = hf(torch.tensor([ids])).last_hidden_state[0].mean(0)
    assert torch.allclose(torch.tensor(engine.embed(ids)), h / h.norm(), atol=1e-4)


def test_embeddings_with_the_openai_client(client, engine):
    texts = ["hello world", "the quick brown fox"]
    r = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    assert r.object == "list" and [d.index for d in r.data] == [0, 1]
    ids = [engine.tokenizer.prompt_ids(t, raw=True) for t in texts]
    for d, x in zip(r.data, ids):
        assert d.object == "embedding"
        assert torch.allclose(torch.tensor(d.embedding), reference(engine, x), atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    b = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    for d, f in zip(b.data, r.data):
        assert torch.allclose(torch.tensor(d.embedding), torch.tensor(f.embedding), atol=1e-6)
    one = client.embeddings.create(model="tiny", input="hello world", encoding_format="float")
    assert one.data[0].embedding == r.data[0].embedding


def test_embeddings_of_token_ids(client, engine):
    ids = engine.tokenizer.encode("hello world")
    one = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
    two = client.embeddings.create(model="tiny", input=[ids, ids[:2]], encoding_format="float")
    assert len(one.data) == 1 and len(two.data) == 2
    assert torch.allclose(torch.tensor(one.data[0].embedding), torch.tensor(two.data[0].embedding), atol=1e-6)
    assert torch.allclose(torch.tensor(two.data[1].embedding), reference(engine, ids[:2]), atol=1e-5)


def _bad_embeddings(engine) -> list:
    vocab, ctx = engine.model.lm_head.out_features, engine.model.config.max_position_embeddings
    return [
        "",
        [],
        [""],
        [[]],
        [vocab],
        [[1, -1]],
        [1] * (ctx + 1),
        ["a"] * (MAX_INPUTS + 1),
        [1, "a"],
        [True, 2],
        {"text": "x"},
        None,
    ]


def test_bad_embeddings_input_is_a_400_and_the_server_keeps_serving(url, engine):
    for bad in _bad_embeddings(engine):
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": bad}, timeout=30)
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "\n" not in err["message"]
    for extra in ({"encoding_format": "int8"}, {"dimensions": 3}):
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "hi"} | extra)
        assert r.status_code == 400, r.text
    ok = httpx.post(f"{url}/v1/embeddings", json={"input": "hi", "encoding_format": None, "model": None})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == engine.model.config.hidden_size


def test_responses_whole_equals_the_chat_path(client, engine):
    r = client.responses.create(model="tiny", input="the quick brown fox", max_output_tokens=12, temperature=0)
    want = alone(engine, "the quick brown fox", 12)
    assert r.object == "response" and r.output_text == want
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert msg.content[0].text == want
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status in ("completed", "incomplete")


def test_responses_with_messages_and_instructions(client, url):
    msgs = [
        {"role": "user", "content": "one two three"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "four"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "five six"}]},
    ]
    r = client.responses.create(model="tiny", input=msgs, instructions="count", max_output_tokens=6, temperature=0)
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": [{"role": "system", "content": "count"}]
            + [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four"}]
            + [{"role": "user", "content": "five six"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    ).json()
    assert r.output_text == chat["choices"][0]["message"]["content"]
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]


def test_responses_streamed_equals_whole(client):
    args = {"model": "tiny", "input": "hello there", "max_output_tokens": 10, "temperature": 0}
    whole = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text and events[-1].response.output_text == text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_responses_stream_helper_accumulates(client):
    args = {"model": "tiny", "input": "hello there", "max_output_tokens": 8, "temperature": 0}
    whole = client.responses.create(**args)
    with client.responses.stream(**args) as s:
        final = s.get_final_response()
    assert final.output_text == whole.output_text


def test_bad_responses_input_is_a_400(url, engine):
    ctx = engine.model.config.max_position_embeddings
    bads = [
        {"input": ""},
        {"input": []},
        {"input": "x " * (ctx + 5)},
        {"input": "hi", "max_output_tokens": ctx},
        {"input": "hi", "max_output_tokens": 0},
        {"input": "hi", "temperature": -1},
        {"input": "hi", "top_p": 0},
        {"input": [{"role": "tool", "content": "x"}]},
        {"input": [{"type": "function_call", "role": "user", "content": "x"}]},
        {"input": 5},
    ]
    for bad in bads:
        r = httpx.post(f"{url}/v1/responses", json=bad, timeout=30)
        assert r.status_code == 400, (bad, r.text)
    ok = httpx.post(
        f"{url}/v1/responses",
        json={"input": "hi", "max_output_tokens": 3, "temperature": None, "top_p": None, "stream": None},
    )
    assert ok.status_code == 200 and ok.json()["usage"]["output_tokens"] <= 3
