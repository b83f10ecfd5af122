"""Tests of mobilellm-prepare and the shard format: tokenizer training, encoding JSONL / Parquet /
text, the held-out split, resuming an interrupted run, converting the original layouts, and the
clear error each kind of bad input gets.

Every test writes its own small inputs under tmp_path; a tokenizer is trained once per module.
Run: python -m pytest tests/test_prepare.py -q
"""

import json
import logging
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from mobilellm_train.data import prepare
from mobilellm_train.data.jsonl import DataError
from mobilellm_train.data.loader import build_token_loader
from mobilellm_train.data.shards import (
    DTYPES,
    INDEX_DTYPE,
    check_tokenizer,
    read_manifest,
    write_token_dataset,
)

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

WORDS = "the a loader shard token resume epoch model data of to in is for with from by on at ring".split()


def random_texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 40))) + rng.choice(["", ".", "\n!"])
            for _ in range(n)]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def documents(folder):
    """The documents of a prepared folder, in order, as lists of ids."""
    m = read_manifest(str(folder))
    docs = []
    for s in m.shards:
        tokens = np.fromfile(os.path.join(folder, s.name + ".bin"), dtype=DTYPES[m.dtype])
        ends = np.fromfile(os.path.join(folder, s.name + ".idx"), dtype=INDEX_DTYPE)
        docs += [tokens[a:b].tolist() for a, b in zip(np.concatenate(([0], ends[:-1])), ends)]
    return docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    raw = write_jsonl(root / "raw" / "t.jsonl", [{"text": t} for t in random_texts(400, seed=1)])
    out = str(root / "tok.model")
    summary = prepare.run(["tokenizer", "--input", raw, "--out", out, "--vocab-size", "400", "--workers", "1"])
    assert summary["vocab_size"] == 400 and (summary["bos_id"], summary["eos_id"]) == (1, 2)
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare.run(["tokenizer", "--input", raw, "--out", out, "--vocab-size", "400"])
    return out


def encode(tokenizer, inputs, out, *extra):
    return prepare.run(["encode", "--input", *map(str, inputs), "--tokenizer", tokenizer, "--out", str(out),
                        "--workers", "1", *map(str, extra)])


# ---------------------------------------------------------------------------------------------
# Encoding.


def test_encode_jsonl_round_trips_with_bos_eos_and_a_manifest(tmp_path, tokenizer, capsys):
    texts = random_texts(300)
    a = write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[:150])])
    write_jsonl(tmp_path / "raw" / "b.jsonl", [{"body": t} for t in texts[150:]])
    os.rename(tmp_path / "raw" / "b.jsonl", tmp_path / "b.jsonl")
    b = write_jsonl(tmp_path / "raw2" / "b.jsonl", [{"text": t} for t in texts[150:]])
    summary = encode(tokenizer, [tmp_path / "raw", b], tmp_path / "out", "--unit-bytes", "2K")

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    expected = [[1, *ids, 2] for ids in sp.encode(texts)]
    assert documents(tmp_path / "out") == expected
    m = read_manifest(str(tmp_path / "out"))
    assert m.dtype == "uint16" and m.vocab_size == 400 and m.num_documents == 300
    assert m.num_tokens == sum(map(len, expected)) == summary["train"]["num_tokens"]
    assert m.max_token_id == max(max(d) for d in expected)
    assert len(m.shards) == summary["train"]["num_shards"] > 4  # 2K units: several shards per file
    assert [p for p, _ in m.raw["sources"]] == sorted([a, b])
    assert m.tokenizer["sha256"] and m.tokenizer["vocab_size"] == 400
    check_tokenizer(m, str(tmp_path / "out" / "tokenizer.model"))  # a copy of the tokenizer
    assert not os.path.exists(tmp_path / "out" / "val")
    assert "ETA" in capsys.readouterr().err

    # N worker processes write exactly the same shards.
    encode(tokenizer, [tmp_path / "raw", b], tmp_path / "par", "--unit-bytes", "2K", "--workers", "2")
    assert read_manifest(str(tmp_path / "par")).shards == m.shards


