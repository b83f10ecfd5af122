"""mobilellm-eval: the MobileLLM results table, WikiText-2 and token-data perplexity for your
own checkpoints, offline, on one GPU or on CPU.

    mobilellm-eval --checkpoint outputs/mobilellm_125M/checkpoints/step-480000 --data-dir ~/eval_data
    mobilellm-eval --checkpoint exported/125M --checkpoint exported/LS-125M --names ours,ours-LS \
        --tasks all --data-dir ~/eval_data --reference MobileLLM-125M,MobileLLM-LS-125M --out results.json
    python -m mobilellm_train.evaluation.cli --checkpoint STEP --tasks tokens --token-data outputs/debug/demo_data/val

--checkpoint takes a DCP step folder or a Hugging Face folder and may be repeated (a table row
each); `--weights ema` reads a step's weight EMA instead of its weights (one value, or one per
--checkpoint: `--checkpoint S --checkpoint S --weights model,ema` compares the two). --tasks is a comma list of arc_easy, arc_challenge, boolq, piqa, siqa, hellaswag, obqa,
winogrande (or `commonsense` for the eight), wikitext, tokens; `all` is the eight plus wikitext.
docs/EVALUATION.md describes the data layout under --data-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import time

from typing import TYPE_CHECKING

from mobilellm_train.evaluation.tasks import TASKS, TaskDataError, check_task_files
from mobilellm_train.quantization import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES, parse_embedding_scheme, short_name

if TYPE_CHECKING:
    import torch

# torch, the model and the data code are imported inside the functions that use them: --help and
# argument errors answer at once (importing torch takes seconds).

logger = logging.getLogger("mobilellm_train")

PERPLEXITY_TASKS = ("wikitext", "tokens")
# Perplexity windows per forward by default. On the CPU small batches leave the cores waiting on
# each other between ops: 32 ran 2.6x the windows/s of 4 (docs/EVALUATION.md).
PPL_BATCH_GPU, PPL_BATCH_CPU = 4, 32
TASK_GROUPS = {"commonsense": tuple(TASKS), "all": (*TASKS, "wikitext")}


class UsageError(ValueError):
    """Arguments that cannot work together; reported before any model is loaded."""


def parse_tasks(spec: str) -> list[str]:
    tasks: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        expanded = TASK_GROUPS.get(item, (item,))
        for name in expanded:
            if name not in TASKS and name not in PERPLEXITY_TASKS:
                known = ", ".join([*TASKS, *PERPLEXITY_TASKS, *TASK_GROUPS])
                raise UsageError(f"--tasks: unknown task {name!r}; known: {known}")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise UsageError("--tasks is empty")
    return tasks


def parse_weights(spec: str, count: int) -> list[str]:
    """--weights: one source for every checkpoint, or one per checkpoint."""
    weights = [w.strip() for w in spec.split(",")]
    bad = [w for w in weights if w not in ("model", "ema")]
    if bad:
        raise UsageError(f"--weights {spec!r}: each must be model or ema")
    if len(weights) not in (1, count):
        raise UsageError(f"--weights has {len(weights)} entries for {count} checkpoints (give one, or one each)")
    return weights * count if len(weights) == 1 else weights


def default_name(checkpoint: str) -> str:
    """<run folder>/step-N for a DCP step folder, the folder's name for an HF folder."""
    from mobilellm_train.checkpoint import is_complete

    path = os.path.abspath(checkpoint)
    if is_complete(path) and os.path.basename(os.path.dirname(path)) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(os.path.dirname(path)))}/{os.path.basename(path)}"
    return os.path.basename(path)


def ppl_batch_size(args: argparse.Namespace, device: torch.device) -> int:
    return args.ppl_batch_size or (PPL_BATCH_GPU if device.type == "cuda" else PPL_BATCH_CPU)


