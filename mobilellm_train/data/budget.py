"""The data budget: whether a run's steps fit in its data's windows, and what it lacks if not.

    budget = data_budget(loader.sampler, total_steps, global_batch_size)   # pure arithmetic
    check_data_budget(loader, total_steps)   # at start-up: logs once when some steps repeat data
    coverage_summary(num_tokens, seq_len, global_batch_size)   # mobilellm-prepare's summary line

No torch here: mobilellm-prepare imports it. A sampler is anything with .mixture (counts,
block_size and the per-block pattern of data/loader.py's Mixture), .seq_len and .sources (each
with .num_windows and .manifest.num_tokens, .manifest.folder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class DataBudget:
    """What total_steps steps of global_batch_size samples take from each source."""

    total_samples: int
    windows: list[int]
    """Per source: its windows (one epoch)."""
    samples: list[int]
    """Per source: the samples the run takes from it."""
    tokens_missing: list[int]
    """Per source: how many more tokens it would need for no window to be seen twice (0: none)."""
    first_repeat_step: int | None
    """The first step (counted from 1, as training does) with a window seen before; None: none is."""
    repeat_steps: int
    """Steps from first_repeat_step to the last: those that see data again."""


def data_budget(sampler, total_steps: int, global_batch_size: int) -> DataBudget:
    """Whether a run of total_steps steps fits in one epoch of every source (pure arithmetic)."""
    mix, T = sampler.mixture, sampler.seq_len
    total = total_steps * global_batch_size
    blocks, rest = divmod(total, mix.block_size)
    windows, samples, missing, first = [], [], [], None
    for s, src in enumerate(sampler.sources):
        n, c = src.num_windows, int(mix.counts[s])
        taken = blocks * c + int(np.sum(mix._source_of[:rest] == s))
        windows.append(n)
        samples.append(taken)
        missing.append(max(0, taken * (T + 1) - src.manifest.num_tokens))
        if taken > n:  # source s's sample j = n (its first repeat) is global sample g:
            block, r = divmod(n, c)
            place = int(np.flatnonzero((mix._source_of == s) & (mix._rank_in_block == r))[0])
            g = block * mix.block_size + place
            first = g if first is None else min(first, g)
    first_step = None if first is None else first // global_batch_size + 1
    repeat_steps = 0 if first_step is None else total_steps - first_step + 1
    return DataBudget(total, windows, samples, missing, first_step, repeat_steps)


def check_data_budget(loader, total_steps: int) -> DataBudget:
    """At start-up: warn once when the run's samples exceed its data's windows, saying how many steps
    will see data again and how many more tokens would avoid it."""
    budget = data_budget(loader.sampler, total_steps, loader.global_batch_size)
    if budget.first_repeat_step is not None:
        short = [f"{src.manifest.folder}: {w:,} windows for {n:,} samples, {m:,} tokens short"
                 for src, w, n, m in zip(loader.sampler.sources, budget.windows, budget.samples,
                                         budget.tokens_missing) if m > 0]
        logger.warning(
            "the run's %d steps x %d samples of %d tokens (%s samples) exceed its data: from step %d on, "
            "the last %d steps see data again (reshuffled). %s. More tokens would avoid it; fewer steps too",
            total_steps, loader.global_batch_size, loader.sampler.seq_len + 1, f"{budget.total_samples:,}",
            budget.first_repeat_step, budget.repeat_steps, "; ".join(short),
        )
    return budget


def coverage_summary(num_tokens: int, seq_len: int, global_batch_size: int) -> str:
    """For mobilellm-prepare's summary: the windows num_tokens make and the steps they cover."""
    windows = num_tokens // (seq_len + 1)
    steps = windows // global_batch_size
    return (f"{windows:,} windows of seq_len + 1 = {seq_len + 1} tokens: {steps:,} steps of global batch "
            f"{global_batch_size} before any window repeats")
