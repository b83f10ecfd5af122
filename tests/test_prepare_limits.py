"""Tests of mobilellm-prepare at its limits: the tokenizer's sample (within --sample-bytes, spread
over the inputs by size, memory bounded), many small inputs packed into units of --unit-bytes,
and a full disk (a real 1 MiB tmpfs where the test runs as root and may mount one, an injected
ENOSPC otherwise): every command says what, where and what to do, keeps what is complete, and a
rerun after freeing space finishes the job.

Run: python -m pytest tests/test_prepare_limits.py -q
"""

import errno
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tracemalloc
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mobilellm_train.data import prepare
from mobilellm_train.data import shards as shards_module
from mobilellm_train.data.prepare.sample import SampleStats, sample_sentences
from mobilellm_train.data.shards import read_manifest
from mobilellm_train.errors import DataError
from test_prepare import documents

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

WORDS = "the a loader shard token resume epoch model data of to in is for with from by on at ring".split()


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, texts):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


def tmp_files(folder):
    return [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names if ".tmp." in n]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(1)
    raw = write_jsonl(root / "t.jsonl", [words(rng, rng.randrange(1, 40)) for _ in range(400)])
    out = str(root / "tok.model")
    prepare.run(["tokenizer", "--input", raw, "--out", out, "--vocab-size", "300", "--workers", "1"])
    return out


def encode(tokenizer, inputs, out, *extra):
    return prepare.run(["encode", "--input", *map(str, inputs), "--tokenizer", tokenizer, "--out", str(out),
                        "--workers", "1", *map(str, extra)])


# ---------------------------------------------------------------------------------------------
# The tokenizer's sample.


def test_tokenizer_sample_is_within_the_limit_and_shared_by_size(tmp_path):
    rng = random.Random(0)
    # A book: one document on one line (no line start to cut at); the words of its tenth z end in z.
    book = " ".join(" ".join(rng.choice(WORDS) + str(z) for _ in range(2000)) for z in range(10))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "book.txt").write_text(book)
    write_jsonl(tmp_path / "in" / "web.jsonl", [words(rng, rng.randrange(5, 60)) for _ in range(400)])
    for k in range(20):
        (tmp_path / "in" / f"note{k:02d}.txt").write_text(words(rng, 300) + "\n")
    with gzip.open(tmp_path / "in" / "old.jsonl.gz", "wt") as f:  # counts at its compressed size
        f.writelines(json.dumps({"text": words(rng, 40)}) + "\n" for _ in range(600))
    pq.write_table(pa.table({"text": [words(rng, 40) for _ in range(600)]}), tmp_path / "in" / "t.parquet",
                   row_group_size=50)
    sizes = {str(p): p.stat().st_size for p in (tmp_path / "in").iterdir()}
    limit = 40 * 1024
    assert limit < sum(sizes.values()) / 2

    summary = prepare.run(["tokenizer", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "tok.model"),
                           "--vocab-size", "400", "--workers", "1", "--sample-bytes", "40K"])
    assert 0.95 * limit <= summary["sample_bytes"] <= limit
    shares = summary["sample_bytes_per_input"]
    assert set(shares) == set(sizes)
    for path, size in sizes.items():  # each input's share of the sample is its share of the input
        assert abs(shares[path] / summary["sample_bytes"] - size / sum(sizes.values())) < 0.01, path

    args = types.SimpleNamespace(input=[str(tmp_path / "in" / "book.txt")], format="auto", text_field="text",
                                 sample_bytes=8 * 1024, skip_bad=0)
    sample = list(sample_sentences(args, SampleStats()))
    assert {w[-1] for w in " ".join(sample).split()} == set("0123456789")  # from all over the book
    assert max(map(len, sample)) <= prepare.sample.MAX_SENTENCE_CHARS


