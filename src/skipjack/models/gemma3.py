"""Gemma 3 text decoder (Gemma Team 2025).

Differences from Llama: embeddings scaled by sqrt(hidden); four norms per block (pre/post attention, pre/post
FFN) whose scale is (1 + w); RMS QK-norm per head; GELU-tanh gated FFN; attention scale
query_pre_attn_scalar^-1/2; local layers with a sliding window and their own RoPE base, global layers every
`sliding_window_pattern`-th layer with the global base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from skipjack.models.common import DecoderLM, config_from_dict, run_attention
from skipjack.models.rowops import Rope, TorchMath, apply_rope
from skipjack.weights.linear import fuse, param

# What transformers' Gemma3TextConfig (transformers 5) fills in for a key config.json leaves out, for the keys
# skipjack reads (`layer_types` None: derived in `Gemma3Config.normalise`).
# fmt: off
HF_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=131_072, tie_word_embeddings=True,
    query_pre_attn_scalar=256, sliding_window=4096, layer_types=None, final_logit_softcapping=None, bos_token_id=2,
    eos_token_id=1,
)
# fmt: on


@dataclass
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_theta: float = 10_000.0  # sliding layers
    rope_scale: float = 1.0  # linear scaling of the global RoPE
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)  # "sliding_attention" | "full_attention" per layer
    max_position_embeddings: int = 32768
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True

    @staticmethod
    def normalise(d: dict) -> dict:
        """An HF config dict as transformers' Gemma3TextConfig would complete it, for the keys skipjack reads: its
        defaults where a key is missing, `layer_types` from `sliding_window_pattern` (every 6th layer global),
        RoPE per layer type in `rope_parameters` (legacy `rope_scaling` applies to the global layers)."""
        d = {**HF_DEFAULTS, **d}
        if d["layer_types"] is None:
            every = d.get("sliding_window_pattern", 6)
            d["layer_types"] = [
                "sliding_attention" if (i + 1) % every else "full_attention" for i in range(d["num_hidden_layers"])
            ]
        rope = {k: dict(v) if isinstance(v, dict) else v for k, v in (d.get("rope_parameters") or {}).items()}
        for kind in ("full_attention", "sliding_attention"):
            if rope.get(kind) is None:
                rope[kind] = {"rope_type": "default"}
        full, local = rope["full_attention"], rope["sliding_attention"]
        full.update(d.pop("rope_scaling", None) or {})
        full.setdefault("rope_theta", d.pop("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", d.pop("rope_local_base_freq", 10_000.0))
        for kind in set(d["layer_types"]) & set(rope):  # transformers completes the kinds its layers use
            rope[kind].setdefault("rope_type", rope[kind].get("type", "default"))
        d["rope_parameters"] = rope
        return d

    @classmethod
    def from_hf(cls, d: dict) -> Gemma3Config:
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
        d["rope_theta"] = full.get("rope_theta", d.get("rope_theta", 1e6))
        d["rope_local_theta"] = local.get("rope_theta", d.get("rope_local_base_freq", 1e4))
        if full.get("rope_type") == "linear":
            d["rope_scale"] = full["factor"]
        return config_from_dict(cls, d)


class Block(nn.Module):
    math = TorchMath  # the row-wise ops; `DecoderLM._build` sets the model's
    GELU = True  # the FFN's gate: GELU-tanh, else SiLU
    NORMS = ("attn_pre", "attn_post", "ffn_pre", "ffn_post", "q_norm", "k_norm")  # the native step's order

    def __init__(self, c: Gemma3Config, sd: dict[str, torch.Tensor], p: str, linear):
        super().__init__()
        self.c = c
        self.n_q, self.n_kv = c.num_attention_heads, c.num_key_value_heads

        def norm(name):  # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in once
            return param(sd[p + name] + 1.0)

        self.attn_pre, self.attn_post = norm("input_layernorm.weight"), norm("post_attention_layernorm.weight")
        self.ffn_pre, self.ffn_post = (
            norm("pre_feedforward_layernorm.weight"),
            norm("post_feedforward_layernorm.weight"),
        )
        self.q_norm, self.k_norm = norm("self_attn.q_norm.weight"), norm("self_attn.k_norm.weight")
        a = p + "self_attn."
        self.wqkv = linear(fuse(*(sd[a + n + "_proj.weight"] for n in "qkv")))
        self.wo = linear(sd[a + "o_proj.weight"])
        m = p + "mlp."
        self.wgu = linear(fuse(sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]))
        self.wd = linear(sd[m + "down_proj.weight"])
        self.scale = c.query_pre_attn_scalar**-0.5

    def forward(self, h, kv, start, rope, mask_fn, attn=True, ffn=True):
        B, T, _ = h.shape
        c, eps = self.c, self.c.rms_norm_eps
        if attn:
            x = self.math.rms_norm(h, self.attn_pre, eps)
            qkv = self.wqkv(x).view(B, T, self.n_q + 2 * self.n_kv, c.head_dim)  # [B, T, Hq+2Hkv, D]
            q = self.math.rms_norm(qkv[:, :, : self.n_q], self.q_norm, eps)  # [B, T, Hq, D]
            k = self.math.rms_norm(qkv[:, :, self.n_q : self.n_q + self.n_kv], self.k_norm, eps)  # [B, T, Hkv, D]
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            o = run_attention(q, k, qkv[:, :, self.n_q + self.n_kv :], kv, start, mask_fn, self.scale)  # [B, T, H*D]
            h = h + self.math.rms_norm(self.wo(o), self.attn_post, eps)
        if ffn:
            x = self.math.rms_norm(h, self.ffn_pre, eps)
            y = self.wd(self.math.act_mul(self.wgu(x), gelu=True))  # [B, T, F] -> [B, T, Dm]
            h = h + self.math.rms_norm(y, self.ffn_post, eps)
        return h


class Model(DecoderLM):
    def __init__(self, c: Gemma3Config, sd: dict[str, torch.Tensor], linear):
        super().__init__()
        self._build(c, sd, Block, linear, norm_shift=1.0)
        self.kinds = [
            (c.sliding_window, "local") if t == "sliding_attention" else (None, "global") for t in c.layer_types
        ]
        self.embed_scale = math.sqrt(c.hidden_size)
        self.rope_local = Rope(c.head_dim, c.rope_local_theta, self.dtype)
        self.rope_global = Rope(c.head_dim, c.rope_theta, self.dtype, c.rope_scale)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(ids)  # [B, T, Dm]
        return e * torch.tensor(self.embed_scale, dtype=e.dtype)

    def ropes(self, positions):
        return {"local": self.rope_local(positions), "global": self.rope_global(positions)}
