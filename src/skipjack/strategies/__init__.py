"""Lossy per-layer strategies, by method name (`--method ffn-skip`, `layer-skip:ratio=0.25`, `skipdecode`,
`dola:layers=high`, `lol`).
Each is one file behind `skipjack.strategies.base.Strategy`; the method registry (`skipjack.drafters`) makes
them from a spec like a drafter."""

from __future__ import annotations

from skipjack.strategies.base import Strategy
from skipjack.strategies.dola import DoLa
from skipjack.strategies.ffn_skip import FFNSkip
from skipjack.strategies.layer_skip import LayerSkip
from skipjack.strategies.lol import LOL
from skipjack.strategies.skipdecode import SkipDecode

STRATEGIES = {"ffn-skip": FFNSkip, "layer-skip": LayerSkip, "skipdecode": SkipDecode, "dola": DoLa, "lol": LOL}

__all__ = ["STRATEGIES", "DoLa", "FFNSkip", "LayerSkip", "LOL", "SkipDecode", "Strategy"]
