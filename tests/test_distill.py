"""Distillation (issue 30): the KD loss against F.kl_div, top-K with K = vocabulary against the full
KL, chunked against unchunked, its memory against the planner's count and never a [tokens, vocab]
tensor; the teacher-logits cache (every row the teacher's top-K of its training window, in any
window order and rank split; resumable, verified, refused when it does not fit); the refusals of a
teacher or cache of another vocabulary or tokenizer, before anything is built; the planner's
teacher terms; and end to end, cached training (K = vocabulary) equal over 20 steps to online
full-vocabulary training on 2 ranks of HSDP stopped and resumed, with document masking, layer
sharing, gradient accumulation and selective activation checkpointing.

Run: python -m pytest -q tests/test_distill.py
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import init_model, read_metrics, run_trainer, train_tiny_tokenizer
from mobilellm_train import config as C
from mobilellm_train.data.loader import build_token_loader
from mobilellm_train.data.prepare import run as prepare
from mobilellm_train.data.shards import write_token_dataset
from mobilellm_train.distill import cache as cache_format
from mobilellm_train.distill.distiller import build_distiller, check_cache_fits
from mobilellm_train.distill.heldout import heldout_kl
from mobilellm_train.distill.kd_loss import DenseTargets, chunked_distillation_loss, teacher_topk
from mobilellm_train.distill.memory import kd_loss_bytes, teacher_forward_bytes_per_token
from mobilellm_train.distill.teacher import TeacherLLM, check_teacher_fits
from mobilellm_train.errors import ConfigError, DataError
from mobilellm_train.export import write_hf_folder
from mobilellm_train.model import ModelArgs
from test_plan import CreatedBytes

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata on torch >= 2.12

VOCAB = 60  # the tiny tokenizer's pieces: data, teacher and student share them


def make_inputs(n=90, dim=16, teacher_dim=24, vocab=VOCAB, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(vocab, dim, generator=gen)).to(dtype).requires_grad_()
    teacher = DenseTargets(torch.randn(n, teacher_dim, generator=gen).to(dtype),
                           (0.5 * torch.randn(vocab, teacher_dim, generator=gen)).to(dtype))
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = -100
    return hidden, weight, labels, teacher


def loss_and_grads(hidden, weight, labels, targets, alpha=0.4, temperature=1.0, chunk=16):
    total, ce, kd = chunked_distillation_loss(hidden, weight, labels, targets, alpha, temperature, chunk)
    return (total, ce, kd, *torch.autograd.grad(total, (hidden, weight)))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_is_t2_times_kl_div_of_the_tempered_distributions(temperature):
    hidden, weight, labels, teacher = make_inputs()
    total, ce, kd, grad_h, grad_w = loss_and_grads(hidden, weight, labels, teacher, 0.4, temperature)
    s, t, valid = hidden @ weight.T, teacher.hidden @ teacher.weight.T, labels != -100
    kl = F.kl_div(F.log_softmax(s[valid] / temperature, -1), F.log_softmax(t[valid] / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    reference = 0.4 * kl + 0.6 * F.cross_entropy(s, labels)
    assert abs(kd.item() - kl.item()) < 1e-6 and abs(total.item() - reference.item()) < 1e-6
    assert abs(ce.item() - F.cross_entropy(s, labels).item()) < 1e-6
    for got, want in zip((grad_h, grad_w), torch.autograd.grad(reference, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_top_k_with_k_vocabulary_equals_full_and_smaller_k_renormalises():
    hidden, weight, labels, teacher = make_inputs()
    full = loss_and_grads(hidden, weight, labels, teacher, temperature=2.0)
    top = loss_and_grads(hidden, weight, labels, teacher_topk(teacher.hidden, teacher.weight, VOCAB, 7),
                         temperature=2.0)
    for a, b in zip(full, top):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # K < vocabulary: the teacher's K largest, renormalised at T, against the student's full log-softmax.
    k, T = 5, 2.0
    got = loss_and_grads(hidden, weight, labels, teacher_topk(teacher.hidden, teacher.weight, k), 1.0, T)[2]
    t, valid = teacher.hidden @ teacher.weight.T, labels != -100
    values, ids = t.topk(k, dim=-1)
    q = torch.softmax(values / T, -1)
    log_p = torch.log_softmax(hidden @ weight.T / T, -1).gather(1, ids)
    want = (q * (q.log() - log_p)).sum(-1)[valid].mean() * T**2
    assert abs(got.item() - want.item()) < 1e-6


@pytest.mark.parametrize("top_k", [0, 6])
def test_chunked_equals_unchunked(top_k):
    hidden, weight, labels, teacher = make_inputs()
    targets = teacher if not top_k else teacher_topk(teacher.hidden, teacher.weight, top_k, 1000)
    whole = loss_and_grads(hidden, weight, labels, targets, chunk=len(labels))
    for chunk in (1, 13, 89, 4096):
        for a, b in zip(loss_and_grads(hidden, weight, labels, targets, chunk=chunk), whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # validation: the same values, no gradient work
        total, ce, kd = chunked_distillation_loss(hidden, weight, labels, targets, 0.4, 1.0, 13)
    assert [total.item(), ce.item(), kd.item()] == pytest.approx([x.item() for x in whole[:3]], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("top_k", [0, 8])
def test_loss_memory_is_the_planned_count_and_never_tokens_by_vocab(dtype, top_k):
    tokens, chunk, dim, vocab = 300, 128, 32, 600
    hidden, weight, labels, teacher = make_inputs(tokens, dim, 24, vocab, dtype)
    targets = teacher if not top_k else teacher_topk(teacher.hidden, teacher.weight, top_k, chunk)
    existing = [hidden, weight, labels, teacher.hidden, teacher.weight]
    if top_k:
        existing += [targets.ids, targets.logprobs]
    largest = []

    class Largest(CreatedBytes):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            largest.extend(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Largest(existing) as mem:
        total, _, _ = chunked_distillation_loss(hidden, weight, labels, targets, 0.5, 2.0, chunk)
        kept = mem.now()
        total.backward()
    kept_planned, work_planned, _ = kd_loss_bytes(tokens, dim, vocab, chunk, dtype.itemsize, top_k)
    assert 0 <= kept - kept_planned <= 32  # plus the loss and its two terms, fp32 scalars
    # Above the count only per-chunk vectors and [chunk, K] values: a few KiB.
    assert 0 <= mem.peak_bytes - kept - work_planned < 8 * chunk * 4 + 6 * chunk * top_k * 8
    assert max(largest) <= chunk * vocab < tokens * vocab  # one chunk of logits, never [tokens, vocab]


def test_teacher_forward_count_bounds_what_it_creates():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=300, max_seq_len=64)
    teacher = TeacherLLM(args)
    teacher.init_weights(seed=1)
    tokens = torch.randint(0, 300, (4, 32))
    with torch.no_grad(), CreatedBytes([tokens, *teacher.parameters(), *teacher.buffers()]) as mem:
        teacher(tokens, top_k=8, chunk_tokens=64)
    # The count, for 128 tokens: one block's intermediates, a chunk of logits (fp32), the targets.
    planned = 128 * teacher_forward_bytes_per_token(args, 4) + 64 * 300 * 4 + 128 * 8 * 12
    assert mem.peak_bytes <= planned < 2 * mem.peak_bytes


# ---------------------------------------------------------------------------------------------
# The cache: mobilellm-prepare teacher-logits and the loader that reads it.


def corpus(folder, tokenizer, n_docs=120, seed=0, tokens_per_shard=700):
    """A prepared dataset of arithmetic progressions (learnable) in several shards, with val/."""
    rng = np.random.default_rng(seed)
    docs = [3 + (rng.integers(VOCAB) + rng.integers(1, 4) * np.arange(rng.integers(10, 60))) % (VOCAB - 3)
            for _ in range(n_docs)]
    write_token_dataset(str(folder), docs[:-12], VOCAB, tokens_per_shard, tokenizer_path=tokenizer)
    write_token_dataset(str(folder / "val"), docs[-12:], VOCAB, tokens_per_shard, tokenizer_path=tokenizer)
    return str(folder)


@pytest.fixture
def tokenizer(tmp_path):
    return train_tiny_tokenizer(tmp_path)


@pytest.fixture
def hf_teacher(tmp_path, tokenizer):
    """A (random) teacher as a Hugging Face folder, with the data's tokenizer, and its model."""
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=VOCAB, max_seq_len=64)
    model = init_model(args, seed=5)
    return write_hf_folder(args, model.state_dict(), str(tmp_path / "teacher"), tokenizer_path=tokenizer), model


