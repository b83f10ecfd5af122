"""The run configuration's sections: one dataclass each, every field with a default and a
docstring (the string literal under it), which is also its `--help` text; and the values derived
from them in one place (model shape, batch sizes, steps, peak lr), so no component recomputes them.

Each component receives its own section, never the whole `Config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mobilellm_train.model import ModelArgs


@dataclass
class JobConfig:
    dump_folder: str = "./outputs/debug"
    """Run folder: checkpoints/, metrics.jsonl, tb/ and the effective config.toml go here."""
    description: str = ""
    """Free text, logged at start; empty: said from the run (model and data, start_checks.describe_run)."""
    stop_file: str = ""
    """If this file appears, all ranks save a checkpoint at the next stop check and exit cleanly
    (launch/train.slurm creates it before the time limit). One present at start, left by an
    earlier run, is deleted once the start is past its checks; anything there that is not a stop
    file (empty or holding `stop`, yours, not a link) stops the start. Empty: none is watched."""
    stop_check_freq: int = 10
    """Ranks agree on a stop request (signal or stop file) every N steps, with a small CPU
    all-reduce that all ranks wait for; a request takes effect at the next multiple of N."""


@dataclass
class ModelConfig:
    flavor: Literal["debug", "125M", "350M", "600M", "1B", "1.5B"] = "debug"
    """Size preset from the MobileLLM paper; `debug` is a tiny model for CPU runs and tests."""
    layer_sharing: bool = False
    """MobileLLM-LS: run each block twice in a row with the same weights (2x compute, same params)."""
    tie_embeddings: bool = True
    """Share the output projection with the input embedding, as MobileLLM does."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes the data's (a prepared folder's manifest, data.tokenizer_path of
    JSONL data, the demo's) or a resumed checkpoint's, else the flavor's (32000). Must cover every
    token id in the data."""
    max_seq_len: int = 0
    """Longest sequence the RoPE tables cover; 0 takes the flavor's (2048)."""
    dim: int = 0
    """Hidden size override for experiments; 0 takes the flavor's."""
    n_layers: int = 0
    """Number of (unique) blocks override; 0 takes the flavor's."""
    n_heads: int = 0
    """Query heads override; 0 takes the flavor's."""
    n_kv_heads: int = 0
    """Key/value heads override (grouped-query attention); 0 takes the flavor's."""
    ffn_dim: int = 0
    """SwiGLU hidden size override; 0 takes the flavor's."""


@dataclass
class TrainingConfig:
    steps: int = 200
    """Optimizer steps to train for (ignored when `tokens` is set). Accepts 480k, 1.2M, ..."""
    tokens: int = 0
    """Token budget instead of steps, e.g. 1T or 500B: steps = ceil(tokens / global batch tokens)."""
    stop_at_step: int = 0
    """Save a checkpoint and exit after this step, as an interruption would; the lr schedule still
    spans the whole budget. Splits a run into jobs of fixed length. 0 runs to the end."""
    local_batch_size: int = 8
    """Sequences per GPU per micro-batch."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks; 0 means local x data-parallel size. Larger
    values accumulate gradients over local x dp micro-batches."""
    seq_len: int = 256
    """Tokens per training sequence."""
    seed: int = 0
    """Seed for weight init and every random number of the run."""
    max_norm: float = 1.0
    """Gradient clipping by global L2 norm; 0 disables."""
    mixed_precision_param: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of parameters in forward/backward on GPU (CPU always runs float32)."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """Dtype of gradient reduce-scatter on GPU."""
    loss_chunk_tokens: int = 4096
    """The output projection and cross-entropy run over this many tokens at a time, so the full
    logits never exist; 0 computes them whole (the original way, more memory)."""
    gc_freq: int = 50
    """Run a generation-1 collection of Python's garbage collector every N steps (automatic
    collection is off during training: its pauses at random points stall every rank)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf gradient norm either stops the run before the optimizer step, or skips the step."""
    max_skipped_steps: int = 10
    """on_nonfinite = "skip": stop anyway once this many steps of the run were skipped."""
    spike_threshold: float = 0.0
    """Report a loss spike when a step's loss exceeds this multiple of the mean of the previous
    `spike_window` steps (e.g. 2.0); 0 disables (it costs a small all-reduce per step)."""
    spike_window: int = 50
    """Steps whose mean loss a spike is measured against."""
    spike_rewind: bool = False
    """On a spike, reload the newest checkpoint and skip the data of the steps since it."""
    max_rewinds: int = 3
    """Stop after this many spike rewinds in one process instead of looping."""
    doc_mask_attention: Literal["flex", "sdpa"] = "flex"
    """With data.doc_mask on GPU: flex runs FlexAttention with a block mask from the document
    boundaries (fused, skips masked tiles); sdpa passes a boolean [B,1,T,T] mask, which forces
    SDPA's math kernel. CPU always takes sdpa (FlexAttention has no CPU backward)."""
    gc_full_freq: int = 1000
    """Run a full (all-generation) garbage collection every N steps; it walks every Python object
    and takes far longer than a generation-1 pass, so it runs rarely. 0: never during training."""
    z_loss: float = 0.0
    """Add z_loss x mean(logsumexp(logits)^2) to the training loss, logged apart as `z_loss`
    (1e-4 is the usual value; it keeps the logits from drifting). 0: off. The validation loss
    stays the cross-entropy alone."""
    ema_decay: float = 0.0
    """Keep an fp32 exponential moving average of the weights, ema = decay x ema + (1 - decay) x
    weights after each optimizer step (e.g. 0.999), sharded like them and saved in every checkpoint;
    validation also reports its loss (val_loss_ema), and eval/export/generate read it with
    --weights ema. 0: off."""


