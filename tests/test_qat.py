"""Tests of quantization-aware training (quantization.py, loop/qat.py) and of the quantized model
in the tools. The fake-quantized model computes the converted model's numbers (the export's
quantization, and torchao's own convert step) for both schemes, loss paths included; the tied
table stays one Parameter in training and the export unties it; every activation-checkpointing
mode and torch.compile agree with plain eager across the switch; under FSDP2 the tie and the
checkpoint layout are kept. The fake-quantized embedding table (qat.embedding_quantize) is the
export's quantized table bit for bit, all-zero and tiny rows included. The trainer switches fake quantization on at qat.start_step exactly:
2 gloo ranks equal 1, a run folder trained without QAT switched on mid-way and then killed
mid-QAT equals an uninterrupted run, and validation reports the quantized model's loss. The export
refuses another scheme, group size or embedding scheme than the step was trained for unless
--force; eval and generate quantize as the program does, the table too; a bad [qat] section is a
config error. (The program's
own logits and greedy output against the fake-quantized model: tests/test_edge.py.)

Skipped without torchao: pip install -e '.[edge]'.
"""

import copy
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchao", reason="needs torchao: pip install -e '.[edge]'")

from conftest import base_args, init_model, read_metrics, run_trainer, train_tiny_tokenizer  # noqa: E402
from mobilellm_train import config as C  # noqa: E402
from mobilellm_train.model import ModelArgs  # noqa: E402
from mobilellm_train.quantization import (  # noqa: E402
    EmbeddingScheme,
    QATRecord,
    apply_embedding_ptq,
    apply_embedding_qat,
    apply_ptq,
    apply_qat,
    linear_config,
    parse_embedding_scheme,
    set_fake_quantization,
)

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=96, max_seq_len=32)


