"""A user's first month, round three (issue 32): each step a user took that went wrong, taken
again, with what should happen now: a prepared dataset never silently replaced, an interrupted
encode named as such (on exit and at training start), the config change a resume logs, continued
pretraining from another tokenizer refused, a command-line data.sources against a TOML data.path,
and the smaller rough edges. Everything in-process on tiny inputs, except where the processes
themselves are what is tested (the launcher's one-line error).
Run: python -m pytest tests/test_first_month.py -q
"""

import gzip
import json
import logging
import os
import re
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from mobilellm_train.data import prepare
from mobilellm_train.data.shards import read_manifest
from mobilellm_train.errors import ConfigError, DataError
from test_prepare import documents, encode, random_texts, tokenizer, write_jsonl  # noqa: F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def folder_bytes(folder):
    """Every file under `folder` (relative name -> bytes)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ---------------------------------------------------------------------------------------------
# 1. A finished dataset is never replaced without --overwrite; verify names what is not listed.


def test_encode_into_a_finished_dataset_of_other_inputs_is_refused(tmp_path, tokenizer, caplog):
    big = write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": t} for t in random_texts(300, seed=2)])
    write_jsonl(tmp_path / "web" / "b.jsonl", [{"text": t} for t in random_texts(200, seed=3)])
    small = write_jsonl(tmp_path / "man" / "c.jsonl", [{"text": t} for t in random_texts(30, seed=4)])
    out = tmp_path / "data"
    encode(tokenizer, [tmp_path / "web"], out, "--unit-bytes", "4K", "--val-fraction", "0.1")
    shards = len(read_manifest(str(out)).shards)
    assert shards > 3
    before = folder_bytes(out)

    # The user's step: the same --out, other inputs. Refused, naming what differs and the ways on.
    with pytest.raises(DataError) as e:
        encode(tokenizer, [small], out, "--unit-bytes", "4K", "--val-fraction", "0.1")
    message = str(e.value)
    assert f"{out}: a finished dataset ({shards} shards" in message and "from other inputs" in message
    assert f"1 file added: {small}" in message and "2 files no longer given" in message
    assert "Choose another --out" in message and "--overwrite" in message
    assert folder_bytes(out) == before  # not a byte changed
    # Other settings too (and a grown input), all named at once.
    write_jsonl(big, [{"text": t} for t in random_texts(301, seed=2)])
    with pytest.raises(DataError, match=r"with other settings \(eos: True then, False now\) and from other inputs "
                                        rf"\(1 file changed size: {re.escape(big)}: [\d,]+ bytes then, [\d,]+ now\)"):
        encode(tokenizer, [tmp_path / "web"], out, "--unit-bytes", "4K", "--val-fraction", "0.1", "--no-eos")
    assert folder_bytes(out) == before
    write_jsonl(big, [{"text": t} for t in random_texts(300, seed=2)])

    # verify names what the manifest does not list (an orphan shard, a stray file), and keeps them.
    (out / "shard-00042.bin").write_bytes(b"\0" * 64)
    (out / "notes.txt").write_text("mine")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = prepare.run(["verify", str(out)])
    assert summary[str(out)]["unlisted"] == ["notes.txt", "shard-00042.bin"]
    assert summary[str(out / "val")]["unlisted"] == []
    assert "2 files (68 B) that manifest.json does not list" in caplog.text and "notes.txt, shard-00042.bin" in caplog.text

    # --overwrite: the old dataset's files go first (the orphan shard too), a file of another name stays.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [small], out, "--unit-bytes", "4K", "--val-fraction", "0.1", "--overwrite")
    assert f"--overwrite: removed the earlier dataset ({shards + 1} shards" in caplog.text
    fresh = tmp_path / "fresh"
    encode(tokenizer, [small], fresh, "--unit-bytes", "4K", "--val-fraction", "0.1")
    assert documents(out) == documents(fresh) and documents(out / "val") == documents(fresh / "val")
    assert prepare.run(["verify", str(out)])[str(out)]["unlisted"] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# 5. An interrupted encode says how it resumes, and training names the folder as unfinished.


def test_interrupted_encode_says_rerunning_resumes_and_training_names_it_unfinished(tmp_path, tokenizer, caplog,
                                                                                   monkeypatch):
    from mobilellm_train.config import load_config
    from mobilellm_train.data.prepare import pipeline

    raw = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in random_texts(400, seed=5)])
    out = tmp_path / "data"
    argv = ["encode", "--input", raw, "--tokenizer", tokenizer, "--out", str(out), "--workers", "1",
            "--unit-bytes", "2K", "--val-fraction", "0.1"]
    real_run_unit, calls = pipeline.run_unit, []

    def run_unit_then_sigterm(unit, settings):
        record = real_run_unit(unit, settings)
        calls.append(unit.index)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or slurm would, between two units
        return record

    monkeypatch.setattr(pipeline, "run_unit", run_unit_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as e:
        prepare.main(argv)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is handler
    units = len([n for n in os.listdir(out / ".progress") if n.startswith("unit-")])
    assert units == 2
    total = json.loads((out / ".progress" / "command.json").read_text())["units"]
    assert f"stopped by SIGTERM: {out}: 2 of {total} shards are finished and kept; rerunning the same command " \
           "resumes" in caplog.text
    assert not [n for n in os.listdir(out) if ".tmp." in n]

    # The user's next step: training on it. Named as unfinished, with the command that finishes it.
    for key, args in (("data.path", ["--data.path", str(out), "--data.val_interval", "10"]),
                      ("data.sources", ["--data.sources", str(out)]),
                      ("data.val_path", ["--data.val_path", str(out / "val")])):
        with pytest.raises(ConfigError) as e:
            load_config(args + ["--job.dump_folder", str(tmp_path / "run")])
        assert str(e.value).startswith(f"{key}: {out if key != 'data.val_path' else out}"), e.value
        assert f"is an unfinished mobilellm-prepare output: preparing it was interrupted (2 of {total} shards " \
               "finished, no manifest.json yet)" in str(e.value)
        assert "mobilellm-prepare encode --input" in str(e.value) and f"--out {out}" in str(e.value)

    monkeypatch.setattr(pipeline, "run_unit", real_run_unit)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare.run(argv[:])
    assert f"2 of {total} shards already finished" in caplog.text
    assert load_config(["--data.path", str(out), "--data.val_interval", "10", "--job.dump_folder",
                        str(tmp_path / "run")]).data.val_path == str(out / "val")


# ---------------------------------------------------------------------------------------------
# 8. The smaller rough edges of mobilellm-prepare.


def test_gz_progress_ends_at_100_percent(tmp_path, tokenizer, capsys):
    rows = "".join(json.dumps({"text": t}) + "\n" for t in random_texts(600, seed=6) * 4)
    path = tmp_path / "in" / "a.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(rows.encode()))
    assert len(rows) > 4 * path.stat().st_size  # text compresses well: counted decompressed, 400%+
    encode(tokenizer, [path], tmp_path / "out")
    percents = [float(p) for p in re.findall(r"\[encode\]\s+([\d.]+)%", capsys.readouterr().err)]
    assert percents and max(percents) == 100.0 and percents[-1] == 100.0


def test_empty_inputs_are_skipped_and_text_field_takes_a_list(tmp_path, tokenizer, caplog):
    texts = random_texts(60, seed=7)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts[:20]])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"content": t, "text_len": len(t)} for t in texts[20:40]])
    pq.write_table(pa.table({"content": texts[40:]}), tmp_path / "in" / "c.parquet")
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [tmp_path / "in"], tmp_path / "out", "--text-field", "text,content")
    assert f"{tmp_path / 'in' / 'empty.jsonl'}: empty file (0 bytes); skipping it" in caplog.text
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    assert documents(tmp_path / "out") == [[1, *ids, 2] for ids in sp.encode(texts)]
    # The tokenizer command reads the same inputs the same way.
    summary = prepare.run(["tokenizer", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "t.model"),
                           "--vocab-size", "300", "--text-field", "text,content", "--workers", "1"])
    assert set(summary["sample_bytes_per_input"]) == {str(tmp_path / "in" / n) for n in ("a.jsonl", "b.jsonl",
                                                                                          "c.parquet")}
    with pytest.raises(DataError, match=r"b\.jsonl:1: no key 'text' or 'body' \(keys: 'content', 'text_len'\)"):
        encode(tokenizer, [tmp_path / "in" / "b.jsonl"], tmp_path / "o2", "--text-field", "text,body")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file \(0 bytes\); nothing to read"):
        encode(tokenizer, [tmp_path / "in" / "empty.jsonl"], tmp_path / "o3")


def test_a_huge_document_is_cut_at_line_ends_into_documents(tmp_path, tokenizer, caplog):
    lines = [f"line {i} of the book: " + " ".join(random_texts(1, seed=i)[0].split()) + "\n" for i in range(120)]
    book = tmp_path / "book.txt"
    book.write_text("".join(lines))
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [book], tmp_path / "out", "--max-document-bytes", "2K")
    docs = documents(tmp_path / "out")
    size = book.stat().st_size
    assert f"{book}: a document of {size / 1000:.3g} kB, cut into {len(docs)} documents at line ends" in caplog.text
    assert len(docs) == -(-size // 2048) or len(docs) == -(-size // 2048) + 1
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    parts = [sp.decode(d[1:-1]) for d in docs]
    assert all(p.endswith("\n") and len(p.encode()) <= 2048 for p in parts) and "".join(parts) == book.read_text()
    encode(tokenizer, [book], tmp_path / "whole", "--max-document-bytes", "0")
    assert len(documents(tmp_path / "whole")) == 1