@dataclass
class OptimizerConfig:
    lr: float = 5e-4
    """Peak learning rate (the original recipe: 5e-4 at 256 x 2048 tokens per step)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices and embeddings, never to norm weights."""
    fused: bool = True
    """Use the fused AdamW kernel (CUDA and CPU): one kernel for all parameters, and a
    non-finite step is skipped on the device. Off: the foreach kernel, and a host sync per step."""
    scale_lr_with_batch: bool = False
    """Linear scaling rule: lr_used = lr x global batch tokens / reference_batch_tokens."""
    reference_batch_tokens: int = 256 * 2048
    """Batch size, in tokens, at which `lr` is the right peak (the original: 256 x 2048)."""


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = 1000
    """Linear warmup from ~0 to the peak lr over this many steps."""
    decay_type: Literal["cosine", "linear", "wsd"] = "cosine"
    """Shape after warmup: cosine or linear decay to the floor, or warmup-stable-decay."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak lr (the original: 10%)."""
    decay_ratio: float = 0.2
    """wsd only: the fraction of all steps spent in the final linear decay."""


@dataclass
class DataConfig:
    path: str = ""
    """Training data: a folder prepared by mobilellm-prepare (holding manifest.json), or one in the
    original layout, path/<node>/*.jsonl with {"token_ids": [...]} lines. Empty: build the built-in
    demo corpus (Python's own docstrings) under the run folder."""
    sources: str = ""
    """Prepared folders to mix instead of `path`, 'path1:0.7,path2:0.3' (a bare path weighs 1)."""
    doc_mask: bool = False
    """Prepared data: attend within each document only, positions restarting at each document
    (slower attention). Off: documents are packed across, as in the original code."""
    verify_checksums: bool = True
    """Prepared data: at start-up check that each shard is as its last full verification recorded
    (verified.json, one stat per file); shards changed since or never verified are hashed, spread
    over the ranks; off: sizes only."""
    val_path: str = ""
    """Prepared held-out data (<out>/val of mobilellm-prepare); empty with val_interval set: <data.path>/val."""
    val_interval: int = 0
    """Compute the validation loss every N steps and at the last step; 0: never."""
    val_sequences: int = 512
    """Validation sequences over all ranks: the same fixed set at every evaluation and rank count."""
    tokenizer_path: str = ""
    """SentencePiece model the data was tokenized with; copied into every checkpoint so that
    evaluation and export find it. Empty with the demo corpus: the demo's own."""
    num_workers: int = 1
    """Loader worker processes per rank; 0 reads in the training process."""
    skip_bad_lines: int = 0
    """How many malformed lines a rank may skip (each logged); 0 stops at the first one."""
    demo_vocab_size: int = 2000
    """Vocabulary of the SentencePiece model trained for the demo corpus."""


