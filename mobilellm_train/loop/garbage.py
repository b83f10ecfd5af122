"""Garbage collection at fixed steps: automatic collection off for the run, generation 1 every
`training.gc_freq` steps and a full pass every `training.gc_full_freq`.
"""

from __future__ import annotations

import gc



class GarbageCollection:
    """Python's cyclic garbage collector at fixed steps instead of at random points.

    An automatic collection pauses one rank at an arbitrary moment and every other rank waits for
    it at the next collective. So automatic collection is off from construction until `close()`;
    `collect(step)` runs a cheap generation-1 pass every `gen1_freq` steps (what a training step's
    short-lived cycles reach) and a full pass, which walks every object, every `full_freq` steps.
    """

    def __init__(self, gen1_freq: int, full_freq: int):
        self.gen1_freq = gen1_freq
        self.full_freq = full_freq
        self.was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()  # start-up garbage (model build, compile) goes now, before the timed steps

    def collect(self, step: int) -> None:
        if self.full_freq and step % self.full_freq == 0:
            gc.collect()
        elif step % self.gen1_freq == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.was_enabled:
            gc.enable()
