"""The set-up a run is built from: the process group, logging, the data, the wrapped model and
the checkpointer (the run folder's config.toml is run_config.py's). `train.Trainer` calls these
in order; bench.py and checkpoint_bench.py build their model with the same `build_model`.

torch and the modules built on it are imported inside the functions that use them, so that
`mobilellm-train --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mobilellm_train import config as C

if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.stateful import Stateful
    from torch.distributed.device_mesh import DeviceMesh

    from mobilellm_train.model import ModelArgs

logger = logging.getLogger("mobilellm_train")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The batch and budget a config gives on `world_size` ranks."""

    global_batch: int  # sequences per optimizer step, all ranks
    accum_steps: int  # micro-batches per rank per step
    global_batch_tokens: int
    total_steps: int
    lr: float  # the peak lr, after the linear scaling rule


def plan_batches(training: C.TrainingConfig, optimizer: C.OptimizerConfig, world_size: int) -> BatchPlan:
    """The batch plan; warns when the linear scaling rule moves the lr far from optimizer.lr."""
    global_batch = C.global_batch_size(training, world_size)
    global_batch_tokens = global_batch * training.seq_len
    lr = C.peak_lr(optimizer, global_batch_tokens)
    if not 0.25 <= lr / optimizer.lr <= 4:
        logger.warning(
            "the linear scaling rule makes the peak lr %.3g, %.3gx optimizer.lr %.3g (global batch %d tokens "
            "against optimizer.reference_batch_tokens %d); if that is not meant, set --optimizer.lr for this "
            "batch with --optimizer.scale_lr_with_batch false",
            lr, lr / optimizer.lr, optimizer.lr, global_batch_tokens, optimizer.reference_batch_tokens,
        )
    return BatchPlan(global_batch, C.grad_accum_steps(training, world_size), global_batch_tokens,
                     C.total_steps(training, world_size), lr)


