"""chunked_cross_entropy: equal to the plain fp32-logits cross-entropy in value and gradients, in
fp32 and within bf16 rounding, never holding more than one chunk of logits, and correct under
FSDP2 when computed inside the root module's forward (the integration it is meant for)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import subprocess_env
from mobilellm_train.losses import chunked_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(n=300, dim=32, vocab=97, dtype=torch.float32, ignore_every=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(vocab, dim, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, grad_scale=1.0):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    (grad_scale * loss).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def plain(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)


@pytest.mark.parametrize("chunk_size", [1, 64, 100, 299, 300, 4096])
@pytest.mark.parametrize("ignore_every", [0, 7])
def test_fp32_equals_plain_path(chunk_size, ignore_every):
    hidden, weight, labels = make_inputs(ignore_every=ignore_every)
    ref = loss_and_grads(plain, hidden, weight, labels, grad_scale=3.0)
    got = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size), hidden, weight, labels, 3.0)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_error_no_worse_than_plain_bf16_path():
    # Both paths round the logits and their gradient to bf16; measured against an fp64 reference,
    # the chunked path (fp32 accumulation of the weight gradient over chunks) must not be less
    # accurate than the plain path's bf16 error.
    hidden, weight, labels = make_inputs(n=512, dim=64, vocab=1000, dtype=torch.bfloat16, ignore_every=5)
    exact = loss_and_grads(plain, hidden.detach().double().requires_grad_(),
                           weight.detach().double().requires_grad_(), labels)
    ref = loss_and_grads(plain, hidden, weight, labels)
    got = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, 128), hidden, weight, labels)
    for name, g, r, e in zip(("loss", "grad hidden", "grad weight"), got, ref, exact):
        assert g.dtype == r.dtype, name
        err_got = (g.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert err_got <= 1.5 * err_ref + 1e-3 * scale, f"{name}: chunked error {err_got}, plain bf16 error {err_ref}"


def test_no_grad_and_partial_grad():
    hidden, weight, labels = make_inputs(ignore_every=3)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 50), plain(hidden, weight, labels))
    # Only the weight needs a gradient (a frozen trunk): the hidden gradient is not made.
    frozen = hidden.detach()
    weight.grad = None
    chunked_cross_entropy(frozen, weight, labels, 50).backward()
    ref_weight = weight.grad.clone()
    weight.grad = None
    plain(frozen, weight, labels).backward()
    torch.testing.assert_close(ref_weight, weight.grad)


def test_all_labels_ignored_gives_nan_like_cross_entropy():
    hidden, weight, labels = make_inputs(n=10)
    labels[:] = -100
    assert torch.isnan(plain(hidden, weight, labels))
    assert torch.isnan(chunked_cross_entropy(hidden, weight, labels, 4))


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_more_than_one_chunk_of_logits():
    n, vocab, chunk = 512, 1000, 64
    hidden, weight, labels = make_inputs(n=n, dim=16, vocab=vocab)
    with LargestTensor() as plain_mode:
        plain(hidden, weight, labels).backward()
    assert plain_mode.max_numel >= n * vocab  # the probe sees the whole-batch logits of the plain path
    hidden.grad = weight.grad = None
    with LargestTensor() as chunked_mode:
        chunked_cross_entropy(hidden, weight, labels, chunk).backward()
    assert chunked_mode.max_numel <= chunk * vocab, chunked_mode.max_numel


def test_tied_weight_gradient_accumulates_with_embedding():
    # MobileLLM ties the output projection to the embedding: both uses must add into one gradient.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    tokens = torch.randint(0, 50, (4, 12))
    labels = torch.randint(0, 50, (48,))
    grads = []
    for use_chunked in (False, True):
        emb.weight.grad = None
        h = torch.tanh(emb(tokens)).flatten(0, 1)
        loss = chunked_cross_entropy(h, emb.weight, labels, 10) if use_chunked else plain(h, emb.weight, labels)
        loss.backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", ["hidden_3d", "dim_mismatch", "label_count", "float_labels", "chunk_zero"])
def test_bad_arguments_are_named(bad):
    hidden, weight, labels = make_inputs(n=8)
    chunk = 4
    if bad == "hidden_3d":
        hidden = hidden.view(2, 4, -1)
    elif bad == "dim_mismatch":
        weight = weight[:, :5]
    elif bad == "label_count":
        labels = labels[:5]
    elif bad == "float_labels":
        labels = labels.float()
    else:
        chunk = 0
    with pytest.raises(ValueError, match="chunked_cross_entropy"):
        chunked_cross_entropy(hidden, weight, labels, chunk)


@pytest.mark.slow
def test_compiled_chunk_equals_plain_path():
    # Inductor compiles the per-chunk arithmetic (two shapes: the full chunks and the last one).
    hidden, weight, labels = make_inputs(n=200, dim=16, vocab=50, ignore_every=6)
    ref = loss_and_grads(plain, hidden, weight, labels)
    got = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, 64, compile_chunk=True), hidden, weight, labels)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# Two gloo ranks, FSDP2 as parallelize.apply_fsdp applies it. The model computes the loss inside
# its forward (the integration proposed for model.py; written out here as a subclass) with and
# without explicit block prefetching, and must train exactly as the trainer's current path, which
# takes logits out of forward and computes F.cross_entropy outside.
FSDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist, torch.nn.functional as F
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from mobilellm_train.losses import chunked_cross_entropy
    from mobilellm_train.model import MobileLLM, ModelArgs
    from mobilellm_train.parallelize import build_mesh

    class LossInForward(MobileLLM):
        def forward(self, tokens, labels=None):
            T = tokens.shape[1]
            h = self.tok_embeddings(tokens)
            for layer in self.layers:
                h = layer(h, self.rope_cos[:T], self.rope_sin[:T])
            h = self.norm(h)
            if labels is None:
                return self.output(h)
            return chunked_cross_entropy(h.flatten(0, 1), self.output.weight, labels.flatten(), 24)

    def build(args, reshard, prefetch):
        with torch.device("meta"):
            model = LossInForward(args)
        mesh = build_mesh("cpu", dist.get_world_size(), 1)
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        blocks = list(model.layers)
        for i, block in enumerate(blocks):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard and i < len(blocks) - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        if prefetch:
            for prev, nxt in zip(blocks, blocks[1:]):
                prev.set_modules_to_forward_prefetch([nxt])
                nxt.set_modules_to_backward_prefetch([prev])
        model.to_empty(device="cpu")
        model.init_weights(seed=0)
        return model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for ls in (False, True):
        args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=101,
                         max_seq_len=16, layer_sharing=ls)
        runs = {}
        for name, reshard, prefetch, chunked in (("plain", True, False, False), ("chunked", True, False, True),
                                                 ("chunked_prefetch", False, True, True)):
            torch.manual_seed(0)
            model = build(args, reshard, prefetch)
            # SGD: an update linear in the gradient, so float rounding is not amplified the way
            # Adam's normalisation amplifies it for near-zero gradients.
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
            losses = []
            for step in range(3):
                window = torch.randint(0, args.vocab_size, (3, 17), generator=gen)
                inputs, labels = window[:, :-1], window[:, 1:]
                opt.zero_grad()
                if chunked:
                    loss = model(inputs, labels)
                else:
                    loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), labels.flatten())
                loss.backward()
                if step == 0:
                    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
                opt.step()
                losses.append(loss.item())
            params = {n: p.full_tensor() for n, p in model.named_parameters()}
            runs[name] = (losses, grads, params)
        ref_losses, ref_grads, ref_params = runs["plain"]
        for name in ("chunked", "chunked_prefetch"):
            losses, grads, params = runs[name]
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
            for n in params:
                torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(params[n], ref_params[n], rtol=1e-4, atol=1e-6)
        report[f"ls={ls}"] = ref_losses
    if rank == 0:
        print("RESULT " + json.dumps(report))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_loss_inside_forward_under_fsdp_two_ranks(tmp_path):
    script = tmp_path / "fsdp_chunked_loss.py"
    script.write_text(FSDP_SCRIPT)
    env = subprocess_env()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, env=env, timeout=240, cwd=ROOT,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    report = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    for losses in report.values():
        assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def z_loss_reference(hidden, weight, labels, z_loss):
    """The loss with z-loss in fp64 on the whole logits: the closed form the chunks must give."""
    logits = hidden.double() @ weight.double().T
    valid = labels != -100
    ce = F.cross_entropy(logits, labels)
    z_term = z_loss * torch.logsumexp(logits, dim=-1)[valid].square().mean()
    return ce + z_term, ce, z_term


@pytest.mark.parametrize("chunk_size", [0, 7, 300])
def test_z_loss_equals_its_closed_form_value_and_gradient(chunk_size):
    """z_loss x mean(logsumexp(logits)^2) over the labelled rows, added inside the chunks (several,
    one) and on whole logits (loss_chunk_tokens 0): value, logged terms and both gradients."""
    from mobilellm_train.losses import _loss_and_dlogits_fusable, _loss_and_dlogits_inplace, unchunked_cross_entropy

    z = 0.05  # large enough that a wrong gradient term shows far above rounding
    hidden, weight, labels = make_inputs(n=300, dim=32, vocab=97, ignore_every=7)

    def ours(h, w, y):
        terms.clear()
        if chunk_size == 0:
            return unchunked_cross_entropy(h @ w.T, y, z, terms=terms)
        return chunked_cross_entropy(h, w, y, chunk_size, z_loss=z, terms=terms)

    terms = {}
    got = loss_and_grads(ours, hidden, weight, labels, grad_scale=3.0)
    ref = loss_and_grads(lambda h, w, y: z_loss_reference(h, w, y, z)[0], hidden.detach().double().requires_grad_(),
                         weight.detach().double().requires_grad_(), labels, grad_scale=3.0)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=name)
    _, ce, z_term = z_loss_reference(hidden.detach(), weight.detach(), labels, z)
    assert set(terms) == {"ce", "z_loss"}
    torch.testing.assert_close(terms["ce"].double(), ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["z_loss"].double(), z_term, rtol=1e-6, atol=1e-7)
    assert z_term > 0.01  # the term is not negligible here, so the comparison means something
    # The fusable chunk arithmetic (what compile_chunk compiles), run eagerly, agrees with the in-place one.
    logits = (hidden @ weight.T).detach()
    inv = 1.0 / (labels != -100).sum().float()
    for a, b in zip(_loss_and_dlogits_inplace(logits.clone(), labels, inv, -100, z),
                    _loss_and_dlogits_fusable(logits.clone(), labels, inv, -100, z)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_model_z_loss_off_unchanged_and_on_in_training_only(chunk_tokens):
    """z_loss 0: the loss is the cross-entropy as before, bit for bit on whole logits, and "ce" its
    only term; on, it adds the closed form (with and without document positions, the prepared-data
    path), and the validation loss (eval mode) stays the cross-entropy."""
    from mobilellm_train.model import MobileLLM, ModelArgs

    torch.manual_seed(0)
    model = MobileLLM(ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32))
    model.init_weights(seed=1)
    model.loss_chunk_tokens = chunk_tokens
    tokens = torch.randint(0, 64, (2, 24))
    labels = torch.randint(0, 64, (2, 24))
    labels[:, :3] = -100
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    logits = model(tokens).flatten(0, 1)
    terms = {}
    off = model(tokens, labels=labels, loss_terms=terms)
    if chunk_tokens == 0:  # what forward computed before z-loss existed
        assert torch.equal(off, F.cross_entropy(logits.float(), labels.flatten()))
    torch.testing.assert_close(off, F.cross_entropy(logits.float(), labels.flatten()))
    assert list(terms) == ["ce"] and torch.equal(terms["ce"], off.detach())
    model.z_loss = 1e-2
    for pos in (None, positions):
        terms = {}
        on = model(tokens, labels=labels, position_ids=pos, loss_terms=terms)
        whole = model(tokens, position_ids=pos).flatten(0, 1).double()
        valid = labels.flatten() != -100
        closed = F.cross_entropy(whole, labels.flatten()) + 1e-2 * torch.logsumexp(whole, -1)[valid].square().mean()
        torch.testing.assert_close(on.double(), closed, rtol=1e-6, atol=1e-6)
        assert set(terms) == {"ce", "z_loss"}
        torch.testing.assert_close(terms["ce"] + terms["z_loss"], on.detach())
    model.eval()
    torch.testing.assert_close(model(tokens, labels=labels), off, rtol=0, atol=0)
