"""End-to-end training runs on CPU: loss falls, metrics are written, checkpoints resume exactly,
and 2-rank gloo runs with FSDP2, activation checkpointing and compile."""

import json
import os

import pytest

from conftest import base_args, make_corpus, read_metrics, run_trainer, subprocess_env

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "mfu", "peak_memory_gib",
               "data_wait_fraction", "step_time_s", "tokens_seen", "elapsed_s", "eta_s"}


def test_single_rank_run_learns_and_writes_metrics(corpus, tmp_path):
    run = tmp_path / "run"
    out = run_trainer(base_args(corpus, run, steps=30, **{"checkpoint.keep_latest_k": 2,
                                                          "metrics.enable_tensorboard": "true"}))
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, 31))
    for record in metrics.values():
        assert METRIC_KEYS <= set(record)
        assert record["tokens_per_second"] > 0 and record["grad_norm"] > 0
        assert record["mfu"] is None  # no known peak on CPU: reported as absent, not invented
    assert metrics[30]["tokens_seen"] == 30 * 4 * 32
    assert metrics[30]["eta_s"] == 0
    first, last = metrics[1]["loss"], metrics[30]["loss"]
    assert first > 3.5  # ~ln(64) at init
    assert last < first - 1.0, (first, last)
    # lr: warmup 2 steps then cosine to 10% of 3e-3 at the last step
    assert metrics[1]["lr"] == pytest.approx(1.5e-3) and metrics[30]["lr"] == pytest.approx(3e-4)
    # keep_latest_k = 2 of the checkpoints at 10, 20, 30
    assert sorted(os.listdir(run / "checkpoints")) == ["run.lock", "step-20", "step-30"]
    assert os.path.isfile(run / "checkpoints" / "step-30" / ".metadata")
    assert "flavor = \"debug\"" in (run / "config.toml").read_text()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tb"))
    assert "step 30  loss" in out


def test_resume_equals_uninterrupted_single_rank(corpus, tmp_path):
    # num_workers 1: the loader state comes from a worker process.
    common = {"data.num_workers": 1}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_trainer(base_args(corpus, straight, steps=16, **common))
    run_trainer(base_args(corpus, split, steps=16, **common, **{"training.stop_at_step": 7}))
    assert max(read_metrics(split)) == 7
    out = run_trainer(base_args(corpus, split, steps=16, **common))
    assert "resumed from" in out and "step-7" in out
    a, b = read_metrics(straight), read_metrics(split)
    assert [a[s]["loss"] for s in range(1, 17)] == [b[s]["loss"] for s in range(1, 17)]
    assert [a[s]["lr"] for s in range(1, 17)] == [b[s]["lr"] for s in range(1, 17)]
    # Finished runs stay finished.
    assert "nothing to do" in run_trainer(base_args(corpus, split, steps=16, **common))


@pytest.mark.slow
def test_two_ranks_fsdp_resume_equals_uninterrupted(tmp_path):
    # Two node folders, two ranks: rank r reads folder r+1. Selective AC, grad accumulation,
    # reshard_after_forward off and HSDP-free FSDP over 2 gloo ranks.
    data = make_corpus(tmp_path / "data", folders=2)
    common = {"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_every": 2,
              "parallelism.explicit_prefetch": "true",
              "training.global_batch_size": 16, "parallelism.reshard_after_forward": "false",
              "model.layer_sharing": "true"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_trainer(base_args(data, straight, steps=8, **common), nproc=2)
    run_trainer(base_args(data, split, steps=8, **common, **{"training.stop_at_step": 3}), nproc=2)
    run_trainer(base_args(data, split, steps=8, **common), nproc=2)
    a, b = read_metrics(straight), read_metrics(split)
    assert [a[s]["loss"] for s in range(1, 9)] == [b[s]["loss"] for s in range(1, 9)]
    assert a[8]["loss"] < a[1]["loss"]
    assert a[8]["tokens_seen"] == 8 * 16 * 32

    # The same checkpoint on another rank count: the JSONL reader cannot carry its position over,
    # so this is refused in words, not restarted silently.
    out = run_trainer(base_args(data, split, steps=12, **common), nproc=1, expect_rc=1)
    assert "written by 2 data-parallel ranks and this run has 1" in out


@pytest.mark.slow
@pytest.mark.parametrize("ac_mode", ["full", "op"])
def test_two_ranks_compile_ac_hsdp(corpus, tmp_path, ac_mode):
    run = tmp_path / "run"
    out = run_trainer(base_args(corpus, run, steps=6, **{
        "compile.enable": "true", "activation_checkpoint.mode": ac_mode, "parallelism.dp_replicate": 2,
    }), nproc=2, timeout=600)
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, 7))
    assert metrics[6]["loss"] < metrics[1]["loss"]
    assert "Traceback" not in out


