"""Tests of the data path at scale, on a small "virtual" dataset (one shard hard-linked many times,
as the 1T benchmark builds it): starts that trust a recorded verification and still stop on a
corrupted shard, cold-read bytes per batch, bounded reader memory, the budget check and the
direct rewind (skip_steps yields exactly what replaying would).

Run: python -m pytest tests/test_data_scale.py -q
"""

import itertools
import logging
import os
import time

import numpy as np
import pytest
import torch

from mobilellm_train.data import shards
from mobilellm_train.data.bench_storage import (
    evict,
    file_rss_bytes,
    storage_read_bytes,
    virtual_dataset,
)
from mobilellm_train.data.budget import check_data_budget, coverage_summary, data_budget
from mobilellm_train.data.loader import build_token_loader
from mobilellm_train.data.shards import VERIFIED_FILE, read_manifest, verify_dataset, write_token_dataset
from mobilellm_train.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

SEQ = 2048


@pytest.fixture(scope="module")
def virtual(tmp_path_factory):
    """64 links of one 4M-token shard: 256M tokens, 124,938 windows of 2049."""
    return virtual_dataset(str(tmp_path_factory.mktemp("v") / "data"), 4_000_000, 64)


def count_hashing(monkeypatch) -> list:
    hashed = []
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda path: hashed.append(path) or real(path))
    return hashed


# ---------------------------------------------------------------------------------------------
# Item 1: verify once, check cheaply at every start.


def test_default_start_hashes_nothing_when_a_verification_is_recorded(virtual, monkeypatch, caplog):
    hashed = count_hashing(monkeypatch)
    with caplog.at_level(logging.INFO, logger="mobilellm_train.data.loader"):
        ld = build_token_loader(virtual, SEQ, 8, 256, 31, 32, num_workers=0)
    assert hashed == []
    assert "as verified in full before" in caplog.text
    assert next(iter(ld))["input"].shape == (8, SEQ)


def _flip_byte(path, at=4096):
    time.sleep(0.05)  # file times tick with the kernel's coarse clock: a change must land on a new tick
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


def test_a_corrupted_shard_stops_the_start_and_a_full_verify_records_again(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "d")
    write_token_dataset(path, [rng.integers(0, 1000, 300) for _ in range(40)], 1000, tokens_per_shard=2000)
    assert os.path.isfile(os.path.join(path, VERIFIED_FILE))  # the writer's hashes are a verification
    _flip_byte(os.path.join(path, "shard-00001.bin"), at=10)
    hashed = count_hashing(monkeypatch)
    # Only the changed shard is hashed, by the rank whose share it is (1 of 2), before any batch.
    build_token_loader(path, 64, 2, 4, 0, 2, num_workers=0)
    assert hashed == []
    with caplog.at_level(logging.WARNING), pytest.raises(
            DataError, match=r"shard-00001\.bin: sha256 .* does not match .*mobilellm-prepare verify"):
        build_token_loader(path, 64, 2, 4, 1, 2, num_workers=0)
    assert [os.path.basename(p) for p in hashed] == ["shard-00001.bin"]
    with pytest.raises(DataError, match=r"shard-00001\.bin: sha256"):
        verify_dataset(path)
    _flip_byte(os.path.join(path, "shard-00001.bin"), at=10)  # repaired: a full verify records it
    summary = verify_dataset(path, workers=2)
    assert summary["record"].endswith(VERIFIED_FILE) and summary["num_shards"] == len(read_manifest(path).shards)
    hashed.clear()
    build_token_loader(path, 64, 2, 4, 1, 2, num_workers=0)
    assert hashed == []


