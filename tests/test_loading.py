"""GGUF reading (dequantisation, llama.cpp tensor layout), the conversion cache, and named models."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import byte_bpe_tokenizer, hf_model

from skipjack.errors import SkipjackError
from skipjack.loading import load as loading

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (the inverse of what we undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, qtype_for, arch: str = "llama", drop: tuple[str, ...] = ()):
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer; returns the HF model and the dequantised
    state dict that the file really holds. `arch`: the architecture the file claims; `drop`: GGUF tensor names
    left out (hostile-input tests)."""
    tok = byte_bpe_tokenizer()
    hf = hf_model("llama", seed=12, vocab=len(tok), max_position_embeddings=128, hidden_size=64, intermediate_size=128)
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<eos>" else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.eos_token_id)
    w.add_chat_template(tok.chat_template)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    held = {}
    for i, (name, t) in enumerate(hf.state_dict().items()):
        if name.startswith("model.layers."):
            _, _, li, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            gname = f"blk.{li}.{parts[part]}.{kind}"
        else:
            gname = names[name]
        arr = t.numpy().astype(np.float32)
        if ".attn_q." in gname:
            arr = _permute(arr, c.num_attention_heads)
        elif ".attn_k." in gname:
            arr = _permute(arr, c.num_key_value_heads)
        if gname in drop:
            continue
        qt = gguf.GGMLQuantizationType[qtype_for(i, gname, arr)]
        data = gguf.quants.quantize(arr, qt)
        w.add_tensor(gname, data, raw_dtype=qt)
        held[name] = torch.from_numpy(gguf.quants.dequantize(data, qt).reshape(t.shape).copy())
        if ".attn_q." in gname or ".attn_k." in gname:  # what the file holds, in HF row order
            heads = c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads
            held[name] = torch.from_numpy(loading_unpermute(held[name].numpy(), heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, held


def loading_unpermute(w, n_head):
    from skipjack.loading.gguf_io import _unpermute

    return _unpermute(w, n_head)


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8 * 3, 4)
    assert np.array_equal(loading_unpermute(_permute(w, 3), 3), w)


def _pick(i, name, arr):
    if arr.ndim == 1 or arr.shape[-1] % 32:
        return "F32"
    return QTYPES[i % len(QTYPES)]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_gguf_quant_types_and_layout(tmp_path, home):
    path = tmp_path / "tiny.gguf"
    hf, held = write_tiny_gguf(path, _pick)
    first = loading.load(str(path), "fp32")
    assert first.converted
    from skipjack.models import build_model

    ref = build_model(hf.config.to_dict(), held)
    ids = torch.tensor([first.tokenizer.prompt_ids("hello world")])
    torch.testing.assert_close(first.model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    # the HF model with the same (dequantised) weights agrees too
    hf.load_state_dict(held)
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    assert first.tokenizer.chat_template and "assistant:" in first.tokenizer.chat_template
    second = loading.load(str(path), "fp32")
    assert not second.converted
    torch.testing.assert_close(second.model(ids).logits, first.model(ids).logits, atol=0, rtol=0)
    assert second.tokenizer.encode("the quick brown fox") == first.tokenizer.encode("the quick brown fox")


def test_q4_load_keeps_the_files_blocks(tmp_path, home):
    """A q4 load reads the blocks themselves (cached apart from the fp32 conversion): a linear whose type maps
    exactly holds the very values of the fp32 load, the others are requantised and the load line says so;
    at q8 (4-bit blocks promoted exactly, other tensors requantised to 8 bits) its logits stay near fp32's."""
    path = tmp_path / "tiny.gguf"
    hf, held = write_tiny_gguf(path, _pick)
    from skipjack.models import build_model
    from skipjack.weights.linear import QuantLinear

    ref = build_model(hf.config.to_dict(), held, weights="dense")
    q4 = loading.load(str(path), "q4")
    assert q4.converted and q4.dtype == "q4" and q4.model.invariant
    exact = 0
    for ours, theirs in zip(q4.model.linears(), ref.linears()):
        assert isinstance(ours, QuantLinear)
        if "Q" in ours.source and "requantised" not in ours.source:
            assert torch.equal(ours.weight().dequantize(), theirs.weight)
            exact += 1
    assert exact and "as stored" in q4.info["weights"]
    ids = torch.tensor([q4.tokenizer.prompt_ids("hello world")])
    q8 = loading.load(str(path), "q8")  # 4-bit values promoted exactly, the rest requantised to 8 bits
    got, want = q8.model(ids).logits, ref(ids).logits
    assert (got - want).abs().mean() <= 0.05 * want.abs().mean() and (got - want).abs().max() <= 0.1 * want.abs().max()
    assert not loading.load(str(path), "q4").converted  # the blocks are cached


def test_interrupted_conversion_leaves_no_entry(tmp_path, home, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, _pick)
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        loading.load(str(path), "fp32")
    assert list((home / "converted").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("SKIPJACK_HOME", str(home))
    assert loading.load(str(path), "fp32").converted


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_reconversion_drops_the_stale_entry(tmp_path, home, monkeypatch):
    """A replaced GGUF is converted again and its old fp32 copy deleted; a same-named file elsewhere keeps its
    own; the copy of a deleted GGUF goes at the next conversion. A terminal is told that the conversion runs
    (it takes a while), a pipe is not."""
    path, other = tmp_path / "tiny.gguf", tmp_path / "elsewhere" / "tiny.gguf"
    write_tiny_gguf(path, _pick)
    other.parent.mkdir()
    shutil.copy(path, other)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert loading.load(str(path), "fp32").converted
    assert "converting tiny.gguf (fp32 weights), once" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert loading.load(str(other), "fp32").converted and sys.stderr.getvalue() == ""
    first = {e.name for e in (home / "converted").iterdir()}
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file was replaced
    assert loading.load(str(path), "fp32").converted
    now = {e.name for e in (home / "converted").iterdir()}
    assert len(first) == len(now) == 2 and len(first & now) == 1  # other's entry stays, path's old one is gone
    assert not loading.load(str(path), "fp32").converted
    gone = tmp_path / "gone" / "tiny.gguf"  # a GGUF converted, then deleted: its copy goes at the next conversion
    gone.parent.mkdir()
    shutil.copy(path, gone)
    assert loading.load(str(gone), "fp32").converted
    shutil.rmtree(gone.parent)
    os.utime(other, ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns + 10**9))
    assert loading.load(str(other), "fp32").converted
    sources = [json.loads((e / "skipjack.json").read_text())["source"] for e in (home / "converted").iterdir()]
    assert sorted(sources) == sorted([str(path), str(other)])


def test_k_quant_blocks_dequantise(tmp_path):
    """K-quants (Q4_K, Q5_K, Q6_K) are decoded by the gguf package: a block with known fields gives known
    values. Q6_K: all 6-bit quants 0 -> value (0 - 32) * scale * d."""
    from skipjack.loading.gguf_io import read_tensors

    block = np.zeros(210, dtype=np.uint8)  # Q6_K: ql[128] qh[64] scales[16] (int8) d (fp16)
    block[192:208] = 2
    block[208:210] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("output_norm.weight", block.reshape(1, 210), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    for qt in ("Q4_K", "Q5_K"):  # all-zero blocks decode to zeros
        size = {"Q4_K": 144, "Q5_K": 176}[qt]
        w.add_tensor(
            f"blk.0.attn_{'q' if qt == 'Q4_K' else 'v'}.weight",
            np.zeros((1, size), np.uint8),
            raw_dtype=gguf.GGMLQuantizationType[qt],
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = read_tensors(tmp_path / "k.gguf", {"model_type": "qwen2"})
    assert torch.all(out["model.norm.weight"] == -32.0)
    assert out["model.layers.0.self_attn.q_proj.weight"].abs().sum() == 0
    assert out["model.layers.0.self_attn.v_proj.weight"].shape == (1, 256)


def test_unknown_named_model_and_offline_hub(home):
    with pytest.raises(SkipjackError, match="not found"):
        loading.load("no-such-model")
    with pytest.raises(SkipjackError, match="hub could not be reached"):
        loading.load("someorg/somemodel-that-is-not-here")


def _hf_normalised(d: dict) -> dict:
    """What `normalise_config` gave when it went through transformers' config classes (the reference)."""
    from transformers import AutoConfig

    mt = d.get("model_type")
    if mt == "gemma3":
        d, mt = {**d.get("text_config", {}), "model_type": "gemma3_text"}, "gemma3_text"
    extra = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(mt, **extra).to_dict() | {"model_type": mt}


SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4)


def _configs():
    kv = SMALL | {"num_key_value_heads": 2}
    for mt in ("llama", "mistral", "qwen2", "gemma3_text"):
        yield {"model_type": mt}  # every default
        yield {"model_type": mt, **kv, "rope_theta": 5000.0, "transformers_version": "4.4", "torch_dtype": "bfloat16"}
        yield {"model_type": mt, **SMALL, "num_attention_heads": 32}  # the family's default KV heads
        yield {"model_type": mt, **kv, "rope_scaling": {"type": "linear", "factor": 2.0}}
        yield {"model_type": mt, **kv, "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 123.0}
        yield {"model_type": mt, **kv, "sliding_window": None, "head_dim": 32, "tie_word_embeddings": True}
        yield {"model_type": mt, **kv, "sliding_window": 7, "use_sliding_window": True, "max_window_layers": 3}
        yield {"model_type": mt, **kv, "layer_types": ["attention"] * 3 + ["sliding_attention"] * 4}
        yield {"model_type": mt, **kv, "attention_bias": True, "rms_norm_eps": 1e-5, "eos_token_id": [5, 6]}
    yield {"model_type": "llama", **SMALL, "num_key_value_heads": None, "max_position_embeddings": 77}
    yield {"model_type": "llama", **SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}}
    yield {"model_type": "gemma3_text", **SMALL, "sliding_window_pattern": 3, "rope_local_base_freq": 99.0}
    yield {"model_type": "gemma3_text", **SMALL, "query_pre_attn_scalar": 64, "final_logit_softcapping": 30.0}
    full, local = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, {"rope_type": "default", "rope_theta": 1e4}
    yield {
        "model_type": "gemma3_text",
        **SMALL,
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
    }
    yield {"model_type": "gemma3", "text_config": {**SMALL, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}}
    yield {"model_type": "gemma3", "text_config": {}}
    from conftest import FAMILIES, hf_config

    for family in FAMILIES:
        yield hf_config(family).to_dict()


@pytest.mark.parametrize("config", list(_configs()), ids=lambda c: str(c.get("model_type")))
def test_configs_are_completed_as_transformers_completes_them(config):
    """Without transformers, a config dict gives the same family config (every field `from_hf` reads) and the same
    eos ids as transformers' config class for its model_type; the config passed in is left as it was."""
    import copy

    from skipjack.models import FAMILIES, normalise_config

    ours, before = normalise_config(copy.deepcopy(config)), copy.deepcopy(config)
    want = _hf_normalised(copy.deepcopy(config))
    cls = FAMILIES[want["model_type"]][0]
    assert cls.from_hf(ours) == cls.from_hf(want)
    assert ours.get("eos_token_id") == want.get("eos_token_id")
    assert normalise_config(config) == ours and config == before


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"model_type": "llama", "hidden_size": "64"}, "hidden_size must be a positive integer"),
        ({"model_type": "qwen2", "num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"model_type": "mistral", **SMALL}, "not a multiple of its num_key_value_heads (8)"),
    ],
)
def test_a_config_with_bad_sizes_is_one_error(config, needle):
    from skipjack.models import normalise_config

    with pytest.raises(SkipjackError) as e:
        normalise_config(config)
    assert needle in str(e.value)
