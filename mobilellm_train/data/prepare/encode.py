"""mobilellm-prepare encode (text -> token shards with a SentencePiece model) and convert (the
original token-id JSONL layouts, nodes or amber, -> token shards): each builds its settings and
units, then hands them to pipeline.run_prepare."""

from __future__ import annotations

import logging
import os

from mobilellm_train.data.prepare.inputs import find_inputs, plan_units
from mobilellm_train.data.prepare.pipeline import run_prepare
from mobilellm_train.data.prepare.space import format_bytes
from mobilellm_train.data.shards import dtype_for_vocab, tokenizer_info
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")


def _base_settings(args, vocab_size: int, kind: str) -> dict:
    return {
        "out": os.path.abspath(args.out),
        "command": kind,
        "vocab_size": vocab_size,
        "dtype": dtype_for_vocab(vocab_size),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "skip_bad": args.skip_bad,
        "unit_bytes": args.unit_bytes,
    }


def cmd_encode(args) -> dict:
    info = tokenizer_info(args.tokenizer)
    files = find_inputs(args.input, args.format)
    settings = {
        **_base_settings(args, info["vocab_size"], "encode"),
        "tokenizer": os.path.abspath(args.tokenizer),
        "tokenizer_info": info,
        "text_field": args.text_field,
        "text_split": args.text_split,
        "bos": args.bos,
        "eos": args.eos,
        "doc_boundary": "line",
        "max_document_bytes": args.max_document_bytes,
    }
    if args.bos and info["bos_id"] < 0 or args.eos and info["eos_id"] < 0:
        raise DataError(f"{args.tokenizer}: has no BOS/EOS piece; pass --no-bos / --no-eos")
    units = plan_units([(p, k, "train") for p, k in files], args.unit_bytes, args.text_field, args.text_split)
    logger.info("encoding %d files (%s) in %d units with %d workers into %s",
                len(files), format_bytes(sum(u.input_bytes for u in units)), len(units), args.workers, args.out)
    return run_prepare(units, settings, args.workers, "encode", _extra(args, "encode", args.input),
                       (args.seq_len, args.global_batch_size), args.overwrite)


def _extra(args, command: str, inputs: list[str]) -> dict:
    """What the manifest records of the command beside its settings."""
    return {"command": command, "inputs": inputs, "command_line": getattr(args, "command_line", "")}


def cmd_convert(args) -> dict:
    from mobilellm_train.data.jsonl import find_node_folders, list_jsonl_files

    if bool(args.vocab_size) == bool(args.tokenizer):
        raise DataError("convert needs exactly one of --vocab-size and --tokenizer")
    info = tokenizer_info(args.tokenizer) if args.tokenizer else None
    vocab_size = info["vocab_size"] if info else args.vocab_size
    eos_id = info["eos_id"] if info else args.eos_id
    root = args.input
    if args.layout == "nodes":
        files = [(f, "tokens", "train") for folder in find_node_folders(root) for f in list_jsonl_files(folder)]
        boundary = args.doc_boundary or "line"
    else:
        train_dir = os.path.join(root, "train")
        train_root = train_dir if os.path.isdir(train_dir) else root
        if not os.path.isdir(train_root):
            raise DataError(f"{root}: no such folder")
        files = [(f, "tokens", "train") for f in list_jsonl_files(train_root)]
        valid_dir = os.path.join(root, "valid")
        if os.path.isdir(valid_dir):
            files += [(f, "tokens", "val") for f in list_jsonl_files(valid_dir)]
        boundary = args.doc_boundary or "eos"
    if boundary == "eos" and eos_id < 0:
        raise DataError("--doc-boundary eos needs an EOS id (--eos-id or a tokenizer with one)")
    settings = {
        **_base_settings(args, vocab_size, f"convert-{args.layout}"),
        "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else "",
        "tokenizer_info": info,
        "doc_boundary": boundary,
        "eos_id": eos_id,
    }
    units = plan_units(files, args.unit_bytes, "", "line")
    logger.info("converting %d files (%s layout, documents end at each %s) in %d units into %s",
                len(files), args.layout, "line" if boundary == "line" else f"EOS ({eos_id})", len(units), args.out)
    return run_prepare(units, settings, args.workers, "convert", _extra(args, "convert", [root]),
                       (args.seq_len, args.global_batch_size), args.overwrite)
