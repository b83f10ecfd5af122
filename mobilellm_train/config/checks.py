"""Checks of a loaded `Config`: impossible values are refused with the key's name, before any
process group or model exists. `validate` runs one check per section (a new section adds its own
function here); the data, model and task modules are imported only here, when values are checked.
"""

from __future__ import annotations

import os

from mobilellm_train.config.sections import (
    Config,
    DataConfig,
    DistillConfig,
    QATConfig,
    TrainingConfig,
    build_model_args,
    global_batch_size,
    total_steps,
)
from mobilellm_train.errors import ConfigError, DataError, raw_text_hint
from mobilellm_train.evaluation.tasks import parse_task_names


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: int) -> None:
    """Reject impossible values with the key's name, before anything expensive starts."""
    m = build_model_args(cfg.model)
    check_model(m)
    check_training(cfg.training, m, world_size)
    check(cfg.job.stop_check_freq > 0, f"job.stop_check_freq must be positive (got {cfg.job.stop_check_freq})")
    p = cfg.parallelism
    check(p.dp_replicate >= 1 and world_size % p.dp_replicate == 0,
          f"parallelism.dp_replicate ({p.dp_replicate}) must divide the number of ranks ({world_size})")
    check_optimizer_and_schedule(cfg)
    check_data(cfg.data, m.vocab_size)
    check_eval(cfg)
    check_checkpoint(cfg)
    check_qat(cfg.qat, m, total_steps(cfg.training, world_size))
    check_distill(cfg.distill, cfg.data, cfg.training.z_loss)

    cm = cfg.comm
    check(cm.init_timeout_seconds > 0 and cm.train_timeout_seconds > 0, "comm timeouts must be positive")
    check(cm.trace_buf_size >= 0, f"comm.trace_buf_size must be >= 0 (got {cm.trace_buf_size})")
    check(cfg.metrics.log_freq > 0, f"metrics.log_freq must be positive (got {cfg.metrics.log_freq})")
    check_writable_folder(cfg.job.dump_folder, "job.dump_folder")
    check(cfg.metrics.peak_tflops >= 0, "metrics.peak_tflops must be >= 0")
    pr = cfg.profiling
    check(pr.start_step >= 1 and pr.steps >= 1,
          f"profiling.start_step and profiling.steps must be >= 1 (got {pr.start_step}, {pr.steps})")