def test_cache_holds_the_teachers_top_k_of_every_window_in_any_order(tmp_path, tokenizer, hf_teacher, monkeypatch):
    data = corpus(tmp_path / "data", tokenizer)
    teacher_path, teacher = hf_teacher
    out = str(tmp_path / "cache")
    argv = ["teacher-logits", "--teacher", teacher_path, "--data", data, "--out", out, "--top-k", "5",
            "--seq-len", "24", "--doc-mask", "--batch-size", "3"]
    # Spread over two ranks: rank 0's shards first (no manifest yet), then rank 1's finish it.
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        summary = prepare(argv)
        assert summary[out]["finished"] is (rank == 1) and summary["bytes_per_token"] == 5 * 6
    m = cache_format.read_cache_manifest(out)
    assert (m.top_k, m.seq_len, m.doc_mask, m.vocab_size, m.logprob_dtype) == (5, 24, True, VOCAB, "float16")
    assert len(m.shards) >= 3 and cache_format.is_teacher_logits(os.path.join(out, "val"))
    # Every batch of the shuffled loader, on either rank of two, carries the teacher's own top-K.
    for rank in (0, 1):
        loader = build_token_loader(data, seq_len=24, local_batch_size=3, global_batch_size=6, dp_rank=rank,
                                    dp_world_size=2, seed=4, num_workers=0, doc_mask=True, teacher_logits=out)
        for batch, _ in zip(loader, range(4)):
            with torch.no_grad():
                top = teacher_topk(teacher.hidden_states(batch["input"], batch["position_ids"]).flatten(0, 1),
                                   teacher.output.weight, 5)
            assert torch.equal(batch["teacher_ids"].flatten(0, 1).long(), top.ids)
            torch.testing.assert_close(batch["teacher_logprobs"].flatten(0, 1).float(), top.logprobs,
                                       atol=2e-2, rtol=1e-3)  # fp16 storage
    # The held-out KL of a model to itself is zero; to another, positive.
    val_loader = build_token_loader(os.path.join(data, "val"), seq_len=24, local_batch_size=4, global_batch_size=4,
                                    dp_rank=0, dp_world_size=1, num_workers=0)
    val = [batch for batch, _ in zip(val_loader, range(2))]
    assert heldout_kl(teacher, teacher, val)["kl"] == pytest.approx(0.0, abs=1e-6)
    assert heldout_kl(teacher, init_model(teacher.args, seed=6), val)["kl"] > 0.01


