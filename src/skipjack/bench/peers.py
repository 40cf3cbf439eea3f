"""Peers: other engines run in the same benchmark, on the same prompt token ids and token budget.

- `hf`: HF transformers `generate`, greedy (or sampling at T > 0), on the same weights (for a GGUF, the HF
  folder skipjack converted it into; for an HF folder, the folder itself).
- `hf-pld`: the same with HF's prompt lookup decoding, `prompt_lookup_num_tokens=10`.
- `hf-assist`: HF's assisted generation (`assistant_model`) with the smaller model of the same tokenizer that
  `DRAFT_FOR` names for the target (Qwen2.5-Coder 1.5B: the 0.5B), the same pair as `draft:model=`.
- `hf-early-exit`: HF's `assistant_early_exit` (self-speculation: the target's first L/2 layers draft).
- `llamacpp`: llama.cpp through `llama-cpp-python` on the same GGUF file, plain decoding.
- `llamacpp-pld`: the same with its prompt-lookup draft model (`LlamaPromptLookupDecoding(num_pred_tokens=10)`).
- `llamacpp-draft`: the same with the named draft model of `DRAFT_FOR`, run by a second llama.cpp instance
  behind the binding's draft-model hook (`GGUFDraft`: it drafts `NUM_PRED_TOKENS` greedy tokens and keeps
  its KV prefix between calls). `llama-cpp-python` has no draft-model decoding of its own (llama.cpp's `-md`
  lives in its C++ examples), so this is the nearest peer to `draft:model=` the binding allows.

A peer that cannot run is never faked: its `status` says why ("not installed" when its package is missing,
"unavailable: ..." when the model is not in a form it reads, "failed: ..." when it broke mid-run).
Every peer strips the trailing stop token, so its token list compares with skipjack's `Result.tokens`.
Forward passes are counted by wrapping the engine's forward (HF) or `eval` (llama.cpp); the prefill pass is
excluded, as in `skipjack.engine.Result.forward_passes`. llama.cpp uses as many threads as torch does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

NUM_PRED_TOKENS = 10  # prompt lookup draft length for hf-pld and llamacpp-pld
DRAFT_FOR = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}  # hf-assist's draft model, by named target


@dataclass
class PeerOut:
    tokens: list[int]  # generated ids, stop token excluded
    seconds: float  # prefill + decode, wall time
    forward_passes: int  # decoding forward passes (prefill excluded)
    prefill_seconds: float | None = None  # time to the first token, where the peer streams (llama.cpp)


class Peer:
    """One peer engine. `status` is "ok" when `run` can be called."""

    name = ""
    status = "ok"

    def run(self, prompt: list[int], max_new_tokens: int, temperature: float, seed: int, stop_ids) -> PeerOut:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Missing(Peer):
    def __init__(self, name: str, status: str):
        self.name, self.status = name, status


class HFPeer(Peer):
    def __init__(self, name: str, model, lookup: int = 0, extra: dict | None = None):
        self.name, self.model, self.lookup, self.extra = name, model, lookup, extra or {}
        self.calls = 0
        model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def run(self, prompt, max_new_tokens, temperature, seed, stop_ids) -> PeerOut:
        from transformers import GenerationConfig

        stop = sorted(stop_ids)
        kw = {"do_sample": False}
        if temperature:
            kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if self.lookup:
            kw["prompt_lookup_num_tokens"] = self.lookup
        assistant = self.extra.get("assistant_model")
        kw |= {k: v for k, v in self.extra.items() if k != "assistant_model"}
        gc = GenerationConfig(
            max_new_tokens=max_new_tokens, eos_token_id=stop or None, pad_token_id=stop[0] if stop else 0, **kw
        )
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        if temperature:
            torch.manual_seed(seed)
        self.calls = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            extra = {"assistant_model": assistant} if assistant is not None else {}
            out = self.model.generate(ids, attention_mask=mask, generation_config=gc, **extra)
        dt = time.perf_counter() - t0
        toks = out[0, len(prompt) :].tolist()
        for i, t in enumerate(toks):  # generate stops at the first stop token (and may pad after it)
            if t in stop_ids:
                toks = toks[:i]
                break
        return PeerOut(toks, dt, max(self.calls - 1, 0))


def gguf_draft(gguf: Path, n_ctx: int, threads: int, n: int = NUM_PRED_TOKENS):
    """A draft model for llama-cpp-python's speculative hook, run by llama.cpp itself on `gguf` (`llamacpp-draft`)."""
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaDraftModel

    class GGUFDraft(LlamaDraftModel):
        def __init__(self):
            self.llm = Llama(
                model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
            )

        def __call__(self, input_ids, /, **kwargs):
            out = []
            gen = self.llm.generate(list(map(int, input_ids)), top_k=1, temp=0.0, repeat_penalty=1.0)  # prefix kept
            for t in gen:
                out.append(t)
                if len(out) >= n:
                    break
            gen.close()
            return np.array(out, dtype=np.intc)

    return GGUFDraft()


