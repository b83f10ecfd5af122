"""mobilellm-prepare: tokenize your own data, or convert the original layout, into token shards.

    python -m mobilellm_train.data.prepare tokenizer --input raw/ --out tok.model --vocab-size 32000
    python -m mobilellm_train.data.prepare encode --input raw/ --tokenizer tok.model --out data/web --workers 16
    python -m mobilellm_train.data.prepare convert --layout nodes --input /data/tokens --out data/orig \
        --vocab-size 32000
    python -m mobilellm_train.data.prepare convert --layout amber --input amber/ --out data/amber \
        --tokenizer tok.model
    python -m mobilellm_train.data.prepare verify data/web
    python -m mobilellm_train.data.prepare teacher-logits --teacher runs/big/checkpoints/step-9000 --data data/web \
        --out data/web-top16 --top-k 16 --seq-len 2048

Inputs (``--input``, files, folders or globs): JSONL with a text field (``--text-field``, or a comma
list: the first one a record has), Parquet with a text column (read with pyarrow in batches), plain
text (one document per file, per line or per blank-line-separated paragraph: ``--text-split``);
``.jsonl.gz``, ``.json.gz`` and ``.txt.gz`` too (a folder's files of other names are skipped;
``--format`` reads every file as one format). A document over ``--max-document-bytes`` (4 MiB)
is cut at line ends into documents of at most that size. The output
folder is a dataset in the format of shards.py, plus ``<out>/val/`` for the held-out documents
(``--val-fraction``) and ``<out>/.progress/`` for the bookkeeping that makes a re-run resume.

How it runs: the inputs are cut into units of about ``--unit-bytes`` of input (byte ranges of a
large JSONL or text file, on line boundaries; groups of Parquet row groups; small files, and
compressed files or text documents, which are never cut, packed together in input order), and
unit i becomes ``shard-<i>`` in ``<out>`` (and in ``<out>/val``), written by one of
``--workers`` processes. A unit's shard files are renamed into place when complete and its
record ``.progress/unit-<i>.json`` is written after them; a re-run skips the units with a record,
so a killed run loses only its units in flight, and their temporary files (``*.tmp.<pid>``) are
deleted by the next run (or at once on Ctrl-C or SIGTERM, which say that rerunning resumes).
``manifest.json`` is written last, after every unit, and the trainer reads no folder without one
(it names an unfinished one as such, with the command that finishes it). A re-run with other
settings (tokenizer, text field, BOS/EOS, ...) into an unfinished folder is refused, naming what
differs; the units of an input file that changed since (its size, or the units before it) are
redone, with a warning. A finished dataset is never replaced: a run into it with other inputs or
settings is refused, naming what differs (another ``--out``, or ``--overwrite``, which removes the
earlier dataset's files first).

Bad records (malformed JSON or UTF-8, a missing field, a value of the wrong type, a null Parquet
cell, a token id outside the vocabulary) stop the run naming the file and line (or Parquet row);
``--skip-bad N`` skips up to N of them over the whole run instead, each logged, counts in the
manifest. Empty files are skipped with a warning; empty folders, unreadable Parquet files and
unknown file types stop the run while planning, before any encoding. A full disk stops any
command in words (what it was writing, where, the space left, what to do), with the temporary
files deleted and the finished shards kept for the rerun. The tokenizer trains on at most
``--sample-bytes`` of text, taken from every input in proportion to its size, streamed
(sample.py).

The package, one file per part:

- cli.py        the command line, `run` (returns a summary) and `main` (the console script)
- inputs.py     finding input files, cutting them into units, reading a unit's records
- worker.py     one unit in a worker process: records -> documents -> shard files -> its record
- pipeline.py   the run encode and convert share: resume, workers, progress, manifests
- out_folder.py which output folders a run may write into; --overwrite; files a manifest does not list
- layout.py     the output folder's val/ and .progress/; an unfinished folder in words
- encode.py     the encode and convert commands
- tokenizer.py  the tokenizer command: a SentencePiece model from a sample of the input
- sample.py     that sample: at most --sample-bytes, spread over the inputs by size, streamed
- space.py      sizes in words, and a full disk in words (what, where, what to do)
- verify.py     the verify command (and the files the manifest does not list)
- teacher_logits.py  the teacher-logits command: a teacher's top-K for every token (distillation)
"""

from mobilellm_train.data.prepare.cli import build_parser, main, parse_bytes, run
from mobilellm_train.data.prepare.encode import cmd_convert, cmd_encode
from mobilellm_train.data.prepare.inputs import (
    Piece,
    Unit,
    find_inputs,
    piece_records,
    plan_units,
)
from mobilellm_train.data.prepare.layout import PROGRESS_DIR, VAL_DIR, unit_record_path
from mobilellm_train.data.prepare.pipeline import Progress, run_prepare
from mobilellm_train.data.prepare.space import byte_unit, format_bytes
from mobilellm_train.data.prepare.tokenizer import cmd_tokenizer
from mobilellm_train.data.prepare.verify import cmd_verify
from mobilellm_train.data.prepare.worker import run_unit

__all__ = [
    "PROGRESS_DIR",
    "VAL_DIR",
    "Piece",
    "Progress",
    "Unit",
    "build_parser",
    "byte_unit",
    "cmd_convert",
    "cmd_encode",
    "cmd_tokenizer",
    "cmd_verify",
    "find_inputs",
    "format_bytes",
    "main",
    "parse_bytes",
    "piece_records",
    "plan_units",
    "run",
    "run_prepare",
    "run_unit",
    "unit_record_path",
]
