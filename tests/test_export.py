"""Tests of export.py and hf.load_hf_checkpoint: an exported folder loads in transformers with
logits equal to ours (tied, untied, layer sharing; a real training checkpoint end to end), its
tokenizer loads too, bf16 and torch formats, nothing the user has is overwritten, and HF folders
(sharded safetensors, pytorch_model.bin) import back, with clear errors for what cannot."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import base_args, init_model, make_corpus, run_trainer, subprocess_env
from mobilellm_train.checkpoint import load_model_from_checkpoint
from mobilellm_train.export import ExportError, write_hf_folder
from mobilellm_train.hf import LAYER_SHARING_KEY, HFCheckpointError, load_hf_checkpoint
from mobilellm_train.model import MobileLLM, ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=320, max_seq_len=64,
                 rope_theta=50000.0)
VARIANTS = {
    "tied": ARGS,
    "untied": replace(ARGS, tie_embeddings=False),
    "ls": replace(ARGS, layer_sharing=True),
}


def train_tokenizer(path, vocab_size=300):
    """Llama-2 style (identity normalization, byte fallback); test_hf_tokenizer.py covers the
    exported tokenizer's ids in depth."""
    spm = pytest.importorskip("sentencepiece")
    lines = ["the quick brown fox jumps over the lazy dog", "Question: is it a dog?\nAnswer: yes it is"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path), model_type="bpe",
                                   vocab_size=vocab_size, bos_id=1, eos_id=2, unk_id=0, byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return f"{path}.model"


def hf_logits(folder, tokens, **kwargs):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    with torch.no_grad():
        return hf, hf(input_ids=tokens).logits


