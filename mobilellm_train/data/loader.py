"""The training data loader over prepared token shards: one global sample order, exact resume on
any number of data-parallel ranks, weighted mixtures, per-document position ids, validation.

    loader = build_token_loader("/data/web:0.7,/data/code:0.3", seq_len=2048, local_batch_size=32,
                                global_batch_size=1024, dp_rank=rank, dp_world_size=world_size,
                                seed=0, num_workers=2, pin_memory=True)
    for batch in loader: ...        # {"input", "label"}: LongTensor[B, T] (+ "position_ids")
    loader.state_dict()             # {"samples_consumed": ..., ...}, the same on every rank

The order, step by step (docs/DATA.md has the full statement and its guarantees):

1. Windows. Each source's shards, concatenated in manifest order, are one token stream; window i
   is tokens [i*(T+1), (i+1)*(T+1)) (T = seq_len), so documents are packed across, as the original
   code does; input = w[:-1], label = w[1:]. The last num_tokens mod (T+1) tokens are never used.
2. Shuffle. Sample j of a source is window perm_e(j mod n) of epoch e = j // n, n its window
   count. perm_e is a Feistel-network bijection on [0, n) keyed by (seed, epoch, source index),
   evaluated on the fly: no index array (an int64 permutation of the 488M windows of 1T tokens
   would take 3.9 GB per process). Each epoch reshuffles; the start of one is logged.
3. Mixture. Global sample g goes to source s and that source's sample j by a fixed pattern over
   blocks of MIXTURE_BLOCK_SIZE samples: in every block source s gets round(w_s * block) samples,
   spread evenly. A pure function of g, so sources wrap into their next epochs independently.
4. Ranks. Step k uses global samples [kG, (k+1)G), G = global_batch_size; rank r of W takes
   [kG + rG/W, kG + (r+1)G/W) in micro-batches of local_batch_size, loader worker w of N
   producing micro-batches w, w+N, ... (the DataLoader hands them out round-robin).

So the position is one number, samples_consumed = steps x G, independent of the rank count and of
the workers; state_dict() counts only what the trainer has taken (workers prefetch ahead), and
load_state_dict() restarts the workers at that position: a run saved on 8 ranks continues on 4 or
16 with the next unseen sample, and within an epoch no sample is seen twice or skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

from mobilellm_train.data.budget import DataBudget, check_data_budget, coverage_summary, data_budget  # noqa: F401
from mobilellm_train.data.jsonl import ignore_stop_signals, quiet_stateful_dataloader
from mobilellm_train.data.sources import parse_sources  # noqa: F401 (part of the loader's interface)
from mobilellm_train.distill.cache import TeacherLogitsStream, open_teacher_logits
from mobilellm_train.errors import DataError
from mobilellm_train.data.shards import (
    VERIFIED_FILE,
    Manifest,
    TokenStream,
    check_shard_sizes,
    check_tokenizer,
    read_manifest,
    unverified_shards,
    verify_shards,
)

logger = logging.getLogger(__name__)

MIXTURE_BLOCK_SIZE = 10_000
"""Mixture weights are realised exactly in every block of this many global samples (1e-4 resolution)."""
VAL_SEED = 0
"""Validation windows are the first ones of this seed's epoch-0 order: the same for every run."""

_FEISTEL_ROUNDS = 6
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


