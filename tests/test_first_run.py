"""What a first run on one's own data meets (issue 21): the vocabulary taken from the data, a
refused start that leaves the run folder as it was, the free-space check of the checkpoint
folder, messages that name the fix (eval's --data-dir, --wikitext, a run folder given as
--checkpoint, the step a Ctrl-C stops at), elapsed_s as a run total, and the CPU memory line.
In-process checks, no training runs unless said."""

import json
import logging
import os

import pytest

import mobilellm_train.evaluation.cli as eval_cli


def run_eval(args, capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(args)
    assert e.value.code == 1
    return capsys.readouterr().err


def test_eval_names_a_missing_data_dir_and_the_wikitext_flag(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = run_eval(["--checkpoint", str(tmp_path), "--tasks", "all", "--data-dir", str(missing)], capsys)
    assert f"--data-dir {missing}: no such folder" in err and "docs/EVALUATION.md" in err
    assert len(err.strip().splitlines()) == 1  # one line, not every task's accepted layouts

    (tmp_path / "data" / "wikitext").mkdir(parents=True)
    (tmp_path / "data" / "wikitext" / "train-00000.parquet").write_bytes(b"")  # the near miss
    err = run_eval(["--checkpoint", str(tmp_path), "--tasks", "wikitext", "--data-dir", str(tmp_path / "data")],
                   capsys)
    assert "train-00000.parquet" in err and "--wikitext FILE" in err


def test_a_run_folder_as_checkpoint_names_its_newest_step(tmp_path):
    from mobilellm_train.evaluation.loading import load_model, load_tokenizer

    run = tmp_path / "run"
    for step in (10, 20):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / ".metadata").write_bytes(b"")
    (run / "checkpoints" / "step-30").mkdir()  # incomplete: not the one to name
    newest = run / "checkpoints" / "step-20"
    for call in (lambda: load_model(str(run)), lambda: load_tokenizer(str(run))):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert f"its newest complete checkpoint is {newest}: pass --checkpoint {newest}" in str(e.value)
    # The checkpoint folder itself, and a run whose config.toml names another checkpoint folder.
    with pytest.raises(FileNotFoundError, match=f"pass --checkpoint {newest}"):
        load_model(str(run / "checkpoints"))
    os.rename(run / "checkpoints", run / "ckpt")
    (run / "config.toml").write_text('[checkpoint]\nfolder = "ckpt"\n')
    with pytest.raises(FileNotFoundError, match=f"pass --checkpoint {run / 'ckpt' / 'step-20'}"):
        load_model(str(run))


class _Request:
    interrupt_note = ""


@pytest.mark.parametrize("freq, stop_at, step, expected", [
    (10, 0, 0, "stopping after step 10 (the next stop check, job.stop_check_freq 10) and saving"),
    (10, 0, 10, "stopping after step 20 (the next stop check"),
    (10, 0, 37, "stopping after step 40 (the next stop check"),
    (10, 15, 10, "stopping after step 15 (training.stop_at_step)"),
    (1, 0, 4, "stopping after step 5 (the next stop check, job.stop_check_freq 1)"),
])
def test_ctrl_c_says_which_step_the_run_stops_and_saves_at(freq, stop_at, step, expected):
    from mobilellm_train.loop.stops import Stops

    stops = Stops.__new__(Stops)  # without the signal handlers and the process group
    stops.request, stops.check_freq, stops.stop_at_step, stops.saves = _Request(), freq, stop_at, True
    stops._note_step(step)
    assert stops.request.interrupt_note.startswith(expected), stops.request.interrupt_note
    stops.saves = False
    stops._note_step(step)
    assert "nothing is saved" in stops.request.interrupt_note


def test_elapsed_s_is_a_run_total_across_resumes(tmp_path):
    from mobilellm_train.metrics import MetricsLogger, elapsed_at

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "elapsed_s": 2.0 * s, "step_time_s": 2.0} for s in (10, 20, 30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "elaps')
    assert elapsed_at(str(path), 30) == 60.0
    # Resumed from the checkpoint of step 25: the records past it go, the 5 steps after step 20
    # are counted at the last record's step time.
    metrics = MetricsLogger(str(tmp_path), 0, enable_tensorboard=False, resume_step=25)
    metrics.close()
    assert metrics.elapsed_before == 40.0 + 5 * 2.0
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    assert MetricsLogger(str(tmp_path / "new"), 0, enable_tensorboard=False).elapsed_before == 0.0

    import torch

    from mobilellm_train.loop.log_record import LogRecord

    record = LogRecord(torch.device("cpu"), 1, 64, 100, 1.0, None, elapsed_before=50.0)
    assert record.elapsed_s(record.train_begin + 3.0) == 53.0


def test_the_cpu_memory_line_names_no_gpu_card(caplog):
    from conftest import ROOT
    from mobilellm_train import plan as P

    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", "125M.toml")], 1)
    with caplog.at_level(logging.INFO, logger="mobilellm_train"):
        P.check_memory(cfg, 1, "cpu", "cpu", None)
    assert "running on CPU: memory is not checked" in caplog.text
    assert "80 GB" not in caplog.text and "79.1" not in caplog.text