def _check_inputs(args: argparse.Namespace, tasks: list[str]) -> None:
    """Everything about the data that can fail, before minutes are spent loading a model."""
    from mobilellm_train.evaluation.perplexity import find_wikitext
    from mobilellm_train.evaluation.report import PAPER_RESULTS

    mc_tasks = [t for t in tasks if t in TASKS]
    if (mc_tasks or ("wikitext" in tasks and not args.wikitext)) and not args.data_dir:
        raise UsageError(f"--data-dir is needed for {', '.join(mc_tasks) or 'wikitext'}")
    needs_data_dir = mc_tasks or ("wikitext" in tasks and not args.wikitext)
    if needs_data_dir and not os.path.isdir(args.data_dir):
        what = "is a file, not a folder" if os.path.exists(args.data_dir) else "no such folder"
        raise UsageError(f"--data-dir {args.data_dir}: {what}; it should hold one subfolder per task "
                         "(docs/EVALUATION.md lists the layouts)")
    # Every missing task at once: a user fixing the layout should not discover them one per run.
    problems = []
    try:
        check_task_files(mc_tasks, args.data_dir)
    except TaskDataError as e:
        problems.append(str(e))
    if "wikitext" in tasks:
        if args.wikitext and not os.path.isfile(args.wikitext):
            raise UsageError(f"--wikitext {args.wikitext}: no such file")
        if not args.wikitext:
            try:
                find_wikitext(args.data_dir)
            except TaskDataError as e:
                problems.append(f"{e}\n  or name the file: --wikitext FILE (a WikiText-2 test split, "
                                ".parquet or wiki.test.raw)")
    if problems:
        raise TaskDataError("\n".join(problems))
    if "tokens" in tasks and not args.token_data:
        raise UsageError("--tasks tokens needs --token-data PATH (a prepared shard dataset, or PATH/<node>/*.jsonl)")
    if "tokens" in tasks and not os.path.isdir(args.token_data):
        raise UsageError(f"--token-data {args.token_data}: no such folder")
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; choose another file or pass --overwrite")
    for name in args.reference:
        if name not in PAPER_RESULTS:
            raise UsageError(f"--reference {name!r}: the paper's rows are {', '.join(PAPER_RESULTS)}")


def check_token_data_tokenizer(checkpoint: str, tokenizer_path: str, token_data: str) -> None:
    """Token data must have been prepared with the model's tokenizer, as the trainer demands:
    ids of another tokenizer give a perplexity that means nothing. Checked before the model loads."""
    from mobilellm_train.data.shards import TOKENIZER_FILE, check_tokenizer, is_dataset, read_manifest
    from mobilellm_train.evaluation.loading import check_same_tokenizer, find_tokenizer

    if not is_dataset(token_data):
        return  # the JSONL layout records no tokenizer
    tokenizer_path = tokenizer_path or find_tokenizer(checkpoint)
    if not tokenizer_path or not os.path.isfile(tokenizer_path):
        logger.warning("%s holds no %s and --tokenizer is not given: cannot check that %s was prepared "
                       "with the model's tokenizer", checkpoint, TOKENIZER_FILE, token_data)
        return
    check_same_tokenizer(checkpoint, tokenizer_path)
    check_tokenizer(read_manifest(token_data), tokenizer_path)