# ---------------------------------------------------------------------------------------------
# The order: a keyed permutation per (source, epoch), and the mixture.


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a cheap, well-mixing hash of uint64 (numpy wraps the products)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX_1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX_2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A pseudo-random bijection of [0, n), keyed by (seed, epoch, stream), in O(1) memory.

    A balanced Feistel network is a bijection of [0, 4^h) for any round function; the smallest
    4^h >= n is at most 4n, and cycle walking (re-applying it until the value falls below n)
    restricts it to a bijection of [0, n) in fewer than 4 applications on average.
    """

    def __init__(self, n: int, seed: int, epoch: int, stream: int = 0):
        if n < 1:
            raise ValueError(f"cannot permute {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = np.random.SeedSequence([seed, epoch, stream]).generate_state(_FEISTEL_ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << half) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        i = np.asarray(i, dtype=np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.n):
            raise IndexError(f"permutation of {self.n} elements indexed outside [0, {self.n})")
        x = self._encrypt(i.astype(np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class Mixture:
    """Global sample index -> (source, index within that source), a pure function of the index.

    Within each block of block_size samples, source s gets counts[s] (weights rounded by largest
    remainder, so they sum to block_size), its k-th one at the place (k + 0.5) / counts[s] of the block.
    """

    def __init__(self, weights: list[float], block_size: int = MIXTURE_BLOCK_SIZE):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise DataError(f"mixture weights must be positive numbers, got {list(weights)}")
        share = w / w.sum() * block_size
        counts = np.floor(share).astype(np.int64)
        by_remainder = np.argsort(-(share - counts), kind="stable")
        counts[by_remainder[: block_size - int(counts.sum())]] += 1
        if np.any(counts == 0):
            raise DataError(
                f"mixture weights {list(weights)}: source {int(np.argmin(counts))} would get no sample in "
                f"{block_size}; weights must be at least 1/{block_size} of the total"
            )
        self.block_size = block_size
        self.counts = counts
        self.weights = (counts / block_size).tolist()
        source = np.repeat(np.arange(w.size), counts)
        rank = np.concatenate([np.arange(c) for c in counts])
        place = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
        order = np.lexsort((source, place))
        self._source_of = source[order]
        self._rank_in_block = rank[order]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        block, pos = np.divmod(np.asarray(g, dtype=np.int64), self.block_size)
        source = self._source_of[pos]
        return source, block * self.counts[source] + self._rank_in_block[pos]


# ---------------------------------------------------------------------------------------------
# Sources: manifests checked before training, and the sampler that turns indices into batches.


@dataclass
class Source:
    """One prepared dataset as the sampler reads it."""

    manifest: Manifest
    stream: TokenStream
    num_windows: int
    teacher: TeacherLogitsStream | None = None
    """The teacher's cached top-K values for this data (distill.logits), read beside the tokens."""


def open_sources(
    sources: list[tuple[str, float]],
    seq_len: int,
    vocab_size: int | None,
    tokenizer_path: str,
    verify_checksums: bool,
    dp_rank: int,
    dp_world_size: int,
) -> list[Source]:
    """Read and check every source before training: manifest, file sizes, tokenizer, token range,
    enough tokens for a window; and (verify_checksums) that each shard is as its full verification
    recorded it (verified.json: a stat per file, no reading). Shards the record does not vouch for
    are hashed now, split over the ranks (rank r of W hashes the unvouched ones among shards r,
    r+W, ... over all sources), and the run is told how to record a full verification once."""
    manifests = [read_manifest(path) for path, _ in sources]
    tokenizers = {m.tokenizer["sha256"]: m.folder for m in manifests if m.tokenizer and "sha256" in m.tokenizer}
    if len(tokenizers) > 1:
        raise DataError(f"the data sources were made with different tokenizers: {', '.join(tokenizers.values())}")
    out = []
    for m in manifests:
        signatures = check_shard_sizes(m)
        check_tokenizer(m, tokenizer_path)
        if vocab_size is not None:
            if m.max_token_id >= vocab_size:
                worst = max(m.shards, key=lambda s: s.max_token_id)
                raise DataError(
                    f"{m.folder}/{worst.name}.bin: token id {worst.max_token_id} is outside the model's "
                    f"vocabulary [0, {vocab_size}) (max_token_id in {m.path})"
                )
            if m.vocab_size > vocab_size:
                logger.warning("%s: prepared with vocab %d > the model's %d (its ids all fit)",
                               m.folder, m.vocab_size, vocab_size)
        num_windows = m.num_tokens // (seq_len + 1)
        if num_windows == 0:
            raise DataError(
                f"{m.folder}: {m.num_tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}"
            )
        out.append(Source(m, TokenStream(m, vocab_size, signatures if verify_checksums else None), num_windows))
    if verify_checksums:
        _check_recorded_verification(out, dp_rank, dp_world_size)
    else:
        logger.warning(
            "data checksums not verified (--data.verify_checksums false): %d shards checked for size only",
            sum(len(m.shards) for m in manifests)
        )
    return out