def batch(seed=0, vocab=96, size=(2, 17)):
    tokens = torch.randint(0, vocab, size, generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def qat_copy(model, scheme="8da4w", on=True):
    fq = copy.deepcopy(model)
    apply_qat(fq, scheme, 32)
    set_fake_quantization(fq, on)
    return fq


@pytest.mark.parametrize("scheme", ["8da4w", "8da8w"])
def test_fake_quantized_model_computes_the_converted_models_numbers(scheme):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    model = init_model(ARGS, seed=2)
    inputs, labels = batch()
    fq = qat_copy(model, scheme)
    # Every linear layer is fake-quantized, the tied output layer too, and it still computes from
    # the embedding's table: one Parameter.
    assert {type(m).__name__ for m in fq.modules() if hasattr(m, "in_features")} == {"FakeQuantizedLinear"}
    assert fq.output.weight is fq.tok_embeddings.weight
    assert [n for n, _ in fq.named_parameters()] == [n for n, _ in model.named_parameters()]
    # The export's quantization unties: the output layer's own quantized copy, the table fp32.
    ptq = copy.deepcopy(model)
    apply_ptq(ptq, scheme, 32)
    assert ptq.output.weight is not ptq.tok_embeddings.weight
    assert torch.equal(ptq.tok_embeddings.weight, model.tok_embeddings.weight)
    # qat_config writes out the fake quantizers torchao derives from linear_config, but for the
    # weight scales' dtype (bfloat16 groups, as the program stores them), which torchao's own
    # derivation refuses.
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    from mobilellm_train.quantization import qat_config, weight_scale_dtype

    ours, base = qat_config(scheme, 32), dataclasses.replace(linear_config(scheme, 32), weight_scale_dtype=None)
    activation, weight = _infer_fake_quantize_configs(base)
    weight.scale_precision = weight_scale_dtype(scheme)
    assert (ours.activation_config, ours.weight_config) == (activation, weight)
    # torchao's own convert step of the fake-quantized model is that same quantization.
    converted = copy.deepcopy(fq)
    converted.output.weight = torch.nn.Parameter(converted.output.weight.detach().clone())
    quantize_(converted, QATConfig(linear_config(scheme, 32), step="convert"), filter_fn=lambda m, _: True)
    with torch.no_grad():
        want = ptq(inputs)
        torch.testing.assert_close(fq(inputs), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(converted(inputs), want, rtol=0, atol=0)
        assert (model(inputs) - want).abs().max() > 1e-3  # quantization does change the numbers
        ce = F.cross_entropy(want.flatten(0, 1), labels.flatten())
        # The loss of training (chunked: the head's operands fake-quantized as the layer would,
        # and whole logits), and of evaluation on the quantized model (chunked).
        fq.loss_chunk_tokens = 5
        torch.testing.assert_close(fq(inputs, labels=labels), ce, rtol=1e-5, atol=1e-5)
        fq.loss_chunk_tokens = 0
        torch.testing.assert_close(fq(inputs, labels=labels), ce, rtol=1e-5, atol=1e-5)
        ptq.loss_chunk_tokens = 7
        torch.testing.assert_close(ptq(inputs, labels=labels), ce, rtol=1e-5, atol=1e-5)
        # Off, a fake-quantized layer is nn.Linear exactly.
        off = qat_copy(model, scheme, on=False)
        assert torch.equal(off(inputs), model(inputs))
        assert torch.equal(off(inputs, labels=labels), model(inputs, labels=labels))
    # Training reaches the one table through both of its uses (straight-through estimator), and
    # the chunked loss's gradients are those of the output layer's own forward (whole logits).
    whole = copy.deepcopy(fq)
    fq.loss_chunk_tokens = 8
    fq(inputs, labels=labels).backward()
    whole(inputs, labels=labels).backward()
    for (name, p), q in zip(fq.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    plain = copy.deepcopy(model)
    plain(inputs, labels=labels).backward()
    grad, plain_grad = fq.tok_embeddings.weight.grad, plain.tok_embeddings.weight.grad
    assert not torch.equal(grad, plain_grad)
    assert F.cosine_similarity(grad.flatten(), plain_grad.flatten(), dim=0) > 0.9  # the same model, quantized


@pytest.mark.parametrize("embedding", ["8,0", "4,16"])
def test_fake_quantized_table_is_the_exports_table(embedding):
    """What training looks up (torchao's FakeQuantizedEmbedding) is what the export stores
    (apply_embedding_ptq, which the program's kernel reads): equal bit for bit, rows of zeros and
    of tiny values included, for the lookup and the whole model; the table stays tied and trained
    through both uses."""
    model = init_model(ARGS, seed=3)
    with torch.no_grad():
        model.tok_embeddings.weight[3] = 0  # a scale of 0 would divide by zero
        model.tok_embeddings.weight[4] *= 1e-7  # a scale that fp16 would flush to 0
    scheme = parse_embedding_scheme(embedding)
    fq = qat_copy(model, on=False)
    apply_embedding_qat(fq, scheme)
    assert type(fq.tok_embeddings).__name__ == "FakeQuantizedEmbedding"
    assert fq.output.weight is fq.tok_embeddings.weight
    assert [n for n, _ in fq.named_parameters()] == [n for n, _ in model.named_parameters()]
    ptq = copy.deepcopy(model)
    apply_embedding_ptq(ptq, scheme)
    apply_ptq(ptq, "8da4w", 32)
    table = ptq.tok_embeddings.weight
    assert table.scale.dtype == torch.float16 and table.scale.shape == (ARGS.vocab_size, 64 // (scheme.group_size or 64))
    assert int(table.qdata.min()) >= -(2 ** (scheme.bits - 1)) and int(table.qdata.max()) < 2 ** (scheme.bits - 1)
    tokens = torch.arange(ARGS.vocab_size)[None]
    inputs, labels = batch()
    with torch.no_grad():
        assert torch.equal(fq.tok_embeddings(tokens), model.tok_embeddings(tokens))  # off: nn.Embedding
        set_fake_quantization(fq, True)
        got, want = fq.tok_embeddings(tokens)[0], ptq.tok_embeddings(tokens)[0]
        assert torch.equal(got, want) and torch.isfinite(want).all() and not want[3].any()
        # Each value is on its group's grid, within half a step; the largest of a group up to
        # 0.5 + 127.5 * 2^-11 steps, when the scale rounds down to fp16 and it is clipped to 127.
        step = table.scale.float().repeat_interleave(scheme.group_size or 64, dim=1)
        assert ((want - model.tok_embeddings.weight).abs() <= 0.57 * step).all()
        torch.testing.assert_close(fq(inputs), ptq(inputs), rtol=0, atol=1e-5)
    fq(inputs, labels=labels).backward()
    grad = fq.tok_embeddings.weight.grad
    assert grad[inputs.unique()].abs().sum() > 0  # the lookup's straight-through gradient, with the head's


def test_every_ac_mode_and_compile_agree_with_eager_across_the_switch(monkeypatch):
    """Activation checkpointing recomputes the fake quantization; compile traces it into each
    block, inside the checkpointed region (fullgraph: a piece that could not compile would fail
    here), and recompiles once at the switch. Losses and gradients equal plain eager QAT, before
    and after fake quantization starts. (aot_eager: the tracing and autograd are what is tested,
    not inductor's kernels.)"""
    import functools

    from mobilellm_train.parallelize import apply_ac, apply_compile

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    model = init_model(replace(ARGS, n_layers=1, layer_sharing=True), seed=4).train()
    inputs, labels = batch(1)

    def grads(m):
        m.zero_grad(set_to_none=True)
        loss = m(inputs, labels=labels)
        loss.backward()
        names = [n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
                 for n, _ in m.named_parameters()]
        return loss.detach(), dict(zip(names, (p.grad.clone() for p in m.parameters())))

    variants = {"eager": qat_copy(model, on=False)}
    for mode in ("full", "selective", "op"):
        variants[mode] = qat_copy(model, on=False)
        apply_ac(variants[mode], C.ActivationCheckpointConfig(mode=mode, selective_every=2))
    variants["compile+op"] = qat_copy(model, on=False)
    apply_ac(variants["compile+op"], C.ActivationCheckpointConfig(mode="op"))
    apply_compile(variants["compile+op"], C.CompileConfig(enable=True))
    for on in (False, True):
        for m in variants.values():
            set_fake_quantization(m, on)
        loss, want = grads(variants["eager"])
        for name, m in variants.items():
            got_loss, got = grads(m)
            torch.testing.assert_close(got_loss, loss, rtol=0, atol=1e-5, msg=f"{name}, fake quantization {on}")
            assert got.keys() == want.keys()
            for key, g in want.items():
                torch.testing.assert_close(got[key], g, rtol=1e-4, atol=1e-5, msg=f"{name} {key} {on}")


def test_fsdp_build_keeps_the_tie_and_the_checkpoint_layout():
    import torch.distributed as dist

    from mobilellm_train.build import build_model
    from mobilellm_train.checkpoint import ModelState
    from mobilellm_train.parallelize import build_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = C.Config()
        built = {}
        for qat in (False, True):
            built[qat] = build_model(ARGS, build_mesh("cpu", 1, 1), torch.device("cpu"), cfg.training,
                                     cfg.parallelism, C.ActivationCheckpointConfig(mode="op"), cfg.compile,
                                     C.QATConfig(enable=qat, embedding_quantize="4,32"))
        model = built[True]
        assert model.output.weight is model.tok_embeddings.weight
        assert type(model.output).__name__ == "FakeQuantizedLinear"
        assert type(model.tok_embeddings).__name__ == "FakeQuantizedEmbedding"
        assert not any(getattr(m, "enabled", False) for m in model.modules())  # off until the loop's start step
        assert ModelState(model).state_dict().keys() == ModelState(built[False]).state_dict().keys()
        for (name, a), b in zip(model.named_parameters(), built[False].parameters()):
            assert torch.equal(a.full_tensor(), b.full_tensor()), name
    finally:
        dist.destroy_process_group()


def test_qat_config_is_checked(tmp_path, monkeypatch):
    def load(*extra):
        return C.load_config(["--job.dump_folder", str(tmp_path / "run"), "--training.steps", "800",
                              "--qat.enable", "true", *extra], world_size=1)

    assert load("--qat.start_step", "470").qat.start_step == 470
    assert C.load_config(["--qat.start_step", "470k"]).qat.start_step == 470_000  # off: not checked
    with pytest.raises(C.ConfigError, match="qat.start_step 900 is beyond the run's 800 steps"):
        load("--qat.start_step", "900")
    with pytest.raises(C.ConfigError, match=r"qat.group_size 48 does not divide .*\[128, 384\]"):
        load("--qat.group_size", "48")
    with pytest.raises(C.ConfigError, match="qat.scheme: must be one of 8da4w, 8da8w"):
        load("--qat.scheme", "4w")
    load("--qat.scheme", "8da8w", "--qat.group_size", "48")  # per channel: no groups
    assert load("--qat.embedding_quantize", "4,32").qat.embedding_quantize == "4,32"
    with pytest.raises(C.ConfigError, match=r"qat.embedding_quantize 4,48: group size 48 does not divide the "
                                            r"embedding width 128; .* divisors: 2, 4, 8, 16, 32, 64, 128$"):
        load("--qat.embedding_quantize", "4,48")
    with pytest.raises(C.ConfigError, match="qat.embedding_quantize '8,x': give BITS"):
        load("--qat.embedding_quantize", "8,x")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # torchao not installed
    with pytest.raises(C.ConfigError, match=r"qat.enable needs torchao .*pip install -e '\.\[edge\]'"):
        load()


@pytest.mark.slow
def test_trainer_switches_fake_quantization_on_at_the_start_step(tmp_path):
    """One set of runs on prepared shards (the same global order on any rank count), with layer
    sharing, document masking, selective AC, gradient accumulation and validation every 4 steps;
    QAT from step 4 of 8, the embedding table fake-quantized too (int8 per row). 2 gloo ranks equal
    1; a run folder trained 3 steps without QAT, switched on and killed after step 7 (its newest
    checkpoint step 6), then resumed, equals the uninterrupted run step for step; the validation
    loss is the quantized model's, table included: the export's quantization."""
    from test_train import prepare_shards

    shards = prepare_shards(tmp_path, n_docs=300, val_fraction=0.1)
    common = {"model.layer_sharing": "true", "data.doc_mask": "true", "activation_checkpoint.mode": "selective",
              "training.global_batch_size": 8, "training.local_batch_size": 2, "checkpoint.interval": 2,
              "data.val_path": shards / "val", "data.val_interval": 4, "data.val_sequences": 8}
    qat = {"qat.enable": "true", "qat.start_step": 4, "qat.embedding_quantize": "8,0"}
    straight, two, switched = tmp_path / "straight", tmp_path / "two", tmp_path / "switched"
    out = run_trainer(base_args(shards, straight, steps=8, **common, **qat))
    assert "step 4: fake quantization on (8da4w (group size 32); the embedding table int8 per row)" in out
    run_trainer(base_args(shards, two, steps=8, **common, **qat), nproc=2)
    run_trainer(base_args(shards, switched, steps=8, **common, **{"training.stop_at_step": 3}))
    run_trainer(base_args(shards, switched, steps=8, **common, **qat, **{"training.stop_at_step": 7}))
    # A kill after step 7, before its checkpoint: the run folder holds step 6 as its newest.
    shutil.rmtree(switched / "checkpoints" / "step-7")
    out = run_trainer(base_args(shards, switched, steps=8, **common, **qat))
    assert "resumed from" in out and "step-6" in out
    a, b, c = read_metrics(straight), read_metrics(two), read_metrics(switched)
    assert [a[s]["loss"] for s in range(1, 9)] == [c[s]["loss"] for s in range(1, 9)]
    assert [a[s].get("val_loss") for s in (4, 8)] == [c[s].get("val_loss") for s in (4, 8)]
    # Other rank counts sum in another order: equal up to float rounding up to the first
    # fake-quantized step; after it, a weight that rounding moves across a quantization step
    # moves by that step, so the runs agree to the quantization's resolution.
    assert [b[s]["loss"] for s in range(1, 5)] == pytest.approx([a[s]["loss"] for s in range(1, 5)], rel=1e-4)
    assert [b[s]["loss"] for s in range(5, 9)] == pytest.approx([a[s]["loss"] for s in range(5, 9)], rel=3e-3)

    # On either rank count the validation loss is that of the step's weights quantized as the
    # export does: fake quantization was on in the in-loop validation.
    from mobilellm_train.checkpoint import load_model_from_checkpoint
    from mobilellm_train.data.loader import build_val_batches
    from mobilellm_train.evaluation.loading import trained_embedding, trained_scheme

    for run, metrics in ((straight, a), (two, b)):
        step = str(run / "checkpoints" / "step-8")
        model = load_model_from_checkpoint(step)
        apply_embedding_ptq(model, EmbeddingScheme(8, 0))
        apply_ptq(model, "8da4w", 32)
        total = count = 0.0
        with torch.no_grad():
            for vb in build_val_batches(str(shards / "val"), 32, 2, 0, 1, 8, doc_mask=True, vocab_size=64):
                n = (vb["label"] != -100).sum().item()
                total += model(vb["input"], labels=vb["label"], position_ids=vb["position_ids"]).item() * n
                count += n
        assert total / count == pytest.approx(metrics[8]["val_loss"], rel=1e-5), run
        # The checkpoint says what its weights were trained for.
        assert trained_scheme(step) == ("8da4w", 32, 4) and trained_embedding(step) == EmbeddingScheme(8, 0)
    with open(straight / "config.toml") as f:
        assert C.parse_effective_config(f.read()).qat == C.QATConfig(enable=True, start_step=4,
                                                                     embedding_quantize="8,0")


def save_qat_step(model, path, step, record, tokenizer=""):
    """A DCP step folder as a QAT run writes it (model, train state, the QAT record), on one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from mobilellm_train.checkpoint import TOKENIZER_FILE, ChecksummedWriter, TrainState, model_args_fingerprint

    train_state = TrainState(step=step, model_args=model_args_fingerprint(model.args))
    state = {"model": model.state_dict(), "train_state": train_state}
    if record is not None:
        state["qat"] = record.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        extra = {TOKENIZER_FILE: tokenizer} if tokenizer else {}
        dcp.save(state, storage_writer=ChecksummedWriter(str(path), extra_files=extra), no_dist=True)
    return str(path)


def test_tools_quantize_as_the_program_and_export_refuses_another_scheme(tmp_path, capsys):
    import sentencepiece as spm

    from conftest import make_corpus
    from mobilellm_train import export
    from mobilellm_train.evaluation import cli as eval_cli
    from mobilellm_train.evaluation.loading import trained_embedding, trained_scheme
    from mobilellm_train.generate import generate, main as generate_main

    tokenizer = train_tiny_tokenizer(tmp_path)
    model = init_model(replace(ARGS, vocab_size=64), seed=6)
    record = QATRecord("8da4w", 32, 11, "8,0")
    step = save_qat_step(model, tmp_path / "run" / "checkpoints" / "step-20", 20, record, tokenizer)
    early = save_qat_step(model, tmp_path / "early", 10, record)
    plain = save_qat_step(model, tmp_path / "plain", 20, None)
    linear_only = save_qat_step(model, tmp_path / "linear", 20, QATRecord("8da4w", 32, 11))  # as before the table
    assert trained_scheme(step) == ("8da4w", 32, 11) and trained_embedding(step) == EmbeddingScheme(8, 0)
    assert trained_scheme(early) is None and trained_scheme(plain) is None  # before the start; no QAT
    assert trained_embedding(early) is None and trained_embedding(plain) is None
    assert trained_scheme(linear_only) == ("8da4w", 32, 11) and trained_embedding(linear_only) is None

    def export_error(*argv):
        with pytest.raises(SystemExit) as e:
            export.main(["--checkpoint", step, "--format", "executorch", "--out", str(tmp_path / "m.pte"), *argv])
        assert e.value.code == 1
        return capsys.readouterr().err

    err = export_error("--quantize", "8da4w", "--group-size", "16")
    assert "was trained for 8da4w (group size 32) by QAT from step 11; 8da4w (group size 16)" in err
    assert "pass --quantize 8da4w --group-size 32; or pass --force" in err
    assert "no quantization is not what" in export_error()
    assert "8da8w is not what" in export_error("--quantize", "8da8w")
    err = export_error("--quantize", "8da4w")
    assert ("embedding table was trained for 8,0 (int8 per row) by QAT; an fp32 table is not what it was trained "
            "for: pass --embedding-quantize 8,0; or pass --force") in err
    err = export_error("--quantize", "8da4w", "--embedding-quantize", "4,32")
    assert "--embedding-quantize 4,32 (int4 in groups of 32) is not what it was trained for" in err
    assert "BITS 8 or 4" in export_error("--quantize", "8da4w", "--embedding-quantize", "16,0")
    assert not os.path.exists(tmp_path / "m.pte")

    # eval --quantize --embedding-quantize: the row and the --out record name the quantization; the
    # perplexity is the quantized model's, its table looked up as the program's.
    corpus = make_corpus(tmp_path / "data", n_docs=40)
    out = tmp_path / "eval.json"
    eval_cli.main(["--checkpoint", step, "--tasks", "tokens", "--token-data", corpus, "--seq-len", "16",
                   "--max-windows", "8", "--quantize", "8da4w", "--embedding-quantize", "8,0", "--out", str(out)])
    (name, record), = json.loads(out.read_text())["models"].items()
    assert name == "run/step-20 8da4w-g32 E8,0"
    assert record["quantize"] == {"scheme": "8da4w", "group_size": 32, "embedding": "8,0"}
    assert f"{name}: tokens perplexity" in capsys.readouterr().out
    from mobilellm_train.evaluation.perplexity import pack_windows, token_documents

    quantized = copy.deepcopy(model)
    apply_embedding_ptq(quantized, EmbeddingScheme(8, 0))
    apply_ptq(quantized, "8da4w", 32)
    windows = pack_windows(token_documents(corpus, 64), 17, 8)
    with torch.no_grad():
        nll = quantized(windows[:, :-1], labels=windows[:, 1:]).item()
    assert record["perplexity"]["tokens"]["mean_nll"] == pytest.approx(nll, rel=1e-5)

    # generate --quantize samples from the quantized model (greedy: what the program generates).
    generate_main(["--checkpoint", step, "--prompt", "the dog", "--max-new-tokens", "6", "--quantize", "8da4w",
                   "--embedding-quantize", "8,0"])
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    prompt = [1] + sp.encode("the dog")
    (expected,) = generate(quantized, prompt, 6, eos_id=2, vocab_limit=sp.vocab_size())
    assert capsys.readouterr().out.strip().splitlines() == ["=== prompt 1 ===", sp.decode(prompt + expected)]


def test_a_crafted_qat_record_is_a_checkpoint_error():
    """The record the export acts on comes from a step folder that may come from elsewhere."""
    from mobilellm_train.errors import CheckpointError
    from mobilellm_train.quantization import QATRecord

    good = QATRecord("8da4w", 32, 500)
    record = QATRecord()
    record.load_state_dict(good.state_dict())
    assert (record.scheme, record.group_size, record.start_step, record.embedding) == ("8da4w", 32, 500, "")
    record.load_state_dict(QATRecord("8da4w", 32, 500, "4,32").state_dict())
    assert record.embedding == "4,32"
    for text in ("[" * 100_000, "{", "[]", '{"scheme": "8da4w"}', '{"scheme": "8da2w", "group_size": 32, "start_step": 0}',
                 '{"scheme": "8da4w", "group_size": "32", "start_step": 0}',
                 '{"scheme": "8da4w", "group_size": 32, "start_step": -1}',
                 '{"scheme": "8da4w", "group_size": 32, "start_step": 0, "embedding": "3,0"}',
                 '{"scheme": "8da4w", "group_size": 32, "start_step": 0, "embedding": 8}'):
        with pytest.raises(CheckpointError, match="QAT record"):
            QATRecord().load_state_dict({"record": text})
