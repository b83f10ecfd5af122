"""The benchmark end to end on CPU (our trainer and the HF baseline on tiny shapes, the loss
comparison), its out-of-memory handling and argument checks; compile health of the blocks on CPU
(dynamo only); and on CUDA (marked gpu): no graph breaks or recompiles with inductor, LS and
activation checkpointing included, and SDPA running flash or cuDNN attention for our shapes."""

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import subprocess_env
from mobilellm_train import bench
from mobilellm_train.config import ActivationCheckpointConfig, CompileConfig
from mobilellm_train.model import MODEL_PRESETS, Attention, MobileLLM, ModelArgs, count_params, precompute_rope
from mobilellm_train.parallelize import apply_ac, apply_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()

try:
    import transformers  # noqa: F401

    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False

TINY = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.ffn_dim", "64", "--model.vocab_size", "300"]


def write_toml(path, flavor="debug", layer_sharing=False, ac="none", compile_enable=False):
    path.write_text(
        f'[model]\nflavor = "{flavor}"\nlayer_sharing = {str(layer_sharing).lower()}\n'
        f'[activation_checkpoint]\nmode = "{ac}"\n[compile]\nenable = {str(compile_enable).lower()}\n'
    )
    return str(path)


def run_bench(args, timeout=300):
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.bench", *args], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    return out


def test_bench_end_to_end_on_cpu(tmp_path):
    ls_toml = write_toml(tmp_path / "tiny_ls.toml", layer_sharing=True)
    out = run_bench(["--presets", "debug", ls_toml, "--steps", "2", "--warmup-steps", "1", "--seq-len", "16",
                     "--local-batch-size", "2", "--baseline-batch-size", "2", "--out", str(tmp_path / "out"), *TINY])
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert results["environment"]["torch"] == torch.__version__
    assert [r["preset"] for r in results["runs"]] == ["debug", "tiny_ls"]
    assert results["runs"][1]["config"] == ls_toml
    for run in results["runs"]:
        ours = run["ours"]
        assert ours["status"] == "ok", ours
        args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=300,
                         layer_sharing=run["layer_sharing"])
        assert ours["params"] == count_params(args)
        assert ours["local_batch_size"] == 2 and ours["tokens_per_second"] > 0 and ours["step_time_ms"] > 0
        assert ours["mfu"] is None  # no known peak on CPU
        # At initialisation the loss is close to ln(vocab) for a correctly wired model.
        assert abs(ours["final_loss"] - math.log(300)) < 1.0 and math.isfinite(ours["final_grad_norm"])
        assert ours["graph_breaks"] == 0 and ours["graphs_compiled_in_timed_steps"] == 0
        if HAVE_TRANSFORMERS:
            base = run["baseline"]
            assert base["status"] == "ok", base
            # The baseline is the same architecture; an LS model's baseline is a Llama of 2L layers.
            hf_args = ModelArgs(dim=32, n_layers=2 * args.n_passes, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                vocab_size=300)
            assert base["params"] == count_params(hf_args)
            assert abs(base["final_loss"] - math.log(300)) < 1.0
            assert run["speedup"] == pytest.approx(ours["tokens_per_second"] / base["tokens_per_second"])
    assert run["layer_sharing"] is True and results["runs"][0]["layer_sharing"] is False
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| debug | 2 | none | false |" in table and "tokens/s/GPU" in table
    assert "| debug | 2 |" in out  # the table is printed too


def test_loss_bench_on_cpu(tmp_path):
    run_bench(["--loss", "--presets", "debug", "--seq-len", "16", "--local-batch-size", "4", "--chunk-sizes", "8",
               "24", "--loss-iters", "1", "--out", str(tmp_path), *TINY])
    results = json.loads((tmp_path / "loss_bench.json").read_text())
    entries = results["loss"]["debug"]
    assert [e["variant"] for e in entries] == ["plain", "chunked-8", "chunked-24"]
    for e in entries:
        assert e["status"] == "ok" and e["num_tokens"] == 64 and e["vocab_size"] == 300 and e["time_ms"] > 0
        assert e["loss"] == pytest.approx(entries[0]["loss"], rel=1e-5)
    assert "chunked-24" in (tmp_path / "loss_bench.md").read_text()