def _check_recorded_verification(sources: list[Source], dp_rank: int, dp_world_size: int) -> None:
    first = 0  # global index of each source's first shard
    for src in sources:
        m = src.manifest
        todo, why = unverified_shards(m, src.stream.signatures)
        if todo:
            mine = [i for i in todo if (first + i) % dp_world_size == dp_rank]
            seconds = verify_shards(m, mine)
            logger.warning(
                "%s: %s; hashed %d of the %d unvouched shards (this rank's share of %d ranks) in %.1f s. "
                "Run `mobilellm-prepare verify %s` once: it hashes every shard and records it in %s, and "
                "later starts check only sizes and that record", m.folder, why, len(mine), len(todo),
                dp_world_size, seconds, m.folder, VERIFIED_FILE,
            )
        else:
            logger.info("%s: all %d shards as verified in full before (%s); sizes and stat checked",
                        m.folder, len(m.shards), VERIFIED_FILE)
        first += len(m.shards)


class Sampler:
    """Global sample indices -> a batch: the order of the module docstring, steps 1 to 3."""

    def __init__(self, sources: list[Source], weights: list[float], seq_len: int, seed: int, doc_mask: bool,
                 block_size: int = MIXTURE_BLOCK_SIZE):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sources = sources
        self.mixture = Mixture(weights, block_size)
        self.seq_len, self.seed, self.doc_mask = seq_len, seed, doc_mask
        self._perms: dict[tuple[int, int], Permutation] = {}

    def _permutation(self, source: int, epoch: int) -> Permutation:
        perm = self._perms.get((source, epoch))
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = Permutation(self.sources[source].num_windows, self.seed, epoch, source)
            self._perms[(source, epoch)] = perm
        return perm

    def windows(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, window index in that source) of each global sample index."""
        source, j = self.mixture.locate(g)
        window = np.empty_like(j)
        for s in np.unique(source):
            sel = source == s
            n = self.sources[s].num_windows
            epoch, i = np.divmod(j[sel], n)
            win = np.empty_like(i)
            for e in np.unique(epoch):
                at = epoch == e
                win[at] = self._permutation(int(s), int(e))(i[at])
                if e > 0 and np.any(i[at] == 0):
                    logger.info(
                        "data source %s: epoch %d done after %d samples; epoch %d starts, reshuffled by "
                        "(seed %d, epoch %d)", self.sources[s].manifest.folder, e - 1, n, e, self.seed, e,
                    )
            window[sel] = win
        return source, window

    def batch(self, g: np.ndarray) -> dict[str, torch.Tensor]:
        return self.read_windows(*self.windows(g))

    def read_windows(self, source: np.ndarray, window: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of these windows (by source and window index): "input", "label", with doc_mask
        "position_ids", and with a teacher cache "teacher_ids" and "teacher_logprobs" [B, T, K]."""
        T = self.seq_len
        tokens = np.empty((len(window), T + 1), dtype=np.int64)
        for row, (s, w) in enumerate(zip(source.tolist(), window.tolist())):
            self.sources[s].stream.read(w * (T + 1), tokens[row])
        # All tensors of a batch are views of one buffer: a worker then hands over one shared-memory
        # segment per batch, not one per tensor (the segment setup, not the bytes, is the cost).
        out = np.empty((3 if self.doc_mask else 2, len(window), T), dtype=np.int64)
        out[0], out[1] = tokens[:, :-1], tokens[:, 1:]
        if self.doc_mask:
            steps = np.arange(T, dtype=np.int64)
            for row, (s, w) in enumerate(zip(source.tolist(), window.tolist())):
                starts = self.sources[s].stream.document_starts(w * (T + 1), T)
                last_start = np.zeros(T, dtype=np.int64)
                last_start[starts] = starts
                out[2, row] = steps - np.maximum.accumulate(last_start)
        batch = dict(zip(("input", "label", "position_ids"), torch.from_numpy(out).unbind(0)))
        if self.sources[0].teacher is not None:  # a cache is refused with a mixture (config check)
            cache = self.sources[0].teacher
            ids, logprobs = (np.empty((len(window), T, cache.top_k), dtype=d) for d in cache.dtypes)
            for row, w in enumerate(window.tolist()):
                cache.read(w * (T + 1), ids[row], logprobs[row])
            batch.update(teacher_ids=torch.from_numpy(ids), teacher_logprobs=torch.from_numpy(logprobs))
        return batch

    def fingerprint(self) -> str:
        """What a saved position depends on: each source's data and weight, as text."""
        return ",".join(f"{src.manifest.fingerprint()}:{c}" for src, c in zip(self.sources, self.mixture.counts))