def init_distributed(comm: C.CommConfig | None = None, dump_folder: str = ".") -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes, or make a group of one for a plain `python` run.

    A one-rank group keeps a single code path: FSDP2 and DCP work the same on 1 or N ranks.
    """
    import torch
    import torch.distributed as dist

    from mobilellm_train.resilience import set_flight_recorder_env

    comm = comm or C.CommConfig()
    set_flight_recorder_env(comm, dump_folder)
    timeout = datetime.timedelta(seconds=comm.init_timeout_seconds)
    # A lone process needs no rendezvous: an in-memory store, and the communication libraries
    # on the loopback interface, so that nothing listens on the network.
    store = None
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        loopback = "lo0" if sys.platform == "darwin" else "lo"
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
        store = dist.HashStore()
    group_args = {} if store is None else {"store": store, "rank": 0, "world_size": 1}
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout, **group_args)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout, **group_args)
    return dist.get_rank(), dist.get_world_size(), device


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def resolve_data(cfg: C.DataConfig, dump_folder: str, rank: int) -> tuple[str, str]:
    """(token folder, tokenizer): data.path (or data.sources), else the demo corpus built once by
    rank 0."""
    import torch.distributed as dist

    from mobilellm_train.data.demo import build_demo_corpus
    from mobilellm_train.run_files import check_not_link

    if cfg.path or cfg.sources:
        return cfg.path, cfg.tokenizer_path
    out_dir = os.path.join(dump_folder, "demo_data")
    check_not_link(out_dir)  # the corpus is written inside: never through a link
    if rank == 0:
        paths = build_demo_corpus(out_dir, vocab_size=cfg.demo_vocab_size)
    dist.barrier()
    if rank != 0:
        paths = build_demo_corpus(out_dir, vocab_size=cfg.demo_vocab_size)  # finished: returns at once
    return paths


def build_model(
    model_args: ModelArgs,
    mesh: DeviceMesh,
    device: torch.device,
    training: C.TrainingConfig,
    parallelism: C.ParallelismConfig,
    ac: C.ActivationCheckpointConfig,
    compile_cfg: C.CompileConfig,
    qat: C.QATConfig | None = None,
) -> torch.nn.Module:
    """The model wrapped for training and initialised.

    Built on the meta device (no memory), wrapped, and only then materialised, so each rank
    allocates only its shard: a 1.5B model never exists whole on one rank. With qat.enable its
    linear layers (and with qat.embedding_quantize its embedding) are torchao's fake-quantized
    ones, fake quantization off until the loop turns it on (loop/qat.py).
    """
    import torch

    from mobilellm_train.model import MobileLLM
    from mobilellm_train.parallelize import parallelize

    with torch.device("meta"):
        model = MobileLLM(model_args)
    if qat is not None and qat.enable:
        from mobilellm_train.quantization import apply_embedding_qat, apply_qat, parse_embedding_scheme

        # Before parallelize, because the linear modules are replaced: FSDP2 shards and gathers
        # each parameter through the module holding it, and compile and AC trace the modules they
        # wrap. Inside FSDP2 a layer's forward sees its all-gathered (unsharded) weight, so each
        # int4 group is a slice of a whole row, as the export quantizes it; AC recomputes the
        # fake quantization with the other elementwise ops; compile traces it into each block.
        apply_qat(model, qat.scheme, qat.group_size)
        apply_embedding_qat(model, parse_embedding_scheme(qat.embedding_quantize, "qat.embedding_quantize"))
    on_gpu = device.type == "cuda"
    param_dtype = getattr(torch, training.mixed_precision_param) if on_gpu else torch.float32
    reduce_dtype = getattr(torch, training.mixed_precision_reduce) if on_gpu else torch.float32
    parallelize(model, mesh, parallelism, ac, compile_cfg, param_dtype, reduce_dtype)
    model.to_empty(device=device)
    model.init_weights(seed=training.seed)
    model.loss_chunk_tokens = training.loss_chunk_tokens
    model.z_loss = training.z_loss
    # The per-chunk softmax arithmetic fuses into a few kernels when compiled.
    model.compile_loss = compile_cfg.enable and on_gpu
    model.flex_doc_mask = training.doc_mask_attention == "flex" and on_gpu
    model.train()
    return model


def build_checkpointer(
    cfg: C.CheckpointConfig,
    dump_folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data_state: Stateful,
    model_args: ModelArgs,
    rank: int,
    world_size: int,
    tokenizer_path: str,
    config_text: str = "",
    ema: Stateful | None = None,
    qat: C.QATConfig | None = None,
):
    """(the checkpointer of every Stateful part of the run, the run's TrainState). The checkpoint
    holds exactly these states; nothing else is needed to resume. `config_text`, the run's
    effective config as TOML, is recorded in each checkpoint's train state (run_config.py). The
    weight EMA (loop/ema.py), when on, is optional: a checkpoint written without it starts it from
    the weights. A QAT run's steps also record its scheme, for the export (written, never loaded
    back)."""
    from mobilellm_train import checkpoint as ckpt
    from mobilellm_train.quantization import QATRecord

    train_state = ckpt.TrainState(dp_world_size=world_size, model_args=ckpt.model_args_fingerprint(model_args),
                                  config=config_text)
    jsonl_position = isinstance(data_state, ckpt.PerRankState)
    states = {
        "model": ckpt.ModelState(model),
        "optimizer": ckpt.OptimizerState(model, optimizer),
        "lr_scheduler": ckpt.SchedulerState(scheduler),
        "dataloader": data_state,
        "train_state": train_state,
        "rng": ckpt.PerRankState(rank, ckpt.RNGState()),
    }
    if ema is not None and ema.enabled:
        states["ema"] = ema
    if qat is not None and qat.enable:
        from mobilellm_train.quantization import parse_embedding_scheme

        embedding = parse_embedding_scheme(qat.embedding_quantize, "qat.embedding_quantize")
        states[QATRecord.KEY] = QATRecord(qat.scheme, qat.group_size, qat.start_step, str(embedding or ""))
    checkpointer = ckpt.Checkpointer(
        cfg, dump_folder, states, rank, tokenizer_path=tokenizer_path,
        # The JSONL reader's position belongs to one rank and cannot move to another rank count.
        per_rank=frozenset({"rng", "dataloader"} if jsonl_position else {"rng"}),
        required_per_rank=frozenset({"dataloader"} if jsonl_position else set()),
        optional=frozenset({"ema"}),
        save_only=frozenset({QATRecord.KEY}),
    )
    return checkpointer, train_state


def build_train_data(
    cfg: C.DataConfig,
    data_path: str,
    tokenizer_path: str,
    training: C.TrainingConfig,
    vocab_size: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
    teacher_logits: str = "",
) -> tuple[Iterable[dict], Stateful, str]:
    """(batches, their checkpoint state, the tokenizer) for prepared shards or the JSONL layout.

    Prepared shards have one global position, the same on every rank, so a checkpoint continues
    on any number of ranks. The JSONL reader's position is per rank. teacher_logits: the cached
    teacher values (distill.logits), read beside the tokens; prepared shards only.
    """
    from mobilellm_train.checkpoint import PerRankState
    from mobilellm_train.data.jsonl import DataError, JsonlTokenDataset, build_dataloader, check_token_id_layout
    from mobilellm_train.data.loader import build_token_loader, parse_sources
    from mobilellm_train.data.shards import TOKENIZER_FILE, is_dataset

    global_batch = C.global_batch_size(training, world_size)
    sources = cfg.sources or (data_path if is_dataset(data_path) else "")
    if sources:
        if not tokenizer_path:  # a prepared folder carries its tokenizer
            candidate = os.path.join(parse_sources(sources)[0][0], TOKENIZER_FILE)
            tokenizer_path = candidate if os.path.isfile(candidate) else ""
        loader = build_token_loader(
            sources, seq_len=training.seq_len, local_batch_size=training.local_batch_size,
            global_batch_size=global_batch, dp_rank=rank, dp_world_size=world_size, seed=training.seed,
            num_workers=cfg.num_workers, pin_memory=pin_memory, doc_mask=cfg.doc_mask, vocab_size=vocab_size,
            tokenizer_path=tokenizer_path, verify_checksums=cfg.verify_checksums, teacher_logits=teacher_logits,
        )
        return loader, loader, tokenizer_path
    if teacher_logits:
        raise DataError(f"distill.logits needs prepared data (mobilellm-prepare); {data_path} is in the JSONL layout")
    if cfg.doc_mask:
        raise DataError(f"data.doc_mask needs prepared data (mobilellm-prepare); {data_path} is in the JSONL layout")
    check_token_id_layout(data_path, tokenizer_path)
    dataset = JsonlTokenDataset(
        data_path,
        seq_len=training.seq_len,
        vocab_size=vocab_size,
        dp_rank=rank,
        dp_world_size=world_size,
        ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        skip_bad_lines=cfg.skip_bad_lines,
    )
    loader = build_dataloader(dataset, training.local_batch_size, cfg.num_workers, pin_memory=pin_memory)
    return loader, PerRankState(rank, loader), tokenizer_path