class LlamaCppPeer(Peer):
    def __init__(self, name: str, gguf: Path, n_ctx: int, lookup: int = 0, seed: int = 0, draft: Path | None = None):
        from llama_cpp import Llama

        kw = {}
        if lookup or draft:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            kw["draft_model"] = (
                gguf_draft(draft, n_ctx, torch.get_num_threads())
                if draft
                else LlamaPromptLookupDecoding(num_pred_tokens=lookup)
            )
            # llama-cpp-python 0.3.36 sizes its logits buffer from the `logits_all` argument, not from the
            # draft model that forces it on: without this, prompts longer than n_batch (512) fail to broadcast.
            kw["logits_all"] = True
        threads = torch.get_num_threads()
        self.name = name
        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            seed=seed,
            verbose=False,
            **kw,
        )
        self.calls = 0
        inner = self.llm.eval

        def counted(tokens):
            self.calls += 1
            return inner(tokens)

        self.llm.eval = counted  # generate() calls self.eval once per forward pass

    def run(self, prompt, max_new_tokens, temperature, seed, stop_ids) -> PeerOut:
        if temperature:
            self.llm.set_seed(seed)
        self.llm.reset()  # n_tokens = 0: no KV prefix reuse from the previous request (repeats stay honest)
        self.calls = 0
        toks: list[int] = []
        first = None
        t0 = time.perf_counter()
        gen = self.llm.generate(
            prompt, top_k=0 if temperature else 1, top_p=1.0, min_p=0.0, temp=temperature, repeat_penalty=1.0
        )
        try:
            for t in gen:
                first = first if first is not None else time.perf_counter() - t0
                if t in stop_ids:
                    break
                toks.append(int(t))
                if len(toks) >= max_new_tokens:
                    break
        finally:
            gen.close()
        dt = time.perf_counter() - t0
        return PeerOut(toks, dt, max(self.calls - 1, 0), first)

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


def _hf_folder(loaded) -> Path:
    from skipjack.loading.load import convert_gguf

    src = Path(loaded.source)
    return convert_gguf(src)[0] if src.is_file() else src


def _hf_peer(name: str, model, loaded, dtype) -> Peer:
    """An HF peer: plain, prompt lookup, assisted by the named draft model, or early-exit self-speculation."""
    if name == "hf-pld":
        return HFPeer(name, model, NUM_PRED_TOKENS)
    if name == "hf-early-exit":
        return HFPeer(name, model, extra={"assistant_early_exit": model.config.num_hidden_layers // 2})
    if name == "hf-assist":
        draft = DRAFT_FOR.get(loaded.name)
        if draft is None:
            return Missing(name, f"unavailable: no draft model of the same tokenizer is named for {loaded.name}")
        from transformers import AutoModelForCausalLM

        from skipjack.loading.load import convert_gguf, fetch_named

        folder = convert_gguf(fetch_named(draft))[0]
        small = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        return HFPeer(name, model, extra={"assistant_model": small})
    return HFPeer(name, model)


def make_peers(names: list[str], loaded, dtype: str, n_ctx: int, seed: int = 0) -> dict[str, Peer]:
    """Build the requested peers; each one that cannot run comes back as `Missing` with the reason."""
    out: dict[str, Peer] = {}
    hf_names = [n for n in names if n.startswith("hf")]
    if hf_names:
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            from skipjack.loading.load import DTYPES

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            hf_dtype = DTYPES.get(dtype, DTYPES["fp32"])  # a q4 / q8 run compares with HF in fp32
            model = AutoModelForCausalLM.from_pretrained(str(_hf_folder(loaded)), dtype=hf_dtype).eval()
        except ImportError:
            model, why = None, "not installed"
        except Exception as e:  # a model transformers cannot read
            model, why = None, f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        for n in hf_names:
            out[n] = _hf_peer(n, model, loaded, hf_dtype) if model is not None else Missing(n, why)
    for n in (n for n in names if n.startswith("llamacpp")):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            out[n] = Missing(n, "not installed")
            continue
        src = Path(loaded.source)
        if not src.is_file():  # load() only hands back a file path for a GGUF
            out[n] = Missing(n, "unavailable: the model is not a GGUF file")
            continue
        draft = None
        if n == "llamacpp-draft":
            if loaded.name not in DRAFT_FOR:
                out[n] = Missing(n, f"unavailable: no draft model of the same tokenizer is named for {loaded.name}")
                continue
            from skipjack.loading.load import fetch_named

            draft = fetch_named(DRAFT_FOR[loaded.name])
        try:
            out[n] = LlamaCppPeer(n, src, n_ctx, NUM_PRED_TOKENS if n == "llamacpp-pld" else 0, seed, draft)
        except Exception as e:
            out[n] = Missing(n, f"unavailable: {type(e).__name__}: {str(e)[:120]}")
    return {n: out[n] for n in names}


def weight_bytes(peer) -> int | None:
    """Bytes of the weights a peer runs on (HF: its parameters; llama.cpp: the GGUF file)."""
    if isinstance(peer, HFPeer):
        return sum(p.numel() * p.element_size() for p in peer.model.parameters())
    if isinstance(peer, LlamaCppPeer):
        return Path(peer.llm.model_path).stat().st_size
    return None
