"""What distillation adds to a run: for each micro-batch, the teacher's targets for its tokens (a
`kd_loss.Distillation` for `MobileLLM.forward(..., distill=)`), from the online teacher or from
the cached values the loader put in the batch. `train_step` and validation call
`maybe_teacher_targets` around the student's forward; `build_distiller` makes the Distiller from
the [distill] section, or None when distill.alpha is 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from mobilellm_train import config as C
from mobilellm_train.distill.kd_loss import DenseTargets, Distillation, TopKTargets

logger = logging.getLogger("mobilellm_train")


class Distiller:
    """The teacher (online) or nothing (cached: the targets come in the batch), alpha, the
    temperature and K (0: the full vocabulary; with a cache, 0 takes all of its K)."""

    def __init__(self, alpha: float, temperature: float, top_k: int, teacher: torch.nn.Module | None = None,
                 chunk_tokens: int = 4096):
        self.alpha, self.temperature, self.top_k = alpha, temperature, top_k
        self.teacher, self.chunk_tokens = teacher, chunk_tokens

    @contextlib.contextmanager
    def targets(self, batch: dict, inputs: torch.Tensor, positions: torch.Tensor | None) -> Iterator[Distillation]:
        """The micro-batch's Distillation, valid inside the block (the full-vocabulary teacher keeps
        its output weight gathered until the block ends)."""
        if self.teacher is None:
            ids, logprobs = batch["teacher_ids"], batch["teacher_logprobs"]
            k = self.top_k or ids.shape[-1]
            # The cache keeps each token's K most likely first: a smaller K is its first columns.
            ids = ids[..., :k].to(inputs.device, non_blocking=True).long().flatten(0, 1)
            logprobs = logprobs[..., :k].to(inputs.device, non_blocking=True).float().flatten(0, 1)
            yield Distillation(TopKTargets(ids, logprobs), self.alpha, self.temperature)
            return
        with torch.no_grad():
            out = self.teacher(inputs, position_ids=positions, top_k=self.top_k, chunk_tokens=self.chunk_tokens)
        if self.top_k:
            yield Distillation(out, self.alpha, self.temperature)
            return
        # Full vocabulary: the student's loss makes each chunk's teacher logits from the teacher's
        # hidden states and its output weight, which stays gathered (FSDP2 unshard) until then.
        with maybe_gathered_root(self.teacher):
            yield Distillation(DenseTargets(out, self.teacher.output.weight), self.alpha, self.temperature)


@contextlib.contextmanager
def maybe_gathered_root(module: torch.nn.Module) -> Iterator[None]:
    """An FSDP2 module's own parameters gathered inside the block (its blocks' are not); a plain
    module: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


@contextlib.contextmanager
def maybe_teacher_targets(distiller: Distiller | None, batch: dict, inputs: torch.Tensor,
                          positions: torch.Tensor | None) -> Iterator[Distillation | None]:
    """`distiller.targets(...)`, or None without distillation."""
    if distiller is None:
        yield None
        return
    with distiller.targets(batch, inputs, positions) as distill:
        yield distill


def build_distiller(cfg: C.DistillConfig, training: C.TrainingConfig, compile_cfg: C.CompileConfig, verify: bool,
                    student, tokenizer_path: str, mesh, device: torch.device, rank: int) -> Distiller | None:
    """The run's Distiller, its teacher or cache checked against the student (vocabulary,
    tokenizer, K) first; None when distill.alpha is 0. Collective with a teacher."""
    from mobilellm_train.metrics import flops_per_token

    if cfg.alpha == 0:
        if cfg.teacher or cfg.logits:
            logger.info("distill.alpha is 0: distillation is off (distill.%s is not used)",
                        "teacher" if cfg.teacher else "logits")
        return None
    what = f"alpha {cfg.alpha:g}, temperature {cfg.temperature:g}"
    if cfg.logits:
        k = check_cache_fits(cfg, student.vocab_size, tokenizer_path)
        logger.info("distillation from the cached top-%d of %s (%s; no teacher in memory)", k, cfg.logits, what)
        return Distiller(cfg.alpha, cfg.temperature, cfg.top_k)
    from mobilellm_train.distill.teacher import build_teacher

    on_gpu = device.type == "cuda"
    param_dtype = getattr(torch, training.mixed_precision_param) if on_gpu else torch.float32
    teacher = build_teacher(cfg.teacher, student, tokenizer_path, training.seq_len, mesh, device, param_dtype,
                            compile_cfg.enable, training.doc_mask_attention == "flex" and on_gpu, verify, rank)
    forward_flops = flops_per_token(teacher.args, training.seq_len) / 3  # a forward: a third of a training step
    logger.info("online distillation (%s, %s): the teacher's forward costs %.2f GFLOPs/token, %.2fx the student's "
                "training step", what, f"top-{cfg.top_k}" if cfg.top_k else "full vocabulary", forward_flops / 1e9,
                forward_flops / flops_per_token(student, training.seq_len))
    return Distiller(cfg.alpha, cfg.temperature, cfg.top_k, teacher, training.loss_chunk_tokens)


def check_cache_fits(cfg: C.DistillConfig, vocab_size: int, tokenizer_path: str) -> int:
    """The K a cached run uses; a cache of another vocabulary or tokenizer, or with fewer than
    distill.top_k values per token, is a ConfigError naming both sides."""
    from mobilellm_train.data.shards import file_sha256
    from mobilellm_train.distill.cache import read_cache_manifest

    m = read_cache_manifest(cfg.logits)
    if m.vocab_size != vocab_size:
        raise C.ConfigError(f"distill.logits {cfg.logits}: the teacher's vocabulary has {m.vocab_size} tokens "
                            f"({m.path}), the student's {vocab_size} (model.vocab_size); they must be the same")
    if m.tokenizer_sha256 and tokenizer_path and (ours := file_sha256(tokenizer_path)) != m.tokenizer_sha256:
        raise C.ConfigError(f"distill.logits {cfg.logits}: made with the tokenizer of sha256 "
                            f"{m.tokenizer_sha256[:16]}... ({m.path}), not the run's {tokenizer_path} ({ours[:16]}...)")
    if cfg.top_k > m.top_k:
        raise C.ConfigError(f"distill.top_k {cfg.top_k}: distill.logits {cfg.logits} holds only the top "
                            f"{m.top_k} per token ({m.path}); set distill.top_k to at most {m.top_k} (0 takes all)")
    return cfg.top_k or m.top_k


def val_logits_folder(cfg: C.DistillConfig) -> str:
    """The cached values for the validation data: <distill.logits>/val ("" unless distilling from a cache)."""
    return os.path.join(cfg.logits, "val") if cfg.alpha > 0 and cfg.logits else ""
