"""mobilellm-prepare teacher-logits: a teacher's top-K ids and log-probabilities for every token of
a prepared dataset (and of its val/), so that training distils from them with no teacher in memory
(--distill.logits; the format is distill/cache.py's, docs/DATA.md; when to use it, docs/TRAINING.md).

    mobilellm-prepare teacher-logits --teacher runs/big/checkpoints/step-20000 --data data/web \
        --out data/web-top16 --top-k 16 --seq-len 2048
    torchrun --nproc_per_node 8 -m mobilellm_train.data.prepare teacher-logits ...   # spread over ranks

The teacher (a DCP step folder, verified against its checksums, or a Hugging Face Llama folder)
sees each training window of the data as the trainer would (seq_len, and with --doc-mask the
document masking) and its top K per input token land at that token's position. Data shard i
becomes cache shard i, written by rank i mod W (each rank holds the whole teacher: no collective),
atomically and with its sha256 computed while writing, then recorded in <out>/.progress/. A rerun
of the same command skips the recorded shards, so an interrupted run loses only its shards in
flight; the rank that finds every shard recorded writes manifest.json, last. A rerun with another
teacher, K, seq_len, doc_mask or data into the same folder is refused, naming what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time

import numpy as np

from mobilellm_train.data.prepare.layout import PROGRESS_DIR, VAL_DIR
from mobilellm_train.data.prepare.space import format_bytes
from mobilellm_train.data.shards import (
    MANIFEST_FILE,
    Manifest,
    file_sha256,
    is_dataset,
    read_manifest,
    write_json_atomic,
)
from mobilellm_train.distill.cache import (
    LOGPROB_DTYPES,
    CacheShard,
    CacheShardWriter,
    bytes_per_token,
    read_cache_manifest,
    record_cache_verification,
    write_cache_manifest,
)
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")

SETTINGS_FILE = "teacher-settings.json"


def add_parser(sub) -> None:
    """The subcommand's arguments (cli.build_parser calls this)."""
    q = sub.add_parser("teacher-logits", help="a teacher's top-K log-probabilities for every token of a prepared "
                                              "dataset, for distillation without the teacher (--distill.logits)")
    q.add_argument("--teacher", required=True, help="DCP step folder or Hugging Face Llama folder of the teacher")
    q.add_argument("--data", required=True, help="the prepared dataset (its val/ is done too, into <out>/val)")
    q.add_argument("--out", required=True, help="output folder (created; an unfinished one is resumed)")
    q.add_argument("--top-k", type=int, required=True, help="values kept per token (16: 96 bytes per token at fp16)")
    q.add_argument("--seq-len", type=int, default=2048, help="training.seq_len of the runs it serves (default 2048)")
    q.add_argument("--doc-mask", action="store_true", help="the runs use data.doc_mask (attention within documents)")
    q.add_argument("--logprob-dtype", choices=sorted(LOGPROB_DTYPES), default="float16",
                   help="storage of the log-probabilities (default float16)")
    q.add_argument("--batch-size", type=int, default=8, help="windows per teacher forward (default 8)")
    q.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per chunk of the teacher's logits")
    q.add_argument("--val", action=argparse.BooleanOptionalAction, default=True,
                   help="also <data>/val into <out>/val when it exists (default on)")
    # cli.run checks these of every command that has them; this one has no workers of its own.
    q.set_defaults(workers=1, skip_bad=0)


def cmd_teacher_logits(args) -> dict:
    import torch

    if args.top_k < 1 or args.seq_len < 1 or args.batch_size < 1 or args.chunk_tokens < 1:
        raise DataError("--top-k, --seq-len, --batch-size and --chunk-tokens must be >= 1")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    jobs = [(args.data, args.out)]
    if args.val and is_dataset(os.path.join(args.data, VAL_DIR)):
        jobs.append((os.path.join(args.data, VAL_DIR), os.path.join(args.out, VAL_DIR)))
    manifests = [read_manifest(data) for data, _ in jobs]
    model = load_teacher(args.teacher, device, manifests[0])
    if args.top_k > model.args.vocab_size:
        raise DataError(f"--top-k {args.top_k} exceeds the teacher's vocabulary of {model.args.vocab_size}")
    settings = [job_settings(args, model.args.vocab_size, m) for m in manifests]
    todo = [i for i, ((_, out), s) in enumerate(zip(jobs, settings)) if not finished(out, s)]
    for i in todo:
        start_folder(jobs[i][1], settings[i])
    # Shard j of all the jobs' shards in turn goes to rank j mod W.
    units = [(i, j) for i in todo for j in range(len(manifests[i].shards))][rank::world]
    begin, rows = time.perf_counter(), 0
    for i, j in units:
        if not shard_done(jobs[i][1], manifests[i].shards[j].name):
            rows += write_shard(model, manifests[i], j, jobs[i][1], settings[i], args, device)
    seconds = time.perf_counter() - begin
    summary = {"top_k": args.top_k, "bytes_per_token": bytes_per_token(args.top_k, args.logprob_dtype),
               "tokens_computed_here": rows, "seconds": round(seconds, 1)}
    if rows:
        logger.info("rank %d of %d: the teacher's top-%d for %d tokens in %.0f s (%.0f tokens/s)", rank, world,
                    args.top_k, rows, seconds, rows / max(seconds, 1e-9))
    for (data, out), s, m in zip(jobs, settings, manifests):
        summary[out] = finish_folder(out, s, m, world)
    return summary


