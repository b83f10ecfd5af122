"""Run configuration: one dataclass per section, loaded as defaults < TOML < command line.

    mobilellm-train --config train_configs/125M.toml --training.steps 100 --optimizer.lr=1e-3
    mobilellm-train --help          # every field, its default and its docstring

Each field's docstring (the string literal under it) is its `--help` text. Every component
receives its own section, never the whole `Config`. `load_config` checks names, types and
values and raises `ConfigError` naming the key before any process group or model exists.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from mobilellm_train.model import ModelArgs

# Parsing the command line (and --help) imports nothing heavy: torch takes seconds to import, so
# the model, data and task modules are imported where values are checked (validate).
from mobilellm_train.errors import ConfigError, DataError, raw_text_hint
from mobilellm_train.evaluation.tasks import parse_task_names


def __getattr__(name: str):
    # config.MODEL_PRESETS and config.ModelArgs still resolve, imported on first use.
    if name in ("MODEL_PRESETS", "ModelArgs"):
        from mobilellm_train import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class JobConfig:
    dump_folder: str = "./outputs/debug"
    """Run folder: checkpoints/, metrics.jsonl, tb/ and the effective config.toml go here."""
    description: str = "MobileLLM pretraining"
    """Free text, logged at start."""
    stop_file: str = ""
    """If this file appears, all ranks save a checkpoint at the next stop check and exit cleanly
    (launch/train.slurm creates it before the time limit). One present at start, left by an
    earlier run, is deleted. Empty: no such file is watched."""
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
    """Vocabulary size; 0 takes the flavor's (32000). Must cover every token id in the data."""
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
    """Prepared folder of held-out data (e.g. <out>/val of mobilellm-prepare); empty: no validation."""
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
    pretraining). Used whenever no checkpoint of the run folder is resumed, even with enable = false."""
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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)


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


# ---------------------------------------------------------------------------------------------
# Loading: defaults < TOML < command line.

_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_int(text: str) -> int:
    """'480000', '480_000', '480k', '1T', '1.5B', '2e9' -> int."""
    s = text.strip().replace("_", "")
    m = re.fullmatch(r"([0-9.eE+-]+)([kKmMbBgGtT]?)", s)
    if m is None:
        raise ValueError(f"not an integer: {text!r}")
    number, suffix = m.groups()
    try:
        value = int(number) if not suffix and re.fullmatch(r"[+-]?\d+", number) else float(number)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None
    value = value * _SUFFIXES.get(suffix.lower(), 1)
    if value != int(value):
        raise ValueError(f"not an integer: {text!r}")
    return int(value)


def _coerce(key: str, value, typ):
    """Convert a TOML or command-line value to the field's type, or raise ConfigError naming key."""
    from_cli = isinstance(value, str)
    origin = typing.get_origin(typ)
    try:
        if origin is Literal:
            choices = typing.get_args(typ)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(map(str, choices))}")
            return value
        if typ is bool:
            if isinstance(value, bool):
                return value
            if from_cli and value.lower() in ("true", "1", "yes", "on"):
                return True
            if from_cli and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typ is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return parse_int(value)
            raise ValueError("expected an integer")
        if typ is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            if isinstance(value, (int, float, str)):
                number = float(value)
                # Every float of the config is a finite quantity; inf or nan would only show up
                # later as a NaN loss or a schedule that never moves.
                if not math.isfinite(number):
                    raise ValueError("must be a finite number")
                return number
            raise ValueError("expected a number")
        if typ is str:
            if isinstance(value, str):
                return value
            raise ValueError("expected a string")
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (got {value!r})") from None
    raise TypeError(f"unsupported config field type {typ} for {key}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _set(cfg: Config, dotted: str, value, source: str) -> None:
    section, _, key = dotted.partition(".")
    sections = _section_types()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section '{section}' (sections: {', '.join(sections)})")
    section_cls = sections[section]
    hints = typing.get_type_hints(section_cls, globalns=globals())
    if key not in hints:
        raise ConfigError(f"{source}: unknown key '{dotted}' (keys of [{section}]: {', '.join(hints)})")
    setattr(getattr(cfg, section), key, _coerce(dotted, value, hints[key]))


def _parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split argv into the --config path and (section.key, value) overrides."""
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r} (overrides look like --section.key value)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: --{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name in ("config", "job.config_file"):
            config_path = value
        elif "." not in name:
            raise ConfigError(f"command line: --{name} is not of the form --section.key")
        else:
            overrides.append((name, value))
    return config_path, overrides


def load_config(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """defaults < TOML (--config) < --section.key overrides, then validated for `world_size` ranks."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        raise SystemExit(0)
    config_path, overrides = _parse_cli(argv)
    cfg = Config()
    if config_path is not None:
        try:
            with open(config_path, "rb") as f:
                toml = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file: {config_path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{config_path}: invalid TOML: {e}") from None
        for section, table in toml.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{config_path}: '{section}' must be a [section] table, not a bare key")
            for key, value in table.items():
                _set(cfg, f"{section}.{key}", value, config_path)
    for dotted, value in overrides:
        _set(cfg, dotted, value, f"--{dotted}")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    return cfg


def validate(cfg: Config, world_size: int) -> None:
    """Reject impossible values with the key's name, before anything expensive starts."""
    from mobilellm_train.data.sources import parse_sources

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    m = build_model_args(cfg.model)
    check(m.dim > 0 and m.n_layers > 0 and m.n_heads > 0 and m.n_kv_heads > 0 and m.ffn_dim > 0,
          "model: dim, n_layers, n_heads, n_kv_heads and ffn_dim must be positive")
    check(m.dim % m.n_heads == 0, f"model.n_heads ({m.n_heads}) must divide model.dim ({m.dim})")
    check(m.n_heads % m.n_kv_heads == 0,
          f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads})")
    check((m.dim // m.n_heads) % 2 == 0, f"model: head dim {m.dim // m.n_heads} must be even for RoPE")
    check(m.vocab_size > 2, f"model.vocab_size must be > 2 (got {m.vocab_size})")

    t = cfg.training
    check(t.seq_len > 0, f"training.seq_len must be positive (got {t.seq_len})")
    check(t.seq_len <= m.max_seq_len,
          f"training.seq_len ({t.seq_len}) exceeds what the model supports "
          f"(model.max_seq_len = {m.max_seq_len})")
    check(t.local_batch_size > 0, f"training.local_batch_size must be positive (got {t.local_batch_size})")
    check(t.steps > 0 or t.tokens > 0, "training.steps or training.tokens must be positive")
    check(t.tokens >= 0 and t.global_batch_size >= 0, "training.tokens and training.global_batch_size must be >= 0")
    check(t.stop_at_step >= 0, f"training.stop_at_step must be >= 0 (got {t.stop_at_step})")
    check(t.max_norm >= 0, f"training.max_norm must be >= 0 (got {t.max_norm})")
    check(t.loss_chunk_tokens >= 0, f"training.loss_chunk_tokens must be >= 0 (got {t.loss_chunk_tokens})")
    check(cfg.job.stop_check_freq > 0, f"job.stop_check_freq must be positive (got {cfg.job.stop_check_freq})")
    check(t.gc_freq > 0, f"training.gc_freq must be positive (got {t.gc_freq})")
    check(t.gc_full_freq >= 0, f"training.gc_full_freq must be >= 0 (got {t.gc_full_freq})")
    check(t.max_skipped_steps >= 0, f"training.max_skipped_steps must be >= 0 (got {t.max_skipped_steps})")
    check(t.spike_threshold == 0 or t.spike_threshold > 1,
          f"training.spike_threshold must be 0 (off) or above 1 (got {t.spike_threshold})")
    check(t.spike_window > 0 and t.max_rewinds >= 0, "training.spike_window must be > 0 and training.max_rewinds >= 0")
    per_step = t.local_batch_size * world_size
    check(global_batch_size(t, world_size) % per_step == 0,
          f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
          f"training.local_batch_size ({t.local_batch_size}) x data-parallel size ({world_size}) = {per_step}")

    p = cfg.parallelism
    check(p.dp_replicate >= 1 and world_size % p.dp_replicate == 0,
          f"parallelism.dp_replicate ({p.dp_replicate}) must divide the number of ranks ({world_size})")

    o = cfg.optimizer
    check(o.lr > 0, f"optimizer.lr must be positive (got {o.lr})")
    check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1 and optimizer.beta2 must be in [0, 1)")
    check(o.eps > 0 and o.weight_decay >= 0, "optimizer.eps must be > 0 and optimizer.weight_decay >= 0")
    check(o.reference_batch_tokens > 0, "optimizer.reference_batch_tokens must be positive")

    s = cfg.lr_scheduler
    check(s.warmup_steps >= 0, f"lr_scheduler.warmup_steps must be >= 0 (got {s.warmup_steps})")
    check(0 <= s.min_lr_ratio <= 1, f"lr_scheduler.min_lr_ratio must be in [0, 1] (got {s.min_lr_ratio})")
    check(0 < s.decay_ratio <= 1, f"lr_scheduler.decay_ratio must be in (0, 1] (got {s.decay_ratio})")

    d = cfg.data
    check(d.num_workers >= 0, f"data.num_workers must be >= 0 (got {d.num_workers})")
    check(d.skip_bad_lines >= 0, f"data.skip_bad_lines must be >= 0 (got {d.skip_bad_lines})")
    check(not d.path or os.path.exists(d.path), f"data.path: {d.path} does not exist")
    if d.path and not os.path.isdir(d.path):
        raise ConfigError(f"data.path: {d.path} is a file, not a folder of token data. "
                          + raw_text_hint(d.path, d.tokenizer_path))
    if d.sources:
        try:
            sources = parse_sources(d.sources)
        except DataError as e:
            raise ConfigError(f"data.sources: {e}") from None
        for source, _ in sources:
            check(os.path.isdir(source), f"data.sources: {source} is not a folder")
    check(d.val_interval >= 0 and d.val_sequences > 0, "data.val_interval must be >= 0 and data.val_sequences > 0")
    check(not d.val_path or os.path.isdir(d.val_path), f"data.val_path: {d.val_path} is not a folder")
    check(not d.val_interval or d.val_path, "data.val_interval needs data.val_path")
    check(not d.doc_mask or d.sources or d.path, "data.doc_mask needs prepared data (data.path or data.sources)")
    check(not d.tokenizer_path or os.path.isfile(d.tokenizer_path),
          f"data.tokenizer_path: {d.tokenizer_path} is not a file")
    check(d.path or d.sources or d.demo_vocab_size <= m.vocab_size,
          f"data.demo_vocab_size ({d.demo_vocab_size}) exceeds model.vocab_size ({m.vocab_size})")

    e = cfg.eval
    try:
        eval_tasks = parse_task_names(e.tasks)
    except ValueError as err:
        raise ConfigError(f"eval.tasks: {err}") from None
    check(not eval_tasks or os.path.isdir(e.data_dir), f"eval.tasks needs eval.data_dir, a folder (got {e.data_dir!r})")
    check(e.interval_checkpoints >= 1 and e.batch_size >= 1 and e.limit >= 0,
          "eval.interval_checkpoints and eval.batch_size must be >= 1, eval.limit >= 0")

    a = cfg.activation_checkpoint
    check(a.selective_every >= 1, f"activation_checkpoint.selective_every must be >= 1 (got {a.selective_every})")

    c = cfg.checkpoint
    check(c.interval > 0, f"checkpoint.interval must be positive (got {c.interval})")
    check(c.keep_latest_k >= 0, f"checkpoint.keep_latest_k must be >= 0 (got {c.keep_latest_k})")
    check(c.load_step >= -1, f"checkpoint.load_step must be -1, 0 or a step (got {c.load_step})")
    check(not c.initial_load_path or os.path.isdir(c.initial_load_path),
          f"checkpoint.initial_load_path: {c.initial_load_path} is not a folder")

    cm = cfg.comm
    check(cm.init_timeout_seconds > 0 and cm.train_timeout_seconds > 0, "comm timeouts must be positive")
    check(cm.trace_buf_size >= 0, f"comm.trace_buf_size must be >= 0 (got {cm.trace_buf_size})")

    check(cfg.metrics.log_freq > 0, f"metrics.log_freq must be positive (got {cfg.metrics.log_freq})")
    check_writable_folder(cfg.job.dump_folder, "job.dump_folder")
    check(cfg.metrics.peak_tflops >= 0, "metrics.peak_tflops must be >= 0")

    pr = cfg.profiling
    check(pr.start_step >= 1 and pr.steps >= 1,
          f"profiling.start_step and profiling.steps must be >= 1 (got {pr.start_step}, {pr.steps})")


def check_writable_folder(path: str, key: str) -> None:
    """`path` is a folder, or can be made one, that this user may write into; else ConfigError.
    Checked at start-up: the run would otherwise fail once the process group exists."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}: {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not" if existing == os.path.abspath(path) else f"cannot be created: {existing} is not"
        raise ConfigError(f"{key}: {path} {what} writable by this user; choose another folder")


# ---------------------------------------------------------------------------------------------
# Output: --help text from the field docstrings, and the effective config as TOML.


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its docstring), read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    lines = [
        "usage: mobilellm-train [--config FILE.toml] [--section.key VALUE | --section.key=VALUE ...]",
        "",
        "Precedence: defaults < TOML file < command line. Fields:",
    ]
    defaults = Config()
    for section, cls in _section_types().items():
        lines.append(f"\n[{section}]")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            lines.append(f"  --{section}.{f.name} (default: {_toml_value(default)})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def to_toml(cfg: Config) -> str:
    out = []
    for section in _section_types():
        out.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def parse_effective_config(text: str) -> Config:
    """A run folder's config.toml (as `to_toml` writes it) read back without validation: its
    paths may have moved since, and keys this version does not know are skipped."""
    cfg = Config()
    for section, table in tomllib.loads(text).items():
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            try:
                _set(cfg, f"{section}.{key}", value, "config.toml")
            except ConfigError:
                pass
    return cfg