def test_parquet_and_plain_text_inputs(tmp_path, tokenizer):
    texts = random_texts(50, seed=3)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    table = pa.table({"content": texts, "n": list(range(50))})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    encode(tokenizer, [tmp_path / "t.parquet"], tmp_path / "pq", "--text-field", "content", "--unit-bytes", "300",
           "--no-bos")
    assert documents(tmp_path / "pq") == [[*ids, 2] for ids in sp.encode(texts)]
    assert len(read_manifest(str(tmp_path / "pq")).shards) > 1  # row groups grouped into several units

    flat = [t.replace("\n", " ") for t in texts]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n".join(flat[:20]) + "\n")
    (tmp_path / "txt" / "b.txt").write_text("\n".join(flat[20:]) + "\n")
    encode(tokenizer, [tmp_path / "txt"], tmp_path / "lines", "--text-split", "line", "--no-eos",
           "--unit-bytes", "500")
    assert documents(tmp_path / "lines") == [[1, *ids] for ids in sp.encode(flat)]
    encode(tokenizer, [tmp_path / "txt"], tmp_path / "files")
    whole = [(tmp_path / "txt" / n).read_text() for n in ("a.txt", "b.txt")]
    assert documents(tmp_path / "files") == [[1, *ids, 2] for ids in sp.encode(whole)]
    (tmp_path / "para.txt").write_text("one two\nthree\n\n\nfour\n\nfive six\n")
    encode(tokenizer, [tmp_path / "para.txt"], tmp_path / "para", "--text-split", "paragraph")
    assert documents(tmp_path / "para") == [[1, *ids, 2] for ids in sp.encode(["one two\nthree", "four", "five six"])]


