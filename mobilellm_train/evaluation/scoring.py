"""Multiple-choice scoring as lm-evaluation-harness does it, batched, on one process or on every
rank of an FSDP-wrapped model.

A choice's score is the summed log-probability of its continuation tokens given the context.
Tokenization is the harness's `_encode_pair`: trailing spaces of the context move to the front of
the continuation, `context + continuation` is encoded whole and the continuation's tokens are
what follows the context's own encoding. Sequences longer than the model's max_seq_len lose
tokens from the left. acc takes the highest score; acc_norm the highest score divided by the
choice's length in characters (the harness's `len(choice)`; for ASCII, its bytes).

BOS: the current harness lets the tokenizer decide, and MobileLLM's LlamaTokenizer prepends
BOS, so contexts start with BOS by default (`add_bos=False` matches harness versions that
encoded without special tokens).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mobilellm_train.evaluation.loading import Tokenizer
from mobilellm_train.evaluation.tasks import TASKS, Example, load_task

logger = logging.getLogger("mobilellm_train")


@dataclass
class TaskResult:
    name: str
    acc: float
    acc_norm: float
    num_examples: int

    @property
    def metric(self) -> str:
        """The metric the MobileLLM table reports for this task."""
        return TASKS[self.name].table_metric if self.name in TASKS else "acc"

    @property
    def score(self) -> float:
        return getattr(self, self.metric)


class Progress:
    """Logs `done/total` with a rate and an ETA at most every `interval_s` seconds, and at the end."""

    def __init__(self, total: int, description: str, interval_s: float = 10.0, enabled: bool = True):
        self.total, self.description, self.interval_s, self.enabled = total, description, interval_s, enabled
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.logged = False

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        # The closing line only completes earlier ones: a quick task gets just its result line.
        due = now - self.last >= self.interval_s or (self.done >= self.total and self.logged)
        if not self.enabled or not due:
            return
        self.last, self.logged = now, True
        rate = self.done / max(now - self.start, 1e-9)
        eta_s = (self.total - self.done) / rate if rate > 0 else 0.0
        logger.info("%s: %d/%d (%.0f%%), %.1f/s, eta %.0fs", self.description, self.done, self.total,
                    100.0 * self.done / max(self.total, 1), rate, eta_s)


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str, add_bos: bool = True
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness tokenizes a loglikelihood request."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    if not context:
        # The harness conditions an empty context on the end-of-text token.
        return prefix or [tokenizer.eos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        # The context's last token absorbed the whole continuation (cannot happen with a space
        # in front); score the continuation's own encoding rather than nothing.
        continuation_ids = tokenizer.encode(continuation)
    return prefix + context_ids, continuation_ids


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int,
    max_seq_len: int,
    num_batches: int = 0,
    pad_to_multiple: int = 16,
    progress: Progress | None = None,
) -> list[float]:
    """log p(continuation | context) summed over the continuation's tokens, per pair.

    Pairs are run longest first in batches of `batch_size`, right-padded to a multiple of
    `pad_to_multiple` (fewer distinct shapes for compiled blocks; causal attention keeps padding
    out of the scored positions). With `num_batches` larger than this call needs, it runs the
    difference as dummy forwards: under FSDP every rank must call forward equally often.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    scores = [0.0] * len(pairs)
    for b in range(max(num_batches, len(batches))):
        if b >= len(batches):
            model(torch.zeros((1, min(pad_to_multiple, max_seq_len)), dtype=torch.long, device=device))
            continue
        rows, scored = [], []
        for i in batches[b]:
            context_ids, continuation_ids = pairs[i]
            if not 0 < len(continuation_ids) <= max_seq_len:
                raise ValueError(f"continuation of {len(continuation_ids)} tokens; the model takes 1..{max_seq_len}")
            # The last token is only ever a target; left-truncate to the model's length.
            sequence = (context_ids + continuation_ids)[-(max_seq_len + 1) :][:-1]
            rows.append(sequence)
            scored.append((len(sequence), continuation_ids))
        length = min(_round_up(max(map(len, rows)), pad_to_multiple), max_seq_len)
        tokens = torch.zeros((len(rows), length), dtype=torch.long)
        for r, sequence in enumerate(rows):
            tokens[r, : len(sequence)] = torch.tensor(sequence)
        logits = model(tokens.to(device, non_blocking=True))
        # Gather only the scored positions before the softmax: [tokens, vocab] instead of
        # [batch, length, vocab] in fp32.
        row_index = torch.cat([torch.full((len(c),), r) for r, (_, c) in enumerate(scored)])
        positions = torch.cat([torch.arange(n - len(c), n) for n, c in scored])
        targets = torch.cat([torch.tensor(c) for _, c in scored]).to(device)
        picked = logits[row_index.to(device), positions.to(device)].float()
        token_logprobs = F.log_softmax(picked, dim=-1).gather(1, targets[:, None]).squeeze(1).cpu()
        start = 0
        for i, (_, continuation_ids) in zip(batches[b], scored):
            scores[i] = token_logprobs[start : start + len(continuation_ids)].sum().item()
            start += len(continuation_ids)
        if progress is not None:
            progress.update(len(rows))
    return scores


