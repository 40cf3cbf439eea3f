"""FFN-SkipLLM (Jaiswal et al. 2024, "FFN-SkipLLM: A Hidden Gem for Autoregressive Decoding with Adaptive Feed
Forward Skipping").

The FFN blocks of the middle layers change the residual stream little: the cosine similarity between a
block's input and output "saturates" near 1. Input-adaptive skipping, attention always run (so every layer's
keys are written and the KV cache is untouched):

1. Full steps: the first `warmup` generated tokens, and then one in every `period`, run every FFN and record,
   per layer, the cosine between the residual stream before and after its FFN.
2. The skip set is recomputed at each full step: among the middle layers (the first `keep_first` and last
   `keep_last` layers always run their FFN), those whose FFN cosine, averaged over the last `window` full
   steps, reaches `threshold`, the most saturated first, at most `max_share` of all the layers (the paper
   skips 25-30% of FFN blocks). The tokens until the next full step skip their FFNs.

The paper skips every middle FFN after the first saturated layer; on small models (SmolLM2-135M's FFN cosines
sit at 0.96-0.98 from layer 1 on) that removes nearly all of them, so here each layer qualifies on its own
cosine and the share is capped. A higher threshold or a lower cap skips less. `stats` reports the share of
FFN blocks skipped.
"""

from __future__ import annotations

from collections import deque

import torch

from skipjack.errors import SkipjackError
from skipjack.strategies.base import Strategy, count, fraction


class FFNSkip(Strategy):
    name = "ffn-skip"

    def __init__(
        self,
        threshold: float = 0.98,
        max_share: float = 0.3,
        warmup: int = 4,
        period: int = 8,
        window: int = 4,
        keep_first: int = 2,
        keep_last: int = 2,
    ):
        self.threshold = fraction(self.name, "threshold", threshold, top_open=False)
        self.max_share = fraction(self.name, "max_share", max_share, top_open=False)
        self.warmup, self.period = count(self.name, "warmup", warmup, 1), count(self.name, "period", period, 1)
        self.window = count(self.name, "window", window, 1)
        self.keep_first, self.keep_last = (
            count(self.name, "keep_first", keep_first),
            count(self.name, "keep_last", keep_last),
        )

    def begin(self, model, prompt_len: int, max_new: int) -> None:
        super().begin(model, prompt_len, max_new)
        if self.keep_first + self.keep_last > model.num_layers:
            raise SkipjackError(f"ffn-skip: keep_first + keep_last exceeds the model's {model.num_layers} layers")
        self.recent: deque[torch.Tensor] = deque(maxlen=self.window)  # per full step: [L] FFN cosines
        self.skip: list[int] = []

    def full(self, t: int) -> bool:
        return t < self.warmup or (t - self.warmup) % self.period == 0

    def forward(self, model, ids, cache, index: int):
        T, outs, a = ids.shape[1], [], 0
        while a < T:
            if self.full(index + a):  # one token, every FFN, cosines recorded
                out = model(ids[:, a : a + 1], cache, trace=True)
                L = model.num_layers
                self.recent.append(torch.stack([out.trace[i][1][0, -1].float() for i in range(L)]))  # [L]
                self._plan(L)
                self.count(1, L, 0)
                b = a + 1
            else:  # up to the next full step, the current skip set
                b = a + 1
                while b < T and not self.full(index + b):
                    b += 1
                out = model(ids[:, a:b], cache, skip_ffn=self.skip)
                self.count(b - a, model.num_layers, (b - a) * len(self.skip))
            outs.append(out)
            a = b
        if len(outs) > 1:
            outs[-1].logits = torch.cat([o.logits for o in outs], 1)  # [1, T, V]
        return outs[-1]

    def _plan(self, L: int) -> None:
        cos = torch.stack(list(self.recent)).mean(0)  # [L]
        middle = [i for i in range(self.keep_first, L - self.keep_last) if float(cos[i]) >= self.threshold]
        most = sorted(middle, key=lambda i: -float(cos[i]))[: int(self.max_share * L)]
        self.skip = sorted(most)
