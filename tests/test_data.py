"""Tests of the JSONL reader (layout, packing, exact resume, bad data) and the demo corpus.

Every test writes its own small corpus under tmp_path. Run: python -m pytest tests/test_data.py -q
"""

import itertools
import json
import logging
import os
import re

import pytest
import sentencepiece as spm
import torch

from mobilellm_train.data import demo
from mobilellm_train.data.jsonl import DataError, JsonlTokenDataset, build_dataloader

# torchdata 0.11 calls an API that torch >= 2.12 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

VOCAB = 100_000


def write_jsonl(path, docs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for ids in docs:
            f.write(json.dumps({"token_ids": ids}) + "\n")


class UniqueIds:
    """Hands out token ids that never repeat, so any token says which line it came from."""

    def __init__(self):
        self.next_id = 3

    def take(self, n):
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids


def take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def windows(samples):
    # Rebuild each seq_len + 1 window from its shifted input/label pair.
    return [torch.cat([s["input"], s["label"][-1:]]).tolist() for s in samples]


def test_packing_concatenates_documents_into_contiguous_windows(tmp_path):
    ids = UniqueIds()
    lengths_a = [5, 1, 13, 2, 9, 30, 4]
    lengths_b = [7, 3, 11, 6]
    docs_a = [ids.take(n) for n in lengths_a]
    docs_b = [ids.take(n) for n in lengths_b]
    # Written out of order: the reader must use sorted file names, and a basepath holding
    # .jsonl files directly is one folder.
    write_jsonl(tmp_path / "b.jsonl", docs_b)
    write_jsonl(tmp_path / "a.jsonl", docs_a)
    stream = [t for doc in docs_a + docs_b for t in doc]
    seq_len = 6
    num_windows = len(stream) // (seq_len + 1)

    ds = JsonlTokenDataset(str(tmp_path), seq_len, VOCAB, dp_rank=0, dp_world_size=1, ranks_per_node=8)
    samples = take(ds, num_windows)

    for j, s in enumerate(samples):
        assert s["input"].dtype == torch.int64 and s["input"].shape == (seq_len,)
        expected = stream[j * (seq_len + 1) : (j + 1) * (seq_len + 1)]
        assert s["input"].tolist() == expected[:-1]
        assert s["label"].tolist() == expected[1:]


def expected_lines(num_folders, world_size, rank, lines_per_folder):
    """Which (folder, line) pairs a rank reads, by the documented rule, written out independently."""
    if world_size >= num_folders:
        group = world_size // num_folders
        folder = rank // group
        return [(folder, i) for i in range(lines_per_folder) if i % group == rank % group]
    return [(f, i) for f in range(num_folders) if f % world_size == rank for i in range(lines_per_folder)]


@pytest.mark.parametrize("num_folders,world_size", [(2, 8), (1, 2), (4, 2)])
def test_ranks_read_their_documented_share_and_together_cover_the_data(tmp_path, num_folders, world_size):
    seq_len = 4
    lines_per_folder = 11
    ids = UniqueIds()
    # Lines are exactly one window long, so each window is one line and its first token names it.
    line_of_first_token = {}
    for f in range(num_folders):
        docs = [ids.take(seq_len + 1) for _ in range(lines_per_folder)]
        for i, doc in enumerate(docs):
            line_of_first_token[doc[0]] = (f, i)
        # Two files per folder: the line stream runs on across the file boundary.
        write_jsonl(tmp_path / str(f + 1) / "part-0.jsonl", docs[:5])
        write_jsonl(tmp_path / str(f + 1) / "part-1.jsonl", docs[5:])

    seen = []
    for rank in range(world_size):
        want = expected_lines(num_folders, world_size, rank, lines_per_folder)
        ds = JsonlTokenDataset(str(tmp_path), seq_len, VOCAB, rank, world_size, ranks_per_node=8)
        got = [line_of_first_token[w[0]] for w in windows(take(ds, len(want) + 1))]
        assert got[:-1] == want
        assert got[-1] == want[0]  # the next epoch starts over
        seen += got[:-1]
    assert sorted(seen) == sorted(line_of_first_token.values())  # all lines, none twice


@pytest.mark.parametrize("num_folders", [1, 4])
def test_workers_split_their_ranks_lines(tmp_path, num_folders):
    seq_len, lines_per_folder, world_size = 4, 11, 2
    ids = UniqueIds()
    line_of_first_token = {}
    for f in range(num_folders):
        docs = [ids.take(seq_len + 1) for _ in range(lines_per_folder)]
        line_of_first_token.update({doc[0]: (f, i) for i, doc in enumerate(docs)})
        write_jsonl(tmp_path / str(f + 1) / "part-0.jsonl", docs[:5])
        write_jsonl(tmp_path / str(f + 1) / "part-1.jsonl", docs[5:])
    for rank in range(world_size):
        want = expected_lines(num_folders, world_size, rank, lines_per_folder)
        ds = JsonlTokenDataset(str(tmp_path), seq_len, VOCAB, rank, world_size, ranks_per_node=8)
        loader = build_dataloader(ds, local_batch_size=1, num_workers=2, pin_memory=False)
        # Worker w takes the rank's lines w, w+2, ...; the loader alternates workers, so one
        # epoch of batches comes back in the rank's own line order.
        got = [line_of_first_token[b["input"][0, 0].item()] for b in itertools.islice(loader, len(want))]
        assert got == want


def test_impossible_folder_split_is_rejected(tmp_path):
    for f in range(3):
        write_jsonl(tmp_path / str(f + 1) / "a.jsonl", [[1, 2, 3]])
    with pytest.raises(DataError, match=r"cannot split 3 node folders over 2 data-parallel ranks.*24 ranks"):
        JsonlTokenDataset(str(tmp_path), 2, VOCAB, 0, 2, ranks_per_node=8)


RESUME_LENGTHS = [(7 * i) % 19 + 1 for i in range(40)]


def make_resume_corpus(root):
    ids = UniqueIds()
    # Varied lengths so windows straddle lines and files.
    docs = [ids.take(n) for n in RESUME_LENGTHS]
    write_jsonl(root / "1" / "a.jsonl", docs[:25])
    write_jsonl(root / "1" / "b.jsonl", docs[25:])


def build(root, num_workers, world_size=3, rank=1):
    ds = JsonlTokenDataset(
        str(root), seq_len=7, vocab_size=VOCAB, dp_rank=rank, dp_world_size=world_size, ranks_per_node=8
    )
    return build_dataloader(ds, local_batch_size=2, num_workers=num_workers, pin_memory=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_equals_uninterrupted(tmp_path, num_workers):
    make_resume_corpus(tmp_path)
    after_resume = 30
    save_points = [3, 20]
    # Rank 1 of 3 reads lines 1, 4, 7, ...; worker w of N every N-th of those. The later save point
    # must lie past an epoch boundary of every worker (whose batches alternate), and the batches
    # after it cross more boundaries.
    readers = max(num_workers, 1)
    epoch_tokens = [sum(RESUME_LENGTHS[1 + 3 * w :: 3 * readers]) for w in range(readers)]
    batch_tokens = 2 * 8
    assert save_points[1] // readers * batch_tokens > max(epoch_tokens)

    reference = list(itertools.islice(iter(build(tmp_path, num_workers)), max(save_points) + after_resume))
    assert reference[0]["input"].shape == (2, 7) and reference[0]["input"].dtype == torch.int64

    for k in save_points:
        loader = build(tmp_path, num_workers)
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = loader.state_dict()
        del it, loader

        resumed = build(tmp_path, num_workers)
        resumed.load_state_dict(state)
        got = list(itertools.islice(iter(resumed), after_resume))
        for b_ref, b_got in zip(reference[k : k + after_resume], got, strict=True):
            assert torch.equal(b_ref["input"], b_got["input"]) and torch.equal(b_ref["label"], b_got["label"])


def test_state_is_small_and_explicit(tmp_path):
    make_resume_corpus(tmp_path)
    ds = JsonlTokenDataset(str(tmp_path), 7, VOCAB, 0, 1, 8)
    assert ds.state_dict()["byte_offset"] == 0
    take(ds, 3)
    sd = ds.state_dict()
    assert set(sd) == {
        "epoch", "file_index", "byte_offset", "line_number", "buffer", "bad_lines_skipped", "dp_world_size", "dp_rank"
    }
    assert isinstance(sd["buffer"], list) and all(type(t) is int for t in sd["buffer"])
    with open(tmp_path / "1" / "a.jsonl", "rb") as f:
        lines = f.readlines()
    assert sd["byte_offset"] == sum(len(x) for x in lines[: sd["line_number"]])


def test_resume_on_a_different_world_size_or_rank_is_refused(tmp_path):
    make_resume_corpus(tmp_path)
    ds = JsonlTokenDataset(str(tmp_path), 7, VOCAB, 0, 2, 8)
    take(ds, 2)
    other = JsonlTokenDataset(str(tmp_path), 7, VOCAB, 0, 4, 8)
    saved_2_now_4 = r"cannot resume on a different number of data-parallel ranks \(saved 2, now 4\)"
    with pytest.raises(DataError, match=saved_2_now_4):
        other.load_state_dict(ds.state_dict())
    other_rank = JsonlTokenDataset(str(tmp_path), 7, VOCAB, 1, 2, 8)
    with pytest.raises(DataError, match="data state of dp rank 0 loaded into dp rank 1"):
        other_rank.load_state_dict(ds.state_dict())


GOOD = b'{"token_ids": [5, 6]}\n'


@pytest.mark.parametrize(
    "bad_line,message",
    [
        (b'{"token_ids": [5, 6\n', "invalid JSON"),
        (b'{"token_ids": [5, 6], "src": "\xff\xfe"}\n', "invalid UTF-8"),
        (b'{"tokens": [5, 6]}\n', 'no key "token_ids"'),
        (b"[5, 6]\n", "expected a JSON object"),
        (b'{"token_ids": 5}\n', '"token_ids" must be a list of ints, got an int'),
        (b'{"token_ids": []}\n', '"token_ids" is an empty list'),
        (b'{"token_ids": ["5", "6"]}\n', r'"token_ids"\[0\] is a string'),
        (b'{"token_ids": [5, 6.5]}\n', r'"token_ids"\[1\] is a float'),
        (b'{"token_ids": [5, true]}\n', r'"token_ids"\[1\] is a bool'),
        (b'{"token_ids": [5, [6]]}\n', r'"token_ids"\[1\] is a list'),
        (b'{"token_ids": [5, 6, 100]}\n', r"token id 100 outside \[0, 100\) at index 2"),
        (b'{"token_ids": [5, -3]}\n', r"token id -3 outside \[0, 100\)"),
        (b'{"token_ids": [5, 100000000000000000000000]}\n', r"token id 100000000000000000000000 outside"),
        (b"\n", "empty line"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "1" / "a.jsonl"
    path.parent.mkdir()
    path.write_bytes(GOOD + GOOD + bad_line + GOOD * 4)
    ds = JsonlTokenDataset(str(tmp_path), 4, 100, 0, 1, 8)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: {message}"):
        take(ds, 1)


def test_bad_lines_of_other_ranks_are_not_read(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(GOOD + b"not json\n" + GOOD * 4)
    ds = JsonlTokenDataset(str(tmp_path), 3, 100, 0, 2, 8)
    assert len(take(ds, 3)) == 3


def test_layout_errors_are_found_before_training(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'missing'}: data path does not exist")):
        JsonlTokenDataset(str(tmp_path / "missing"), 4, VOCAB, 0, 1, 8)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no node folders"):
        JsonlTokenDataset(str(tmp_path / "none"), 4, VOCAB, 0, 1, 8)

    write_jsonl(tmp_path / "d" / "1" / "a.jsonl", [[1, 2, 3]])
    (tmp_path / "d" / "2").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'd' / '2'}: folder has no *.jsonl files")):
        JsonlTokenDataset(str(tmp_path / "d"), 4, VOCAB, 0, 2, 8)
    (tmp_path / "d" / "2" / "b.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'd' / '2' / 'b.jsonl'}: empty file")):
        JsonlTokenDataset(str(tmp_path / "d"), 4, VOCAB, 0, 2, 8)

    write_jsonl(tmp_path / "gap" / "1" / "a.jsonl", [[1, 2, 3]])
    write_jsonl(tmp_path / "gap" / "3" / "a.jsonl", [[1, 2, 3]])
    with pytest.raises(DataError, match="named 1..F with none missing; found 1, 3"):
        JsonlTokenDataset(str(tmp_path / "gap"), 4, VOCAB, 0, 2, 8)


def test_data_too_small_for_seq_len_raises_instead_of_looping(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [[1, 2, 3], [4, 5]])
    ds = JsonlTokenDataset(str(tmp_path), 16, VOCAB, 0, 1, 8)
    with pytest.raises(DataError, match=r"no full window of seq_len \+ 1 = 17 tokens in a whole epoch.*small"):
        take(ds, 1)
    # A rank whose share has no lines at all is the same failure, not an endless loop.
    ds = JsonlTokenDataset(str(tmp_path), 1, VOCAB, 2, 4, 8)
    with pytest.raises(DataError, match="dp rank 2 got no full window"):
        take(ds, 1)


def test_skip_bad_lines_warns_counts_and_has_a_budget(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"token_ids": [5, 6]}\n{"x": 1}\n{"token_ids": [7, 8]}\n[1]\n{"token_ids": [9, 10]}\n')
    caplog.set_level(logging.INFO, logger="mobilellm_train.data.jsonl")
    ds = JsonlTokenDataset(str(tmp_path), 1, 100, 0, 1, 8, skip_bad_lines=2)
    samples = take(ds, 3)
    assert windows(samples) == [[5, 6], [7, 8], [9, 10]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"{path}:2: " in warnings[0] and "(1 of at most 2 bad lines skipped" in warnings[0]
    assert f"{path}:4: " in warnings[1] and "(2 of at most 2 bad lines skipped" in warnings[1]
    assert ds.state_dict()["bad_lines_skipped"] == 2

    # The second epoch meets the same lines: warned again, not charged to the budget again.
    take(ds, 3)
    assert any("epoch 0 finished; starting epoch 1" in r.getMessage() for r in caplog.records)
    assert sum("skipping it again" in r.getMessage() for r in caplog.records) == 2
    assert ds.state_dict()["bad_lines_skipped"] == 2

    ds = JsonlTokenDataset(str(tmp_path), 1, 100, 0, 1, 8, skip_bad_lines=1)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: .*budget exhausted: 1 of 1"):
        take(ds, 3)


def test_demo_corpus_builds_once_and_is_readable(tmp_path, monkeypatch):
    data_path, model_path = demo.build_demo_corpus(str(tmp_path), vocab_size=500, max_text_bytes=300_000)
    assert data_path == str(tmp_path / "data") and model_path == str(tmp_path / "tokenizer.model")
    assert spm.SentencePieceProcessor(model_file=model_path).vocab_size() == 500
    done = json.loads((tmp_path / "DONE.json").read_text())
    assert done["vocab_size"] == 500 and done["text_bytes"] <= 300_000

    for split, folder in (("train", tmp_path / "data" / "1"), ("val", tmp_path / "val" / "1")):
        assert os.listdir(folder) == ["part-00000.jsonl"]
        lines = (folder / "part-00000.jsonl").read_text().splitlines()
        docs = [json.loads(line)["token_ids"] for line in lines]
        assert len(docs) == done["documents"][split] > 0
        assert sum(map(len, docs)) == done["tokens"][split]
        for ids in docs:
            assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 2
            assert all(0 <= t < 500 for t in ids)
    assert done["documents"]["val"] < done["documents"]["train"] / 10

    ds = JsonlTokenDataset(data_path, 64, 500, 0, 1, 8)
    assert take(ds, 1)[0]["input"][0].item() == 1

    files = [model_path, tmp_path / "DONE.json", tmp_path / "data" / "1" / "part-00000.jsonl"]
    mtimes = [os.stat(f).st_mtime_ns for f in files]

    def must_not_rebuild(*args):
        raise AssertionError("the second call rebuilt the corpus")

    monkeypatch.setattr(demo, "_stdlib_documents", must_not_rebuild)
    again = demo.build_demo_corpus(str(tmp_path), vocab_size=500, max_text_bytes=300_000)
    assert again == (data_path, model_path)
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
