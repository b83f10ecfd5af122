"""Tests of the token-shard loader: the permutation and mixture, exact resume and the union of all
ranks' samples across rank-count changes, epochs, document position ids, validation batches,
state checks and the checks made before training.

Every token id in these datasets is unique, so a token says which window it came from.
Run: python -m pytest tests/test_loader.py -q
"""

import itertools
import logging
import os

import numpy as np
import pytest
import torch

from mobilellm_train.data import shards
from mobilellm_train.data.jsonl import DataError
from mobilellm_train.data.loader import (
    Mixture,
    Permutation,
    build_token_loader,
    build_val_batches,
    parse_sources,
)
from mobilellm_train.data.shards import write_token_dataset

# torchdata 0.11 calls an API that torch >= 2.12 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

VOCAB = 1 << 20  # uint32 shards: room for unique ids


def unique_dataset(folder, num_docs=120, seed=0, first_id=0, tokens_per_shard=300, max_doc_len=30):
    """Documents of consecutive, never-repeating ids; returns (path, doc lengths)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_doc_len, num_docs)
    starts = first_id + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    docs = [np.arange(s, s + n) for s, n in zip(starts, lengths)]
    write_token_dataset(str(folder), docs, VOCAB, tokens_per_shard)
    return str(folder), lengths


def loaders(path, world_size, seq_len=6, local_batch_size=2, global_batch_size=8, num_workers=0, **kw):
    return [
        build_token_loader(path, seq_len, local_batch_size, global_batch_size, rank, world_size, seed=3,
                           num_workers=num_workers, verify_checksums=False, **kw)
        for rank in range(world_size)
    ]


def take_steps(rank_loaders, iterators, steps):
    """Run `steps` optimizer steps on all ranks; returns each step's windows, rank 0's first."""
    out = []
    for _ in range(steps):
        step = []
        for ld, it in zip(rank_loaders, iterators):
            for _ in range(ld.accum_steps):
                b = next(it)
                step += [torch.cat([i, l[-1:]]).tolist() for i, l in zip(b["input"], b["label"])]
        out.append(step)
    return out


# ---------------------------------------------------------------------------------------------
# The order.


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_permutation_is_a_bijection_that_changes_with_seed_and_epoch(n):
    i = np.arange(n)
    perms = {(seed, epoch): Permutation(n, seed, epoch)(i) for seed in (0, 1) for epoch in (0, 1)}
    for p in perms.values():
        assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(Permutation(n, 0, 0)(i), perms[(0, 0)])  # a pure function of its key
    if n >= 17:
        assert len({p.tobytes() for p in perms.values()}) == 4
        assert not np.array_equal(perms[(0, 0)], i)
    with pytest.raises(IndexError):
        Permutation(n, 0, 0)(np.array([n]))


def test_mixture_realises_the_weights_exactly_per_block_and_spreads_them():
    m = Mixture([0.7, 0.2, 0.1], block_size=100)
    source, j = m.locate(np.arange(300))
    assert np.bincount(source[:100]).tolist() == [70, 20, 10]
    for s in range(3):
        # Each source's samples are 0, 1, 2, ... in global order: nothing skipped or repeated.
        assert j[source == s].tolist() == list(range(int((source == s).sum())))
    # Spread, not bunched: every 10 consecutive samples hold exactly one of the 10% source.
    assert all(np.sum(source[k : k + 10] == 2) == 1 for k in range(0, 300, 10))
    # A pure function of the index: any subset maps the same way.
    s2, j2 = m.locate(np.array([299, 5, 150]))
    assert s2.tolist() == source[[299, 5, 150]].tolist() and j2.tolist() == j[[299, 5, 150]].tolist()
    assert Mixture([3, 1], block_size=4).counts.tolist() == [3, 1]
    with pytest.raises(DataError, match="no sample"):
        Mixture([1.0, 1e-6], block_size=100)


def test_parse_sources():
    assert parse_sources("/a/b") == [("/a/b", 1.0)]
    assert parse_sources("/a:0.7, /b:0.3") == [("/a", 0.7), ("/b", 0.3)]
    assert parse_sources("/x:y/c") == [("/x:y/c", 1.0)]
    with pytest.raises(DataError, match="weight"):
        parse_sources("/a:-1")


# ---------------------------------------------------------------------------------------------
# Exact resume: every sample of an epoch exactly once, across restarts on other rank counts.


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_sizes", [(2,), (4,), (2, 4, 1), (4, 2)])
def test_resume_on_any_rank_count_sees_each_sample_once_in_the_global_order(tmp_path, num_workers, world_sizes):
    path, lengths = unique_dataset(tmp_path / "d", num_docs=110)
    window = 7  # seq_len 6 + 1
    num_windows = int(lengths.sum()) // window
    G = 8
    total_steps = -(-num_windows // G)
    # The reference: one rank, one pass, no restarts.
    (ref_loader,) = loaders(path, 1)
    ref = take_steps([ref_loader], [iter(ref_loader)], total_steps)

    seen, state = [], None
    legs = np.array_split(np.arange(total_steps), len(world_sizes))
    for W, leg in zip(world_sizes, legs):
        rank_loaders = loaders(path, W, num_workers=num_workers)
        if state is not None:
            for ld in rank_loaders:
                ld.load_state_dict(state)
        seen += take_steps(rank_loaders, [iter(ld) for ld in rank_loaders], len(leg))
        states = [ld.state_dict() for ld in rank_loaders]
        assert all(s == states[0] for s in states)  # the position is global, not per rank
        state = states[0]
        assert state["samples_consumed"] == G * (leg[-1] + 1)

    assert seen == ref  # the same samples in the same steps, whatever the rank count
    flat = [w for step in seen for w in step][:num_windows]
    tokens = [t for w in flat for t in w]
    # Unique ids: the epoch's windows cover the stream's first num_windows * window tokens once each.
    assert sorted(tokens) == list(range(num_windows * window))
    for w in flat:
        assert w == list(range(w[0], w[0] + window)) and w[0] % window == 0


def test_state_counts_what_was_handed_out_not_what_workers_prefetched(tmp_path):
    path, _ = unique_dataset(tmp_path / "d")
    (ld,) = loaders(path, 1, num_workers=2, global_batch_size=2)
    it = iter(ld)
    next(it)
    assert ld.state_dict()["samples_consumed"] == 2  # workers are several batches ahead by now
    (ld4,) = loaders(path, 1, global_batch_size=4)
    it4 = iter(ld4)
    next(it4)  # half of a step of two micro-batches
    with pytest.raises(RuntimeError, match="mid-step"):
        ld4.state_dict()
    next(it4)
    assert ld4.state_dict()["samples_consumed"] == 4


def test_epochs_reshuffle_and_log_once(tmp_path, caplog):
    path, lengths = unique_dataset(tmp_path / "d", num_docs=40)
    num_windows = int(lengths.sum()) // 7
    (ld,) = loaders(path, 1, global_batch_size=2, local_batch_size=2)
    it = iter(ld)
    with caplog.at_level(logging.INFO, logger="mobilellm_train.data.loader"):
        batches = [next(it) for _ in range(num_windows)]  # two epochs
    firsts = [int(x) for b in batches for x in b["input"][:, 0]]
    epoch0, epoch1 = firsts[:num_windows], firsts[num_windows:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, num_windows * 7, 7))
    assert epoch0 != epoch1
    msgs = [r.getMessage() for r in caplog.records if "reshuffled" in r.getMessage()]
    assert len(msgs) == 1 and "epoch 1 starts" in msgs[0]


def test_mixture_of_sources_follows_weights_and_wraps_each_source_on_its_own(tmp_path, caplog):
    a, la = unique_dataset(tmp_path / "a", num_docs=200, seed=1)
    b, lb = unique_dataset(tmp_path / "b", num_docs=20, seed=2, first_id=500_000)
    wa, wb = int(la.sum()) // 7, int(lb.sum()) // 7
    ld = build_token_loader(f"{a}:0.75,{b}:0.25", 6, 4, 4, 0, 1, seed=0, num_workers=0, verify_checksums=False)
    it = iter(ld)
    n = 4 * (2 * wb + 5)  # source b wraps into its third epoch
    with caplog.at_level(logging.INFO, logger="mobilellm_train.data.loader"):
        firsts = [int(x) for _ in range(n // 4) for x in next(it)["input"][:, 0]]
    from_b = [x for x in firsts if x >= 500_000]
    assert len(from_b) == n // 4  # 25% exactly
    b_windows = list(range(500_000, 500_000 + wb * 7, 7))
    assert sorted(from_b[:wb]) == sorted(from_b[wb : 2 * wb]) == b_windows
    assert from_b[:wb] != from_b[wb : 2 * wb]
    from_a = [x for x in firsts if x < 500_000]
    assert len(from_a) < wa and len(set(from_a)) == len(from_a)  # a is still in its first epoch
    logs = [r.getMessage() for r in caplog.records if "reshuffled" in r.getMessage()]
    assert len(logs) == 2 and all(b in m for m in logs) and "epoch 2 starts" in logs[1]


# ---------------------------------------------------------------------------------------------
# Document masking, validation, and what is checked before training.


def test_doc_mask_position_ids_restart_at_each_document(tmp_path):
    path, lengths = unique_dataset(tmp_path / "d", num_docs=80, max_doc_len=9, tokens_per_shard=50)
    doc_start = np.zeros(int(lengths.sum()), dtype=bool)
    doc_start[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
    (ld,) = loaders(path, 1, global_batch_size=2, doc_mask=True)
    it = iter(ld)
    for _ in range(20):
        b = next(it)
        assert b["position_ids"].dtype == torch.int64 and b["position_ids"].shape == b["input"].shape
        for tokens, pos in zip(b["input"].tolist(), b["position_ids"].tolist()):
            expected, p = [], -1
            for k, t in enumerate(tokens):  # token id == stream position
                p = 0 if k == 0 or doc_start[t] else p + 1
                expected.append(p)
            assert pos == expected
    (plain,) = loaders(path, 1, global_batch_size=2)
    assert "position_ids" not in next(iter(plain))


def test_val_batches_are_fixed_and_the_same_set_on_any_rank_count(tmp_path, caplog):
    path, lengths = unique_dataset(tmp_path / "v", num_docs=60)

    padded = []

    def windows(W, n=13):
        out = []
        per_rank = [build_val_batches(path, 6, 4, r, W, n, verify_checksums=False) for r in range(W)]
        assert len({len(vb) for vb in per_rank}) == 1  # every rank runs the same number of forwards
        for vb in per_rank:
            batches = list(vb)
            assert len(batches) == len(vb)
            assert [b["input"].tolist() for b in vb] == [b["input"].tolist() for b in batches]  # re-iterable
            for b in batches:
                real = (b["label"] != -100).all(dim=1)
                assert real.all() or (len(real) == 1 and (b["label"] == -100).all())  # whole padding rows only
                padded.append((W, not real.all()))
                out += b["input"][real, 0].tolist()
        return out

    one = windows(1)
    assert len(one) == 13 == len(set(one))
    assert sorted(windows(2)) == sorted(windows(3)) == sorted(one)
    assert (3, True) in padded and (1, True) not in padded  # 13 over 3 ranks of 4 + 4 + 5: rank 0 pads
    assert one != sorted(one)  # a shuffle, so a prefix samples the whole folder
    with caplog.at_level(logging.WARNING):
        assert len(windows(1, n=10**6)) == int(lengths.sum()) // 7
    assert "using all of them" in caplog.text


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_state_refuses_other_data_seed_or_seq_len_and_survives_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp

    path, _ = unique_dataset(tmp_path / "d")
    other, _ = unique_dataset(tmp_path / "o", seed=9)
    (ld,) = loaders(path, 1)
    it = iter(ld)
    for _ in range(8):
        next(it)
    state = ld.state_dict()
    dcp.save({"dataloader": ld}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    (fresh,) = loaders(path, 2)[:1]
    dcp.load({"dataloader": fresh}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert fresh.state_dict()["samples_consumed"] == 16
    assert next(iter(fresh))["input"].tolist() == next(it)["input"].tolist()

    for kw, key in (({"seq_len": 5}, "seq_len"), ({}, "data")):
        (bad,) = loaders(other if key == "data" else path, 1, **kw)
        with pytest.raises(DataError, match=key):
            bad.load_state_dict(state)
    seeded = build_token_loader(path, 6, 2, 8, 0, 1, seed=4, num_workers=0, verify_checksums=False)
    with pytest.raises(DataError, match="seed"):
        seeded.load_state_dict(state)
    with pytest.raises(DataError, match="samples_consumed"):
        ld.load_state_dict({**state, "samples_consumed": -1})


def test_checks_before_training(tmp_path, monkeypatch, caplog):
    path, _ = unique_dataset(tmp_path / "d", tokens_per_shard=100)
    with pytest.raises(DataError, match=r"shard-\d+\.bin: token id \d+ is outside the model's vocabulary \[0, 1000\)"):
        build_token_loader(path, 6, 2, 2, 0, 1, vocab_size=1000, verify_checksums=False)
    with pytest.raises(DataError, match="fewer than one window"):
        build_token_loader(path, 100_000, 2, 2, 0, 1, verify_checksums=False)

    # Corrupt one byte of shard 1: with 2 ranks, rank 1 hashes shards 1, 3, ... and finds it.
    with open(os.path.join(path, "shard-00001.bin"), "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 0xFF]))
    build_token_loader(path, 6, 2, 4, 0, 2)  # rank 0 does not hash shard 1
    with pytest.raises(DataError, match=r"shard-00001\.bin: sha256 .* does not match .* recorded in .*manifest\.json"):
        build_token_loader(path, 6, 2, 4, 1, 2)
    with caplog.at_level(logging.WARNING):
        build_token_loader(path, 6, 2, 4, 1, 2, verify_checksums=False)
    assert "not verified" in caplog.text

    with open(os.path.join(path, "shard-00002.bin"), "r+b") as f:
        f.truncate(8)
    with pytest.raises(DataError, match=r"shard-00002\.bin: 8 bytes, but .*manifest\.json implies"):
        build_token_loader(path, 6, 2, 4, 0, 2, verify_checksums=False)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(DataError, match="no manifest.*interrupted"):
        build_token_loader(path, 6, 2, 2, 0, 1)


def test_few_open_shards_at_a_time_read_the_same(tmp_path, monkeypatch):
    path, _ = unique_dataset(tmp_path / "d", tokens_per_shard=40)
    (ld,) = loaders(path, 1, doc_mask=True)
    expected = [b for b in itertools.islice(iter(ld), 30)]
    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 2)
    (small,) = loaders(path, 1, doc_mask=True)
    got = list(itertools.islice(iter(small), 30))
    stream = small.sampler.sources[0].stream
    assert len(stream._bins) + len(stream._idxs) <= 2
    for a, b in zip(expected, got):
        for key in a:
            assert torch.equal(a[key], b[key])
