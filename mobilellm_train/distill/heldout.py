"""The held-out KL from a teacher to a student: how close a run brought the student to the teacher
(the measurement of docs/TRAINING.md, "Distillation"), with each model's cross-entropy.

    python -m mobilellm_train.distill.heldout --teacher runs/teacher/checkpoints/step-500 \
        --student runs/student/checkpoints/step-300 --data data/demo/val --seq-len 256

Both models (DCP step folders, verified, or Hugging Face folders) read every window of the
prepared held-out folder (seq_len + 1 tokens each, as training cuts them; --doc-mask as the runs
had it). Prints one JSON object: "kl", the mean over tokens of KL(teacher || student) at
temperature 1 over the full vocabulary, in nats; "student_ce" and "teacher_ce"; "tokens". The KL
is computed chunk by chunk (kd_loss.chunked_distillation_loss), never over whole-batch logits.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mobilellm_train.distill.kd_loss import DenseTargets, chunked_distillation_loss
from mobilellm_train.losses import chunked_cross_entropy


@torch.no_grad()
def heldout_kl(teacher: torch.nn.Module, student: torch.nn.Module, batches, chunk_tokens: int = 4096) -> dict:
    """{"kl", "student_ce", "teacher_ce", "tokens"} over `batches` ({"input", "label"[, "position_ids"]})."""
    sums = torch.zeros(3, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        positions = batch.get("position_ids")
        labels = batch["label"].flatten()
        count = int((labels != -100).sum())
        if count == 0:
            continue
        t_hidden = teacher.hidden_states(batch["input"], positions).flatten(0, 1)
        s_hidden = student.hidden_states(batch["input"], positions).flatten(0, 1)
        _, student_ce, kl = chunked_distillation_loss(s_hidden, student.output.weight, labels,
                                                      DenseTargets(t_hidden, teacher.output.weight), alpha=1.0,
                                                      chunk_size=chunk_tokens)
        teacher_ce = chunked_cross_entropy(t_hidden, teacher.output.weight, labels, chunk_tokens)
        sums += torch.stack([kl, student_ce, teacher_ce]).double() * count
        tokens += count
    kl, student_ce, teacher_ce = (sums / max(tokens, 1)).tolist()
    return {"kl": kl, "student_ce": student_ce, "teacher_ce": teacher_ce, "tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    from mobilellm_train.data.loader import build_val_batches
    from mobilellm_train.data.shards import read_manifest
    from mobilellm_train.errors import CheckpointError, DataError
    from mobilellm_train.evaluation.loading import load_model
    from mobilellm_train.hf import HFCheckpointError

    p = argparse.ArgumentParser(prog="python -m mobilellm_train.distill.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher: DCP step folder or Hugging Face folder")
    p.add_argument("--student", required=True, help="the student: DCP step folder or Hugging Face folder")
    p.add_argument("--data", required=True, help="prepared held-out folder (e.g. <data>/val)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window, as training.seq_len")
    p.add_argument("--doc-mask", action="store_true", help="attention within documents, as data.doc_mask")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        models = {}
        for name in ("teacher", "student"):
            try:
                models[name] = load_model(getattr(args, name))
            except (OSError, CheckpointError, HFCheckpointError) as e:
                raise DataError(f"--{name} {getattr(args, name)}: {e}") from None
        teacher, student = models["teacher"], models["student"]
        if teacher.args.vocab_size != student.args.vocab_size:
            raise DataError(f"the teacher's vocabulary ({teacher.args.vocab_size}) is not the student's "
                            f"({student.args.vocab_size})")
        windows = read_manifest(args.data).num_tokens // (args.seq_len + 1)
        batches = build_val_batches(args.data, args.seq_len, args.batch_size, 0, 1, max(windows, 1),
                                    doc_mask=args.doc_mask, vocab_size=student.args.vocab_size)
    except (OSError, CheckpointError, DataError, HFCheckpointError) as e:
        print(f"heldout: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({**heldout_kl(teacher, student, batches), "windows": windows, "seq_len": args.seq_len}))


if __name__ == "__main__":
    main()
