"""mobilellm-prepare tokenizer: train a SentencePiece model (Llama-2 ids, text kept as it is) on a
sample of the corpus, taken from every unit of the input."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator

from mobilellm_train.data.prepare.inputs import (
    BadRecord,
    LineCounter,
    find_inputs,
    plan_units,
    record_place,
    unit_records,
)
from mobilellm_train.data.shards import tokenizer_info, write_file_atomic
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")


def _sample_texts(args) -> Iterator[str]:
    """Documents from every unit of the input, each unit's first sample_bytes / units bytes."""
    files = find_inputs(args.input, args.format)
    units = plan_units([(p, k, "train") for p, k in files], args.unit_bytes, args.text_field, args.text_split)
    per_unit = max(1, args.sample_bytes // len(units))
    s = {"text_field": args.text_field, "text_split": args.text_split}
    skipped = 0
    for unit in units:
        taken = 0
        lines = LineCounter(unit.path, unit.start if unit.stop >= 0 else 0)
        for value, key, _ in unit_records(unit, s):
            if isinstance(value, BadRecord):
                skipped += 1
                if skipped > args.skip_bad:
                    where = record_place(unit, key, lines)
                    raise DataError(f"{where}: {value}; pass --skip-bad N to skip up to N bad records")
                logger.warning("skipped bad record %s: %s", record_place(unit, key, lines), value)
                continue
            yield value
            taken += len(value)
            if taken >= per_unit:
                break


def cmd_tokenizer(args) -> dict:
    import sentencepiece as spm

    if os.path.exists(args.out):
        raise DataError(f"{args.out}: exists; refusing to overwrite it (choose another --out)")
    begin = time.perf_counter()
    sentences = []
    sample_bytes = 0
    for doc in _sample_texts(args):
        sample_bytes += len(doc)
        sentences += [line for line in doc.split("\n") if line.strip()]
    if not sentences:
        raise DataError(f"{args.input}: no text to train a tokenizer on")
    logger.info("training a %s tokenizer of %d pieces on %d lines (%.1f MB sampled)",
                args.model_type, args.vocab_size, len(sentences), sample_bytes / 1e6)
    spm.set_random_generator_seed(args.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=args.model_type,
            vocab_size=args.vocab_size,
            byte_fallback=args.byte_fallback,
            # Llama-2 ids, as MobileLLM's tokenizer (docs/REFERENCE.md): unk 0, bos 1, eos 2, no pad.
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            # Keep text as it is (whitespace, newlines via byte fallback): decode(encode(x)) == x.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=args.character_coverage,
            max_sentence_length=1 << 16,
            num_threads=max(1, args.workers),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_file_atomic(args.out, model.getvalue())
    summary = {**tokenizer_info(args.out), "lines": len(sentences), "sample_bytes": sample_bytes,
               "seconds": round(time.perf_counter() - begin, 2)}
    logger.info("wrote %s: %s", args.out, json.dumps(summary))
    return summary
