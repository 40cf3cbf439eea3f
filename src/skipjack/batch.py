"""Continuous batching: sequences decoded together, one forward pass per step for all of them (as in Orca and
vLLM, on a CPU whose step time is the weights' streaming, nearly flat in the batch).

A sequence joins after its prompt's own forward pass (the prefill in `Sequence`), and leaves as soon as it
finishes or is dropped (a client gone). Each step, every live sequence drafts with its own method and draft
length, all of them run in one `DecoderLM.forward_batch` (rows concatenated through the linears, each
sequence's rows attending only to its own cache), and each verifies its own draft. The pass's rows are capped
at `MAX_DRAFT + 1`, the widest the batch-invariant q4/q8 kernels take: with B sequences each drafts at most
(MAX_DRAFT + 1) // B - 1 nodes, so speculation turns down as the batch grows (vLLM's `disable_by_batch_size`,
from the kernels' width). A sequence alone steps exactly as `generate` steps it. Where the forward is
batch-invariant, a batched sequence's tokens equal its tokens alone (a test checks it); elsewhere (fp32 or
bf16 dense GEMMs) rounding can differ.
"""

from __future__ import annotations

from skipjack.decode import Sequence, Step
from skipjack.limits import MAX_DRAFT

MAX_ROWS = MAX_DRAFT + 1  # rows of one batched pass at most (and so sequences in a batch at most)


class Batch:
    def __init__(self, model, rows: int = MAX_ROWS):
        self.model, self.rows = model, rows
        self.live: list[Sequence] = []

    def add(self, seq: Sequence) -> Step:
        """Admit a prefilled sequence; returns its first step (a sequence that ends there is closed)."""
        if len(self.live) >= self.rows:
            raise ValueError(f"a batch holds at most {self.rows} sequences")
        step = seq.first()
        if step.finish:
            seq.close()
        else:
            self.live.append(seq)
        return step

    def drop(self, seq: Sequence) -> None:
        """Remove a sequence between steps (its cache is whole) and close it."""
        if seq in self.live:
            self.live.remove(seq)
        seq.close()

    def step(self) -> list[tuple[Sequence, Step]]:
        """One step of every live sequence; finished ones leave the batch (closed)."""
        live = list(self.live)
        if len(live) == 1:
            out = [(live[0], live[0].advance())]
        elif live:
            cap = max(0, self.rows // len(live) - 1)
            segs = [s.plan(cap, full=True) for s in live]
            want = {i for s in live if s.proposal is not None for i in s.proposal.want}
            outs = self.model.forward_batch(segs, want)
            out = [(s, s.settle(o, None)) for s, o in zip(live, outs)]
        else:
            out = []
        for s, st in out:
            if st.finish:
                self.drop(s)
        return out
