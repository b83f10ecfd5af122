"""The teacher of online distillation: its shape read and its fit with the student checked before
anything is built, then built like the student (on the meta device, compiled per block when the
student is, sharded with FSDP2 over the same mesh) but frozen, and loaded from a DCP step folder or
a Hugging Face Llama-family folder through the same checked loading as checkpoint.initial_load_path.

Frozen means: no gradients (requires_grad off, forward under no_grad), no optimizer state, every
block and the root resharded after its forward (there is no backward to keep them for), compute
in the run's parameter dtype (bf16 on GPU, as the student's; fp32 shards, as the student's).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mobilellm_train.checkpoint.folders import is_complete
from mobilellm_train.checkpoint.model_loading import load_initial_weights, read_model_args
from mobilellm_train.checkpoint.state import ModelState
from mobilellm_train.config import CompileConfig
from mobilellm_train.data.shards import TOKENIZER_FILE, file_sha256
from mobilellm_train.distill.kd_loss import TopKTargets, teacher_topk
from mobilellm_train.errors import CheckpointError, ConfigError
from mobilellm_train.hf import (
    LAYER_SHARING_KEY,
    HFCheckpointError,
    args_from_hf_config,
    is_hf_folder,
    load_hf_checkpoint,
    read_hf_config,
)
from mobilellm_train.model import MobileLLM, ModelArgs, count_params
from mobilellm_train.parallelize import apply_compile

logger = logging.getLogger("mobilellm_train")


class TeacherLLM(MobileLLM):
    """A MobileLLM whose forward returns its distillation targets instead of logits or a loss: the
    top-K (`top_k` > 0, kd_loss.teacher_topk) or, for the full-vocabulary KL, its final hidden
    states [tokens, dim]. The same parameters under the same names, so any MobileLLM checkpoint
    loads into it; forward is the method FSDP2 gathers the root's weights around."""

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, top_k: int = 0,
                chunk_tokens: int = 4096) -> TopKTargets | torch.Tensor:
        hidden = self.hidden_states(tokens, position_ids).flatten(0, 1)
        return teacher_topk(hidden, self.output.weight, top_k, chunk_tokens) if top_k else hidden


def read_teacher_shape(path: str, key: str = "distill.teacher") -> ModelArgs:
    """The teacher's shape without reading its weights: a DCP step folder's recorded ModelArgs, or
    a Hugging Face config.json read as stored (its layers counted as independent blocks, the head
    tied as the config says), which is exact for what the vocabulary and memory checks need."""
    try:
        if is_hf_folder(path):
            cfg = read_hf_config(path)
            return args_from_hf_config(cfg, layer_sharing=bool(cfg.get(LAYER_SHARING_KEY)))
        if is_complete(path):
            return read_model_args(path)
    except HFCheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{key}: {path}/config.json cannot describe a MobileLLM "
                              f"({type(e).__name__}: {e})") from None
    raise ConfigError(f"{key}: {path} is neither a complete DCP step folder (no .metadata) nor a Hugging Face "
                      "folder (no config.json)")


def check_teacher_fits(path: str, teacher: ModelArgs, student: ModelArgs, tokenizer_path: str, seq_len: int,
                       key: str = "distill.teacher") -> None:
    """The teacher must share the student's vocabulary (the same tokenizer.model, compared by
    sha256 as the trainer compares a run's tokenizer with its data's) and cover its seq_len; else a
    ConfigError naming both. A side without a tokenizer file is warned about, not refused."""
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"{key} {path} has a vocabulary of {teacher.vocab_size} tokens and the student {student.vocab_size} "
            "(model.vocab_size): distillation compares the two distributions token by token, so the teacher must "
            "use the student's tokenizer and vocabulary"
        )
    own = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(own) or not tokenizer_path:
        logger.warning("%s: cannot check that the teacher's tokenizer is the run's (%s)", key,
                       f"{path} holds no {TOKENIZER_FILE}" if not os.path.isfile(own) else "the run has no tokenizer")
    elif not os.path.samefile(own, tokenizer_path) and (
            (theirs := file_sha256(own)) != (ours := file_sha256(tokenizer_path))):
        raise ConfigError(
            f"{key} {path}: its tokenizer {own} (sha256 {theirs[:16]}...) is not the run's {tokenizer_path} "
            f"(sha256 {ours[:16]}...): the same ids would mean different tokens to the teacher and the student"
        )
    if seq_len > teacher.max_seq_len:
        raise ConfigError(f"{key} {path}: training.seq_len {seq_len} exceeds the teacher's max_seq_len "
                          f"{teacher.max_seq_len}")


def exact_teacher_args(path: str, shape: ModelArgs, rank: int, key: str = "distill.teacher") -> ModelArgs:
    """The shape to build: a DCP folder's as recorded; a Hugging Face folder's as its weights say
    (layer sharing and a tied head are decided from the weights, hf.load_hf_checkpoint), read by
    rank 0 and sent to the others. The loading reads the folder once more."""
    if not is_hf_folder(path):
        return shape
    box: list = [None]
    if rank == 0:
        try:
            box[0] = dataclasses.asdict(load_hf_checkpoint(path)[0])
        except HFCheckpointError as e:
            box[0] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)  # our own ranks' values, not the folder's bytes
    if isinstance(box[0], str):
        raise CheckpointError(f"{key}: {box[0]}")
    return ModelArgs(**box[0])


def apply_teacher_fsdp(teacher: torch.nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """fully_shard every block, then the root, all resharded after their forward (unlike the
    student's last block and root: the teacher has no backward that would gather them again)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype)
    for block in teacher.layers.children():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def build_teacher(path: str, student: ModelArgs, tokenizer_path: str, seq_len: int, mesh: DeviceMesh,
                  device: torch.device, param_dtype: torch.dtype, compile_blocks: bool, flex_doc_mask: bool,
                  verify: bool, rank: int) -> TeacherLLM:
    """The frozen, sharded, loaded teacher; its shape and fit are checked first (a refusal costs
    only a metadata read). Collective: every rank calls it."""
    shape = read_teacher_shape(path)
    check_teacher_fits(path, shape, student, tokenizer_path, seq_len)
    args = exact_teacher_args(path, shape, rank)
    with torch.device("meta"):
        teacher = TeacherLLM(args)
    teacher.requires_grad_(False)
    apply_compile(teacher, CompileConfig(enable=compile_blocks))
    apply_teacher_fsdp(teacher, mesh, param_dtype)
    teacher.to_empty(device=device)
    teacher.init_weights()  # the rotary tables; every weight is loaded next
    load_initial_weights(ModelState(teacher), path, verify, rank, key="distill.teacher")
    teacher.flex_doc_mask = flex_doc_mask
    logger.info("distill.teacher: %s, %s%d x %d, %s parameters (the student has %s)", path,
                "LS-" if args.layer_sharing else "", args.dim, args.n_layers, f"{count_params(args):,}",
                f"{count_params(student):,}")
    return teacher.eval()