def test_cache_resumes_is_verified_and_refuses_what_does_not_fit(tmp_path, tokenizer, hf_teacher):
    data = corpus(tmp_path / "data", tokenizer)
    out = str(tmp_path / "cache")
    argv = ["teacher-logits", "--teacher", hf_teacher[0], "--data", data, "--out", out, "--top-k", "4",
            "--seq-len", "20", "--no-val"]
    prepare(argv)
    first = cache_format.read_cache_manifest(out)
    # Interrupted: the manifest, one shard and its record gone; the rerun writes that shard again.
    name = first.shards[1].name
    for path in ("manifest.json", f"{name}.ids", f".progress/{name}.json"):
        os.remove(os.path.join(out, path))
    assert prepare(argv)["tokens_computed_here"] == first.shards[1].num_rows
    assert cache_format.read_cache_manifest(out).fingerprint() == first.fingerprint()
    with pytest.raises(DataError, match="top_k 4 -> 3"):
        prepare([*argv[:-5], "--top-k", "3", "--seq-len", "20", "--no-val"])
    # Made for another seq_len, or for other data: refused at the start, in words.
    from mobilellm_train.data.shards import read_manifest

    with pytest.raises(DataError, match="made for seq_len 20, doc_mask false; this run has seq_len 32"):
        cache_format.open_teacher_logits(out, read_manifest(data), 32, False, VOCAB, True)
    other = corpus(tmp_path / "other", tokenizer, seed=1)
    with pytest.raises(DataError, match="made for other data"):
        cache_format.open_teacher_logits(out, read_manifest(other), 20, False, VOCAB, True)
    # A changed byte: found by its sha256 once verified.json no longer vouches for the file.
    with open(os.path.join(out, f"{name}.lp"), "r+b") as f:
        f.seek(10)
        f.write(b"\x7f")
    with pytest.raises(DataError, match=f"{name}.lp: sha256"):
        cache_format.open_teacher_logits(out, read_manifest(data), 20, False, VOCAB, True)
    with pytest.raises(DataError, match="sha256"):
        prepare(["verify", out])