# ---------------------------------------------------------------------------------------------
# Training: the per-rank dataset and the Stateful loader.


class RankDataset(IterableDataset):
    """One rank's micro-batches from global sample start_sample on (the module docstring, step 4)."""

    def __init__(self, sampler: Sampler, local_batch_size: int, global_batch_size: int, dp_rank: int,
                 dp_world_size: int, start_sample: int):
        super().__init__()
        self.sampler = sampler
        self.local_batch_size = local_batch_size
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // dp_world_size
        self.accum_steps = self.per_rank // local_batch_size
        self.dp_rank = dp_rank
        self.start_sample = start_sample

    def sample_indices(self, micro_batch: int) -> np.ndarray:
        step, m = divmod(micro_batch, self.accum_steps)
        first = (self.start_sample + step * self.global_batch_size + self.dp_rank * self.per_rank
                 + m * self.local_batch_size)
        return np.arange(first, first + self.local_batch_size, dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        t = worker_id
        while True:
            yield self.sampler.batch(self.sample_indices(t))
            t += num_workers


class TokenLoader(Stateful):
    """Iterate it for this rank's micro-batches; its state is the global position, not the rank's.

    The state counts the micro-batches handed to the caller, not those the workers have prefetched.
    It is only defined between optimizer steps (a whole number of global batches), which is when
    checkpoints are taken. A loaded state takes effect at the next iter().
    """

    def __init__(self, sampler: Sampler, local_batch_size: int, global_batch_size: int, dp_rank: int,
                 dp_world_size: int, num_workers: int, pin_memory: bool, prefetch_factor: int = 4):
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_world_size={dp_world_size})")
        if local_batch_size < 1 or global_batch_size % (local_batch_size * dp_world_size) != 0:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of local_batch_size "
                f"({local_batch_size}) x dp_world_size ({dp_world_size})"
            )
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch_factor >= 1, got {num_workers}, {prefetch_factor}")
        self.sampler = sampler
        self.local_batch_size, self.global_batch_size = local_batch_size, global_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.accum_steps = global_batch_size // (local_batch_size * dp_world_size)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._start_sample = 0
        self._micro_batches = 0
        self._generation = 0

    @property
    def samples_consumed(self) -> int:
        steps, partial = divmod(self._micro_batches, self.accum_steps)
        if partial:
            raise RuntimeError(
                f"data position asked for mid-step: {partial} of {self.accum_steps} micro-batches of the "
                f"current step taken; the position is defined between optimizer steps only"
            )
        return self._start_sample + steps * self.global_batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self.samples_consumed
        self._generation += 1
        generation = self._generation
        self._start_sample, self._micro_batches = start, 0
        dataset = RankDataset(self.sampler, self.local_batch_size, self.global_batch_size, self.dp_rank,
                              self.dp_world_size, start)
        loader = quiet_stateful_dataloader(
            dataset,
            batch_size=None,  # the dataset yields whole micro-batches: no per-sample collate
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            # The position is ours (samples_consumed); the loader's own worker snapshots would
            # only cost an IPC round trip per batch.
            snapshot_every_n_steps=1 << 62,
            worker_init_fn=ignore_stop_signals,
        )
        for batch in loader:
            if generation != self._generation:
                raise RuntimeError("this data iterator was replaced by a newer iter() or load_state_dict()")
            self._micro_batches += 1
            yield batch

    def skip_steps(self, steps: int) -> None:
        """Move the position `steps` optimizer steps on without reading any data: the same position,
        and so the same next batches, as taking and dropping steps x accum_steps micro-batches (a
        spike rewind's skip past the data that led to the spike). Takes effect at the next iter()."""
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        self._start_sample = self.samples_consumed + steps * self.global_batch_size
        self._micro_batches = 0
        self._generation += 1  # a live iterator from before would continue at the old position

    def state_dict(self) -> dict:
        return {
            "samples_consumed": self.samples_consumed,
            "seed": self.sampler.seed,
            "seq_len": self.sampler.seq_len,
            "data": self.sampler.fingerprint(),
            "mixture_block_size": self.sampler.mixture.block_size,
            "global_batch_size": self.global_batch_size,
            "sources": ",".join(s.manifest.folder for s in self.sampler.sources),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        sd = state_dict
        for key, now in (
            ("seed", self.sampler.seed),
            ("seq_len", self.sampler.seq_len),
            ("mixture_block_size", self.sampler.mixture.block_size),
            ("data", self.sampler.fingerprint()),
        ):
            if key not in sd:
                raise DataError(f"saved data loader state has no {key!r}: it is not a token-shard loader state")
            if sd[key] != now:
                what = {"data": "data (shard checksums and mixture counts per source)"}.get(key, key)
                raise DataError(
                    f"cannot resume the data position: the saved {what} is {sd[key]!r}, this run's is {now!r} "
                    f"(saved sources {sd.get('sources', '?')}). The position only means something for the "
                    f"same data, weights, seed and seq_len; start a new run folder to change them."
                )
        consumed = sd.get("samples_consumed")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"saved data loader state: samples_consumed must be an int >= 0, got {consumed!r}")
        if sd.get("global_batch_size") != self.global_batch_size:
            logger.info("global batch size changed from %s to %d: continuing at sample %d",
                        sd.get("global_batch_size"), self.global_batch_size, consumed)
        self._start_sample, self._micro_batches = consumed, 0
        self._generation += 1  # a live iterator from before would continue at the old position