def choose(scores: list[float], lengths: list[int] | None = None) -> int:
    """The index of the best choice (the first on ties, as numpy's argmax), by score or by
    score per character."""
    if lengths is not None:
        scores = [s / max(n, 1) for s, n in zip(scores, lengths)]
    return max(range(len(scores)), key=scores.__getitem__)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def score_examples(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: list[Example],
    batch_size: int = 32,
    add_bos: bool = True,
    pad_to_multiple: int = 16,
    description: str = "",
) -> tuple[float, float, int]:
    """(acc correct count, acc_norm correct count, examples) over `examples`; on several ranks,
    each rank scores every world_size-th example and the counts are summed over ranks."""
    rank, world_size = _world()
    local = examples[rank::world_size]
    pairs, owners = [], []
    for e, example in enumerate(local):
        for context, continuation in example.requests:
            pairs.append(encode_pair(tokenizer, context, continuation, add_bos))
            owners.append(e)
    device = next(model.parameters()).device
    num_batches = math.ceil(len(pairs) / batch_size)
    if world_size > 1:
        most = torch.tensor(num_batches, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        num_batches = int(most.item())
    progress = Progress(len(pairs), description or "scoring", enabled=rank == 0)
    max_seq_len = _max_seq_len(model)
    scores = continuation_logprobs(model, pairs, batch_size, max_seq_len, num_batches, pad_to_multiple, progress)
    per_example: list[list[float]] = [[] for _ in local]
    for owner, score in zip(owners, scores):
        per_example[owner].append(score)
    correct = correct_norm = 0
    for example, example_scores in zip(local, per_example):
        correct += choose(example_scores) == example.gold
        correct_norm += choose(example_scores, [len(c) for c in example.choices]) == example.gold
    counts = torch.tensor([correct, correct_norm, len(local)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    correct, correct_norm, total = counts.tolist()
    return correct, correct_norm, int(total)


def _max_seq_len(model: nn.Module) -> int:
    # FSDP and compile keep the MobileLLM as the root module (FSDP swaps its class in place),
    # so its args are there.
    return model.args.max_seq_len


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Tokenizer,
    tasks: list[str],
    data_dir: str,
    batch_size: int = 32,
    max_examples_per_task: int = 0,
    add_bos: bool = True,
    pad_to_multiple: int = 16,
) -> dict[str, TaskResult]:
    """Zero-shot accuracy per task. Call it on every rank of a (possibly FSDP-wrapped) model:
    examples are split over the ranks, forward calls are matched across ranks, and every rank
    returns the same, global results. `max_examples_per_task` > 0 takes each task's first N."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name in tasks:
            examples = load_task(name, data_dir, limit=max_examples_per_task)
            begin = time.perf_counter()
            correct, correct_norm, total = score_examples(
                model, tokenizer, examples, batch_size, add_bos, pad_to_multiple, description=name
            )
            results[name] = TaskResult(name, correct / total, correct_norm / total, total)
            logger.info("%s: acc %.4f, acc_norm %.4f over %d examples (%.1fs)", name,
                        results[name].acc, results[name].acc_norm, total, time.perf_counter() - begin)
    finally:
        model.train(was_training)
    return results
