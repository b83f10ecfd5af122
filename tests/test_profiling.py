"""The [profiling] section on CPU: a torch.profiler trace of the chosen steps, readable as a Chrome
trace, and the planned memory logged at start-up."""

import json
import os

import pytest
import torch

from conftest import base_args, run_trainer


def test_profiler_traces_the_chosen_steps(corpus, tmp_path):
    run = tmp_path / "run"
    out = run_trainer(base_args(corpus, run, steps=5, **{"profiling.enable": "true", "profiling.start_step": 2,
                                                        "profiling.steps": 2, "checkpoint.enable": "false"}))
    assert "running on CPU: memory is not checked (on 1 GPU(s) this config would need" in out
    assert "profiling steps 2-3" in out and "80 GB" not in out
    assert os.listdir(run / "profile") == ["rank0.steps2-3.pt.trace.json"]
    with open(run / "profile" / "rank0.steps2-3.pt.trace.json") as f:
        trace = json.load(f)
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {"train step 2", "train step 3"} <= names  # one span per profiled step
    assert any("aten::mm" in n or "aten::addmm" in n for n in names)  # the model's matmuls ran inside


def test_a_run_ending_inside_the_window_still_writes_its_trace(corpus, tmp_path):
    run = tmp_path / "run"
    out = run_trainer(base_args(corpus, run, steps=3, **{"profiling.enable": "true", "profiling.start_step": 2,
                                                        "profiling.steps": 10, "profiling.memory_snapshot": "true",
                                                        "checkpoint.enable": "false"}))
    assert "memory_snapshot needs CUDA" in out
    assert os.listdir(run / "profile") == ["rank0.steps2-3.pt.trace.json"]


def test_profiling_off_writes_nothing(corpus, tmp_path):
    run = tmp_path / "run"
    run_trainer(base_args(corpus, run, steps=2, **{"checkpoint.enable": "false"}))
    assert not os.path.exists(run / "profile")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_snapshot_on_gpu(corpus, tmp_path):
    run = tmp_path / "run"
    run_trainer(base_args(corpus, run, steps=3, **{"profiling.memory_snapshot": "true", "profiling.start_step": 1,
                                                  "profiling.steps": 2, "checkpoint.enable": "false"}))
    snapshot = run / "profile" / "memory_snapshot.rank0.step-2.pickle"
    assert snapshot.stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_stops_before_allocating_a_config_too_big_for_the_gpu(corpus, tmp_path):
    run = tmp_path / "run"
    args = base_args(corpus, run, steps=3) + [
        "--model.flavor", "1.5B", "--model.dim", "1600", "--model.n_layers", "54", "--model.n_heads", "25",
        "--model.n_kv_heads", "5", "--model.ffn_dim", "4352", "--model.vocab_size", "32000",
        "--training.seq_len", "2048", "--training.local_batch_size", "128",
    ]
    out = run_trainer(args, expect_rc=1)
    assert "ConfigError: planned peak memory" in out and "--profiling.memory_check false" in out
    # Nothing saved: the checkpoint folder holds only its run lock, taken at start.
    assert os.listdir(run / "checkpoints") == ["run.lock"]