def test_checkpoint_mismatch_and_load_step_errors(corpus, tmp_path):
    run = tmp_path / "run"
    run_trainer(base_args(corpus, run, steps=20))
    out = run_trainer(base_args(corpus, run, steps=30, **{"model.n_layers": 3}), expect_rc=1)
    assert "was written for another model" in out and "'n_layers': (2, 3)" in out
    out = run_trainer(base_args(corpus, run, steps=30, **{"checkpoint.load_step": 10}), expect_rc=1)
    assert "holds newer checkpoints [20]" in out
    out = run_trainer(base_args(corpus, run, steps=30, **{"checkpoint.load_step": 15}), expect_rc=1)
    assert "no complete checkpoint" in out and "step-15" in out
    # The JSONL reader's position belongs to its worker count: refused in words, not an AssertionError.
    out = run_trainer(base_args(corpus, run, steps=30, **{"data.num_workers": 1}), expect_rc=1)
    assert "saved with --data.num_workers 0" in out and "Resume with --data.num_workers 0" in out
    assert "AssertionError" not in out

    # A save killed half-way leaves a folder without .metadata: ignored, with a warning.
    os.makedirs(run / "checkpoints" / "step-25")
    (run / "checkpoints" / "step-25" / "__0_0.distcp").write_bytes(b"partial")
    out = run_trainer(base_args(corpus, run, steps=30))
    assert "ignoring incomplete checkpoint" in out and "resumed from" in out and "step-20" in out
    assert max(read_metrics(run)) == 30


def test_initial_load_path_continues_pretraining(corpus, tmp_path):
    first, second, fresh = tmp_path / "first", tmp_path / "second", tmp_path / "fresh"
    run_trainer(base_args(corpus, first, steps=20))
    run_trainer(base_args(corpus, second, steps=2, **{
        "checkpoint.initial_load_path": first / "checkpoints" / "step-20"}))
    run_trainer(base_args(corpus, fresh, steps=2))
    assert read_metrics(second)[1]["loss"] < read_metrics(fresh)[1]["loss"] - 1.0


def test_bad_data_line_stops_the_run_with_file_and_line(tmp_path):
    data = make_corpus(tmp_path / "data", n_docs=50)
    path = tmp_path / "data" / "1" / "part-0.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({"token_ids": [1, 5, 9999, 2]})
    path.write_text("\n".join(lines) + "\n")
    out = run_trainer(base_args(data, tmp_path / "run", steps=5), expect_rc=1)
    assert f"{path}:4" in out and "9999" in out


def test_non_finite_loss_stops_before_the_step(corpus, tmp_path):
    out = run_trainer(base_args(corpus, tmp_path / "run", steps=10, **{
        "optimizer.lr": "1e30", "lr_scheduler.warmup_steps": 0, "training.max_norm": 0}), expect_rc=1)
    assert "NonFiniteError: step" in out and "non-finite gradient norm" in out


def test_checkpoint_folder_is_self_contained(corpus, tmp_path):
    """A step folder alone gives back the model (shape from its train state) and the tokenizer."""
    import torch
    import torch.nn.functional as F

    from mobilellm_train.checkpoint import CheckpointError, load_model_from_checkpoint, read_model_args

    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not really a sentencepiece model, but copied verbatim")
    run = tmp_path / "run"
    run_trainer(base_args(corpus, run, steps=20, **{"data.tokenizer_path": tokenizer}))
    step = run / "checkpoints" / "step-20"
    assert (step / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    args = read_model_args(str(step))
    assert (args.vocab_size, args.dim, args.n_layers) == (64, 64, 2)

    model = load_model_from_checkpoint(str(step))
    assert model.output.weight is model.tok_embeddings.weight
    with open(os.path.join(corpus, "1", "part-0.jsonl")) as f:
        ids = [t for line in f for t in json.loads(line)["token_ids"]][: 8 * 33]
    batch = torch.tensor(ids).view(8, 33)
    with torch.no_grad():
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    assert loss < read_metrics(run)[1]["loss"] - 1.0  # trained weights, not a fresh init

    with pytest.raises(CheckpointError, match="not a complete DCP checkpoint"):
        read_model_args(str(run / "checkpoints"))


def prepare_shards(tmp_path, n_docs=600, val_fraction=0.0):
    """The test corpus converted by mobilellm-prepare into token shards."""
    import subprocess
    import sys

    from conftest import ROOT

    src = make_corpus(tmp_path / "jsonl", n_docs=n_docs)
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.data.prepare", "convert", "--layout", "nodes", "--input", src, "--out",
                        str(out), "--vocab-size", "64", "--workers", "1", "--val-fraction", str(val_fraction)],
                       cwd=ROOT, capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.slow