def test_tokenizer_sample_memory_does_not_grow_with_the_input(tmp_path):
    rng = random.Random(0)
    line = words(rng, 20000)  # ~100 kB
    with open(tmp_path / "huge.txt", "w") as f:  # 25 MB in one line: one document
        for _ in range(250):
            f.write(line + " ")
    args = types.SimpleNamespace(input=[str(tmp_path / "huge.txt")], format="auto", text_field="text",
                                 sample_bytes=256 * 1024, skip_bad=0)
    stats = SampleStats()
    tracemalloc.start()
    try:
        for _ in sample_sentences(args, stats):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.bytes <= 256 * 1024
    assert peak < 8 << 20, f"{peak} bytes held while sampling a 25 MB file"


def test_tokenizer_sample_names_a_bad_line_and_skips_it_on_request(tmp_path):
    path = tmp_path / "a.jsonl"
    rng = random.Random(5)
    rows = [json.dumps({"text": words(rng, 30)}) for i in range(50)]
    rows[30] = '{"text": 5}'
    path.write_text("\n".join(rows) + "\n")
    base = ["tokenizer", "--input", str(path), "--vocab-size", "300", "--workers", "1"]
    with pytest.raises(DataError, match=r"a\.jsonl:31: 'text' must be a string"):
        prepare.run(base + ["--out", str(tmp_path / "t1.model")])
    assert not os.path.exists(tmp_path / "t1.model")
    prepare.run(base + ["--out", str(tmp_path / "t2.model"), "--skip-bad", "1"])


# ---------------------------------------------------------------------------------------------
# Packing small inputs into units.


def test_many_small_inputs_are_packed_into_units_of_about_unit_bytes(tmp_path, tokenizer, caplog):
    rng = random.Random(2)
    texts = [[words(rng, rng.randrange(5, 30)) for _ in range(6)] for _ in range(300)]
    paths = [write_jsonl(tmp_path / "in" / f"f{k:03d}.jsonl", t) for k, t in enumerate(texts)]
    total = sum(os.path.getsize(p) for p in paths)
    unit = 16 * 1024
    out = tmp_path / "out"
    encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "16K", "--val-fraction", "0.1")
    n = len(read_manifest(str(out)).shards)
    assert 0.75 * total / unit <= n <= 1.35 * total / unit + 1  # not one shard per file
    assert len(os.listdir(out / ".progress")) == n + 2  # a record per unit, the settings and the command
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    expected = [[1, *ids, 2] for ids in sp.encode([t for f in texts for t in f])]
    train, val = documents(out), documents(out / "val")
    assert 0 < len(val) < len(expected) / 5 and sorted(train + val) == sorted(expected)
    assert [d for d in expected if d in train] == train  # input order kept

    # The same inputs and settings plan the same units: a rerun has nothing to do. In a run that
    # was interrupted, a file that grew redoes its unit and the later ones (they shift), not the
    # ones before it (a finished dataset is refused instead: test_first_month).
    mtimes = {s.name: os.path.getmtime(out / f"{s.name}.bin") for s in read_manifest(str(out)).shards}
    with caplog.at_level("INFO"):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "16K", "--val-fraction", "0.1")
    assert "nothing to do" in caplog.text
    texts[200].append("one more document")
    write_jsonl(paths[200], texts[200])
    os.remove(out / "manifest.json")  # as if the run had been stopped before its end
    caplog.clear()
    with caplog.at_level("INFO"):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "16K", "--val-fraction", "0.1")
    assert "f200.jsonl: changed since an earlier run" in caplog.text
    kept = [name for name, t in mtimes.items() if os.path.getmtime(out / f"{name}.bin") == t]
    assert n // 2 < len(kept) < n
    fresh = tmp_path / "fresh"
    encode(tokenizer, [tmp_path / "in"], fresh, "--unit-bytes", "16K", "--val-fraction", "0.1")
    assert documents(out) == documents(fresh) and documents(out / "val") == documents(fresh / "val")

    # A record of an older mobilellm-prepare (a unit was one part of one file) is redone, not misread.
    record = out / ".progress" / "unit-00001.json"
    old = json.loads(record.read_text())
    old["unit"] = {"index": 1, "path": paths[0], "kind": "jsonl", "start": 0, "stop": -1, "file_bytes": 1,
                   "input_bytes": 1, "split": "train"}
    record.write_text(json.dumps(old))
    os.remove(out / "manifest.json")
    caplog.clear()
    with caplog.at_level("INFO"):
        encode(tokenizer, [tmp_path / "in"], out, "--unit-bytes", "16K", "--val-fraction", "0.1")
    assert "changed since an earlier run prepared shard 1" in caplog.text
    assert documents(out) == documents(fresh)


