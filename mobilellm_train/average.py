"""mobilellm-average: the (weighted) element-wise mean of checkpoint steps, as a weights-only step folder.

    mobilellm-average --checkpoint outputs/run/checkpoints/step-4000 \
        --checkpoint outputs/run/checkpoints/step-4500 --checkpoint outputs/run/checkpoints/step-5000 \
        --out outputs/run/average-4000-5000
    python -m mobilellm_train.average --checkpoint A --checkpoint B --weights 1,3 --out AB   # 0.25 A + 0.75 B

The folder has a training step's layout: DCP shards of the mean in fp32 ("model"), the train state
(the model's shape; the step and tokens of the newest step averaged), the tokenizer, `average.json`
(the steps and their weights) and the checksum manifests, so it verifies like a step and
mobilellm-eval, mobilellm-export, mobilellm-generate and checkpoint.initial_load_path read it. It
holds no optimizer state, data position or weight EMA: a run does not resume it, and a branch
(checkpoint.initial_load_optimizer) refuses it.

Every --checkpoint is a complete step folder (a run folder is refused, naming its steps) of the
same model and tokenizer (a difference is refused by name), verified against its checksums unless
--no-verify. Weights default to equal and are normalised to sum to 1. The steps are read one at a
time into one buffer and added to an fp32 running sum: memory is two models' weights, whatever the
number of steps. --out must not exist (or be empty) and may not be inside a checkpoint folder,
where retention would delete it; it is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings

# torch and the checkpoint code are imported inside the functions that use them: --help and
# argument errors answer at once (importing torch takes seconds).

logger = logging.getLogger("mobilellm_train")

SUMMARY_FILE = "average.json"


class AverageError(ValueError):
    """The arguments cannot give an average: named steps that are not steps, do not match, bad weights."""


def parse_weights(spec: str, count: int) -> list[float]:
    """--weights: `count` positive numbers, normalised to sum to 1; empty: equal weights."""
    if not spec:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise AverageError(f"--weights {spec!r}: give comma-separated numbers, one per --checkpoint") from None
    if len(weights) != count:
        raise AverageError(f"--weights has {len(weights)} numbers for {count} checkpoints")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise AverageError(f"--weights {spec!r}: every weight must be a positive number")
    return [w / sum(weights) for w in weights]


def check_steps(paths: list[str]) -> None:
    """Each path is a complete DCP step folder; a run folder or Hugging Face folder is refused."""
    from mobilellm_train.checkpoint import is_complete
    from mobilellm_train.evaluation.loading import newest_step_folder, run_folder_message
    from mobilellm_train.hf import is_hf_folder

    if len(paths) < 2:
        raise AverageError("name at least two steps (--checkpoint STEP --checkpoint STEP ...)")
    for path in paths:
        if not os.path.isdir(path):
            raise AverageError(f"--checkpoint {path}: no such folder")
        if is_complete(path):
            continue
        newest = newest_step_folder(path)
        if newest:
            raise AverageError(run_folder_message(path, newest) + " (name each step to average)")
        if is_hf_folder(path):
            raise AverageError(f"--checkpoint {path} is a Hugging Face folder; mobilellm-average reads the DCP "
                               "step folders of training runs")
        raise AverageError(f"--checkpoint {path} is not a complete DCP step folder (no .metadata)")
    real = [os.path.realpath(p) for p in paths]
    twice = sorted({p for p in paths if real.count(os.path.realpath(p)) > 1})
    if twice:
        raise AverageError(f"--checkpoint {twice[0]} is named twice; give a step more weight with --weights")


def check_out(out: str) -> None:
    """--out: new (or an empty folder), and not inside a checkpoint folder."""
    from mobilellm_train.checkpoint import scan_checkpoints

    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise AverageError(f"--out {out} exists and is not an empty folder; choose another")
    parent = os.path.dirname(os.path.abspath(out))
    if any(scan_checkpoints(parent)):
        raise AverageError(
            f"--out {out} is inside the checkpoint folder {parent}, where retention would delete it and a resume "
            "would meet a step it cannot continue; write it elsewhere (e.g. beside the checkpoint folder)")


def describe_sources(paths: list[str]):
    """(ModelArgs, tokenizer path or "", [(step, tokens_seen)]) of the steps, refusing steps of
    different models or tokenizers by name."""
    from mobilellm_train.checkpoint import TOKENIZER_FILE, TrainState, checked_load
    from mobilellm_train.data.shards import file_sha256

    states, tokenizers = [], {}
    for path in paths:
        state = TrainState()
        checked_load({"train_state": state}, path)
        states.append(state)
        theirs, first = json.loads(state.model_args or "{}"), json.loads(states[0].model_args or "{}")
        diff = {k: (first.get(k), theirs.get(k)) for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)}
        if diff:
            raise AverageError(f"{paths[0]} and {path} hold different models: (first, this) differ in {diff}")
        tokenizer = os.path.join(path, TOKENIZER_FILE)
        tokenizers[path] = file_sha256(tokenizer) if os.path.isfile(tokenizer) else None
    if len(set(tokenizers.values())) > 1:
        described = "; ".join(f"{p}: {'no tokenizer' if h is None else 'sha256 ' + h[:12]}"
                              for p, h in tokenizers.items())
        raise AverageError(f"the steps hold different tokenizers ({described}); average steps of one tokenizer")
    from mobilellm_train.model import ModelArgs

    tokenizer = os.path.join(paths[0], TOKENIZER_FILE) if tokenizers[paths[0]] else ""
    return ModelArgs(**json.loads(states[0].model_args)), tokenizer, [(s.step, s.tokens_seen) for s in states]


def average_steps(paths: list[str], out: str, weights: list[float], verify: bool = True) -> str:
    """Write the weighted mean of the steps' weights to `out` (see the module docstring); returns it."""
    import torch

    from mobilellm_train.checkpoint import load_weights_into, verify_checkpoint
    from mobilellm_train.model import MobileLLM

    check_steps(paths)
    check_out(out)
    if verify:
        for path in paths:
            verify_checkpoint(path)
    args, tokenizer, progress = describe_sources(paths)
    with torch.device("meta"):
        buffer = MobileLLM(args)
    buffer.to_empty(device="cpu")  # every weight is overwritten by each load
    names = [n for n in buffer.state_dict() if not (args.tie_embeddings and n == "output.weight")]
    total = None
    for path, weight in zip(paths, weights):
        load_weights_into(buffer, path)
        state = buffer.state_dict()
        if total is None:
            total = {n: torch.zeros_like(state[n], dtype=torch.float32) for n in names}
        for name in names:
            total[name].add_(state[name].float(), alpha=weight)
        logger.info("added %s with weight %.4g", path, weight)
    del buffer
    newest = max(range(len(paths)), key=lambda i: progress[i][0])
    summary = {"created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "steps": [{"path": os.path.abspath(p), "step": s, "tokens_seen": t, "weight": w}
                         for p, (s, t), w in zip(paths, progress, weights)]}
    _write_step(out, total, args, progress[newest], tokenizer, summary)
    verify_checkpoint(out)
    return out