def test_prepared_shards_resume_on_other_rank_counts(tmp_path):
    """Saved on 2 ranks, resumed on 4 and then on 1: model and optimizer reshard, the data goes on
    from the next unseen sample, and the losses track an uninterrupted 2-rank run."""
    shards = prepare_shards(tmp_path)
    common = {"training.global_batch_size": 8, "training.local_batch_size": 2}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_trainer(base_args(shards, straight, steps=12, **common), nproc=2)
    run_trainer(base_args(shards, split, steps=12, **common, **{"training.stop_at_step": 4}), nproc=2)
    out = run_trainer(base_args(shards, split, steps=12, **common, **{"training.stop_at_step": 8}), nproc=4)
    assert "resuming a checkpoint of 2 ranks on 4" in out
    run_trainer(base_args(shards, split, steps=12, **common), nproc=1)
    a, b = read_metrics(straight), read_metrics(split)
    assert [a[s]["loss"] for s in range(1, 5)] == [b[s]["loss"] for s in range(1, 5)]
    # Other rank counts sum gradients in another order: equal up to float rounding.
    assert [b[s]["loss"] for s in range(5, 13)] == pytest.approx([a[s]["loss"] for s in range(5, 13)], rel=1e-4)
    assert b[12]["tokens_seen"] == 12 * 8 * 32


def test_prepared_shards_with_validation_and_doc_mask(tmp_path):
    shards = prepare_shards(tmp_path, val_fraction=0.1)
    run = tmp_path / "run"
    out = run_trainer(base_args(shards, run, steps=20, **{
        "data.val_path": shards / "val", "data.val_interval": 10, "data.val_sequences": 16, "data.doc_mask": "true"}))
    metrics = read_metrics(run)
    assert "validation loss" in out
    assert set(s for s, r in metrics.items() if "val_loss" in r) == {10, 20}
    assert metrics[20]["val_loss"] < metrics[10]["val_loss"] < 4.2
    assert (run / "checkpoints" / "step-20" / "tokenizer.model").exists() is False  # convert had no tokenizer


def test_in_training_eval_and_hf_initial_load(tmp_path):
    """Zero-shot tasks scored at checkpoint steps into eval.jsonl; then a new run starts from the
    Hugging Face export of that checkpoint."""
    import subprocess
    import sys

    from conftest import ROOT
    from mobilellm_train.data.demo import build_demo_corpus
    from test_eval import write_task_data

    data, tokenizer = build_demo_corpus(str(tmp_path / "demo"), vocab_size=500, max_text_bytes=300_000)
    tasks = write_task_data(tmp_path / "tasks", n=4)
    run = tmp_path / "run"
    overrides = {"model.vocab_size": 500, "data.tokenizer_path": tokenizer, "checkpoint.interval": 2,
                 "eval.tasks": "arc_easy,boolq,winogrande", "eval.data_dir": tasks, "eval.batch_size": 4}
    out = run_trainer(base_args(data, run, steps=4, **overrides))
    with open(run / "eval.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [2, 4]
    assert {"eval/arc_easy", "eval/boolq", "eval/winogrande"} <= set(records[0])  # avg: only with all 8
    assert all(0 <= r["eval/boolq"] <= 100 for r in records)
    assert "eval  arc_easy" in out

    export = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.export", "--checkpoint",
                        str(run / "checkpoints" / "step-4"), "--out", str(export)],
                       cwd=ROOT, capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    second = tmp_path / "second"
    out = run_trainer(base_args(data, second, steps=1, **{"model.vocab_size": 500,
                                                          "checkpoint.initial_load_path": export}))
    assert "initialised model weights from the Hugging Face folder" in out
    fresh = tmp_path / "fresh"
    run_trainer(base_args(data, fresh, steps=1, **{"model.vocab_size": 500}))
    assert read_metrics(second)[1]["loss"] < read_metrics(fresh)[1]["loss"]

    out = run_trainer(base_args(data, tmp_path / "third", steps=1, **{
        "model.vocab_size": 500, "model.n_layers": 3, "checkpoint.initial_load_path": export}), expect_rc=1)
    assert "CheckpointError: checkpoint.initial_load_path" in out


def test_logged_loss_is_the_mean_since_the_previous_record(corpus, tmp_path):
    every, fifth = tmp_path / "every", tmp_path / "fifth"
    run_trainer(base_args(corpus, every, steps=10))
    run_trainer(base_args(corpus, fifth, steps=10, **{"metrics.log_freq": 5}))
    a, b = read_metrics(every), read_metrics(fifth)
    assert sorted(b) == [5, 10]
    assert b[5]["loss"] == pytest.approx(sum(a[s]["loss"] for s in range(1, 6)) / 5, rel=1e-6)
    assert b[10]["loss"] == pytest.approx(sum(a[s]["loss"] for s in range(6, 11)) / 5, rel=1e-6)
    assert b[10]["grad_norm"] == pytest.approx(a[10]["grad_norm"], rel=1e-6)  # the last step's