@dataclass
class ParallelismConfig:
    dp_replicate: int = 1
    """HSDP: number of replica groups (usually nodes); parameters are sharded within a group and
    replicated across groups. 1 is plain FSDP over all ranks."""
    reshard_after_forward: bool = True
    """Free gathered block weights after forward (saves memory, costs a second all-gather in
    backward). Off suits small models."""
    explicit_prefetch: bool = False
    """Issue block i+1's all-gather when block i starts (and i-1's in backward), instead of
    FSDP2's implicit prefetching."""


@dataclass
class ActivationCheckpointConfig:
    mode: Literal["none", "full", "selective", "op"] = "none"
    """Recompute activations in backward: none; every block (full); every N-th block (selective);
    or op, every block keeping its matmul and attention outputs and recomputing only the
    elementwise ops (norms, RoPE, SwiGLU), so no GEMM runs twice."""
    selective_every: int = 2
    """selective mode: checkpoint one block in every N."""


@dataclass
class CompileConfig:
    enable: bool = False
    """torch.compile each transformer block (fullgraph)."""


@dataclass
class QATConfig:
    enable: bool = False
    """Quantization-aware training: from start_step on, every linear layer the ExecuTorch export
    quantizes (the tied output layer included) computes with torchao's fake quantization of
    `scheme`, so the loss logged is that of the quantized model (docs/QUANTIZATION.md). Needs
    the edge extra (pip install -e '.[edge]')."""
    start_step: int = 0
    """First step trained fake-quantized (0 or 1: the run's first); accepts 470k. Steps before it
    train in full precision, so a run (or a run folder trained without QAT) switches on mid-way."""
    scheme: Literal["8da4w", "8da8w"] = "8da4w"
    """The scheme the weights are trained for, as mobilellm-export --quantize names it: 8da4w (int8
    dynamic activations, int4 weights in groups) or 8da8w (int8 per-channel weights)."""
    group_size: int = 32
    """8da4w: input columns per int4 weight scale, as mobilellm-export --group-size (32: the export's)."""
    embedding_quantize: str = "none"
    """The embedding table trained fake-quantized too (weight-only), as mobilellm-export
    --embedding-quantize stores it: "8,0" (int8 per row), "4,32" (int4 in groups of 32), "none"."""


@dataclass
class CheckpointConfig:
    enable: bool = True
    """Save DCP checkpoints and resume from them."""
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "async"
    """disabled: training waits for each save. async: training waits only while the state is
    copied, then continues while a thread writes it. async_with_pinned_mem (GPU): the copy to
    pinned host memory also overlaps training, and a separate process writes."""
    folder: str = "checkpoints"
    """Sub-folder of the run folder holding step-<N>/ checkpoints."""
    interval: int = 100
    """Save every N steps (and at the last step)."""
    keep_latest_k: int = 3
    """Keep this many newest complete checkpoints; 0 keeps all."""
    load_step: int = -1
    """Resume from this step's checkpoint; -1 takes the newest complete one, 0 starts fresh."""
    initial_load_path: str = ""
    """A DCP step folder or Hugging Face folder whose model weights start a new run (continued
    pretraining). Used whenever no checkpoint of the run folder is resumed, even with enable = false.
    The tokenizer.model it holds must be the one this run's data was made with."""
    initial_load_other_tokenizer: bool = False
    """Start from initial_load_path's weights although they were trained with another tokenizer
    than this run's data (its token ids then mean other text to them); logged as a warning."""
    initial_load_optimizer: bool = False
    """With initial_load_path a DCP step folder: also take that step's AdamW moments and step
    counts (and its weight EMA, when both runs keep one), so the new run is a branch that continues
    the source run's optimizer, e.g. a decay branch of a WSD run. The schedule, data and step count
    are this run's own; the source folder is only read."""
    verify: bool = True
    """Check every checkpoint file against the checksums recorded at save before loading it."""


@dataclass
class CommConfig:
    init_timeout_seconds: int = 600
    """Collective timeout until the first step ends (start-up, compile, checkpoint load)."""
    train_timeout_seconds: int = 300
    """Collective timeout after the first step: a hung or dead rank stops the job this fast."""
    trace_buf_size: int = 0
    """NCCL flight recorder: keep this many collective records per rank and dump them to
    <dump_folder>/comm_traces/ on a timeout. 0 disables."""