def test_oom_retry_halves_the_batch_and_reports_it():
    def run(batch_size):
        if batch_size > 4:
            raise torch.OutOfMemoryError(f"CUDA out of memory at batch {batch_size}")
        return {"status": "ok", "local_batch_size": batch_size}

    cpu = torch.device("cpu")
    assert bench.with_oom_retry(run, 16, True, cpu) == {"status": "ok", "local_batch_size": 4, "oom_batch_sizes": [16, 8]}
    assert bench.with_oom_retry(run, 16, False, cpu) == {"status": "oom", "local_batch_size": 16, "oom_batch_sizes": [16]}

    def broken(batch_size):
        raise ValueError("shape mismatch")

    result = bench.with_oom_retry(broken, 8, True, cpu)
    assert result["status"] == "error" and "ValueError: shape mismatch" in result["error"]


def test_bad_preset_and_bad_override_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no preset 'nonesuch'"):
        bench.main(["--presets", "nonesuch", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="training.seq_lenn"):
        bench.main(["--presets", "debug", "--training.seq_lenn", "4", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--presets", "debug", "stray"])
    assert not os.listdir(tmp_path)  # nothing ran, nothing written


@pytest.mark.parametrize("layer_sharing,ac_mode", [(False, "none"), (True, "none"), (True, "full")])
def test_compiled_blocks_trace_whole_and_do_not_recompile(monkeypatch, layer_sharing, ac_mode):
    # Dynamo's tracing decides graph breaks and recompiles whatever the backend; aot_eager traces
    # forward and backward without inductor's code generation, so this runs in seconds on CPU.
    # apply_ac and apply_compile are the trainer's own (fullgraph=True: a graph break raises).
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50, max_seq_len=16,
                     layer_sharing=layer_sharing)
    model = MobileLLM(args)
    apply_ac(model, ActivationCheckpointConfig(mode=ac_mode))
    apply_compile(model, CompileConfig(enable=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    graphs_per_step = []
    for step in range(3):
        tokens = torch.randint(0, 50, (2, 16))
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        opt.step()
        opt.zero_grad()
        graphs_per_step.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    # One graph serves every block (parameters are graph inputs, not guarded constants), so
    # compile time does not grow with depth; and nothing is compiled again in later steps.
    assert graphs_per_step == [1, 1, 1], f"graphs compiled after each step: {graphs_per_step}"
    assert sum(counters["graph_break"].values()) == 0


# ---------------------------------------------------------------------------------------------
# On CUDA only.


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_inductor_no_graph_breaks_no_recompiles_on_gpu(tmp_path):
    # Our trainer's real path (FSDP2 on one rank, bf16, inductor) at 125M's block shape, two
    # blocks: plain, LS, and LS with full activation checkpointing.
    presets = [write_toml(tmp_path / f"{name}.toml", flavor="125M", layer_sharing=ls, ac=ac, compile_enable=True)
               for name, ls, ac in (("plain", False, "none"), ("ls", True, "none"), ("ls_ac", True, "full"))]
    run_bench(["--presets", *presets, "--no-baseline", "--steps", "3", "--warmup-steps", "2", "--seq-len", "512",
               "--local-batch-size", "2", "--model.n_layers", "2", "--out", str(tmp_path / "out")], timeout=900)
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    for run in results["runs"]:
        ours = run["ours"]
        assert ours["status"] == "ok", ours
        assert ours["graphs_compiled_in_warmup"] >= 1, ours  # compile did happen (the counters work)
        assert ours["graph_breaks"] == 0, ours
        assert ours["graphs_compiled_in_timed_steps"] == 0, ours


def _attention_step(args: ModelArgs, seq_len: int):
    torch.manual_seed(0)
    attn = Attention(args).cuda().to(torch.bfloat16)
    x = torch.randn(2, seq_len, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = precompute_rope(args.head_dim, seq_len, args.rope_theta, device="cuda")
    attn(x, cos, sin).sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("flavor", ["125M", "350M", "600M", "1B", "1.5B"])
def test_sdpa_runs_flash_or_cudnn_for_our_shapes(flavor):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = MODEL_PRESETS[flavor]
    # Restricted to the fast kernels, GQA (enable_gqa, no repeat_kv) at seq 2048 in bf16 must run:
    # SDPA raises "No available kernel" otherwise.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        _attention_step(args, 2048)
    # And left to choose, it picks one of them (not the memory-efficient or math kernels).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _attention_step(args, 2048)
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages()]
    assert any("flash" in k.lower() or "cudnn" in k.lower() for k in kernels), kernels
    assert not any("fmha_cutlass" in k.lower() or "efficient_attention" in k.lower() for k in kernels), kernels


def test_bench_records_and_forces_the_sdpa_kernel(tmp_path):
    common = ["--presets", "debug", "--steps", "1", "--warmup-steps", "1", "--seq-len", "16", "--local-batch-size",
              "2", "--baseline-batch-size", "2", *TINY]
    run_bench([*common, "--out", str(tmp_path / "auto")])
    run_bench([*common, "--sdpa-backend", "math", "--out", str(tmp_path / "math")])
    auto = json.loads((tmp_path / "auto" / "bench.json").read_text())
    forced = json.loads((tmp_path / "math" / "bench.json").read_text())
    assert forced["sdpa_backend"] == "math"
    # On CPU SDPA picks its fused CPU flash kernel for causal attention; forcing math is seen too.
    assert auto["runs"][0]["ours"]["sdpa_kernel"] == "flash (CPU)"
    assert forced["runs"][0]["ours"]["sdpa_kernel"] == "math"
    if HAVE_TRANSFORMERS:
        assert forced["runs"][0]["baseline"]["sdpa_kernel"] == "math"
    assert "| flash (CPU) / " in (tmp_path / "auto" / "bench.md").read_text()


def test_sdpa_kernel_names():
    from mobilellm_train.bench import sdpa_kernels

    assert sdpa_kernels(["aten::mm", "aten::_scaled_dot_product_cudnn_attention"]) == "cudnn"
    assert sdpa_kernels(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == "flash (CPU)"
    assert sdpa_kernels(["aten::_scaled_dot_product_efficient_attention",
                         "aten::_scaled_dot_product_attention_math"]) == "efficient+math"
    assert sdpa_kernels(["aten::mm"]) == "n/a"


# ---------------------------------------------------------------------------------------------
# launch/gpu_bench.sh: its schedule replayed on CPU with short stand-in compile times
# (DRY_COMPILE_S), and the rows of its summary. The full-length dry run (DRY_COMPILE_S=90, the
# default budget: three rows, the first within 3 minutes) is a manual check (docs/PERFORMANCE.md).


def run_gpu_bench(tmp_path, *mode, timeout=400, **env):
    env = subprocess_env(**{"ALLOW_CPU": 1, "PY": sys.executable, "TMPDIR": tmp_path, "OUT": tmp_path / "out", **env})
    r = subprocess.run(["bash", "launch/gpu_bench.sh", *mode], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout, start_new_session=True)
    return r, (tmp_path / "out" / "summary.md").read_text() if (tmp_path / "out" / "summary.md").exists() else ""


def table_rows(summary):
    """{preset: {column: cell}} of the summary's preset table."""
    lines = [line for line in summary.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(columns, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


@pytest.mark.slow
def test_gpu_bench_dry_run_one_process_per_preset(tmp_path):
    """Each preset is one process whose row carries its compile seconds (the stand-in wait
    included), a failed preset gets its row and the rest go on, and OUT holds only the summary and
    the archive of everything else."""
    import tarfile

    r, summary = run_gpu_bench(tmp_path, DRY_COMPILE_S=2, PRESETS="125M missing 125M_ls",
                               TIMED_ARGS="--steps 1 --warmup-steps 1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = table_rows(summary)
    assert list(rows) == ["125M", "missing", "125M_ls"]
    for preset in ("125M", "125M_ls"):
        row = rows[preset]
        assert row["status"] == "ok" and float(row["compile s"]) >= 2, row  # the wait is inside the warm-up
        assert row["recompiles"] == "0" and row["breaks"] == "0" and row["SDPA"] == "flash (CPU)"
        assert float(row["row at s"]) >= float(row["wall s"])
        assert row["speed-up"].endswith("x") or not HAVE_TRANSFORMERS
    assert rows["missing"]["status"].startswith("exit 1") and "no preset" in rows["missing"]["status"]
    assert float(rows["125M_ls"]["row at s"]) > float(rows["125M"]["row at s"])
    assert sorted(os.listdir(tmp_path / "out")) == ["all_results.tar.gz", "summary.md"]
    with tarfile.open(tmp_path / "out" / "all_results.tar.gz") as tar:
        names = tar.getnames()
    assert "./bench/125M.json" in names and "./logs/missing.log" in names
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gpu_bench.")]  # the work folder is removed
    with open(os.path.join(ROOT, "launch", "gpu_bench.sh")) as f:
        assert "/tmp/" not in f.read().replace('"${TMPDIR:-/tmp}/gpu_bench', "")  # no fixed paths


@pytest.mark.slow
def test_gpu_bench_cuts_a_preset_at_the_budget_and_skips_the_rest(tmp_path):
    """A compile longer than the budget: the preset is stopped at the budget (its row says so,
    with the time it ran in the compile column) and no later preset starts."""
    r, summary = run_gpu_bench(tmp_path, DRY_COMPILE_S=600, BUDGET_S=40, MIN_PRESET_S=10, PRESETS="125M 1B")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    row = table_rows(summary)["125M"]
    limit = int(row["status"].split("timed out after ")[1].split()[0])
    assert 0 < limit <= 40  # the script's own decision: never past the budget
    assert row["compile s"].startswith("> ")
    assert "Skipped, under 10 s of the budget left: 1B" in summary and "1B" not in table_rows(summary)


def test_gpu_bench_tests_stop_at_once_without_torchdata(tmp_path):
    # `python -S`: no site-packages, so no torchdata; the check runs before anything imports torch.
    r, summary = run_gpu_bench(tmp_path, "tests", timeout=60, PY=f"{sys.executable} -S")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "no torchdata" in r.stderr and "launch/gpu_bench.sh fetch" in r.stderr
    assert "no torchdata" in summary


def test_gpu_summary_rows():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    ours = {"status": "ok", "compile_s": 91.234, "graphs_compiled_in_timed_steps": 0, "graph_breaks": 1,
            "local_batch_size": 32, "peak_memory_gib": 35.0, "planned_allocated_gib": 34.6, "tokens_per_second": 4.2e5,
            "mfu": 0.41, "step_time_ms": 156.0, "sdpa_kernel": "flash", "oom_batch_sizes": []}
    base = {"status": "ok", "local_batch_size": 32, "tokens_per_second": 1.68e5, "mfu": 0.199}
    run = {"preset": "125M", "started_s": 14.2, "ours": ours, "baseline": base, "speedup": 2.5}
    header = gpu_summary.header().splitlines()
    columns = len(header[0].split("|"))
    row = gpu_summary.run_row(run, "130", "145")
    assert len(row.split("|")) == columns
    assert "| 125M | ok | 91.2 | 0 | 1 | 14.2 | 130 | 145 | 32 | 35.0 | 34.6 (-1%) | 420,000 | 41.0% |" in row
    assert row.endswith("| 168,000 (19.9% MFU) | 2.50x |")
    cut = gpu_summary.run_row({**run, "baseline": None}, "240", "250", "timed out after 240 s")
    assert "ok, then timed out after 240 s" in cut and "not run" in cut
    missing = gpu_summary.missing_row("1B", "240", "490", "timed out after 240 s")
    assert len(missing.split("|")) == columns and "| 1B | timed out after 240 s | > 240 |" in missing
    failed = gpu_summary.run_row({**run, "ours": {"status": "oom", "oom_batch_sizes": [32]}}, "50", "60")
    assert "out of memory at micro-batch [32]" in failed and len(failed.split("|")) == columns