def _write_step(out: str, weights: dict, args, progress: tuple[int, int], tokenizer: str, summary: dict) -> None:
    """The step folder, through the trainer's checksummed writer, under a temporary name first."""
    import torch.distributed.checkpoint as dcp

    from mobilellm_train.checkpoint import TOKENIZER_FILE, ChecksummedWriter, TrainState, model_args_fingerprint

    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only ever ours: the name carries our pid
    train_state = TrainState(step=progress[0], tokens_seen=progress[1], dp_world_size=1,
                             model_args=model_args_fingerprint(args))
    with tempfile.TemporaryDirectory() as scratch:
        summary_path = os.path.join(scratch, SUMMARY_FILE)
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
        extra = {SUMMARY_FILE: summary_path, **({TOKENIZER_FILE: tokenizer} if tokenizer else {})}
        try:
            with warnings.catch_warnings():  # DCP warns that it assumes a single process
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save({"model": weights, "train_state": train_state},
                         storage_writer=ChecksummedWriter(tmp, extra_files=extra), no_dist=True)
            if os.path.isdir(out):  # check_out allowed it only empty
                os.rmdir(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mobilellm-average", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a DCP step folder (<run>/checkpoints/step-N); repeat for each step to average")
    p.add_argument("--out", required=True, help="the step folder to write (must not exist, or be empty)")
    p.add_argument("--weights", default="", help="comma list of positive weights, one per --checkpoint "
                                                 "(normalised to sum to 1); default: equal")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the steps' files against the checksums recorded at save")
    args = p.parse_args(argv)
    try:
        weights = parse_weights(args.weights, len(args.checkpoint))
    except AverageError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from mobilellm_train.checkpoint import CheckpointError  # only now: the command line is usable

    try:
        out = average_steps(args.checkpoint, args.out, weights, args.verify)
    except (AverageError, CheckpointError, OSError) as e:
        print(f"average error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(out)


if __name__ == "__main__":
    main()