def attach_teacher_logits(sources: list[Source], folder: str, seq_len: int, doc_mask: bool, vocab_size: int | None,
                          verify_checksums: bool, dp_rank: int, dp_world_size: int) -> None:
    """Open the teacher cache `folder` (if given) for the single source it was made for."""
    if not folder:
        return
    if len(sources) != 1:
        raise DataError(f"cached teacher logits ({folder}) serve one data source, not a mixture of {len(sources)}")
    sources[0].teacher = open_teacher_logits(folder, sources[0].manifest, seq_len, doc_mask, vocab_size,
                                             verify_checksums, dp_rank, dp_world_size)


def build_token_loader(
    sources: str | list[tuple[str, float]],
    seq_len: int,
    local_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    seed: int = 0,
    num_workers: int = 1,
    pin_memory: bool = False,
    doc_mask: bool = False,
    vocab_size: int | None = None,
    tokenizer_path: str = "",
    verify_checksums: bool = True,
    prefetch_factor: int = 4,
    teacher_logits: str = "",
) -> TokenLoader:
    """The training loader over prepared shards, every source checked first (see open_sources).

    sources: 'path' or 'path1:0.7,path2:0.3', or [(path, weight), ...]. With doc_mask each batch
    also has "position_ids": LongTensor[B, T], restarting at 0 where a document starts (and at
    the window start). teacher_logits: the teacher's cached top-K for the one source
    (distill/cache.py), added to each batch as "teacher_ids" and "teacher_logprobs".
    """
    parsed = parse_sources(sources) if isinstance(sources, str) else list(sources)
    opened = open_sources(parsed, seq_len, vocab_size, tokenizer_path, verify_checksums, dp_rank, dp_world_size)
    attach_teacher_logits(opened, teacher_logits, seq_len, doc_mask, vocab_size, verify_checksums, dp_rank,
                          dp_world_size)
    sampler = Sampler(opened, [w for _, w in parsed], seq_len, seed, doc_mask)
    loader = TokenLoader(sampler, local_batch_size, global_batch_size, dp_rank, dp_world_size, num_workers,
                         pin_memory, prefetch_factor)
    for src, weight in zip(opened, sampler.mixture.weights):
        m = src.manifest
        logger.info(
            "data %s: %d tokens, %d documents, %d shards: an epoch is %d windows of %d tokens; weight %.4f",
            m.folder, m.num_tokens, m.num_documents, len(m.shards), src.num_windows, seq_len + 1, weight,
        )
    return loader


