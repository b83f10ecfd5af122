"""The training batches: each step's micro-batches from the loader, and repositioning the loader
after a spike rewind restored an earlier checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mobilellm_train.run_parts import RunParts


class StepBatches:
    """`accum_steps` micro-batches per optimizer step from `loader`. The live iterator is also
    `parts.data_iter`, so that a failing run stops its workers first."""

    def __init__(self, loader: Iterable[dict], accum_steps: int, parts: RunParts):
        self.loader = loader
        self.accum_steps = accum_steps
        self.parts = parts
        self.iterator = None

    def start(self) -> None:
        """A fresh iterator at the loader's current position (the restored one after a load)."""
        self.iterator = self.parts.data_iter = iter(self.loader)

    def next_step(self) -> list[dict]:
        return [next(self.iterator) for _ in range(self.accum_steps)]

    def restart(self, skip_steps: int) -> None:
        """After a checkpoint load: continue `skip_steps` optimizer steps past the restored position
        (past the data that led to a spike). Prepared shards move there directly, without reading
        a batch (one number changes); the JSONL layout's reader has no such move and reads past
        the batches."""
        if hasattr(self.loader, "skip_steps"):
            self.loader.skip_steps(skip_steps)
            self.start()
            return
        self.start()
        for _ in range(skip_steps * self.accum_steps):
            next(self.iterator)
