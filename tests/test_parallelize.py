"""Tests of parallelize.py on CPU: every activation-checkpointing mode gives the gradients of no
checkpointing, op-level selective AC repeats no matmul in backward and traces under torch.compile
without graph breaks; and on 2 x 2 gloo ranks (HSDP), train_step all-reduces across replicas once
per accumulation step with the gradients of all-reducing every micro-batch, and the training
timeout reaches every process group of the mesh.

    python -m pytest tests/test_parallelize.py -q
"""

import copy
import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, subprocess_env
from mobilellm_train.config import ActivationCheckpointConfig
from mobilellm_train.model import MODEL_PRESETS, MobileLLM
from mobilellm_train.parallelize import apply_ac

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def tiny(layer_sharing=False):
    args = replace(MODEL_PRESETS["debug"], vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   ffn_dim=64, max_seq_len=32, layer_sharing=layer_sharing)
    model = MobileLLM(args)
    model.init_weights(seed=0)
    model.loss_chunk_tokens = 0  # keep the head's matmuls in one place for counting
    return model


def tokens(seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 64, (2, 17), generator=gen)
    return t[:, :-1], t[:, 1:]


def canonical(name):
    """A parameter's name with the AC and compile wrappers' prefixes taken out."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def grads(model, positions=None):
    model.zero_grad(set_to_none=True)
    inputs, labels = tokens()
    loss = model(inputs, labels=labels, position_ids=positions)
    loss.backward()
    return loss.detach(), {canonical(n): p.grad.clone() for n, p in model.named_parameters()}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def backward_matmuls(model):
    model.zero_grad(set_to_none=True)
    inputs, labels = tokens()
    loss = model(inputs, labels=labels)
    with CountMatmuls() as counter:
        loss.backward()
    return counter.count


@pytest.mark.parametrize("layer_sharing", [False, True])
@pytest.mark.parametrize("mode", ["full", "selective", "op"])
def test_every_ac_mode_gives_the_gradients_of_no_ac(mode, layer_sharing):
    plain = tiny(layer_sharing)
    wrapped = copy.deepcopy(plain)
    apply_ac(wrapped, ActivationCheckpointConfig(mode=mode, selective_every=2))
    assert type(wrapped.layers[0]) is not type(plain.layers[0])  # it did wrap
    loss_plain, grads_plain = grads(plain)
    loss_ac, grads_ac = grads(wrapped)
    assert torch.equal(loss_plain, loss_ac)
    assert grads_ac.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ac[name], g, rtol=0, atol=1e-6, msg=name)


def test_op_ac_recomputes_no_matmul_but_full_ac_does():
    plain = tiny()
    op = copy.deepcopy(plain)
    apply_ac(op, ActivationCheckpointConfig(mode="op"))
    full = copy.deepcopy(plain)
    apply_ac(full, ActivationCheckpointConfig(mode="full"))
    # Per block forward: wqkv, wo, w13, w2 (or the unfused projections) plus attention's two
    # matmuls on the math path; full AC runs all of them again in backward.
    baseline = backward_matmuls(plain)
    assert backward_matmuls(op) == baseline
    assert backward_matmuls(full) > baseline


def test_op_ac_compiles_without_graph_breaks():
    plain = tiny()
    compiled = copy.deepcopy(plain)
    apply_ac(compiled, ActivationCheckpointConfig(mode="op"))
    torch._dynamo.reset()
    for name, block in compiled.layers.named_children():
        # fullgraph: any graph break raises instead of silently splitting the block.
        compiled.layers.register_module(name, torch.compile(block, backend="aot_eager", fullgraph=True))
    loss_plain, grads_plain = grads(plain)
    loss_compiled, grads_compiled = grads(compiled)
    torch.testing.assert_close(loss_compiled, loss_plain, rtol=0, atol=1e-6)
    assert grads_compiled.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_compiled[name], g, rtol=0, atol=1e-6, msg=name)


def test_ac_bench_reports_what_each_mode_saves_and_recomputes(tmp_path, capsys):
    from mobilellm_train.ac_bench import main

    out = tmp_path / "ac.json"
    main(["--flavor", "debug", "--n-layers", "4", "--batch", "1", "--seq-len", "256", "--repeats", "1",
          "--loss-chunk-tokens", "64", "--out", str(out)])
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"none", "selective", "op", "full"}
    saved = {mode: r["saved_activations_gib"] for mode, r in modes.items()}
    assert saved["full"] < saved["op"] < saved["none"] and saved["full"] < saved["selective"] < saved["none"]
    assert modes["op"]["backward_matmuls"] == modes["none"]["backward_matmuls"]
    assert modes["none"]["backward_matmuls"] < modes["selective"]["backward_matmuls"] < modes["full"]["backward_matmuls"]
    assert "saved_activations_gib" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["op", "full"])
def test_ac_under_inductor_on_cuda_gives_the_gradients_of_no_ac(mode):
    """The GPU configuration: inductor per block, SDPA's flash/efficient kernels saved by the op
    policy. fp32, so the comparison is tight."""
    plain = tiny().cuda()
    wrapped = copy.deepcopy(plain)
    apply_ac(wrapped, ActivationCheckpointConfig(mode=mode))
    torch._dynamo.reset()
    for model in (plain, wrapped):
        for name, block in model.layers.named_children():
            model.layers.register_module(name, torch.compile(block, fullgraph=True))

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        inputs, labels = (t.cuda() for t in tokens())
        loss = model(inputs, labels=labels)
        loss.backward()
        return loss.detach(), {canonical(n): p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = loss_and_grads(plain)
    loss_ac, grads_ac = loss_and_grads(wrapped)
    torch.testing.assert_close(loss_ac, loss_plain, rtol=0, atol=1e-5)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ac[name], g, rtol=1e-4, atol=1e-5, msg=name)


HSDP_SCRIPT = textwrap.dedent("""
    import datetime, json
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from mobilellm_train import parallelize as P
    from mobilellm_train.config import CommConfig, ParallelismConfig
    from mobilellm_train.model import MobileLLM, ModelArgs
    from mobilellm_train.resilience import set_train_timeout
    from mobilellm_train.train import train_step

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank()
    mesh = P.build_mesh("cpu", 4, 2)  # (replicate 2, shard 2)
    replicate_ranks = dist.get_process_group_ranks(mesh.get_group("dp_replicate"))

    calls = []
    real_all_reduce = dist.all_reduce
    def counting_all_reduce(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        if group is not None and dist.get_process_group_ranks(group) == replicate_ranks:
            calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = counting_all_reduce  # FSDP2 calls dist.all_reduce for the replica reduction

    def run(every_micro_batch):
        args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16)
        with torch.device("meta"):
            model = MobileLLM(args)
        P.apply_fsdp(model, mesh, ParallelismConfig(dp_replicate=2), torch.float32, torch.float32)
        model.to_empty(device="cpu")
        model.init_weights(seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        real_switch = FSDPModule.set_requires_all_reduce
        if every_micro_batch:  # what train_step did before: all-reduce after every backward
            FSDPModule.set_requires_all_reduce = lambda self, enabled, *, recurse=True: real_switch(
                self, True, recurse=recurse)
        per_step, losses = [], []
        try:
            for step in range(2):
                windows = [torch.randint(0, 64, (2, 17), generator=gen) for _ in range(3)]
                batches = [{"input": w[:, :-1], "label": w[:, 1:]} for w in windows]
                before = len(calls)
                loss = train_step(model, opt, batches, max_norm=1.0)[0]
                per_step.append(len(calls) - before)
                losses.append(loss.item())
                if step == 0:
                    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        finally:
            FSDPModule.set_requires_all_reduce = real_switch
        params = {n: p.full_tensor() for n, p in model.named_parameters()}
        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        return per_step, losses, grads, params, units

    once, losses, grads, params, units = run(every_micro_batch=False)
    every, ref_losses, ref_grads, ref_params, _ = run(every_micro_batch=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    for name in ref_params:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-7, msg=name)

    set_train_timeout(CommConfig(train_timeout_seconds=77))
    timeouts = {name: mesh.get_group(name)._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for name in ("dp_replicate", "dp_shard")}
    timeouts["default"] = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    if rank == 0:
        print("RESULT " + json.dumps({"once": once, "every": every, "units": units, "timeouts": timeouts}))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_hsdp_accumulation_all_reduces_once_per_step_with_the_same_gradients(tmp_path):
    script = tmp_path / "hsdp_accumulation.py"
    script.write_text(HSDP_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        str(script)], capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=ROOT,
                       start_new_session=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    report = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    # Three micro-batches per step: one all-reduce per FSDP unit (2 blocks + root) per step, where
    # all-reducing after every backward made three.
    assert report["once"] == [report["units"]] * 2 and report["units"] == 3
    assert report["every"] == [3 * report["units"]] * 2
    # The training timeout on the mesh's own groups too, not only the default one.
    assert report["timeouts"] == {"dp_replicate": 77.0, "dp_shard": 77.0, "default": 77.0}
