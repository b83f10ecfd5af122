"""Ending a run: mobilellm-average (the element-wise mean of steps, written as a step folder that
verifies, exports and loads like one) and annealing branches (checkpoint.initial_load_optimizer:
a new run whose first update is the source run's next one), with every refusal in words.
In one process on a 1-rank gloo group; the trainer-level branch run is in tests/test_ema.py."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from conftest import train_tiny_tokenizer
from mobilellm_train import checkpoint as C
from mobilellm_train.average import AverageError, average_steps, check_out, check_steps, main, parse_weights
from mobilellm_train.checkpoint.initial import load_initial_state
from mobilellm_train.config import CheckpointConfig, OptimizerConfig
from mobilellm_train.model import MobileLLM, ModelArgs
from mobilellm_train.optim import build_optimizer
from mobilellm_train.step import train_step

ARGS = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


def run_parts(args=ARGS, seed=0, optimizer_cfg=OptimizerConfig(lr=1e-2), groups=None):
    """(model, optimizer, train state, states) as the trainer holds them."""
    model = MobileLLM(args)
    model.init_weights(seed=seed)
    if groups is None:
        optimizer = build_optimizer(model, optimizer_cfg, optimizer_cfg.lr)
    else:
        optimizer = torch.optim.AdamW(groups(model), lr=optimizer_cfg.lr, fused=True)
    train_state = C.TrainState(model_args=C.model_args_fingerprint(args))
    states = {"model": C.ModelState(model), "optimizer": C.OptimizerState(model, optimizer), "train_state": train_state}
    return model, optimizer, train_state, states


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 17), generator=gen)
    return [{"input": tokens[:, :-1], "label": tokens[:, 1:]}]


def save(folder, states, train_state, step, tokenizer=""):
    ck = C.Checkpointer(CheckpointConfig(async_mode="disabled", keep_latest_k=0), str(folder), states, rank=0,
                        tokenizer_path=tokenizer)
    train_state.step, train_state.tokens_seen = step, 32 * step
    ck.save(step)
    return ck.path(step)


def snapshot(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def branch_cfg(path, optimizer=True):
    return CheckpointConfig(initial_load_path=str(path), initial_load_optimizer=optimizer)


def test_average_is_the_mean_verifies_exports_and_refuses_what_does_not_fit(tmp_path, one_rank_group, capsys):
    tokenizer = train_tiny_tokenizer(tmp_path)
    run = tmp_path / "run"
    steps = []
    for seed in (0, 1, 2):
        model, _, train_state, states = run_parts(seed=seed)
        steps.append(save(run, states, train_state, 10 * (seed + 1), tokenizer))
    expected = [MobileLLM(ARGS) for _ in steps]
    for model, seed in zip(expected, (0, 1, 2)):
        model.init_weights(seed=seed)
    out = tmp_path / "average"
    assert average_steps(steps[:2], str(out), parse_weights("", 2)) == str(out)
    mean = C.load_model_from_checkpoint(str(out)).state_dict()
    for name, value in mean.items():
        a, b = expected[0].state_dict()[name], expected[1].state_dict()[name]
        torch.testing.assert_close(value, (a + b) / 2, rtol=0, atol=1e-6)
    # A step folder like a training step's: checksums, the tokenizer, the model's shape; no optimizer.
    C.verify_checkpoint(str(out))
    assert C.stored_states(str(out)) == {"model", "train_state"}
    assert (out / "tokenizer.model").read_bytes() == open(tokenizer, "rb").read()
    with open(out / "average.json") as f:
        assert [(s["step"], s["weight"]) for s in json.load(f)["steps"]] == [(10, 0.5), (20, 0.5)]

    # Weighted, from the command line: 1,3 -> 0.25 and 0.75.
    main(["--checkpoint", steps[0], "--checkpoint", steps[2], "--weights", "1,3", "--out", str(tmp_path / "w")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "w")
    weighted = C.load_model_from_checkpoint(str(tmp_path / "w")).state_dict()
    name = "layers.1.feed_forward.w2.weight"
    torch.testing.assert_close(weighted[name], 0.25 * expected[0].state_dict()[name] + 0.75 * expected[2].state_dict()[name],
                               rtol=0, atol=1e-6)

    # Hugging Face export of the average loads in transformers and gives the same logits.
    transformers = pytest.importorskip("transformers")
    from mobilellm_train.export import export_checkpoint

    hf_folder = export_checkpoint(str(out), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = C.load_model_from_checkpoint(str(out))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)

    # The tools and a new run read it like a step; it has no EMA to read.
    from conftest import make_corpus
    from mobilellm_train.evaluation.cli import main as eval_main
    from mobilellm_train.generate import main as generate_main

    generate_main(["--checkpoint", str(out), "--prompt", "the dog", "--max-new-tokens", "4", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("=== prompt 1 ===")
    corpus = make_corpus(tmp_path / "tokens", n_docs=20)
    eval_main(["--checkpoint", str(out), "--tasks", "tokens", "--token-data", corpus, "--seq-len", "16", "--device", "cpu"])
    assert "average: tokens perplexity" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", str(out), "--weights", "ema", "--tasks", "tokens", "--token-data", corpus])
    assert "holds no weight EMA" in capsys.readouterr().err
    new_model, _, new_state, new_states = run_parts(seed=9)
    assert load_initial_state(new_states, branch_cfg(out, optimizer=False), 0, new_state) == {"model"}
    assert all(torch.equal(v, mean[k]) for k, v in new_model.state_dict().items())

    # A run cannot resume it: a weights-only step met in a checkpoint folder is refused in words.
    shutil.copytree(out, run / "checkpoints" / "step-40")
    _, _, resumer_state, resumer_states = run_parts(seed=5)
    resumer = C.Checkpointer(CheckpointConfig(), str(run), resumer_states, rank=0)
    with pytest.raises(C.CheckpointError, match="holds weights only"):
        resumer.maybe_resume(resumer_state)
    shutil.rmtree(run / "checkpoints" / "step-40")

    # Refusals, each naming its cause.
    other_args = ModelArgs(**{**ARGS.__dict__, "n_layers": 3})
    _, _, other_state, other_states = run_parts(args=other_args)
    other = save(tmp_path / "other", other_states, other_state, 5, tokenizer)
    untokenized = save(tmp_path / "plain", run_parts()[3], run_parts()[2], 5)
    for paths, match in [
        ([steps[0], other], r"hold different models.*'n_layers': \(2, 3\)"),
        ([steps[0], untokenized], "different tokenizers"),
        ([str(run), steps[0]], "is a training run folder.*name each step"),
        ([steps[0]], "at least two steps"),
        ([steps[0], steps[0]], "named twice"),
        ([steps[0], hf_folder], "is a Hugging Face folder"),
    ]:
        with pytest.raises(AverageError, match=match):
            check_steps(paths) if "models" not in match and "tokenizers" not in match else \
                average_steps(paths, str(tmp_path / "never"), parse_weights("", len(paths)))
    assert not os.path.exists(tmp_path / "never")
    with pytest.raises(AverageError, match="inside the checkpoint folder"):
        check_out(str(run / "checkpoints" / "avg"))
    with pytest.raises(AverageError, match="exists and is not an empty folder"):
        check_out(str(out))
    for spec, match in [("1", "1 numbers for 2"), ("1,-1", "positive"), ("a,b", "comma-separated numbers")]:
        with pytest.raises(AverageError, match=match):
            parse_weights(spec, 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(run), "--checkpoint", steps[0], "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 1 and "average error:" in capsys.readouterr().err


def test_branch_first_update_is_the_source_runs_next_update(tmp_path, one_rank_group):
    source_model, source_opt, source_state, source_states = run_parts(seed=0)
    for seed in (1, 2):
        train_step(source_model, source_opt, batch(seed), max_norm=1.0)
    step = save(tmp_path / "source", source_states, source_state, 2)
    before = snapshot(step)
    moments = {k: v.clone() for k, v in source_opt.state_dict()["state"][0].items()}
    train_step(source_model, source_opt, batch(3), max_norm=1.0)  # the source run's next step

    # The branch: other initial weights, same settings; loading takes the step's weights and moments.
    model, optimizer, train_state, states = run_parts(seed=7)
    assert load_initial_state(states, branch_cfg(step), 0, train_state) == {"model", "optimizer"}
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments["exp_avg"])
    train_step(model, optimizer, batch(3), max_norm=1.0)
    theirs = source_model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert snapshot(step) == before  # the source step is only read

    # Weights alone (fresh moments): a different first update, so the equality above means something.
    model, optimizer, train_state, states = run_parts(seed=7)
    assert load_initial_state(states, branch_cfg(step, optimizer=False), 0, train_state) == {"model"}
    train_step(model, optimizer, batch(3), max_norm=1.0)
    assert not torch.equal(model.state_dict()["norm.weight"], theirs["norm.weight"])

    # The branch's own optimizer settings stay; only moments and step counts come from the source.
    _, optimizer, train_state, states = run_parts(seed=7, optimizer_cfg=OptimizerConfig(lr=1e-3, beta2=0.99,
                                                                                           weight_decay=0.0))
    load_initial_state(states, branch_cfg(step), 0, train_state)
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, (0.9, 0.99), 0.0)] * 2
    assert torch.equal(optimizer.state_dict()["state"][0]["step"], moments["step"])

    # What does not fit is refused by name, before anything is loaded.
    other_args = ModelArgs(**{**ARGS.__dict__, "n_layers": 3})
    one_group = lambda m: m.parameters()  # noqa: E731
    split_otherwise = lambda m: [{"params": [p for p in m.parameters() if p.ndim >= 2][1:]},  # noqa: E731
                                 {"params": [p for p in m.parameters() if p.ndim < 2]
                                  + [p for p in m.parameters() if p.ndim >= 2][:1]}]
    average = tmp_path / "average"
    other_step = save(tmp_path / "later", run_parts(seed=3)[3], run_parts(seed=3)[2], 4)
    average_steps([step, other_step], str(average), [0.5, 0.5])
    for parts, path, match in [
        (run_parts(args=other_args), step, r"written for another model.*'n_layers': \(2, 3\)"),
        (run_parts(groups=one_group), step, "2 parameter groups there, 1 here"),
        (run_parts(groups=split_otherwise), step, "parameter group 0 holds other parameters"),
        (run_parts(), average, "holds weights only"),
    ]:
        with pytest.raises(C.CheckpointError, match=match):
            load_initial_state(parts[3], branch_cfg(path), 0, parts[2])
    assert snapshot(step) == before