def load_teacher(path: str, device, data: Manifest):
    """The plain teacher in the dtype a run computes in (bf16 on GPU, fp32 on CPU), checked
    against the data: ids in its vocabulary, the data's tokenizer (when both record one)."""
    import torch

    from mobilellm_train.errors import CheckpointError
    from mobilellm_train.evaluation.loading import load_model
    from mobilellm_train.hf import HFCheckpointError

    try:
        model = load_model(path, device=device)
    except (OSError, CheckpointError, HFCheckpointError) as e:
        raise DataError(f"--teacher {path}: {e}") from None
    if model.args.vocab_size <= data.max_token_id:
        raise DataError(f"--teacher {path}: a vocabulary of {model.args.vocab_size} tokens, but {data.folder} holds "
                        f"token id {data.max_token_id}: the teacher was not made for this tokenizer")
    own = os.path.join(path, "tokenizer.model")
    recorded = (data.tokenizer or {}).get("sha256")
    if os.path.isfile(own) and recorded and file_sha256(own) != recorded:
        raise DataError(f"--teacher {path}: its tokenizer {own} is not the one {data.folder} was prepared with "
                        f"(sha256 {recorded[:16]}... in {data.path})")
    model.flex_doc_mask = device.type == "cuda"  # as the trainer's default, data.doc_mask_attention = flex
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)