# ---------------------------------------------------------------------------------------------
# A full disk.


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_in_a_shard_keeps_the_finished_ones_and_a_rerun_resumes(tmp_path, tokenizer, monkeypatch, caplog):
    rng = random.Random(3)
    raw = write_jsonl(tmp_path / "a.jsonl", [words(rng, 30) for _ in range(300)])
    out = tmp_path / "out"
    finish = shards_module.ShardWriter.finish

    def finish_or_full(self):
        if self.name == "shard-00003" and self.folder == str(out):
            self._flush()
            enospc()
        return finish(self)

    monkeypatch.setattr(shards_module.ShardWriter, "finish", finish_or_full)
    with pytest.raises(DataError) as e:
        encode(tokenizer, [raw], out, "--unit-bytes", "4K")
    n = len(prepare.plan_units([(raw, "jsonl", "train")], 4096, "text", "file"))
    assert str(e.value).startswith(f"{out}: no space left on the device while writing shard shard-00003 (")
    assert "free of" in str(e.value) and "Free some space on that disk (or choose another --out)" in str(e.value)
    assert f"run the same command again: the 3 of {n} shards finished so far are kept" in str(e.value)
    assert tmp_files(out) == [] and not os.path.exists(out / "manifest.json")
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        encode(tokenizer, [raw], out, "--unit-bytes", "4K")
    assert f"3 of {n} shards already finished" in caplog.text
    encode(tokenizer, [raw], tmp_path / "fresh", "--unit-bytes", "4K")
    assert documents(out) == documents(tmp_path / "fresh")


def test_full_disk_writing_manifest_settings_or_tokenizer_model(tmp_path, tokenizer, monkeypatch):
    raw = write_jsonl(tmp_path / "a.jsonl", ["some words here"] * 50)
    out = tmp_path / "out"
    write = shards_module.write_file_atomic

    def full_for(suffix):
        def write_or_full(path, data):
            if path.endswith(suffix):
                with open(f"{path}.tmp.{os.getpid()}", "wb") as f:
                    f.write(data[:10])  # as far as it got
                enospc()
            write(path, data)
        return write_or_full

    monkeypatch.setattr(shards_module, "write_file_atomic", full_for("manifest.json"))
    with pytest.raises(DataError, match=r"manifest\.json: no space left .* writing the manifest .*every shard \(1\) "
                                        r"is finished and kept"):
        encode(tokenizer, [raw], out, "--val-fraction", "0.5")
    assert tmp_files(out) == [] and os.path.exists(out / "shard-00000.bin")
    monkeypatch.setattr(shards_module, "write_file_atomic", write)
    encode(tokenizer, [raw], out, "--val-fraction", "0.5")
    assert read_manifest(str(out)).num_documents + read_manifest(str(out / "val")).num_documents == 50

    from mobilellm_train.data.prepare import out_folder, tokenizer as tok_module

    monkeypatch.setattr(out_folder, "write_json_atomic", enospc)
    with pytest.raises(DataError, match=r"settings\.json: no space left .* writing the run's settings"):
        encode(tokenizer, [raw], tmp_path / "out2")
    monkeypatch.setattr(tok_module, "write_file_atomic", full_for("t.model"))
    with pytest.raises(DataError, match=r"t\.model: no space left on the device while writing the tokenizer model"):
        rng = random.Random(1)
        varied = write_jsonl(tmp_path / "v.jsonl", [words(rng, rng.randrange(1, 40)) for _ in range(400)])
        prepare.run(["tokenizer", "--input", varied, "--out", str(tmp_path / "t.model"), "--vocab-size", "300",
                     "--workers", "1"])
    assert os.listdir(tmp_path) and not [n for n in os.listdir(tmp_path) if n.startswith("t.model")]