def check_model(m) -> None:
    check(m.dim > 0 and m.n_layers > 0 and m.n_heads > 0 and m.n_kv_heads > 0 and m.ffn_dim > 0,
          "model: dim, n_layers, n_heads, n_kv_heads and ffn_dim must be positive")
    check(m.dim % m.n_heads == 0, f"model.n_heads ({m.n_heads}) must divide model.dim ({m.dim})")
    check(m.n_heads % m.n_kv_heads == 0,
          f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads})")
    check((m.dim // m.n_heads) % 2 == 0, f"model: head dim {m.dim // m.n_heads} must be even for RoPE")
    check(m.vocab_size > 2, f"model.vocab_size must be > 2 (got {m.vocab_size})")


def check_training(t: TrainingConfig, m, world_size: int) -> None:
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
    check(t.gc_freq > 0, f"training.gc_freq must be positive (got {t.gc_freq})")
    check(t.gc_full_freq >= 0, f"training.gc_full_freq must be >= 0 (got {t.gc_full_freq})")
    check(t.max_skipped_steps >= 0, f"training.max_skipped_steps must be >= 0 (got {t.max_skipped_steps})")
    check(t.spike_threshold == 0 or t.spike_threshold > 1,
          f"training.spike_threshold must be 0 (off) or above 1 (got {t.spike_threshold})")
    check(t.spike_window > 0 and t.max_rewinds >= 0, "training.spike_window must be > 0 and training.max_rewinds >= 0")
    check(t.z_loss >= 0, f"training.z_loss must be >= 0 (got {t.z_loss})")
    check(0 <= t.ema_decay < 1, f"training.ema_decay must be in [0, 1) (0: off; got {t.ema_decay})")
    per_step = t.local_batch_size * world_size
    check(global_batch_size(t, world_size) % per_step == 0,
          f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
          f"training.local_batch_size ({t.local_batch_size}) x data-parallel size ({world_size}) = {per_step}")


def check_optimizer_and_schedule(cfg: Config) -> None:
    o = cfg.optimizer
    check(o.lr > 0, f"optimizer.lr must be positive (got {o.lr})")
    check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1 and optimizer.beta2 must be in [0, 1)")
    check(o.eps > 0 and o.weight_decay >= 0, "optimizer.eps must be > 0 and optimizer.weight_decay >= 0")
    check(o.reference_batch_tokens > 0, "optimizer.reference_batch_tokens must be positive")
    s = cfg.lr_scheduler
    check(s.warmup_steps >= 0, f"lr_scheduler.warmup_steps must be >= 0 (got {s.warmup_steps})")
    check(0 <= s.min_lr_ratio <= 1, f"lr_scheduler.min_lr_ratio must be in [0, 1] (got {s.min_lr_ratio})")
    check(0 < s.decay_ratio <= 1, f"lr_scheduler.decay_ratio must be in (0, 1] (got {s.decay_ratio})")
    a = cfg.activation_checkpoint
    check(a.selective_every >= 1, f"activation_checkpoint.selective_every must be >= 1 (got {a.selective_every})")


def check_data(d: DataConfig, vocab_size: int) -> None:
    from mobilellm_train.data.prepare.layout import unfinished_message
    from mobilellm_train.data.sources import parse_sources

    check(d.num_workers >= 0, f"data.num_workers must be >= 0 (got {d.num_workers})")
    check(d.skip_bad_lines >= 0, f"data.skip_bad_lines must be >= 0 (got {d.skip_bad_lines})")
    check(not d.path or os.path.exists(d.path), f"data.path: {d.path} does not exist")
    if d.path and not os.path.isdir(d.path):
        raise ConfigError(f"data.path: {d.path} is a file, not a folder of token data. "
                          + raw_text_hint(d.path, d.tokenizer_path))
    folders = [("data.path", d.path)] if d.path else []
    if d.sources:
        try:
            sources = parse_sources(d.sources)
        except DataError as e:
            raise ConfigError(f"data.sources: {e}") from None
        for source, _ in sources:
            check(os.path.isdir(source), f"data.sources: {source} is not a folder")
        folders += [("data.sources", source) for source, _ in sources]
    # A folder mobilellm-prepare has not finished, before anything mistakes it for other data.
    for key, folder in folders + ([("data.val_path", d.val_path)] if d.val_path else []):
        unfinished = unfinished_message(folder) if os.path.isdir(folder) else ""
        check(not unfinished, f"{key}: {unfinished}")
    check(d.val_interval >= 0 and d.val_sequences > 0, "data.val_interval must be >= 0 and data.val_sequences > 0")
    check(not d.val_path or os.path.isdir(d.val_path), f"data.val_path: {d.val_path} is not a folder")
    check(not d.val_interval or d.val_path, "data.val_interval needs data.val_path, a prepared folder of held-out data"
          + (f" ({d.path}/val, where mobilellm-prepare encode --val-fraction puts it, does not exist)" if d.path else
             " (with data.sources, a single folder's <folder>/val is taken; of several, name one with --data.val_path, "
             "or set --data.val_interval 0)" if d.sources else ""))
    check(not d.doc_mask or d.sources or d.path, "data.doc_mask needs prepared data (data.path or data.sources)")
    check(not d.tokenizer_path or os.path.isfile(d.tokenizer_path),
          f"data.tokenizer_path: {d.tokenizer_path} is not a file")
    check(d.path or d.sources or d.demo_vocab_size <= vocab_size,
          f"data.demo_vocab_size ({d.demo_vocab_size}) exceeds model.vocab_size ({vocab_size})")


def check_eval(cfg: Config) -> None:
    e = cfg.eval
    try:
        eval_tasks = parse_task_names(e.tasks)
    except ValueError as err:
        raise ConfigError(f"eval.tasks: {err}") from None
    check(not eval_tasks or os.path.isdir(e.data_dir), f"eval.tasks needs eval.data_dir, a folder (got {e.data_dir!r})")
    check(e.interval_checkpoints >= 1 and e.batch_size >= 1 and e.limit >= 0,
          "eval.interval_checkpoints and eval.batch_size must be >= 1, eval.limit >= 0")


def check_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    check(c.interval > 0, f"checkpoint.interval must be positive (got {c.interval})")
    check(c.keep_latest_k >= 0, f"checkpoint.keep_latest_k must be >= 0 (got {c.keep_latest_k})")
    check(c.load_step >= -1, f"checkpoint.load_step must be -1, 0 or a step (got {c.load_step})")
    check(not c.initial_load_path or os.path.isdir(c.initial_load_path),
          f"checkpoint.initial_load_path: {c.initial_load_path} is not a folder")
    check(not c.initial_load_optimizer or c.initial_load_path,
          "checkpoint.initial_load_optimizer needs checkpoint.initial_load_path, the step folder to branch from")


def check_qat(q: QATConfig, m, steps: int) -> None:
    if not q.enable:
        return
    from mobilellm_train.quantization import (
        QuantizationError,
        embedding_scheme_problem,
        group_size_problem,
        parse_embedding_scheme,
        require_torchao,
    )

    check(q.start_step >= 0, f"qat.start_step must be >= 0 (got {q.start_step})")
    check(q.start_step <= steps, f"qat.start_step {q.start_step} is beyond the run's {steps} steps: no step would "
          "train fake-quantized; choose a step within the run (e.g. the last tenth of it)")
    # The widths of the linear layers: dim into wqkv and w13, q_dim (= dim) into wo, ffn_dim into w2, dim
    # into the output layer.
    problem = group_size_problem([m.dim, m.ffn_dim], q.scheme, q.group_size, "qat.group_size")
    check(not problem, problem)
    try:
        embedding = parse_embedding_scheme(q.embedding_quantize, "qat.embedding_quantize")
    except QuantizationError as e:
        raise ConfigError(str(e)) from None
    problem = embedding_scheme_problem(m.dim, embedding, "qat.embedding_quantize") if embedding else ""
    check(not problem, problem)
    try:
        require_torchao("qat.enable")
    except QuantizationError as e:
        raise ConfigError(str(e)) from None


def check_distill(d: DistillConfig, data: DataConfig, z_loss: float) -> None:
    check(0 <= d.alpha <= 1, f"distill.alpha must be in [0, 1] (got {d.alpha})")
    check(d.temperature > 0, f"distill.temperature must be positive (got {d.temperature})")
    check(d.top_k >= 0, f"distill.top_k must be >= 0 (got {d.top_k})")
    if d.alpha == 0:
        return
    check(z_loss == 0, f"training.z_loss {z_loss} with distillation: the distillation loss has no z-loss term; set "
          "training.z_loss 0 (the teacher's targets already bound the student's logits) or distill.alpha 0")
    check(bool(d.teacher) != bool(d.logits), "distill.alpha > 0 needs exactly one of distill.teacher (online) and "
          f"distill.logits (cached); got {'both' if d.teacher else 'neither'}")
    check(not d.teacher or os.path.isdir(d.teacher), f"distill.teacher: {d.teacher} is not a folder")
    if d.logits:
        check(os.path.isdir(d.logits), f"distill.logits: {d.logits} is not a folder")
        check(not data.sources or "," not in data.sources, "distill.logits: cached teacher values serve one prepared "
              f"data folder, not the mixture data.sources = {data.sources!r}; distil online (distill.teacher) instead")
        check(bool(data.path or data.sources), "distill.logits needs prepared data (data.path), the data it was made for")
        val = os.path.join(d.logits, "val")
        check(not data.val_interval or os.path.isdir(val),
              f"distill.logits: validation (data.val_interval) needs the teacher's values for data.val_path in {val}; "
              f"mobilellm-prepare teacher-logits writes them there for <data>/val, or give it --data {data.val_path} "
              f"--out {val}")


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

