"""mobilellm-prepare verify: check a prepared folder (and its val/) against its manifest, every
shard's size and sha256, then record that it verified (verified.json beside the manifest), so that
training starts check one stat per file instead of hashing the dataset (docs/DATA.md). Files the
manifest does not list (shards an earlier dataset left there, say) are named: they are not part of
the dataset."""

from __future__ import annotations

import logging
import os

from mobilellm_train.data.budget import coverage_summary
from mobilellm_train.data.prepare.layout import VAL_DIR, unfinished_message
from mobilellm_train.data.prepare.out_folder import unlisted_files
from mobilellm_train.data.prepare.space import format_bytes
from mobilellm_train.data.shards import MANIFEST_FILE, is_dataset, read_manifest, verify_dataset
from mobilellm_train.distill.cache import is_teacher_logits, verify_teacher_logits
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")


def cmd_verify(args) -> dict:
    unfinished = unfinished_message(args.folder)
    if unfinished:
        raise DataError(unfinished)
    summary = {}
    for folder in (args.folder, os.path.join(args.folder, VAL_DIR)):
        if folder != args.folder and not is_dataset(folder):
            continue
        if is_teacher_logits(folder):  # mobilellm-prepare teacher-logits' output
            s = summary[folder] = verify_teacher_logits(folder)
            logger.info("%s: %d cache shards, %d rows of top-%d: sizes and sha256 match %s; recorded in %s", folder,
                        s["num_shards"], s["num_rows"], s["top_k"], MANIFEST_FILE, s["record"])
            continue
        s = summary[folder] = verify_dataset(folder, workers=args.workers)
        logger.info("%s: %d shards, %d tokens, %d documents: sizes and sha256 match %s%s", folder, s["num_shards"],
                    s["num_tokens"], s["num_documents"], MANIFEST_FILE,
                    f"; recorded in {s['record']}" if s["record"] else "")
        if folder == args.folder:
            logger.info("%s: %s", folder, coverage_summary(s["num_tokens"], args.seq_len, args.global_batch_size))
        s["unlisted"] = unlisted = unlisted_files(folder, read_manifest(folder), top=folder == args.folder)
        if unlisted:
            size = sum(os.path.getsize(os.path.join(folder, n)) for n in unlisted
                       if os.path.isfile(os.path.join(folder, n)))
            more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
            logger.warning("%s: %d files (%s) that %s does not list, so not part of the dataset: %s%s. Left by an "
                           "earlier dataset in this folder? Remove them if nothing else needs them",
                           folder, len(unlisted), format_bytes(size), MANIFEST_FILE, ", ".join(unlisted[:5]), more)
    return summary
