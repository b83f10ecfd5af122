"""Config loading: precedence, types, impossible values, --help and the TOML round trip."""

import dataclasses
import glob
import os
import subprocess
import sys

import pytest

from mobilellm_train import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_precedence_defaults_toml_cli(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nseq_len = 64\n[optimizer]\nlr = 1e-3\n")
    cfg = C.load_config(["--config", path, "--training.steps", "9", "--optimizer.lr=2e-3"], world_size=1)
    assert cfg.training.steps == 9  # command line beats TOML
    assert cfg.training.seq_len == 64  # TOML beats default
    assert cfg.optimizer.lr == 2e-3
    assert cfg.training.local_batch_size == C.TrainingConfig().local_batch_size  # default


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trainig.steps", "3"], "unknown section 'trainig'"),
        (["--training.stepz", "3"], "unknown key 'training.stepz'"),
        (["--training.steps", "three"], "training.steps: not an integer"),
        (["--model.layer_sharing", "maybe"], "model.layer_sharing: expected true or false"),
        (["--model.flavor", "2B"], "model.flavor: must be one of"),
        (["--optimizer.lr", "fast"], "optimizer.lr"),
        (["--training.steps"], "--training.steps needs a value"),
        (["steps=3"], "unexpected argument"),
        (["--model.dim", "130"], "model.n_heads (4) must divide model.dim (130)"),
        (["--model.n_kv_heads", "3"], "model.n_kv_heads (3) must divide model.n_heads (4)"),
        (["--training.seq_len", "4096"], "training.seq_len (4096) exceeds what the model supports"),
        (["--training.global_batch_size", "12"], "training.global_batch_size (12) must be divisible by"),
        (["--training.local_batch_size", "0"], "training.local_batch_size must be positive"),
        (["--parallelism.dp_replicate", "3"], "parallelism.dp_replicate (3) must divide"),
        (["--checkpoint.interval", "0"], "checkpoint.interval must be positive"),
        (["--data.path", "/no/such/folder"], "data.path: /no/such/folder does not exist"),
        (["--lr_scheduler.decay_type", "step"], "lr_scheduler.decay_type: must be one of"),
        (["--config", "/no/such.toml"], "no such file"),
        (["--job.stop_check_freq", "0"], "job.stop_check_freq must be positive"),
        (["--training.gc_full_freq", "-1"], "training.gc_full_freq must be >= 0"),
        (["--training.doc_mask_attention", "dense"], "training.doc_mask_attention: must be one of"),
        (["--activation_checkpoint.mode", "ops"], "activation_checkpoint.mode: must be one of"),
        (["--training.ema_decay", "1"], "training.ema_decay must be in [0, 1)"),
        (["--training.z_loss", "-1e-4"], "training.z_loss must be >= 0"),
        (["--checkpoint.initial_load_optimizer", "true"], "checkpoint.initial_load_optimizer needs "
                                                          "checkpoint.initial_load_path"),
    ],
)
def test_bad_config_names_the_key(argv, message):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(argv, world_size=2)
    assert message in str(e.value)


def test_toml_type_errors_name_file_and_key(tmp_path):
    path = write(tmp_path, '[training]\nsteps = "many"\n')
    with pytest.raises(C.ConfigError, match=r"training.steps: not an integer"):
        C.load_config(["--config", path], world_size=1)
    path = write(tmp_path, "[model]\nlayer_sharing = 1\n")
    with pytest.raises(C.ConfigError, match=r"model.layer_sharing: expected true or false"):
        C.load_config(["--config", path], world_size=1)
    path = write(tmp_path, "[training]\nsteps = 3\nsteps = 4\n")
    with pytest.raises(C.ConfigError, match="invalid TOML"):
        C.load_config(["--config", path], world_size=1)
    path = write(tmp_path, "steps = 3\n")
    with pytest.raises(C.ConfigError, match="must be a \\[section\\] table"):
        C.load_config(["--config", path], world_size=1)


def test_global_batch_checked_against_world_size():
    # 64 = 8 x 4 x 2 accumulation on 4 ranks; on 3 ranks 64 is not a multiple of 24.
    cfg = C.load_config(["--training.global_batch_size", "64"], world_size=4)
    assert C.grad_accum_steps(cfg.training, 4) == 2
    with pytest.raises(C.ConfigError, match="data-parallel size \\(3\\)"):
        C.load_config(["--training.global_batch_size", "64"], world_size=3)


def test_token_budget_and_suffixes():
    cfg = C.load_config(
        ["--training.tokens", "1T", "--training.global_batch_size", "1024", "--training.local_batch_size", "32",
         "--training.seq_len", "2048", "--model.flavor", "125M"],
        world_size=32,
    )
    assert cfg.training.tokens == 10**12
    assert C.total_steps(cfg.training, 32) == 476838  # ceil(1e12 / (1024 * 2048))
    assert C.parse_int("480k") == 480_000 and C.parse_int("1.5B") == 1_500_000_000
    assert C.parse_int("2_048") == 2048
    with pytest.raises(ValueError):
        C.parse_int("1.5")


def test_lr_scaling_rule():
    opt = C.OptimizerConfig(lr=5e-4, scale_lr_with_batch=True)
    assert C.peak_lr(opt, 1024 * 2048) == pytest.approx(2e-3)  # the original 4-node rule
    assert C.peak_lr(C.OptimizerConfig(lr=5e-4), 1024 * 2048) == 5e-4


def test_model_overrides():
    cfg = C.load_config(["--model.vocab_size", "500", "--model.n_layers", "2", "--model.layer_sharing", "true",
                         "--data.demo_vocab_size", "400"],
                        world_size=1)
    args = C.build_model_args(cfg.model)
    assert (args.vocab_size, args.n_layers, args.layer_sharing) == (500, 2, True)
    assert args.dim == C.MODEL_PRESETS["debug"].dim


def test_effective_config_toml_round_trip(tmp_path):
    cfg = C.load_config(["--job.description", 'quote " and \\ back', "--optimizer.eps", "1e-8",
                         "--model.layer_sharing", "true"], world_size=1)
    path = write(tmp_path, C.to_toml(cfg))
    assert C.load_config(["--config", path], world_size=1) == cfg


def test_every_preset_loads_and_every_field_is_documented():
    for path in glob.glob(os.path.join(ROOT, "train_configs", "*.toml")):
        # Presets name a data folder (and own_data.toml its val split) the user supplies; point
        # them at one that exists.
        cfg = C.load_config(["--config", path, "--data.path", ROOT, "--data.val_path", ROOT], world_size=32)
        assert C.total_steps(cfg.training, 32) > 0
    for section, cls in C._section_types().items():
        docs = C._field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"


def test_help_lists_fields():
    out = subprocess.run([sys.executable, "-m", "mobilellm_train.train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--model.flavor (default: \"debug\")" in out
    assert "Peak learning rate" in out


def test_cli_reports_config_error_before_starting():
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.train", "--training.seq_len", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "config error: training.seq_len must be positive" in r.stderr