def evaluate_checkpoint(args: argparse.Namespace, checkpoint: str, tasks: list[str], device: torch.device,
                        weights: str = "model") -> dict:
    import torch

    from mobilellm_train.evaluation.loading import (
        apply_program_quantization,
        check_tokenizer_fits,
        load_model,
        load_tokenizer,
    )
    from mobilellm_train.evaluation.perplexity import (
        evaluate_perplexity,
        find_wikitext,
        pack_windows,
        read_wikitext_rows,
        token_documents,
        wikitext_windows,
    )
    from mobilellm_train.evaluation.scoring import evaluate_tasks

    begin = time.perf_counter()
    if "tokens" in tasks:
        check_token_data_tokenizer(checkpoint, args.tokenizer, args.token_data)
    layer_sharing = {"auto": None, "true": True, "false": False}[args.layer_sharing]
    model = load_model(checkpoint, device=device, layer_sharing=layer_sharing, verify=args.verify, weights=weights)
    quantized = apply_program_quantization(model, checkpoint, args.quantize, args.group_size,
                                           parse_embedding_scheme(args.embedding_quantize))
    tokenizer = load_tokenizer(checkpoint, args.tokenizer) if tasks != ["tokens"] else None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer.path, tokenizer.vocab_size, model.args.vocab_size)
    logger.info("loaded %s (%s) in %.1fs", checkpoint, type(model).__name__, time.perf_counter() - begin)
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    record: dict = {"checkpoint": os.path.abspath(checkpoint), "weights": weights, "quantize": quantized, "tasks": {},
                    "perplexity": {}}
    seq_len = args.seq_len or model.args.max_seq_len
    if seq_len > model.args.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
    with autocast:
        mc_tasks = [t for t in tasks if t in TASKS]
        if mc_tasks:
            results = evaluate_tasks(
                model, tokenizer, mc_tasks, args.data_dir, args.batch_size, args.limit, add_bos=not args.no_bos
            )
            for name, r in results.items():
                record["tasks"][name] = {
                    "acc": r.acc, "acc_norm": r.acc_norm, "num_examples": r.num_examples,
                    "metric": r.metric, "score": 100.0 * r.score,
                }
        if "wikitext" in tasks:
            path = args.wikitext or find_wikitext(args.data_dir)
            windows = wikitext_windows(read_wikitext_rows(path), tokenizer, seq_len, add_bos=not args.no_bos)
            if args.max_windows:
                windows = windows[: args.max_windows]
            result = evaluate_perplexity(model, windows, ppl_batch_size(args, device), description="wikitext")
            record["perplexity"]["wikitext"] = {**vars(result), "perplexity": result.perplexity,
                                                "mean_nll": result.mean_nll, "seq_len": seq_len, "file": path}
        if "tokens" in tasks:
            documents = token_documents(args.token_data, model.args.vocab_size)
            windows = pack_windows(documents, seq_len + 1, args.max_windows)
            result = evaluate_perplexity(model, windows, ppl_batch_size(args, device), description="tokens")
            record["perplexity"]["tokens"] = {**vars(result), "perplexity": result.perplexity,
                                              "mean_nll": result.mean_nll, "seq_len": seq_len, "path": args.token_data}
    record["seconds"] = round(time.perf_counter() - begin, 1)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilellm-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="DCP step folder or Hugging Face folder; repeat for several models (a row each)")
    p.add_argument("--names", default="", help="comma list of row names, one per --checkpoint")
    p.add_argument("--tasks", default="commonsense",
                   help="comma list; commonsense = the eight table tasks, all = those + wikitext")
    p.add_argument("--data-dir", default="", help="folder with one subfolder per task (docs/EVALUATION.md)")
    p.add_argument("--wikitext", default="",
                   help="WikiText-2 test file (.parquet or wiki.test.raw) instead of <data-dir>/wikitext")
    p.add_argument("--token-data", default="",
                   help="token data for --tasks tokens: a prepared shard dataset or the JSONL layout")
    p.add_argument("--limit", type=int, default=0, help="only the first N examples of each task (0: all)")
    p.add_argument("--max-windows", type=int, default=0, help="only the first N perplexity windows (0: all)")
    p.add_argument("--seq-len", type=int, default=0, help="perplexity window (0: the model's max_seq_len, 2048)")
    p.add_argument("--batch-size", type=int, default=32, help="choice sequences per forward")
    p.add_argument("--ppl-batch-size", type=int, default=0,
                   help=f"perplexity windows per forward (0: {PPL_BATCH_GPU} on a GPU, {PPL_BATCH_CPU} on the CPU)")
    p.add_argument("--device", default="", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="score the model as the ExecuTorch program runs it: its linear layers quantized as "
                        "mobilellm-export --quantize does (8da4w, 8da8w; docs/QUANTIZATION.md)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"8da4w weight group size (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--embedding-quantize", default="none", metavar="BITS[,GROUP]",
                   help="score the model with its embedding table as mobilellm-export --embedding-quantize "
                        "stores it (8,0: int8 per row; 4,32: int4 in groups of 32; none: fp32)")
    p.add_argument("--no-bos", action="store_true", help="no BOS before contexts (older harness versions)")
    p.add_argument("--layer-sharing", choices=("auto", "true", "false"), default="auto",
                   help="HF folders: read layers 2i, 2i+1 as one shared block (auto: from config.json or the weights)")
    p.add_argument("--tokenizer", default="", help="tokenizer.model, when the checkpoint holds none")
    p.add_argument("--reference", default="", help="comma list of paper rows to print below, e.g. MobileLLM-125M")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking DCP checkpoint files against the checksums recorded at save")
    p.add_argument("--weights", default="model",
                   help="model (a step's weights) or ema (its weight EMA, training.ema_decay): one for every "
                        "--checkpoint, or a comma list with one per --checkpoint")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    import torch  # only now: the command line is known to be usable

    from mobilellm_train.checkpoint import CheckpointError
    from mobilellm_train.data.jsonl import DataError
    from mobilellm_train.evaluation.loading import TokenizerMismatchError, refuse_run_folder
    from mobilellm_train.evaluation.report import average, format_table
    from mobilellm_train.hf import HFCheckpointError
    from mobilellm_train.quantization import QuantizationError

    args.reference = [r.strip() for r in args.reference.split(",") if r.strip()]
    try:
        tasks = parse_tasks(args.tasks)
        weights = parse_weights(args.weights, len(args.checkpoint))
        names = [n.strip() for n in args.names.split(",")] if args.names else [
            default_name(c) + ("" if w == "model" else f" ({w})") for c, w in zip(args.checkpoint, weights)]
        if len(names) != len(args.checkpoint):
            raise UsageError(f"--names has {len(names)} names for {len(args.checkpoint)} checkpoints")
        embedding = parse_embedding_scheme(args.embedding_quantize)
        if args.quantize != "none":  # what is scored is named in every row
            names = [f"{n} {short_name(args.quantize, args.group_size)}" for n in names]
        if embedding is not None:
            names = [f"{n} E{embedding}" for n in names]
        if len(set(names)) != len(names):
            raise UsageError(f"two rows would have the same name ({', '.join(names)}); give --names")
        if args.batch_size < 1 or min(args.ppl_batch_size, args.limit, args.max_windows, args.seq_len) < 0:
            raise UsageError("--batch-size must be >= 1 and --ppl-batch-size, --limit, --max-windows, --seq-len >= 0")
        for checkpoint in args.checkpoint:  # a run folder is named as one before anything about its contents
            refuse_run_folder(checkpoint)
        _check_inputs(args, tasks)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        records = {}
        for name, checkpoint, source in zip(names, args.checkpoint, weights):
            records[name] = evaluate_checkpoint(args, checkpoint, tasks, device, source)
    except (UsageError, TaskDataError, DataError, HFCheckpointError, CheckpointError, FileNotFoundError,
            TokenizerMismatchError, QuantizationError) as e:
        print(f"eval error: {e}", file=sys.stderr)
        raise SystemExit(1) from None

    rows = {name: {t: r["score"] for t, r in rec["tasks"].items()} for name, rec in records.items()}
    for rec, scores in zip(records.values(), rows.values()):
        rec["average"] = average(scores)
    table = format_table(rows, tuple(args.reference)) if any(rows.values()) or args.reference else ""
    if table:
        print(table)
    for name, rec in records.items():
        for kind, r in rec["perplexity"].items():
            print(f"{name}: {kind} perplexity {r['perplexity']:.3f} (mean NLL {r['mean_nll']:.4f}, "
                  f"{r['num_windows']} windows of {r['seq_len']} tokens)")
    if args.out:
        report = {
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoint", "names", "out", "overwrite")},
            "models": records,
            "table": table,
        }
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
