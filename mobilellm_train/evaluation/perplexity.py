"""Perplexity: WikiText-2 as MobileLLM's own eval.py measures it, and perplexity on token data.

WikiText-2: the test split's rows joined with "\\n\\n" and tokenized once, BOS first (the HF
LlamaTokenizer call of the original), then cut into non-overlapping windows of `seq_len` tokens,
the remainder dropped. In each window every token but the first is predicted; the perplexity is
exp of the mean NLL over those tokens (the original's mean of per-window means: every window has
the same count). The rows come from the hub's Parquet files (column `text`) or from the original
release's `wiki.test.raw`, read the way the hub's builder reads it: one row per line, newline
kept, whitespace-only lines as "".

Token data: documents from any token source (an iterable of token-id arrays), concatenated and
cut into non-overlapping windows of `seq_len + 1`, input w[:-1] and target w[1:], exactly as the
trainer packs them, so the mean NLL compares with the training loss. `jsonl_documents` reads the
original JSONL layout and `shard_tokens` a prepared shard dataset (data/shards.py);
`token_documents` picks between them. Any other source only has to yield arrays.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mobilellm_train.data.jsonl import DataError, BadLine, find_node_folders, list_jsonl_files, parse_token_ids
from mobilellm_train.evaluation.loading import Tokenizer
from mobilellm_train.evaluation.scoring import Progress, _world
from mobilellm_train.evaluation.tasks import TaskDataError, near_misses

logger = logging.getLogger("mobilellm_train")

# Relative to the data folder, first match wins: the hub's wikitext-2-raw-v1 test split in a
# folder named as the task or as its repository, or the original release's raw file.
WIKITEXT_LAYOUTS = tuple(
    f"{folder}/{pattern}"
    for folder in ("wikitext", "Salesforce/wikitext")
    for pattern in (
        "wikitext-2-raw-v1/test-*.parquet", "test-*.parquet", "wiki.test.raw", "wikitext-2-raw/wiki.test.raw"
    )
) + ("wikitext-2-raw/wiki.test.raw",)


@dataclass
class PerplexityResult:
    nll_sum: float
    num_tokens: int
    """Predicted tokens."""
    num_windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.num_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def find_wikitext(data_dir: str) -> str:
    for pattern in WIKITEXT_LAYOUTS:
        files = sorted(glob.glob(os.path.join(data_dir, pattern)))
        if files:
            if len(files) > 1:
                raise TaskDataError(f"wikitext: several files match {os.path.join(data_dir, pattern)}: {files}")
            return files[0]
    expected = "\n  ".join(os.path.join(data_dir, p) for p in WIKITEXT_LAYOUTS)
    message = f"wikitext: no WikiText-2 test split found; expected one of:\n  {expected}"
    misses = near_misses(data_dir, ("wikitext", "wiki.")) if os.path.isdir(data_dir) else []
    if misses:
        message += ("\n  these files look like it but match none of the above (another split or "
                    "variant?):\n    " + "\n    ".join(os.path.join(data_dir, m) for m in misses))
    raise TaskDataError(message)


def read_wikitext_rows(path: str) -> list[str]:
    """The test split's rows from a Parquet file (column `text`) or a raw text file."""
    if not os.path.isfile(path):
        raise TaskDataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's own error types for non-parquet bytes
            raise TaskDataError(f"{path}: cannot read as Parquet ({e})") from None
        if "text" not in table.column_names:
            raise TaskDataError(f"{path}: no column 'text' (columns: {table.column_names})")
        return [t or "" for t in table.column("text").to_pylist()]
    try:
        with open(path, encoding="utf-8") as f:
            return [line if line.strip() else "" for line in f]
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e})") from None


