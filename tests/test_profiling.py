"""The [profiling] section on CPU: a torch.profiler trace of the chosen steps, readable as a Chrome
trace, and the planned memory logged at start-up."""

import json
import os

from conftest import base_args, run_trainer


def test_profiler_traces_the_chosen_steps(corpus, tmp_path):
    run = tmp_path / "run"
    out = run_trainer(base_args(corpus, run, steps=5, **{"profiling.enable": "true", "profiling.start_step": 2,
                                                        "profiling.steps": 2, "checkpoint.enable": "false"}))
    assert "planned peak memory per GPU" in out and "profiling steps 2-3" in out
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