def random_tokens(n=2, length=12):
    return torch.randint(0, ARGS.vocab_size, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_trainer_checkpoint_exports_to_a_folder_transformers_loads(tmp_path):
    pytest.importorskip("transformers")
    tokenizer = train_tokenizer(tmp_path / "sp")
    data = make_corpus(tmp_path / "data", n_docs=60)
    run = tmp_path / "run"
    run_trainer(base_args(data, run, steps=4, **{"model.vocab_size": 320, "data.tokenizer_path": tokenizer,
                                                 "checkpoint.interval": 4}))
    step = run / "checkpoints" / "step-4"
    out = tmp_path / "exported"
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.export", "--checkpoint", str(step), "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                       "tokenizer_config.json"]
    ours = load_model_from_checkpoint(str(step))
    tokens = random_tokens()
    hf, theirs = hf_logits(str(out), tokens)
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(theirs, ours(tokens), rtol=1e-5, atol=1e-5)

    import sentencepiece as spm
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    text = "Question: is the fox  quick?\n\nAnswer: yes"
    assert hf_tok(text)["input_ids"] == [1] + sp.encode(text)
    assert hf_tok.eos_token_id == 2
    # Export refuses to write into the now non-empty folder.
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.export", "--checkpoint", str(step), "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "not empty" in r.stderr
    # --no-tokenizer: the model alone, although the step folder holds a tokenizer.
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.export", "--checkpoint", str(step),
                        "--out", str(tmp_path / "alone"), "--no-tokenizer"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "alone")) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_variants_match_transformers_and_import_back(tmp_path, variant):
    args = VARIANTS[variant]
    model = init_model(args)
    out = write_hf_folder(args, model.state_dict(), str(tmp_path / variant))
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["num_hidden_layers"] == args.n_layers * args.n_passes
    assert config[LAYER_SHARING_KEY] == args.layer_sharing
    tokens = random_tokens()
    with torch.no_grad():
        ours = model(tokens)
    hf, theirs = hf_logits(out, tokens)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == args.tie_embeddings
    loaded_args, state = load_hf_checkpoint(out)
    assert loaded_args == args
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_bf16_and_torch_formats(tmp_path):
    args = VARIANTS["ls"]
    model = init_model(args)
    out = write_hf_folder(args, model.state_dict(), str(tmp_path / "bf16"), dtype="bfloat16", weight_format="torch")
    assert "pytorch_model.bin" in os.listdir(out) and "model.safetensors" not in os.listdir(out)
    stored = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "bfloat16"
    # Layers 2i and 2i+1 are stored as separate, equal tensors.
    a, b = stored["model.layers.0.mlp.up_proj.weight"], stored["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    loaded_args, state = load_hf_checkpoint(out)
    assert loaded_args == args and state["layers.0.feed_forward.w13.weight"].dtype == torch.float32
    expected = model.state_dict()["layers.0.feed_forward.w13.weight"].to(torch.bfloat16).float()
    assert torch.equal(state["layers.0.feed_forward.w13.weight"], expected)


def test_export_never_overwrites_unasked(tmp_path, caplog):
    model = init_model(ARGS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        write_hf_folder(ARGS, model.state_dict(), str(out))
    assert os.listdir(out) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        write_hf_folder(ARGS, model.state_dict(), str(tmp_path / "file"))
    with pytest.raises(ExportError, match="no such file"):
        write_hf_folder(ARGS, model.state_dict(), str(tmp_path / "new"), tokenizer_path=str(tmp_path / "none.model"))
    big = train_tokenizer(tmp_path / "big", vocab_size=400)
    with pytest.raises(ExportError, match="more than the model's vocab_size"):
        write_hf_folder(ARGS, model.state_dict(), str(tmp_path / "new"), tokenizer_path=big)
    write_hf_folder(ARGS, model.state_dict(), str(out), overwrite=True)
    assert "notes.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    write_hf_folder(ARGS, model.state_dict(), str(tmp_path / "empty_ok"))
    # No temporary or displaced folders are left beside the results.
    assert sorted(os.listdir(tmp_path)) == ["big.model", "big.vocab", "empty_ok", "file", "out"]


def test_sharded_safetensors_and_bin_folders_import(tmp_path):
    transformers = pytest.importorskip("transformers")
    args = VARIANTS["untied"]
    model = init_model(args)
    out = write_hf_folder(args, model.state_dict(), str(tmp_path / "src"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "sharded")
    # pytorch_model.bin shards as older transformers wrote them, rotary inv_freq buffers included.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    hf_state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    names = sorted(hf_state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: hf_state[k] for k in part}, bin_dir / file)
        weight_map.update(dict.fromkeys(part, file))
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (bin_dir / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    for folder in ("sharded", "bin"):
        loaded_args, state = load_hf_checkpoint(str(tmp_path / folder))
        assert loaded_args == args
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value), key
    os.remove(next(p for p in (tmp_path / "sharded").iterdir() if p.name.startswith("model-0000")))
    with pytest.raises(HFCheckpointError, match="lists shards that are not in"):
        load_hf_checkpoint(str(tmp_path / "sharded"))


def test_layer_sharing_detection_and_choice(tmp_path):
    args = VARIANTS["ls"]
    model = init_model(args)
    out = write_hf_folder(args, model.state_dict(), str(tmp_path / "ls"))
    config_path = os.path.join(out, "config.json")
    config = json.loads(open(config_path).read())
    del config[LAYER_SHARING_KEY]  # as a folder written by other tools
    open(config_path, "w").write(json.dumps(config))
    assert load_hf_checkpoint(out)[0] == args  # equal pairs are detected
    plain_args, plain_state = load_hf_checkpoint(out, layer_sharing=False)
    assert plain_args == replace(args, n_layers=4, layer_sharing=False)
    plain = MobileLLM(plain_args)
    plain.load_state_dict(plain_state)
    tokens = random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    # A plain model's layers are not pairs: never detected, refused when asked for.
    out2 = write_hf_folder(plain_args, init_model(plain_args).state_dict(), str(tmp_path / "plain"))
    assert load_hf_checkpoint(out2)[0].layer_sharing is False
    pair = r"layer sharing: model\.layers\.0\.self_attn\.q_proj\.weight and model\.layers\.1"
    with pytest.raises(HFCheckpointError, match=pair):
        load_hf_checkpoint(out2, layer_sharing=True)


def test_unsupported_or_broken_folders_are_named(tmp_path):
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_hf_checkpoint(str(tmp_path))
    out = write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "m"))
    config_path = os.path.join(out, "config.json")
    config = json.loads(open(config_path).read())
    os.rename(os.path.join(out, "model.safetensors"), tmp_path / "weights")
    with pytest.raises(HFCheckpointError, match="no weights; expected one of model.safetensors"):
        load_hf_checkpoint(out)
    os.rename(tmp_path / "weights", os.path.join(out, "model.safetensors"))
    for change, message in [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "only Llama"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type"),
        ({"intermediate_size": 96}, r"feed_forward.w1.weight has shape \(128, 64\).*implies \(96, 64\)"),
    ]:
        open(config_path, "w").write(json.dumps({**config, **change}))
        with pytest.raises(HFCheckpointError, match=message):
            load_hf_checkpoint(out)
    del config["hidden_size"]
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(HFCheckpointError, match="missing key 'hidden_size'"):
        load_hf_checkpoint(out)


def test_untied_config_without_a_head_imports_as_tied(tmp_path):
    # MobileLLM's own release: tie_word_embeddings false (its code shares through a custom
    # flag) and no lm_head.weight in the weights.
    out = write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "m"))
    config_path = os.path.join(out, "config.json")
    config = json.loads(open(config_path).read())
    open(config_path, "w").write(json.dumps({**config, "tie_word_embeddings": False, "share_embedding": True}))
    args, state = load_hf_checkpoint(out)
    assert args.tie_embeddings and state["output.weight"] is state["tok_embeddings.weight"]


