"""The config a run records, and what changed since: `train.Trainer` calls these once a start is
past every refusal.

A run records its effective config twice: `<run>/config.toml`, rewritten at each start that gets
as far as training (a different earlier one kept as config.previous.toml), for people to read and
to start from; and inside every checkpoint (the train state's `config`), the config its steps were
trained with, which nobody edits. A resume compares this start's config with the checkpoint's
copy, whatever file the new one came from (an edited config.toml included), and logs every key
that changed with its old and new effective value (a global_batch_size of 0 is shown as the batch
it means on its number of ranks). A warning follows when the training budget moves, and one when
the lr of the next step changes, naming the keys that moved it. A checkpoint from before the
record, or a fresh start, is compared with the previous config.toml instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import TYPE_CHECKING

from mobilellm_train import config as C

if TYPE_CHECKING:
    from mobilellm_train.checkpoint import TrainState

logger = logging.getLogger("mobilellm_train")

# The keys whose change moves the lr of a step (with the budget, which is said apart).
_LR_KEYS = ("optimizer.lr", "optimizer.scale_lr_with_batch", "optimizer.reference_batch_tokens", "lr_scheduler.")


def write_effective_config(cfg: C.Config, dump_folder: str) -> str | None:
    """Write <dump_folder>/config.toml, the config of the latest start that got as far as
    training (a refused start writes nothing). A different earlier one is kept as
    config.previous.toml, one file rather than a pile. Returns the earlier text, if any."""
    from mobilellm_train.run_files import read_run_file, write_atomic

    os.makedirs(dump_folder, exist_ok=True)
    path = os.path.join(dump_folder, "config.toml")
    text = C.to_toml(cfg)
    old = read_run_file(path)  # never through a link (run_files)
    if old is not None:
        old = old.decode(errors="replace")
        if old == text:
            return old
        os.replace(path, os.path.join(dump_folder, "config.previous.toml"))
    write_atomic(path, text.encode())
    return old


def effective_values(cfg: C.Config, world_size: int) -> dict[str, object]:
    """Every key of the config as `section.key` -> the value it means on `world_size` ranks: the
    global batch in sequences, the steps a token budget gives, the flavor's shape where the model
    section says 0."""
    values = {f"{section}.{key}": value for section in C._section_types()
              for key, value in dataclasses.asdict(getattr(cfg, section)).items()}
    values["training.global_batch_size"] = C.global_batch_size(cfg.training, world_size)
    if cfg.training.tokens:
        values["training.steps"] = C.total_steps(cfg.training, world_size)
    shape = dataclasses.asdict(C.build_model_args(cfg.model))
    for key in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        values[f"model.{key}"] = shape[key]
    return values


def config_changes(old: C.Config, old_world_size: int, new: C.Config, world_size: int) -> dict[str, tuple]:
    """key -> (old, new) effective value, for every key that differs."""
    before, after = effective_values(old, old_world_size), effective_values(new, world_size)
    return {key: (before[key], value) for key, value in after.items() if key in before and before[key] != value}


def report_config_change(resumed: TrainState | None, previous_text: str | None, cfg: C.Config, world_size: int,
                         step: int) -> None:
    """On rank 0 of a start: what changed since the checkpoint resumed (its recorded config), or
    else since the last start (the previous config.toml)."""
    if resumed is not None and resumed.config:
        log_config_change(resumed.config, resumed.dp_world_size, cfg, world_size, step,
                          f"the checkpoint of step {step} was trained with (the config it records)")
    elif previous_text is not None:
        log_config_change(previous_text, resumed.dp_world_size if resumed is not None else world_size, cfg,
                          world_size, step, "the last start (the earlier one is config.previous.toml)")


def log_config_change(old_text: str, old_world_size: int, cfg: C.Config, world_size: int, step: int,
                      since: str) -> None:
    """Log what changed between the config `old_text` (on `old_world_size` ranks) and this one;
    for a resumed run (step > 0), a moved budget in steps and tokens, and a changed lr of the
    next step with the keys that changed it."""
    from mobilellm_train.optim import lr_multiplier

    try:
        old = C.parse_effective_config(old_text)
    except Exception as e:  # noqa: BLE001 - an unreadable record must not stop the run
        logger.warning("could not read the config of %s (%s)", since, e)
        return
    changed = config_changes(old, old_world_size, cfg, world_size)
    if changed:
        logger.info("config changed since %s: %s", since, "; ".join(
            f"{key} {C._toml_value(a)} -> {C._toml_value(b)}" for key, (a, b) in changed.items()))
    if step == 0:
        return
    budget = {}
    for name, c, ranks in (("old", old, old_world_size), ("new", cfg, world_size)):
        batch_tokens = C.global_batch_size(c.training, ranks) * c.training.seq_len
        steps = C.total_steps(c.training, ranks)
        lr = C.peak_lr(c.optimizer, batch_tokens) * lr_multiplier(step, cfg=c.lr_scheduler, total_steps=steps)
        budget[name] = (steps, steps * batch_tokens, lr)
    (old_steps, old_tokens, old_lr), (new_steps, new_tokens, new_lr) = budget["old"], budget["new"]
    moved = (old_steps, old_tokens) != (new_steps, new_tokens)
    if moved:
        logger.warning("training budget changed on resume: %d steps (%.4g tokens) -> %d steps (%.4g tokens); the "
                       "lr schedule spans the new budget", old_steps, old_tokens, new_steps, new_tokens)
    if not math.isclose(old_lr, new_lr, rel_tol=1e-9):
        causes = [key for key in changed if key.startswith(_LR_KEYS)] + (["the budget"] if moved else [])
        logger.warning("the lr of step %d is %.4g (it would have been %.4g), from the change of %s", step + 1,
                       new_lr, old_lr, ", ".join(causes) or "the global batch (optimizer.scale_lr_with_batch)")
