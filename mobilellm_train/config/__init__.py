"""Run configuration: one dataclass per section, loaded as defaults < TOML < command line.

    mobilellm-train --config train_configs/125M.toml --training.steps 100 --optimizer.lr=1e-3
    mobilellm-train --help          # every field, its default and its docstring

Each field's docstring (the string literal under it) is its `--help` text. Every component
receives its own section, never the whole `Config`. `load_config` checks names, types and
values and raises `ConfigError` naming the key before any process group or model exists.

    sections.py   the section dataclasses and the values derived from them (model shape, batches)
    loading.py    defaults < TOML < --section.key, type conversion, --help, config.toml out and in
    checks.py     `validate`: one check per section, each error naming its key

Parsing the command line (and --help) imports nothing heavy: torch takes seconds to import, so the
model, data and task modules are imported where values are checked.
"""

from mobilellm_train.config.checks import check_writable_folder, validate
from mobilellm_train.config.loading import (
    _coerce,
    _field_docs,
    _parse_cli,
    _section_types,
    _set,
    _toml_value,
    fill_in_from_data,
    help_text,
    load_config,
    parse_effective_config,
    parse_int,
    to_toml,
    tomllib,
)
from mobilellm_train.config.sections import (
    ActivationCheckpointConfig,
    CheckpointConfig,
    CommConfig,
    CompileConfig,
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    JobConfig,
    LRSchedulerConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    ProfilingConfig,
    QATConfig,
    TrainingConfig,
    build_model_args,
    global_batch_size,
    grad_accum_steps,
    peak_lr,
    total_steps,
)
from mobilellm_train.errors import ConfigError, DataError


__all__ = [
    "_coerce",
    "_field_docs",
    "_parse_cli",
    "_section_types",
    "_set",
    "_toml_value",
    "fill_in_from_data",
    "help_text",
    "load_config",
    "parse_effective_config",
    "parse_int",
    "to_toml",
    "tomllib",
    "ActivationCheckpointConfig",
    "CheckpointConfig",
    "CommConfig",
    "CompileConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "JobConfig",
    "LRSchedulerConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelismConfig",
    "ProfilingConfig",
    "QATConfig",
    "TrainingConfig",
    "build_model_args",
    "global_batch_size",
    "grad_accum_steps",
    "peak_lr",
    "total_steps",
    "check_writable_folder",
    "validate",
    "ConfigError",
    "DataError",
]


def __getattr__(name: str):
    # config.MODEL_PRESETS and config.ModelArgs still resolve, imported on first use.
    if name in ("MODEL_PRESETS", "ModelArgs"):
        from mobilellm_train import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