def test_no_record_hashes_this_ranks_share_and_says_how_to_record(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "d")
    write_token_dataset(path, [rng.integers(0, 1000, 300) for _ in range(40)], 1000, tokens_per_shard=2000)
    os.remove(os.path.join(path, VERIFIED_FILE))
    hashed = count_hashing(monkeypatch)
    with caplog.at_level(logging.WARNING):
        build_token_loader(path, 64, 2, 4, 1, 2, num_workers=0)
    n = len(read_manifest(path).shards)
    assert len(hashed) == 2 * len(range(1, n, 2))  # .bin and .idx of shards 1, 3, ...
    assert f"mobilellm-prepare verify {path}" in caplog.text and "never verified" in caplog.text
    with open(os.path.join(path, VERIFIED_FILE), "w") as f:
        f.write("{not json")
    with caplog.at_level(logging.WARNING):
        build_token_loader(path, 64, 2, 4, 1, 2, num_workers=0)
    assert "unreadable" in caplog.text


def test_a_shard_changed_after_start_stops_the_read_that_opens_it(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "d")
    write_token_dataset(path, [rng.integers(0, 1000, 300) for _ in range(40)], 1000, tokens_per_shard=2000)
    ld = build_token_loader(path, 64, 2, 2, 0, 1, num_workers=0)
    for name in os.listdir(path):
        if name.endswith(".bin"):
            _flip_byte(os.path.join(path, name), at=10)
    with pytest.raises(DataError, match=r"\.bin: changed since this run started.*mobilellm-prepare verify"):
        next(iter(ld))


# ---------------------------------------------------------------------------------------------
# Items 2 and 3: what a cold read costs the storage, and what a reader keeps mapped.


def test_first_batch_after_a_cold_start_reads_under_16x_its_bytes(virtual):
    shard = os.path.join(virtual, "shard-00000.bin")
    # Control: storage reads must be visible here at all (not on tmpfs, /proc/self/io present).
    evict(shard)
    before = storage_read_bytes()
    with open(shard, "rb") as f:
        f.seek(1 << 20)
        f.read(4096)
    if storage_read_bytes() - before < 4096:
        pytest.skip("this filesystem's reads are not counted in /proc/self/io read_bytes")
    for doc_mask in (False, True):
        ld = build_token_loader(virtual, SEQ, 16, 16 * 32, 31, 32, num_workers=0, doc_mask=doc_mask)
        it = iter(ld)
        evict(shard)
        evict(os.path.join(virtual, "shard-00000.idx"))
        before = storage_read_bytes()
        batch = next(it)
        used = batch["input"].shape[0] * (SEQ + 1) * 2
        assert storage_read_bytes() - before < 16 * used, doc_mask