# A real full disk: a 1 MiB tmpfs (Linux, root); the commands run as a user runs them.

MOUNT_SIZE = "1m"


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a tmpfs (the injected-ENOSPC tests cover the rest)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE}", "tmpfs", str(disk)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def cli(*argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.data.prepare", *map(str, argv)],
                       capture_output=True, text=True, timeout=300, env=env)
    return r.returncode, r.stderr


def test_real_full_disk_for_every_command(tmp_path, tokenizer, small_disk):
    rng = random.Random(4)
    raw = write_jsonl(tmp_path / "a.jsonl", [words(rng, rng.randrange(20, 200)) for _ in range(3000)])
    out = small_disk / "out"
    rc, err = cli("encode", "--input", raw, "--tokenizer", tokenizer, "--out", out, "--unit-bytes", "64K",
                  "--workers", "2")
    assert rc == 1 and "Traceback" not in err, err
    assert f"{out}: no space left on the device while writing shard shard-" in err, err
    assert "Free some space on that disk (or choose another --out), then run the same command again" in err
    finished = len([n for n in os.listdir(out / ".progress") if n.startswith("unit-")])
    assert finished > 0 and f"the {finished} of " in err
    assert tmp_files(out) == [] and not os.path.exists(out / "manifest.json")

    # The disk filled up to the last byte: the tokenizer's model, convert; verify only reads.
    fill(small_disk / "filler")
    rc, err = cli("tokenizer", "--input", raw, "--out", small_disk / "tok.model", "--vocab-size", "300",
                  "--sample-bytes", "64K", "--workers", "1")
    assert rc == 1 and "Traceback" not in err and "tok.model: not enough space on the device" in err, err
    assert "Free some space on that disk (or choose another --out), then run the same command again" in err
    assert not [n for n in os.listdir(small_disk) if n.startswith("tok.model")]
    nodes = tmp_path / "nodes" / "1"
    nodes.mkdir(parents=True)
    (nodes / "p.jsonl").write_text("".join(json.dumps({"token_ids": [1, 5, 7, 2]}) + "\n" for _ in range(900)))
    rc, err = cli("convert", "--layout", "nodes", "--input", nodes.parent, "--out", small_disk / "conv",
                  "--vocab-size", "500")
    assert rc == 1 and "Traceback" not in err and re.search(r"conv\S*: no space left on the device", err), err
    rc, err = cli("verify", small_disk / "out")  # not a dataset yet: said as before, not as a full disk
    assert rc == 1 and "no manifest" in err and "Traceback" not in err, err

    # Space freed (the disk grows): the same command finishes, from where it stopped.
    os.remove(small_disk / "filler")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True, timeout=30)
    rc, err = cli("encode", "--input", raw, "--tokenizer", tokenizer, "--out", out, "--unit-bytes", "64K",
                  "--workers", "2")
    assert rc == 0 and f"{finished} of " in err and "already finished" in err, err
    encode(tokenizer, [raw], tmp_path / "fresh", "--unit-bytes", "64K")
    assert documents(out) == documents(tmp_path / "fresh")
    fill(small_disk / "filler")
    rc, err = cli("verify", out)
    assert rc == 0 and "sha256 match" in err, err


def fill(path):
    """Write zeros to path until the disk is full."""
    try:
        with open(path, "wb", buffering=0) as f:
            while f.write(b"\0" * (1 << 16)):
                pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