@dataclass
class MetricsConfig:
    log_freq: int = 10
    """Log every N steps to stdout, TensorBoard and metrics.jsonl."""
    enable_tensorboard: bool = True
    """Write TensorBoard events under <dump_folder>/tb."""
    peak_tflops: float = 0.0
    """bf16 dense peak per device for MFU; 0 detects it (H100/H200 989, A100 312; none on CPU)."""


@dataclass
class EvalConfig:
    tasks: str = ""
    """Zero-shot tasks to score during training, comma-separated: arc_easy, arc_challenge, boolq,
    piqa, siqa, hellaswag, obqa, winogrande, or commonsense for all eight. Empty: none."""
    data_dir: str = ""
    """Folder with one subfolder per task, laid out as docs/EVALUATION.md describes."""
    interval_checkpoints: int = 1
    """Score the tasks after every N-th checkpoint save (and after the last step)."""
    limit: int = 0
    """Only the first N examples of each task (0: all); a few hundred keep the pause short."""
    batch_size: int = 32
    """Choice sequences per forward, per rank."""


@dataclass
class ProfilingConfig:
    enable: bool = False
    """Record a torch.profiler trace of steps start_step .. start_step + steps - 1 into
    <dump_folder>/profile/ (open it in Perfetto or TensorBoard)."""
    start_step: int = 10
    """First profiled step (after compile and warm-up)."""
    steps: int = 3
    """Number of profiled steps."""
    memory_snapshot: bool = False
    """CUDA: record every allocation and write a memory snapshot after step start_step + steps - 1
    and on out-of-memory, for https://pytorch.org/memory_viz."""
    memory_check: bool = True
    """CUDA: stop at start-up when the planned peak memory (mobilellm-plan) exceeds the GPU's; false
    logs the estimate and starts anyway."""


@dataclass
class DistillConfig:
    alpha: float = 0.0
    """Knowledge distillation: the loss is alpha x KD + (1 - alpha) x CE, KD the KL divergence from
    the teacher's next-token distribution to the student's; 0 disables distillation."""
    teacher: str = ""
    """Online: the teacher, a DCP step folder or a Hugging Face Llama-family folder (loaded and
    verified as checkpoint.initial_load_path is), with the student's vocabulary and tokenizer."""
    logits: str = ""
    """Cached, instead of teacher: a folder of mobilellm-prepare teacher-logits for data.path (its
    val/ serves validation); no teacher in memory."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in KD, whose KL is multiplied by temperature^2."""
    top_k: int = 0
    """0: KL over the full vocabulary (online only); K: over the teacher's K most likely tokens,
    renormalised, against the student's log-probabilities there. With logits, 0 takes the cache's K."""


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# ---------------------------------------------------------------------------------------------
# Derived values: computed from the config in one place, so no component recomputes them.


def build_model_args(cfg: ModelConfig) -> ModelArgs:
    """The flavor's preset with any non-zero overrides applied."""
    from mobilellm_train.model import MODEL_PRESETS

    args = dataclasses.replace(MODEL_PRESETS[cfg.flavor])
    for name in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        value = getattr(cfg, name)
        if value:
            setattr(args, name, value)
    args.layer_sharing = cfg.layer_sharing
    args.tie_embeddings = cfg.tie_embeddings
    return args


def global_batch_size(cfg: TrainingConfig, dp_size: int) -> int:
    return cfg.global_batch_size or cfg.local_batch_size * dp_size


def grad_accum_steps(cfg: TrainingConfig, dp_size: int) -> int:
    return global_batch_size(cfg, dp_size) // (cfg.local_batch_size * dp_size)


def total_steps(cfg: TrainingConfig, dp_size: int) -> int:
    if cfg.tokens:
        return math.ceil(cfg.tokens / (global_batch_size(cfg, dp_size) * cfg.seq_len))
    return cfg.steps


def peak_lr(opt: OptimizerConfig, global_batch_tokens: int) -> float:
    if opt.scale_lr_with_batch:
        return opt.lr * global_batch_tokens / opt.reference_batch_tokens
    return opt.lr