def test_reader_memory_stays_bounded_over_a_long_read_of_few_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "IDX_RELEASE_LOOKUPS", 64)
    path = virtual_dataset(str(tmp_path / "d"), 2_000_000, 2)  # 4M tokens (8 MB) in 2 shards
    ld = build_token_loader(path, 255, 16, 16, 0, 1, num_workers=0, doc_mask=True)
    it = iter(ld)
    next(it)
    rss0 = file_rss_bytes()
    windows = 0
    n = ld.sampler.sources[0].num_windows
    for batch in itertools.islice(it, 2 * n // 16):  # the whole dataset twice
        windows += batch["input"].shape[0]
    assert windows >= 2 * n - 16
    stream = ld.sampler.sources[0].stream
    assert len(stream._idxs) <= 2
    # Before, every window read stayed mapped: +8 MB here. The .idx maps (2 x 40 KB) are all it keeps.
    assert file_rss_bytes() - rss0 < 1 << 20


# ---------------------------------------------------------------------------------------------
# Items 4 and 5: the budget check and the direct rewind.


def test_budget_check_says_which_steps_repeat_and_how_many_tokens_are_missing(virtual, caplog):
    ld = build_token_loader(virtual, SEQ, 8, 1024, 0, 128, num_workers=0)
    n = ld.sampler.sources[0].num_windows
    assert n == 64 * 4_000_000 // (SEQ + 1)
    fits = data_budget(ld.sampler, n // 1024, 1024)
    assert fits.first_repeat_step is None and fits.repeat_steps == 0 and fits.tokens_missing == [0]
    steps = n // 1024 + 5
    with caplog.at_level(logging.WARNING):
        b = check_data_budget(ld, steps)
    # Sample n (the first repeat) is in step n // 1024 + 1 (steps count from 1).
    assert b.first_repeat_step == n // 1024 + 1 and b.repeat_steps == 5
    assert b.samples == [steps * 1024] and b.tokens_missing == [steps * 1024 * (SEQ + 1) - 64 * 4_000_000]
    assert "see data again" in caplog.text and f"{b.tokens_missing[0]:,} tokens short" in caplog.text
    assert coverage_summary(64 * 4_000_000, SEQ, 1024).startswith(f"{n:,} windows of seq_len + 1 = 2049 tokens: "
                                                                   f"{n // 1024:,} steps")


def test_budget_check_of_a_mixture_finds_the_first_source_to_repeat(tmp_path):
    a = virtual_dataset(str(tmp_path / "a"), 70_000, 1)
    b = virtual_dataset(str(tmp_path / "b"), 70_000, 3)
    ld = build_token_loader(f"{a}:0.5,{b}:0.5", 6, 4, 4, 0, 1, num_workers=0)
    na, nb = (s.num_windows for s in ld.sampler.sources)
    budget = data_budget(ld.sampler, na // 2 + 10, 4)
    # Brute force: the global index of source a's sample na.
    source, j = ld.sampler.mixture.locate(np.arange((na // 2 + 10) * 4))
    first = int(np.flatnonzero((source == 0) & (j == na))[0])
    assert budget.first_repeat_step == first // 4 + 1
    assert budget.tokens_missing[1] == 0 and budget.tokens_missing[0] > 0
    assert budget.samples == [int(np.sum(source == 0)), int(np.sum(source == 1))] and nb > na


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_steps_yields_exactly_what_replaying_would(tmp_path, num_workers):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "d")
    write_token_dataset(path, [rng.integers(0, 1000, 50) for _ in range(300)], 1000, tokens_per_shard=1000)
    kw = dict(seed=5, num_workers=num_workers, doc_mask=True)
    replay = build_token_loader(path, 16, 2, 8, 1, 2, **kw)
    direct = build_token_loader(path, 16, 2, 8, 1, 2, **kw)
    it = iter(replay)
    for _ in range(3 * replay.accum_steps):  # both at step 3, as after a checkpoint load
        next(it)
    direct.load_state_dict(replay.state_dict())
    for _ in range(7 * replay.accum_steps):  # the rewind's replay past 7 steps
        next(it)
    direct.skip_steps(7)
    assert direct.state_dict() == replay.state_dict()
    got = iter(direct)
    for a, b in zip(itertools.islice(it, 6), itertools.islice(got, 6)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="steps"):
        direct.skip_steps(-1)
    del it, got


def test_the_loop_repositions_prepared_shards_directly_after_a_rewind(tmp_path):
    """The spike rewind's restart (loop.batches.StepBatches.restart) moves a shard loader with
    skip_steps, reading no batch, and yields what replaying past the skipped steps yields."""
    from mobilellm_train.loop.batches import StepBatches
    from mobilellm_train.run_parts import RunParts

    rng = np.random.default_rng(2)
    path = str(tmp_path / "d")
    write_token_dataset(path, [rng.integers(0, 1000, 50) for _ in range(300)], 1000, tokens_per_shard=1000)
    replay = build_token_loader(path, 16, 2, 8, 1, 2, seed=3, num_workers=0)
    loader = build_token_loader(path, 16, 2, 8, 1, 2, seed=3, num_workers=0)
    saved = loader.state_dict()  # the checkpoint the rewind goes back to: step 0
    batches = StepBatches(loader, loader.accum_steps, RunParts())
    batches.start()
    for _ in range(4):
        batches.next_step()
    loader.load_state_dict(saved)
    read = []
    loader.skip_steps = (lambda skip: lambda steps: read.append(steps) or skip(steps))(loader.skip_steps)
    batches.restart(skip_steps=4)
    assert read == [4]
    expected = iter(replay)
    for _ in range(4 * replay.accum_steps):
        next(expected)
    for a, b in zip(batches.next_step(), [next(expected) for _ in range(replay.accum_steps)]):
        assert all(torch.equal(a[k], b[k]) for k in a)