def wikitext_windows(rows: list[str], tokenizer: Tokenizer, seq_len: int, add_bos: bool = True) -> torch.Tensor:
    """[num_windows, seq_len] non-overlapping windows of the joined, tokenized rows."""
    ids = tokenizer.encode("\n\n".join(rows))
    if add_bos and tokenizer.bos_id >= 0:
        ids = [tokenizer.bos_id] + ids
    num_windows = len(ids) // seq_len
    if num_windows == 0:
        raise TaskDataError(f"wikitext: {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: num_windows * seq_len], dtype=torch.long).view(num_windows, seq_len)


def jsonl_documents(path: str, vocab_size: int) -> Iterator[np.ndarray]:
    """Each line's token ids from the original layout (path/<node>/*.jsonl, or path/*.jsonl), in
    folder then file order; a bad line raises DataError naming file:line."""
    for folder in find_node_folders(path):
        for file in list_jsonl_files(folder):
            with open(file, "rb") as f:
                for line_number, line in enumerate(f, start=1):
                    try:
                        yield parse_token_ids(line, vocab_size)
                    except BadLine as e:
                        raise DataError(f"{file}:{line_number}: {e}") from None


def shard_tokens(folder: str, vocab_size: int, chunk_tokens: int = 1 << 20) -> Iterator[np.ndarray]:
    """A prepared token dataset (data/shards.py: manifest.json and shards) as consecutive chunks
    of its token stream, in manifest order; packing needs no document boundaries."""
    from mobilellm_train.data.shards import TokenStream, read_manifest

    manifest = read_manifest(folder)
    if manifest.max_token_id >= vocab_size:
        raise DataError(
            f"{manifest.path}: token ids up to {manifest.max_token_id}, beyond the model's vocab_size {vocab_size}"
        )
    stream = TokenStream(manifest)
    for start in range(0, stream.num_tokens, chunk_tokens):
        chunk = np.empty(min(chunk_tokens, stream.num_tokens - start), dtype=np.int64)
        stream.read(start, chunk)
        yield chunk


def token_documents(path: str, vocab_size: int) -> Iterator[np.ndarray]:
    """The token source for `path`: a prepared shard dataset when it holds manifest.json, else
    the JSONL layout."""
    from mobilellm_train.data.shards import is_dataset

    return shard_tokens(path, vocab_size) if is_dataset(path) else jsonl_documents(path, vocab_size)


def pack_windows(documents: Iterable[np.ndarray], window_len: int, max_windows: int = 0) -> torch.Tensor:
    """[num_windows, window_len]: the documents concatenated and cut, remainder dropped; at most
    `max_windows` when > 0 (the source is read only as far as needed)."""
    windows, buffer = [], np.zeros(0, dtype=np.int64)
    for doc in documents:
        buffer = np.concatenate((buffer, np.asarray(doc, dtype=np.int64)))
        while buffer.size >= window_len:
            windows.append(buffer[:window_len])
            buffer = buffer[window_len:]
            if max_windows and len(windows) == max_windows:
                return torch.from_numpy(np.stack(windows))
    if not windows:
        raise DataError(f"token data holds fewer than one window of {window_len} tokens")
    return torch.from_numpy(np.stack(windows))


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 8, description: str = "perplexity"
) -> PerplexityResult:
    """Mean NLL of predicting w[1:] from w[:-1] over every window. Call it on every rank of a
    (possibly FSDP-wrapped) model: each rank takes every world_size-th window, forward calls are
    matched across ranks and every rank returns the global result."""
    rank, world_size = _world()
    device = next(model.parameters()).device
    local = windows[rank::world_size]
    num_batches = math.ceil(len(local) / batch_size)
    if world_size > 1:
        most = torch.tensor(num_batches, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        num_batches = int(most.item())
    was_training = model.training
    model.eval()
    progress = Progress(len(local), description, enabled=rank == 0)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    begin = time.perf_counter()
    try:
        for b in range(num_batches):
            batch = local[b * batch_size : (b + 1) * batch_size].to(device)
            if len(batch) == 0:
                model(windows[:1, :-1].to(device))  # a dummy forward, so ranks call forward equally
                continue
            # The model computes the loss itself (in chunks, fp32), so [batch, seq_len, vocab]
            # logits are never materialised; its mean times the count is the sum.
            mean_nll = model(batch[:, :-1], labels=batch[:, 1:])
            nll_sum += mean_nll.double() * batch[:, 1:].numel()
            progress.update(len(batch))
    finally:
        model.train(was_training)
    num_tokens = float(len(local) * (windows.shape[1] - 1))
    counts = torch.stack([nll_sum, torch.tensor(num_tokens, dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(counts)
    result = PerplexityResult(counts[0].item(), int(counts[1].item()), len(windows))
    if rank == 0:
        logger.info(
            "%s: perplexity %.3f (mean NLL %.4f) over %d windows, %d tokens (%.1fs)", description,
            result.perplexity, result.mean_nll, result.num_windows, result.num_tokens, time.perf_counter() - begin)
    return result