LOAD_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from mobilellm_train.config import ParallelismConfig
from mobilellm_train.hf import HFCheckpointError, load_hf_into_model
from mobilellm_train.model import MobileLLM, ModelArgs
from mobilellm_train.parallelize import apply_fsdp, build_mesh

dist.init_process_group("gloo")
args = ModelArgs(**{args!r})
with torch.device("meta"):
    model = MobileLLM(args)
apply_fsdp(model, build_mesh("cpu", dist.get_world_size(), 1), ParallelismConfig(), torch.float32, torch.float32)
model.to_empty(device="cpu")
model.init_weights(seed=99)
load_hf_into_model(model, {folder!r})
logits = model(torch.load({tokens!r}))
model.args = ModelArgs(**{{**{args!r}, "ffn_dim": 96}})
try:
    load_hf_into_model(model, {folder!r})
    error = ""
except HFCheckpointError as e:
    error = str(e)
if dist.get_rank() == 0:
    torch.save(logits.detach(), {out!r})
print("rank", dist.get_rank(), "error:", error)
dist.destroy_process_group()
# Skip C++ teardown: a gloo run here aborted at exit, after all work ("terminate called without
# an active exception", no Python frame) about once in fifty runs on a loaded 2-core machine.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_hf_weights_load_into_a_sharded_model_on_two_ranks(tmp_path):
    args = VARIANTS["ls"]
    model = init_model(args, seed=5)
    folder = write_hf_folder(args, model.state_dict(), str(tmp_path / "hf"))
    tokens = random_tokens()
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT.format(args=vars(args), folder=folder, tokens=str(tmp_path / "tokens.pt"),
                                         out=str(tmp_path / "logits.pt")))
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(tokens), rtol=1e-5, atol=1e-5)
    # A shape mismatch is refused on both ranks (rather than one rank waiting forever).
    assert r.stdout.count("differ in {'ffn_dim': (128, 96)}") == 2


def test_mobilellm_release_layer_sharing_flag_repeats_the_stored_blocks(tmp_path):
    # MobileLLM's own LS configs: num_hidden_layers counts the stored blocks, each run twice.
    plain = init_model(ARGS, seed=8)
    out = write_hf_folder(ARGS, plain.state_dict(), str(tmp_path / "m"))
    config_path = os.path.join(out, "config.json")
    config = json.loads(open(config_path).read())
    del config[LAYER_SHARING_KEY]
    open(config_path, "w").write(json.dumps({**config, "layer_sharing": True}))
    args, state = load_hf_checkpoint(out)
    assert args == replace(ARGS, layer_sharing=True)
    shared = MobileLLM(args)
    shared.load_state_dict(state)
    for key, value in plain.state_dict().items():
        assert torch.equal(shared.state_dict()[key], value), key
    assert load_hf_checkpoint(out, layer_sharing=False)[0] == ARGS


def test_checkpoint_with_unfused_projections_loads_for_export_and_is_refused_for_resume(tmp_path):
    """Checkpoints written before wq/wk/wv and w1/w3 were fused: the lone-process loader (eval,
    export, generate) reads them exactly; resuming training refuses them with the way out."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from mobilellm_train.checkpoint import CheckpointError, ModelState, TrainState, _checked_load, model_args_fingerprint
    from mobilellm_train.hf import unfuse_projections

    args = VARIANTS["ls"]
    model = init_model(args)
    old_layout = {k: v.clone() for k, v in unfuse_projections(model.state_dict(), args).items()}
    assert "layers.1.attention.wv.weight" in old_layout and "layers.1.feed_forward.w1.weight" in old_layout
    path = str(tmp_path / "step-100")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": old_layout, "train_state": TrainState(step=100, model_args=model_args_fingerprint(args))},
                 checkpoint_id=path, no_dist=True)

    loaded = load_model_from_checkpoint(path, verify=False)  # written before checksum manifests existed
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    with pytest.raises(CheckpointError, match=r"step-100 stores separate q/k/v.*initial_load_path"):
        _checked_load({"model": ModelState(init_model(args))}, path)
