"""Tests of generate.py: cached decoding equals recomputing the whole sequence (logits and greedy
tokens, tied, untied and layer-sharing models), EOS and length limits, temperature and top-p
sampling, and the mobilellm-generate command on a DCP checkpoint with its tokenizer."""

import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import init_model, subprocess_env, train_tiny_tokenizer
from mobilellm_train.checkpoint import TOKENIZER_FILE, ChecksummedWriter, TrainState, model_args_fingerprint
from mobilellm_train.generate import KVCache, forward_cached, generate, sample_next
from mobilellm_train.model import ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97, max_seq_len=48)
VARIANTS = {
    "tied": ARGS,
    "untied": replace(ARGS, tie_embeddings=False),
    "ls": replace(ARGS, layer_sharing=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_the_full_forward(variant):
    model = init_model(VARIANTS[variant])
    tokens = torch.randint(0, ARGS.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
    cache = KVCache(model, batch_size=2, max_len=20)
    # A prompt, then a chunk of several tokens at an offset (the masked path), then single tokens.
    pieces = [(0, 6), (6, 10), (10, 11), (11, 12), (12, 14)]
    cached = torch.cat([forward_cached(model, tokens[:, a:b], cache, a) for a, b in pieces], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="beyond the cache"):
        forward_cached(model, tokens[:, :7], cache, 14)


@pytest.mark.parametrize("variant", ["tied", "ls"])
def test_greedy_generation_equals_recomputing_every_step(variant):
    model = init_model(VARIANTS[variant], seed=7)
    prompt = [1, 5, 9, 13, 2, 40]
    (cached,) = generate(model, prompt, max_new_tokens=15)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            sequence.append(model(torch.tensor([sequence]))[0, -1].argmax().item())
    assert cached == sequence[len(prompt):]
    # EOS ends a sample before it: pretend the 4th generated token is EOS.
    eos = cached[3]
    (stopped,) = generate(model, prompt, max_new_tokens=15, eos_id=eos)
    assert stopped == cached[: cached.index(eos)]


def test_generation_stops_at_max_seq_len_and_rejects_full_prompts():
    model = init_model(ARGS)
    (sample,) = generate(model, list(range(1, 41)), max_new_tokens=50)
    assert len(sample) == ARGS.max_seq_len - 40
    with pytest.raises(ValueError, match="no room"):
        generate(model, list(range(ARGS.max_seq_len)), max_new_tokens=1)


def test_sampling_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_next(logits, 0.0, 1.0, None).tolist() == [0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits.expand(500, 4), 1.0, 0.7, gen) for _ in range(4)]).flatten()
    # top_p 0.7 keeps the smallest set reaching 0.7: tokens 0 and 1, renormalised to 0.625 / 0.375.
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.04)
    draws = sample_next(logits.expand(4000, 4), 1.0, 1.0, gen)
    assert (draws == 3).float().mean().item() == pytest.approx(0.05, abs=0.015)
    # A low temperature sharpens towards the argmax; the same seed gives the same samples.
    cold = sample_next(logits.expand(1000, 4), 0.1, 1.0, torch.Generator().manual_seed(1))
    assert (cold == 0).float().mean().item() > 0.95
    assert torch.equal(cold, sample_next(logits.expand(1000, 4), 0.1, 1.0, torch.Generator().manual_seed(1)))
    model = init_model(ARGS)
    a = generate(model, [1, 2, 3], 10, temperature=1.0, num_samples=3, seed=5)
    assert a == generate(model, [1, 2, 3], 10, temperature=1.0, num_samples=3, seed=5) and len(a) == 3


def save_step_folder(model, path, tokenizer_path=""):
    """A DCP step folder as the trainer writes it (model and train state), on one process."""
    state = {"model": model.state_dict(), "train_state": TrainState(model_args=model_args_fingerprint(model.args))}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # The tokenizer goes in with its checksum, before .metadata, as the trainer's saves do.
        extra = {TOKENIZER_FILE: str(tokenizer_path)} if tokenizer_path else {}
        dcp.save(state, storage_writer=ChecksummedWriter(str(path), extra_files=extra), no_dist=True)
    return str(path)


@pytest.mark.slow
def test_generate_cli_on_a_dcp_checkpoint(tmp_path):
    tokenizer = train_tiny_tokenizer(tmp_path)
    model = init_model(replace(ARGS, layer_sharing=True), seed=11)
    step = save_step_folder(model, tmp_path / "step-5", tokenizer)
    env = subprocess_env()
    cmd = [sys.executable, "-m", "mobilellm_train.generate", "--checkpoint", step, "--prompt", "the dog",
           "--max-new-tokens", "8", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    prompt = [1] + sp.encode("the dog")
    (expected,) = generate(model, prompt, 8, eos_id=2, vocab_limit=sp.vocab_size())
    assert max(expected) < sp.vocab_size()
    assert r.stdout.strip().splitlines() == ["=== prompt 1 ===", sp.decode(prompt + expected)]
    r = subprocess.run(cmd[:-4] + ["--top-p", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "--top-p" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cached_decoding_on_cuda_in_fp32_and_bf16():
    model = init_model(VARIANTS["ls"], seed=7).cuda()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0)).cuda()
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32), torch.no_grad():
            full = model(tokens).float()
            cache = KVCache(model, batch_size=2, max_len=14)
            cached = torch.cat([forward_cached(model, tokens[:, :9], cache, 0),
                                forward_cached(model, tokens[:, 9:12], cache, 9),
                                forward_cached(model, tokens[:, 12:14], cache, 12)], dim=1).float()
        assert cache.k.dtype == dtype
        torch.testing.assert_close(cached, full, rtol=tol, atol=tol)
    sequence = [1, 5, 9, 13]
    (cached,) = generate(model, sequence, max_new_tokens=10)
    with torch.no_grad():
        for _ in range(10):
            sequence.append(model(torch.tensor([sequence], device="cuda"))[0, -1].argmax().item())
    assert cached == sequence[4:]