def teacher_fingerprint(path: str) -> str:
    """What identifies the teacher's weights cheaply: a DCP step's .metadata, or a Hugging Face
    folder's config.json with the names and sizes of its weight files."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return file_sha256(os.path.join(path, ".metadata"))[:16]
    files = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".json")))
    listing = [(n, os.path.getsize(os.path.join(path, n))) for n in files]
    config = file_sha256(os.path.join(path, "config.json"))
    return hashlib.sha256((config + json.dumps(listing)).encode()).hexdigest()[:16]


def job_settings(args, vocab_size: int, data: Manifest) -> dict:
    """What the cache is of: recorded in its manifest; a rerun must match it."""
    return {"top_k": args.top_k, "logprob_dtype": args.logprob_dtype, "seq_len": args.seq_len,
            "doc_mask": args.doc_mask, "vocab_size": vocab_size, "data_fingerprint": data.fingerprint(),
            "tokenizer_sha256": (data.tokenizer or {}).get("sha256"),
            "teacher": {"path": os.path.abspath(args.teacher), "fingerprint": teacher_fingerprint(args.teacher)}}


def _differences(before: dict, now: dict) -> str:
    return ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                     if before.get(k) != now.get(k))


def finished(out: str, settings: dict) -> bool:
    """True when `out` already holds this cache, finished; another cache there is refused."""
    if not os.path.isfile(os.path.join(out, MANIFEST_FILE)):
        return False
    m = read_cache_manifest(out)
    before = {k: getattr(m, k) for k in settings}
    if before != settings:
        raise DataError(f"{out} already holds a finished teacher-logits cache made otherwise "
                        f"({_differences(before, settings)}); choose another --out (nothing there is overwritten)")
    logger.info("%s: already finished (%s)", out, m.path)
    return True


def start_folder(out: str, settings: dict) -> None:
    """The folder and its recorded settings; an unfinished run's other settings are refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file")
    if os.path.isfile(os.path.join(out, MANIFEST_FILE)) or (
            os.path.isdir(out) and any(n.endswith(".bin") for n in os.listdir(out))):
        raise DataError(f"--out {out} holds a dataset or another kind of output; choose another folder")
    progress = os.path.join(out, PROGRESS_DIR)
    os.makedirs(progress, exist_ok=True)
    path = os.path.join(progress, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            raise DataError(f"{out}: an unfinished teacher-logits run with other settings "
                            f"({_differences(before, settings)}); rerun it as it was, or choose another --out")
        return
    write_json_atomic(path, settings)


def _record_path(out: str, name: str) -> str:
    return os.path.join(out, PROGRESS_DIR, name + ".json")


def shard_done(out: str, name: str) -> bool:
    return os.path.isfile(_record_path(out, name))


def write_shard(model, data: Manifest, index: int, out: str, settings: dict, args, device) -> int:
    """Cache shard `index`: the teacher's top K at every input position of the windows that touch
    data shard `index`, rows outside them the sentinel; then its record. Returns its rows."""
    import torch

    from mobilellm_train.data.loader import Sampler, Source
    from mobilellm_train.data.shards import TokenStream
    from mobilellm_train.distill.kd_loss import teacher_topk

    T, K, window = args.seq_len, args.top_k, args.seq_len + 1
    num_windows = data.num_tokens // window
    if num_windows == 0:
        raise DataError(f"{data.folder}: {data.num_tokens} tokens, fewer than one window of --seq-len + 1 = {window}")
    sampler = Sampler([Source(data, TokenStream(data, model.args.vocab_size), num_windows)], [1.0], T, 0, args.doc_mask)
    starts = np.concatenate(([0], np.cumsum([s.num_tokens for s in data.shards])))
    first, stop = int(starts[index]), int(starts[index + 1])
    name = data.shards[index].name
    for ext in (".ids", ".lp"):  # a killed run's partial files of this shard (only this rank writes it)
        for n in os.listdir(out):
            if n.startswith(name + ext + ".tmp."):
                os.remove(os.path.join(out, n))
    begin = time.perf_counter()
    windows = range(first // window, min(num_windows, -(-stop // window)))
    min_logprob = float(np.finfo(LOGPROB_DTYPES[args.logprob_dtype]).min)
    with CacheShardWriter(out, name, stop - first, K, args.logprob_dtype) as writer, torch.no_grad():
        for w0 in range(windows.start, windows.stop, args.batch_size):
            ws = np.arange(w0, min(w0 + args.batch_size, windows.stop))
            batch = sampler.read_windows(np.zeros_like(ws), ws)
            positions = batch.get("position_ids")
            hidden = model.hidden_states(batch["input"].to(device),
                                         None if positions is None else positions.to(device)).flatten(0, 1)
            top = teacher_topk(hidden, model.output.weight, K, args.chunk_tokens)
            ids = top.ids.view(len(ws), T, K).cpu().numpy()
            logprobs = top.logprobs.clamp_(min=min_logprob).view(len(ws), T, K).cpu().numpy()
            for row, w in enumerate(ws.tolist()):
                a, b = max(w * window, first), min(w * window + T, stop)  # this window's inputs in the shard
                if a < b:
                    writer.write(a - first, ids[row, a - w * window:b - w * window],
                                 logprobs[row, a - w * window:b - w * window])
        shard = writer.finish()
    write_json_atomic(_record_path(out, name), {"name": shard.name, "num_rows": shard.num_rows,
                                                "ids_sha256": shard.ids_sha256, "lp_sha256": shard.lp_sha256})
    seconds = time.perf_counter() - begin
    logger.info("%s/%s: %d windows in %.1f s (%.0f tokens/s)", out, name, len(windows), seconds,
                len(windows) * T / max(seconds, 1e-9))
    return stop - first


def finish_folder(out: str, settings: dict, data: Manifest, world: int) -> dict:
    """The manifest once every shard is recorded (by whichever rank sees that first), and the
    summary: K, bytes per token, the cache's size and its size per billion tokens."""
    per_token = bytes_per_token(settings["top_k"], settings["logprob_dtype"])
    summary = {"num_rows": data.num_tokens, "size_bytes": data.num_tokens * per_token,
               "bytes_per_billion_tokens": per_token * 10**9}
    if not os.path.isfile(os.path.join(out, MANIFEST_FILE)):
        missing = [s.name for s in data.shards if not shard_done(out, s.name)]
        if missing:
            logger.info("%s: %d of %d shards still being written%s; the rank that finishes last writes the "
                        "manifest", out, len(missing), len(data.shards), " by other ranks" if world > 1 else "")
            return {**summary, "finished": False}
        shards = []
        for s in data.shards:
            with open(_record_path(out, s.name)) as f:
                shards.append(CacheShard(**json.load(f)))
        m = write_cache_manifest(out, settings, shards)
        record_cache_verification(m, "hashed while writing")
    logger.info("%s: top-%d of the teacher for %d tokens: %s %s log-probabilities + int32 ids = %d bytes per token, "
                "%s in all (%s per billion tokens)", out, settings["top_k"], data.num_tokens, settings["top_k"],
                settings["logprob_dtype"], per_token, format_bytes(summary["size_bytes"]),
                format_bytes(summary["bytes_per_billion_tokens"]))
    return {**summary, "finished": True}