def test_val_fraction_holds_out_whole_documents_deterministically(tmp_path, tokenizer):
    texts = random_texts(400, seed=4)
    raw = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    encode(tokenizer, [raw], tmp_path / "o1", "--val-fraction", "0.1", "--unit-bytes", "3K")
    encode(tokenizer, [raw], tmp_path / "o2", "--val-fraction", "0.1", "--unit-bytes", "3K")
    train, val = documents(tmp_path / "o1"), documents(tmp_path / "o1" / "val")
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    all_docs = [[1, *ids, 2] for ids in sp.encode(texts)]
    assert sorted(train + val) == sorted(all_docs)
    assert 15 < len(val) < 70
    assert val == documents(tmp_path / "o2" / "val")
    assert read_manifest(str(tmp_path / "o1" / "val")).raw["split"] == "val"


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error with the file and line or row, before encoding where possible.


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', r"bad\.jsonl:3: invalid JSON"),
        ('{"text": 7}', r"bad\.jsonl:3: 'text' must be a string, got int"),
        ('{"body": "x"}', r"bad\.jsonl:3: no key 'text' \(keys: 'body'\)"),
        ('["text"]', r"bad\.jsonl:3: expected a JSON object"),
        ("", r"bad\.jsonl:3: empty line"),
    ],
)
def test_bad_jsonl_record_names_file_and_line(tmp_path, tokenizer, line, message):
    raw = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, line, {"text": "c"}])
    with pytest.raises(DataError, match=message):
        encode(tokenizer, [raw], tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_line_numbers_are_right_in_a_later_unit_and_for_invalid_utf8(tmp_path, tokenizer):
    path = tmp_path / "big.jsonl"
    rows = [json.dumps({"text": f"row {i}"}).encode() for i in range(200)]
    rows[150] = b'{"text": "caf\xe9"}'
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(DataError, match=r"big\.jsonl:151: invalid UTF-8 \(byte 0xe9"):
        encode(tokenizer, [path], tmp_path / "out", "--unit-bytes", "500")


def test_bad_files_and_folders_fail_while_planning(tmp_path, tokenizer):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir: folder holds no input files"):
        encode(tokenizer, [tmp_path / "empty_dir"], tmp_path / "o")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: empty file"):
        encode(tokenizer, [tmp_path / "e.jsonl"], tmp_path / "o")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: unreadable Parquet file"):
        encode(tokenizer, [tmp_path / "x.parquet"], tmp_path / "o")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: column 'text' has type int64, not string"):
        encode(tokenizer, [tmp_path / "ints.parquet"], tmp_path / "o")
    with pytest.raises(DataError, match=r"ints\.parquet: no column 'body'"):
        encode(tokenizer, [tmp_path / "ints.parquet"], tmp_path / "o", "--text-field", "body")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown file type"):
        encode(tokenizer, [tmp_path / "data.csv"], tmp_path / "o")
    with pytest.raises(DataError, match="nothing-here: no such file"):
        encode(tokenizer, [tmp_path / "nothing-here"], tmp_path / "o")
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet: row 2 \(counting from 0\): null text"):
        encode(tokenizer, [tmp_path / "null.parquet"], tmp_path / "o")
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_skipping_is_opt_in_with_a_budget_and_logged_counts(tmp_path, tokenizer, caplog):
    raw = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, "{oops", {"text": "b"}, {"n": 1}, {"text": "c"}])
    with pytest.raises(DataError, match=r"a\.jsonl:4: .*budget of 1 is used up"):
        encode(tokenizer, [raw], tmp_path / "o1", "--skip-bad", "1")
    # Over several shards the budget holds for the whole run, also when a re-run resumes it.
    with pytest.raises(DataError, match="2 bad records skipped in all, more than --skip-bad 1"):
        encode(tokenizer, [raw], tmp_path / "o3", "--skip-bad", "1", "--unit-bytes", "20")
    with pytest.raises(DataError, match="more than --skip-bad 1"):
        encode(tokenizer, [raw], tmp_path / "o3", "--skip-bad", "1", "--unit-bytes", "20")
    encode(tokenizer, [raw], tmp_path / "o3", "--skip-bad", "2", "--unit-bytes", "20")  # a larger budget finishes it
    assert len(documents(tmp_path / "o3")) == 3
    with caplog.at_level(logging.WARNING):
        summary = encode(tokenizer, [raw], tmp_path / "o2", "--skip-bad", "2")
    assert summary["records_skipped"] == 2 and len(documents(tmp_path / "o2")) == 3
    assert read_manifest(str(tmp_path / "o2")).raw["records_skipped"] == 2
    assert "a.jsonl:2: invalid JSON" in caplog.text and "a.jsonl:4: no key 'text'" in caplog.text


# ---------------------------------------------------------------------------------------------
# Interrupted and repeated runs.