def test_a_teacher_or_cache_of_another_vocabulary_or_tokenizer_is_refused(tmp_path, tokenizer, hf_teacher):
    student = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=VOCAB)
    # What the trainer's set-up calls: refused from the teacher's config alone, before anything is built.
    with pytest.raises(ConfigError, match=f"vocabulary of {VOCAB} tokens and the student 72"):
        build_distiller(C.DistillConfig(alpha=0.5, teacher=hf_teacher[0]), C.TrainingConfig(), C.CompileConfig(),
                        True, dataclasses.replace(student, vocab_size=72), tokenizer, None, torch.device("cpu"), 0)
    folder = tmp_path / "other_teacher"
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"vocabulary of 64 tokens and the student {VOCAB}"):
        check_teacher_fits(str(folder), ModelArgs(vocab_size=64), student, tokenizer, 32)
    (folder / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(ConfigError, match=f"its tokenizer {folder}/tokenizer.model .* is not the run's {tokenizer}"):
        check_teacher_fits(str(folder), ModelArgs(vocab_size=VOCAB), student, tokenizer, 32)
    cache = tmp_path / "cache"
    cache.mkdir()
    settings = {"top_k": 8, "logprob_dtype": "float16", "seq_len": 32, "doc_mask": False, "vocab_size": 64,
                "data_fingerprint": "x", "tokenizer_sha256": "0" * 64, "teacher": {}}
    cache_format.write_cache_manifest(str(cache), settings, [cache_format.CacheShard("shard-00000", 10, "", "")])
    cfg = C.DistillConfig(alpha=0.5, logits=str(cache))
    with pytest.raises(ConfigError, match=f"vocabulary has 64 tokens .* the student's {VOCAB}"):
        check_cache_fits(cfg, VOCAB, tokenizer)
    settings["vocab_size"] = VOCAB
    cache_format.write_cache_manifest(str(cache), settings, [cache_format.CacheShard("shard-00000", 10, "", "")])
    with pytest.raises(ConfigError, match="made with the tokenizer of sha256 0000"):
        check_cache_fits(cfg, VOCAB, tokenizer)
    cfg.top_k = 9
    with pytest.raises(ConfigError, match="holds only the top 8"):
        check_cache_fits(cfg, VOCAB, "")


@pytest.mark.parametrize("overrides,says", [
    (["--distill.alpha", "1.5"], "distill.alpha must be in [0, 1]"),
    (["--distill.alpha", "0.5"], "needs exactly one of distill.teacher"),
    (["--distill.alpha", "0.5", "--distill.teacher", "/nonexistent"], "distill.teacher: /nonexistent is not a folder"),
    (["--distill.temperature", "0"], "distill.temperature must be positive"),
    (["--distill.alpha", "0.5", "--training.z_loss", "1e-4"], "training.z_loss 0.0001 with distillation"),
])
def test_config_refuses_impossible_distillation(tmp_path, overrides, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        C.load_config(["--job.dump_folder", str(tmp_path), *overrides])


# ---------------------------------------------------------------------------------------------
# End to end: the trainer, online and cached, one and two ranks, stopped and resumed.


@pytest.mark.slow
def test_cached_equals_online_on_two_ranks_stopped_and_resumed(tmp_path, tokenizer):
    data = corpus(tmp_path / "data", tokenizer, n_docs=200)
    common = ["--data.path", data, "--training.seq_len", "32", "--optimizer.lr", "3e-3",
              "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
              "--data.num_workers", "0", "--model.flavor", "debug", "--model.n_layers", "2", "--model.n_heads", "4",
              "--model.n_kv_heads", "2", "--data.doc_mask", "true"]
    teacher_run = tmp_path / "teacher"
    run_trainer([*common, "--job.dump_folder", str(teacher_run), "--model.dim", "96", "--model.ffn_dim", "192",
                 "--training.steps", "6", "--training.local_batch_size", "8", "--checkpoint.interval", "6"])
    teacher = str(teacher_run / "checkpoints" / "step-6")
    cache = str(tmp_path / "cache")
    prepare(["teacher-logits", "--teacher", teacher, "--data", data, "--out", cache, "--top-k", str(VOCAB),
             "--seq-len", "32", "--doc-mask", "--logprob-dtype", "float32"])

    student = [*common, "--model.dim", "64", "--model.ffn_dim", "128", "--training.steps", "20",
               "--training.global_batch_size", "8", "--model.layer_sharing", "true",
               "--activation_checkpoint.mode", "selective", "--data.val_interval", "10", "--checkpoint.interval", "10",
               "--distill.alpha", "0.5", "--distill.temperature", "2"]
    cached, online = tmp_path / "cached", tmp_path / "online"
    run_trainer([*student, "--job.dump_folder", str(cached), "--training.local_batch_size", "4",
                 "--distill.logits", cache])
    # Online over the full vocabulary, on 2 ranks of HSDP (2 replicas), stopped at step 10 and resumed.
    two_ranks = [*student, "--job.dump_folder", str(online), "--training.local_batch_size", "2",
                 "--distill.teacher", teacher, "--parallelism.dp_replicate", "2"]
    run_trainer([*two_ranks, "--training.stop_at_step", "10"], nproc=2)
    assert "resumed from" in run_trainer(two_ranks, nproc=2)

    cached, online = read_metrics(cached), read_metrics(online)
    assert sorted(online) == list(range(1, 21)) and online[20]["kd"] < online[1]["kd"]
    assert {s for s, r in online.items() if "val_kd" in r} == {10, 20}
    for step in range(1, 21):
        for key in ("loss", "ce", "kd", "val_loss", "val_ce", "val_kd"):
            if key in online[step]:
                assert cached[step][key] == pytest.approx(online[step][key], rel=2e-4, abs=1e-5), (step, key)



def test_the_planner_counts_the_teacher(tmp_path):
    from mobilellm_train import plan as P

    folder = tmp_path / "llama-2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({  # a config alone: the planner reads no weight
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    base = ["--config", os.path.join(os.path.dirname(__file__), "..", "train_configs", "125M.toml")]
    plans = {k: P.estimate_config(P.load_plan_config(
        base + ["--distill.alpha", "0.5", "--distill.teacher", str(folder), "--distill.top_k", k], 8), 8, 80.0)
        for k in ("0", "16")}
    alone = P.estimate_config(P.load_plan_config(base, 8), 8, 80.0)
    items = {k: {name: b for name, b, _ in plan.items} for k, plan in plans.items()}
    assert items["16"]["teacher parameters (fp32 shard)"] == 4 * -(-6_738_415_616 // 8)
    assert items["16"]["distillation: teacher's top-K"] == 32 * 2048 * 16 * 12
    assert items["0"]["loss: working set"] > items["16"]["loss: working set"] > {
        name: b for name, b, _ in alone.items}["loss: working set"]
    assert alone.allocated_bytes < plans["16"].allocated_bytes < plans["0"].allocated_bytes
    assert plans["16"].settings["distill_teacher"] == 6_738_415_616
