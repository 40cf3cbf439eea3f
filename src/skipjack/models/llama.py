"""Llama-architecture decoder: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v bias).

Pre-norm blocks: h += Wo·attn(RoPE(Wq·n(h)), RoPE(Wk·n(h)), Wv·n(h)); h += Wd·(silu(Wg·n(h)) * Wu·n(h)).
Q, K, V are one fused matmul, gate and up another; RoPE is applied to q and k heads in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skipjack.models.common import DecoderLM, config_from_dict, run_attention
from skipjack.models.rowops import Rope, TorchMath, apply_rope
from skipjack.weights.linear import fuse, param

# What transformers' config classes (LlamaConfig, MistralConfig, Qwen2Config; transformers 5) fill in for a key
# config.json leaves out, for the keys skipjack reads (None: derived in `LlamaConfig.normalise`).
_SHARED = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, tie_word_embeddings=False
)
# fmt: off
HF_DEFAULTS = {
    "llama": dict(_SHARED, vocab_size=32000, intermediate_size=11008, num_key_value_heads=None, head_dim=None,
                  max_position_embeddings=2048, attention_bias=False, bos_token_id=1, eos_token_id=2),
    "mistral": dict(_SHARED, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=131072, sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(_SHARED, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  layer_types=None, bos_token_id=None, eos_token_id=None),
}
# fmt: on


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # derived from hidden / heads when 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scale: float = 1.0  # linear RoPE scaling factor
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    sliding_window: int | None = None  # Mistral / Qwen2 with use_sliding_window
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention" (None: all slide)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @staticmethod
    def normalise(d: dict) -> dict:
        """An HF config dict as transformers' config class for its `model_type` (llama, mistral, qwen2) would
        complete it, for the keys skipjack reads: the class's defaults where a key is missing, the derived fields
        (`num_key_value_heads`, `head_dim`, Qwen2's window and `layer_types`), RoPE in `rope_parameters`."""
        mt = d["model_type"]
        d = {**HF_DEFAULTS[mt], **d}
        if d["num_key_value_heads"] is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        if mt == "qwen2":
            d["sliding_window"] = d["sliding_window"] if d["use_sliding_window"] else None
            if d["layer_types"] is None:
                sliding = d["sliding_window"] is not None
                d["layer_types"] = [
                    "sliding_attention" if sliding and i >= d["max_window_layers"] else "full_attention"
                    for i in range(d["num_hidden_layers"])
                ]
        elif d["head_dim"] is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        rope = dict(d.pop("rope_scaling", None) or d.get("rope_parameters") or {})  # the legacy key wins
        rope.setdefault("rope_theta", d.pop("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.get("type", "default"))
        d["rope_parameters"] = rope
        return d

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """Build from an HF config dict (already normalised: `normalise`); unknown keys are ignored."""
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type") == "linear":
            d["rope_scale"] = rope["factor"]
        elif rope.get("rope_type", "default") != "default":
            from skipjack.errors import SkipjackError

            raise SkipjackError(f"RoPE scaling type {rope['rope_type']!r} is not supported yet")
        if d.get("model_type") == "qwen2":
            d["attention_bias"] = True
            d["sliding_window"] = d.get("sliding_window") if d.get("use_sliding_window") else None
        return config_from_dict(cls, d)


class Block(nn.Module):
    math = TorchMath  # the row-wise ops; `DecoderLM._build` sets the model's
    GELU = False  # the FFN's gate: GELU-tanh, else SiLU
    NORMS = ("attn_norm", "ffn_norm")  # in the native step's order (`skipjack.models.native`)

    def __init__(self, c: LlamaConfig, sd: dict[str, torch.Tensor], p: str, linear):
        super().__init__()
        self.c = c
        self.n_q, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.attn_norm = param(sd[p + "input_layernorm.weight"])
        self.ffn_norm = param(sd[p + "post_attention_layernorm.weight"])
        a = p + "self_attn."
        qkv = [a + n + "_proj." for n in "qkv"]
        bias = fuse(*(sd.get(n + "bias") for n in qkv)) if c.attention_bias else None
        self.wqkv = linear(fuse(*(sd[n + "weight"] for n in qkv)), bias)
        self.wo = linear(sd[a + "o_proj.weight"])
        m = p + "mlp."
        self.wgu = linear(fuse(sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]))
        self.wd = linear(sd[m + "down_proj.weight"])
        self.scale = c.head_dim**-0.5

    def forward(self, h, kv, start, rope, mask_fn, attn=True, ffn=True):
        B, T, _ = h.shape
        D = self.c.head_dim
        if attn:
            x = self.math.rms_norm(h, self.attn_norm, self.c.rms_norm_eps)
            qkv = self.wqkv(x).view(B, T, self.n_q + 2 * self.n_kv, D)  # [B, T, Hq+2Hkv, D]
            qk = apply_rope(qkv[:, :, : self.n_q + self.n_kv], *rope)  # [B, T, Hq+Hkv, D]
            q, k, v = qk[:, :, : self.n_q], qk[:, :, self.n_q :], qkv[:, :, self.n_q + self.n_kv :]
            h = h + self.wo(run_attention(q, k, v, kv, start, mask_fn, self.scale))  # [B, T, Dm]
        if ffn:
            x = self.math.rms_norm(h, self.ffn_norm, self.c.rms_norm_eps)
            h = h + self.wd(self.math.act_mul(self.wgu(x), gelu=False))  # [B, T, F] -> [B, T, Dm]
        return h


class Model(DecoderLM):
    def __init__(self, c: LlamaConfig, sd: dict[str, torch.Tensor], linear):
        super().__init__()
        self._build(c, sd, Block, linear)
        types = c.layer_types or ["sliding_attention"] * c.num_hidden_layers  # Qwen2: only above max_window_layers
        self.kinds = [(c.sliding_window if t == "sliding_attention" else None, "rope") for t in types]
        self.rope = Rope(c.head_dim, c.rope_theta, self.dtype, c.rope_scale)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)  # [B, T, Dm]

    def ropes(self, positions):
        return {"rope": self.rope(positions)}
