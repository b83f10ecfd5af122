"""mobilellm-prepare verify: check a prepared folder (and its val/) against its manifest: every
shard's size and sha256. It writes nothing; a record of the check written here should go through
space.maybe_report_full_disk (cli.run turns any other full disk into words too)."""

from __future__ import annotations

import logging
import os

from mobilellm_train.data.prepare.layout import VAL_DIR
from mobilellm_train.data.shards import (
    MANIFEST_FILE,
    check_shard_sizes,
    is_dataset,
    read_manifest,
    verify_shards,
)

logger = logging.getLogger("mobilellm_train.prepare")


def cmd_verify(args) -> dict:
    summary = {}
    for folder in (args.folder, os.path.join(args.folder, VAL_DIR)):
        if folder != args.folder and not is_dataset(folder):
            continue
        m = read_manifest(folder)
        check_shard_sizes(m)
        seconds = verify_shards(m)
        summary[folder] = {"num_tokens": m.num_tokens, "num_documents": m.num_documents, "num_shards": len(m.shards),
                           "dtype": m.dtype, "vocab_size": m.vocab_size, "verify_seconds": round(seconds, 2)}
        logger.info("%s: %d shards, %d tokens, %d documents: sizes and sha256 match %s", folder, len(m.shards),
                    m.num_tokens, m.num_documents, MANIFEST_FILE)
    return summary
