"""mobilellm-prepare: tokenize your own data, or convert the original layout, into token shards.

The command line (`build_parser`), `run` (one subcommand, returns its summary, raises DataError on
bad input) and `main` (the console script: logs a DataError and exits 1). The subcommands live in
tokenizer.py, encode.py (encode, convert), verify.py and teacher_logits.py; usage in the package docstring.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys

from mobilellm_train.data.prepare.encode import cmd_convert, cmd_encode
from mobilellm_train.data.prepare.space import full_disk_message, is_full_disk
from mobilellm_train.data.prepare.teacher_logits import add_parser as add_teacher_logits_parser
from mobilellm_train.data.prepare.teacher_logits import cmd_teacher_logits
from mobilellm_train.data.prepare.tokenizer import cmd_tokenizer
from mobilellm_train.data.prepare.verify import cmd_verify
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")


def parse_bytes(text: str) -> int:
    """'1G', '256M', '4096' -> bytes (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 256M, 1G)")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least one byte: {text!r}")
    return int(value)


def parse_size(text: str) -> int:
    """parse_bytes, or 0."""
    return 0 if text.strip() == "0" else parse_bytes(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilellm-prepare", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_run_options(q, default_unit: str) -> None:
        q.add_argument("--out", required=True,
                       help="output dataset folder (created; an unfinished one is resumed; a finished one made from "
                            "other inputs or settings is refused)")
        q.add_argument("--overwrite", action="store_true",
                       help="replace a finished (or unfinished) dataset of other inputs or settings in --out: its "
                            "shards, manifests and bookkeeping are removed first")
        q.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="worker processes (default: all cores)")
        q.add_argument("--unit-bytes", type=parse_bytes, default=parse_bytes(default_unit),
                       help=f"input bytes per shard, e.g. 256M: large files are cut, small ones packed together "
                            f"(default {default_unit})")
        q.add_argument("--val-fraction", type=float, default=0.0,
                       help="fraction of documents held out into <out>/val (default 0)")
        q.add_argument("--seed", type=int, default=0, help="seed of the held-out selection")
        q.add_argument("--skip-bad", type=int, default=0,
                       help="skip up to N bad records (each logged); 0 stops at the first")
        add_budget_options(q)

    def add_budget_options(q) -> None:
        # Only for the summary line: how many optimizer steps the prepared windows cover.
        q.add_argument("--seq-len", type=int, default=2048,
                       help="training.seq_len the data is for, for the summary's windows and steps (default 2048)")
        q.add_argument("--global-batch-size", type=int, default=1024,
                       help="global batch in sequences, for the summary's steps (default 1024, the recipe's)")

    def add_text_options(q) -> None:
        q.add_argument("--input", nargs="+", required=True, help="files, folders or glob patterns")
        q.add_argument("--format", choices=["auto", "jsonl", "parquet", "text"], default="auto",
                       help="input format; auto goes by file name: .jsonl .json .parquet .txt .text .md and "
                            ".jsonl.gz .json.gz .txt.gz (a folder's other files are skipped); another reads every "
                            "file as that format")
        q.add_argument("--text-field", default="text",
                       help="JSONL key / Parquet column holding the text; a comma list (text,content) takes the "
                            "first one each record (or file) has")
        q.add_argument("--text-split", choices=["file", "line", "paragraph"], default="file",
                       help="plain text: one document per file, per line, or per blank-line-separated paragraph")

    q = sub.add_parser("tokenizer", help="train a SentencePiece model on a sample of the corpus")
    add_text_options(q)
    q.add_argument("--out", required=True, help="the .model file to write (must not exist)")
    q.add_argument("--vocab-size", type=int, default=32000)
    q.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    q.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--character-coverage", type=float, default=0.9995)
    q.add_argument("--sample-bytes", type=parse_bytes, default=parse_bytes("1G"),
                   help="at most this much text to train on, taken from every input in proportion to its size "
                        "(default 1G)")
    q.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="SentencePiece training threads")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--skip-bad", type=int, default=0, help="skip up to N bad records (each logged)")

    q = sub.add_parser("encode", help="tokenize JSONL / Parquet / text into token shards")
    add_text_options(q)
    add_run_options(q, "1G")
    q.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    q.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="begin each document with BOS")
    q.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True, help="end each document with EOS")
    q.add_argument("--max-document-bytes", type=parse_size, default=parse_bytes("4M"),
                   help="cut longer documents (a whole file with --text-split file, say) into documents of at most "
                        "this size at line ends: SentencePiece needs about 45x a document's size in memory "
                        "(default 4M; 0 never cuts)")

    q = sub.add_parser("convert", help="convert the original token-id JSONL layout into token shards")
    q.add_argument("--layout", choices=["nodes", "amber"], required=True,
                   help="nodes: basepath/<node>/*.jsonl, a document per line; amber: LLM360 amber-data-prep "
                        "output, <input>/train/*.jsonl (+ valid/ -> val), 2049-token chunks of EOS-ended documents")
    q.add_argument("--input", required=True, help="basepath (nodes) or the amber output folder")
    add_run_options(q, "1G")
    q.add_argument("--vocab-size", type=int, default=0, help="vocabulary size (or give --tokenizer)")
    q.add_argument("--tokenizer", default="", help="the SentencePiece model the ids come from (recorded and checked)")
    q.add_argument("--doc-boundary", choices=["line", "eos"], default=None,
                   help="where documents end: after each line (nodes default) or after each EOS (amber default)")
    q.add_argument("--eos-id", type=int, default=2, help="EOS id for --doc-boundary eos without --tokenizer")

    q = sub.add_parser("verify", help="check a prepared folder's files against its manifest (sizes, sha256) and "
                                      "record it (verified.json), so training starts need not hash them")
    q.add_argument("folder")
    q.add_argument("--workers", type=int, default=1,
                   help="shards hashed at once (more helps on parallel storage; default 1)")
    add_budget_options(q)
    add_teacher_logits_parser(sub)
    return p


def run(argv: list[str]) -> dict:
    """Run one subcommand; returns its summary, raises DataError on bad input."""
    args = build_parser().parse_args(argv)
    # Recorded in the output folder: the command a message about an unfinished folder names.
    args.command_line = shlex.join(["mobilellm-prepare", *argv])
    if args.command in ("encode", "convert", "verify") and (args.seq_len < 1 or args.global_batch_size < 1):
        raise DataError("--seq-len and --global-batch-size must be >= 1")
    if args.workers < 1:
        raise DataError("--workers must be >= 1")
    if args.command != "verify":
        if args.skip_bad < 0:
            raise DataError("--skip-bad must be >= 0")
        if not 0 <= getattr(args, "val_fraction", 0.0) < 1:
            raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    commands = {"tokenizer": cmd_tokenizer, "encode": cmd_encode, "convert": cmd_convert, "verify": cmd_verify,
                "teacher-logits": cmd_teacher_logits}
    try:
        return commands[args.command](args)
    except OSError as e:
        if not is_full_disk(e):
            raise
        # A write no command names more precisely (space.maybe_report_full_disk): still in words.
        where = e.filename or getattr(args, "out", None) or getattr(args, "folder", ".")
        raise DataError(full_disk_message(where, "its output", "run the same command again", "--out")) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the run stops, deletes its temporary files and says so."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except DataError as e:
        logger.error("%s", e)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        # encode and convert say what they keep; the other commands write only when they finish.
        name = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C (SIGINT)"
        logger.error("stopped by %s: %s", name, e.args[0] if e.args else "nothing was written; run the same "
                     "command again")
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