# ---------------------------------------------------------------------------------------------
# Validation: a fixed set of held-out windows, split over ranks.


class ValBatches:
    """A fixed set of validation sequences, this rank's share, in micro-batches; iterable again and
    again with the same result. The set depends only on the data, seq_len and num_sequences, so a
    loss summed over tokens on all ranks and divided by the total token count is the same number
    on any rank count.

    Every rank yields the same number of batches (FSDP needs each rank in every forward): where a
    rank's share runs out first, its last batch is one padding row whose labels are all -100,
    cross_entropy's default ignore_index.
    """

    def __init__(self, sampler: Sampler, num_sequences: int, local_batch_size: int, dp_rank: int, dp_world_size: int):
        self.sampler, self.local_batch_size = sampler, local_batch_size
        self.num_sequences = num_sequences
        self.first = num_sequences * dp_rank // dp_world_size
        self.last = num_sequences * (dp_rank + 1) // dp_world_size
        self._num_batches = -(-(-(-num_sequences // dp_world_size)) // local_batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for k in range(self._num_batches):
            first = self.first + k * self.local_batch_size
            if first < self.last:
                last = min(first + self.local_batch_size, self.last)
                yield self.sampler.batch(np.arange(first, last, dtype=np.int64))
                continue
            T = self.sampler.seq_len
            batch = {
                "input": torch.zeros(1, T, dtype=torch.int64),
                "label": torch.full((1, T), -100, dtype=torch.int64),
            }
            if self.sampler.doc_mask:
                batch["position_ids"] = torch.arange(T, dtype=torch.int64)[None]
            if (cache := self.sampler.sources[0].teacher) is not None:  # any values: every label is ignored
                batch["teacher_ids"] = torch.zeros(1, T, cache.top_k, dtype=torch.int32)
                batch["teacher_logprobs"] = torch.zeros(1, T, cache.top_k, dtype=torch.float32)
            yield batch


def build_val_batches(
    path: str,
    seq_len: int,
    local_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    num_sequences: int,
    doc_mask: bool = False,
    vocab_size: int | None = None,
    tokenizer_path: str = "",
    verify_checksums: bool = True,
    teacher_logits: str = "",
) -> ValBatches:
    """The held-out sequences of a prepared folder (e.g. <out>/val from mobilellm-prepare): the first
    num_sequences windows of a fixed shuffle (VAL_SEED), so they sample all its shards; fewer if the
    folder holds fewer windows (with a warning)."""
    if num_sequences < 1 or local_batch_size < 1:
        raise ValueError(f"need num_sequences, local_batch_size >= 1, got {num_sequences}, {local_batch_size}")
    sources = open_sources([(path, 1.0)], seq_len, vocab_size, tokenizer_path, verify_checksums, dp_rank, dp_world_size)
    attach_teacher_logits(sources, teacher_logits, seq_len, doc_mask, vocab_size, verify_checksums, dp_rank,
                          dp_world_size)
    source = sources[0]
    if source.num_windows < num_sequences:
        logger.warning("validation data %s holds %d windows of %d tokens; using all of them, not %d",
                       path, source.num_windows, seq_len + 1, num_sequences)
        num_sequences = source.num_windows
    sampler = Sampler([source], [1.0], seq_len, VAL_SEED, doc_mask)
    return ValBatches(sampler, num_sequences, local_batch_size, dp_rank, dp_world_size)