def test_interrupted_run_leaves_nothing_readable_and_a_rerun_finishes_it(tmp_path, tokenizer, caplog):
    good = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in random_texts(100)])
    bad_rows = [{"text": t} for t in random_texts(100, seed=5)]
    bad = write_jsonl(tmp_path / "in" / "b.jsonl", bad_rows[:50] + ["{broken"] + bad_rows[50:])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b\.jsonl:51"):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "1K")
    with pytest.raises(DataError, match="no manifest.*interrupted"):
        build_token_loader(str(out), 8, 1, 1, 0, 1)
    records = [json.load(open(out / ".progress" / n)) for n in os.listdir(out / ".progress") if n.startswith("unit-")]
    of_a = sorted(r["train"]["name"] for r in records if {p[0] for p in r["unit"]["pieces"]} == {good})
    assert of_a and len(records) > len(of_a)  # a.jsonl's units, and b.jsonl's first, finished
    stale = out / "shard-00099.bin.tmp.12345"  # what a killed worker leaves
    stale.write_bytes(b"half")
    mtimes = {n: os.path.getmtime(out / f"{n}.bin") for n in of_a}

    write_jsonl(bad, bad_rows)  # the user fixes the bad line: b.jsonl's finished unit is redone
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "1K")
    assert f"{len(of_a)} of" in caplog.text and "already finished" in caplog.text
    assert "b.jsonl: changed since an earlier run" in caplog.text
    assert not stale.exists()
    assert all(os.path.getmtime(out / f"{n}.bin") == t for n, t in mtimes.items())  # finished shards kept
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    texts = [r["text"] for r in map(json.loads, open(good))] + [r["text"] for r in bad_rows]
    assert documents(out) == [[1, *ids, 2] for ids in sp.encode(texts)]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "1K")
    assert "nothing to do" in caplog.text
    with pytest.raises(DataError, match=r"prepared earlier with other settings \(bos: True then, False now"):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "1K", "--no-bos")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a mobilellm-prepare output"):
        encode(tokenizer, [tmp_path / "in"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Converting the original layouts, and the checks the trainer makes of a prepared folder.


def test_convert_node_layout_keeps_documents_and_order(tmp_path):
    rng = random.Random(0)
    docs = {n: [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 30))] + [2] for _ in range(40)]
            for n in (1, 2)}
    for n, folder_docs in docs.items():
        write_jsonl(tmp_path / "base" / str(n) / "p0.jsonl", [{"token_ids": d} for d in folder_docs[:25]])
        write_jsonl(tmp_path / "base" / str(n) / "p1.jsonl", [{"token_ids": d} for d in folder_docs[25:]])
    prepare.run(["convert", "--layout", "nodes", "--input", str(tmp_path / "base"), "--out", str(tmp_path / "o"),
                 "--vocab-size", "500", "--unit-bytes", "700", "--workers", "2"])
    assert documents(tmp_path / "o") == docs[1] + docs[2]
    m = read_manifest(str(tmp_path / "o"))
    assert m.tokenizer is None and m.dtype == "uint16" and m.vocab_size == 500

    write_jsonl(tmp_path / "bad" / "1" / "p.jsonl", [{"token_ids": [1, 5]}, {"token_ids": [1, 500]}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: token id 500 outside \[0, 500\)"):
        prepare.run(["convert", "--layout", "nodes", "--input", str(tmp_path / "bad"), "--out", str(tmp_path / "o2"),
                     "--vocab-size", "500"])
    with pytest.raises(DataError, match="no node folders"):
        prepare.run(["convert", "--layout", "nodes", "--input", str(tmp_path / "o"), "--out", str(tmp_path / "o3"),
                     "--vocab-size", "500"])


def test_convert_amber_splits_documents_at_eos_and_keeps_its_chunks_as_windows(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    stream = rng.integers(3, 120, 12 * 65)
    stream[rng.choice(stream.size, 40, replace=False)] = 2  # EOS ends documents across chunk lines
    chunks = stream.reshape(12, 65).tolist()
    write_jsonl(tmp_path / "amber" / "train" / "train_0.jsonl",
                [{"token_ids": c, "source": "c4"} for c in chunks[:5]])
    write_jsonl(tmp_path / "amber" / "train" / "train_1.jsonl",
                [{"token_ids": c, "source": "arxiv"} for c in chunks[5:10]])
    write_jsonl(tmp_path / "amber" / "valid" / "c4.jsonl", [{"token_ids": c} for c in chunks[10:]])
    out = tmp_path / "o"
    prepare.run(["convert", "--layout", "amber", "--input", str(tmp_path / "amber"), "--out", str(out),
                 "--tokenizer", tokenizer, "--workers", "1"])
    train = documents(out)
    assert [t for d in train for t in d] == stream[: 10 * 65].tolist()
    # Documents end at each EOS, and at the end of each input file (both files share one shard here).
    assert sum(d[-1] != 2 for d in train) <= 2 and all(2 not in d[:-1] for d in train)
    assert len(train) == np.sum(stream[: 5 * 65] == 2) + np.sum(stream[5 * 65 : 10 * 65] == 2) + 2
    assert [t for d in documents(out / "val") for t in d] == stream[10 * 65 :].tolist()
    # With seq_len + 1 = the chunk length, each training window is one original line.
    ld = build_token_loader(str(out), 64, 1, 1, 0, 1, num_workers=0, tokenizer_path=tokenizer)
    it = iter(ld)
    windows = []
    for _ in range(10):
        b = next(it)
        windows.append(b["input"][0].tolist() + b["label"][0, -1:].tolist())
    assert sorted(windows) == sorted(chunks[:10])


def test_tokenizer_mismatch_and_corrupt_shards_are_named(tmp_path, tokenizer):
    raw = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in random_texts(100)])
    out = tmp_path / "o"
    encode(tokenizer, [raw], out, "--unit-bytes", "1K")
    other = tmp_path / "other.model"
    prepare.run(["tokenizer", "--input", raw, "--out", str(other), "--vocab-size", "350", "--workers", "1"])
    with pytest.raises(DataError, match=rf"tokenizer {other} \(sha256 .*\) is not the one {out} was prepared with"):
        build_token_loader(str(out), 8, 1, 1, 0, 1, tokenizer_path=str(other))
    build_token_loader(str(out), 8, 1, 1, 0, 1, tokenizer_path=tokenizer)

    assert prepare.run(["verify", str(out)])[str(out)]["num_tokens"] == read_manifest(str(out)).num_tokens
    shard = out / "shard-00001.idx"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.idx: sha256 .* does not match"):
        prepare.run(["verify", str(out)])
    (out / "manifest.json").write_text('{"format": "mobilellm-token-shards", "version": 1, "dtype": "uint16",')
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        build_token_loader(str(out), 8, 1, 1, 0, 1)


def test_write_token_dataset_refuses_to_overwrite_and_checks_ids(tmp_path):
    write_token_dataset(str(tmp_path / "d"), [np.arange(5)], 10, 100)
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        write_token_dataset(str(tmp_path / "d"), [np.arange(5)], 10, 100)
    with pytest.raises(DataError, match=r"token id outside \[0, 4\)"):
        write_token_dataset(str(tmp_path / "e"), [np.arange(5)], 4, 100)


def test_encode_and_verify_record_the_verification_and_the_steps_the_data_covers(tmp_path, tokenizer, caplog):
    """encode records that its shards verified (verified.json), so training starts hash nothing; a
    shard an earlier, interrupted run wrote is hashed again before the record vouches for it; verify
    records too; both say how many steps of the given batch the windows cover."""
    rows = [{"text": t} for t in random_texts(100, seed=3)]
    good = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in random_texts(100)])
    bad = write_jsonl(tmp_path / "in" / "b.jsonl", rows[:50] + ["{broken"] + rows[50:])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b\.jsonl:51"):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "1K")
    assert not (out / "verified.json").exists()
    records = [json.load(open(out / ".progress" / n)) for n in os.listdir(out / ".progress") if n.startswith("unit-")]
    finished = sorted(r["train"]["name"] for r in records if {p[0] for p in r["unit"]["pieces"]} == {good})
    shard = out / f"{finished[0]}.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # damage while the run was away: same size, other bytes
    shard.write_bytes(bytes(data))
    write_jsonl(bad, rows)
    with pytest.raises(DataError, match=rf"{finished[0]}\.bin: sha256 .* does not match"):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "1K")
    assert not (out / "verified.json").exists()

    fresh = tmp_path / "fresh"
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [tmp_path / "in"], fresh, "--unit-bytes", "1K", "--seq-len", "16",
               "--global-batch-size", "4")
    record = json.loads((fresh / "verified.json").read_text())
    assert record["how"] == "hashed while writing" and len(record["files"]) == 2 * len(read_manifest(str(fresh)).shards)
    windows = read_manifest(str(fresh)).num_tokens // 17
    assert f"{windows:,} windows of seq_len + 1 = 17 tokens: {windows // 4:,} steps of global batch 4" in caplog.text

    (fresh / "verified.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = prepare.run(["verify", str(fresh), "--workers", "2", "--seq-len", "16", "--global-batch-size", "4"])
    assert summary[str(fresh)]["record"] == str(fresh / "verified.json") and (fresh / "verified.json").exists()
    assert "recorded in" in caplog.text and f"{windows // 4:,} steps of global batch 4" in caplog.text
