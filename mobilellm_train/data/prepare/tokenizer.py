"""mobilellm-prepare tokenizer: train a SentencePiece model (Llama-2 ids, text kept as it is) on a
sample of the corpus: at most --sample-bytes, spread over the inputs by size (sample.py), streamed
into SentencePiece."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator

from mobilellm_train.data.prepare.sample import SampleStats, sample_sentences
from mobilellm_train.data.prepare.space import format_bytes, free_bytes, free_space, maybe_report_full_disk
from mobilellm_train.data.shards import tokenizer_info, write_file_atomic
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")


class _Stash:
    """Sentences for SentencePiece, and the error that ended them: it stops the training, which
    reports it as a RuntimeError of its own; `check` raises the original (a DataError, say)."""

    def __init__(self, sentences: Iterator[str]):
        self.sentences, self.error = sentences, None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.sentences
        except Exception as e:
            self.error = e
            raise

    def check(self) -> None:
        if self.error is not None:
            raise self.error from None


def cmd_tokenizer(args) -> dict:
    import sentencepiece as spm

    if os.path.exists(args.out):
        raise DataError(f"{args.out}: exists; refusing to overwrite it (choose another --out)")
    # A full disk found now, not after hours of training (the model is ~15 bytes per piece).
    need = 64 * 1024 + 32 * args.vocab_size
    if free_bytes(args.out) < need:
        raise DataError(f"{args.out}: not enough space on the device for the tokenizer model (about "
                        f"{format_bytes(need)}; {free_space(args.out)} there). Free some space on that disk (or "
                        f"choose another --out), then run the same command again")
    begin = time.perf_counter()
    stats = SampleStats()
    sentences = sample_sentences(args, stats)
    first = next(sentences, None)
    if first is None:
        raise DataError(f"{' '.join(args.input)}: no text to train a tokenizer on")
    stash = _Stash(itertools.chain([first], sentences))
    logger.info("training a %s tokenizer of %d pieces on a sample of at most %s of %s",
                args.model_type, args.vocab_size, format_bytes(args.sample_bytes), " ".join(args.input))
    spm.set_random_generator_seed(args.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(stash),
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
        stash.check()
        raise DataError(f"SentencePiece training failed: {e}") from None
    logger.info("sampled %s in %d sentences from %d inputs", format_bytes(stats.bytes), stats.sentences,
                len(stats.per_input))
    with maybe_report_full_disk(args.out, "the tokenizer model",
                                "run the same command again (nothing was written; it samples and trains anew)"):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_file_atomic(args.out, model.getvalue())
    summary = {**tokenizer_info(args.out), "lines": stats.sentences, "sample_bytes": stats.bytes,
               "sample_bytes_per_input": stats.per_input,
               "seconds": round(time.perf_counter() - begin, 2)}
    logger.info("wrote %s: %s", args.out, json.dumps({k: v for k, v in summary.items() if k != "sample_bytes_per_input"}))
    return summary
