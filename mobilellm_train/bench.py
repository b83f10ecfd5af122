"""Training-throughput benchmark: our trainer against the original code's way of training, in one run.

    mobilellm-bench --presets 125M 125M_ls 1B --out bench_results  # one GPU
    mobilellm-bench --presets 1B --activation_checkpoint.mode selective
    mobilellm-bench --loss --presets 125M 1.5B                   # lm-head loss only
    mobilellm-bench --presets debug --steps 3 --warmup-steps 1   # CPU smoke run

For each preset (a TOML of train_configs/, or a path to a TOML) it builds the model exactly as the
trainer does (`train.build_model`, `optim.build_optimizer`, `parallelize.build_mesh` in a
one-rank process group), runs `--warmup-steps` steps of `train.train_step` on synthetic tokens
(the first compiles), then times `--steps` more with CUDA events. It prints tokens/s per GPU, MFU
(metrics.py's formula), peak memory and step time, and with `transformers` installed does the same
for the original code's way of training in the same process: a Hugging Face `LlamaForCausalLM` of
the same shape (an LS model as a Llama of 2L layers) with tied embeddings, fp32 weights, bf16
autocast, SDPA attention, the model's own fp32-logits loss, gradient clipping and torch's AdamW
without the fused kernel (HF Trainer's "adamw_torch", its default until transformers enabled
"adamw_torch_fused" for torch >= 2.8; --baseline-fused-adamw measures that instead). The ratio of
the two is the speed-up. Each micro-batch is one optimizer step (no accumulation); any
`--section.key value` argument overrides the preset's config for our trainer, as on the
trainer's command line.

A run that runs out of memory is reported as such and, unless --no-oom-retry, repeated at half
the micro-batch; the table shows the batch that ran. Results go to `<out>/<name>.json` and
`<out>/<name>.md`, rewritten after every run, with the card, torch version and date.

`--loss` instead times the language-model head's loss alone at each preset's shape (micro-batch x
seq_len tokens): the plain fp32-logits cross-entropy against `losses.chunked_cross_entropy`
at several chunk sizes, eager and (on GPU) with the per-chunk arithmetic compiled, reporting
time per forward+backward and the peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Callable

from mobilellm_train import config as C
from mobilellm_train.measure import StepTimer, compile_counts, free_memory, is_oom, with_oom_retry  # noqa: F401

if TYPE_CHECKING:
    import torch

    from mobilellm_train.model import ModelArgs

# torch and everything built on it are imported inside the functions that use them: --help and
# argument errors answer at once (importing torch takes seconds).

_PROCESS_START = time.monotonic()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PRESETS = ["125M", "125M_ls", "350M", "350M_ls", "600M", "1B", "1.5B"]

# Per-GPU batch of the original-style reference measurement (docs/REFERENCE.md, one H200). The
# baseline starts there and halves on OOM; an LS model starts at its base size's entry.
REFERENCE_BATCH = {"125M": 32, "350M": 32, "600M": 16, "1B": 8, "1.5B": 8}


# ---------------------------------------------------------------------------------------------
# Measuring (time, memory, compile activity: mobilellm_train.measure) and the inputs.


def synthetic_batches(n: int, batch_size: int, seq_len: int, vocab_size: int, pin: bool) -> list[dict]:
    """n batches of uniform random token windows in the trainer's format: input = window[:-1],
    label = window[1:]. Pinned on GPU so the copy to the device can be asynchronous, as the
    trainer's loader does."""
    import torch

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        window = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        batch = {"input": window[:, :-1].contiguous(), "label": window[:, 1:].contiguous()}
        batches.append({k: v.pin_memory() for k, v in batch.items()} if pin else batch)
    return batches


def _throughput(elapsed_s: float, steps: int, batch_size: int, seq_len: int, flops: int, peak_flops: float | None,
                device: torch.device) -> dict:
    import torch

    from mobilellm_train.metrics import peak_memory_bytes

    tokens_per_second = steps * batch_size * seq_len / elapsed_s
    out = {
        "tokens_per_second": tokens_per_second,
        "mfu": None if peak_flops is None else tokens_per_second * flops / peak_flops,
        "step_time_ms": 1e3 * elapsed_s / steps,
        "peak_memory_gib": peak_memory_bytes(device) / 2**30,
    }
    if device.type == "cuda":
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


# Which attention kernel SDPA dispatched to, by the aten op the profiler records (these names are
# the same on torch 2.11 and 2.13); the first match wins, so the CPU variant comes before flash.
SDPA_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_attention_math", "math"),
    ("flex_attention", "flex"),
)
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def sdpa_kernels(op_names) -> str:
    """The attention kernels among profiled op names, e.g. "flash" or "cudnn+math"; "n/a" if none."""
    found = []
    for name in op_names:
        for op, kernel in SDPA_OPS:
            if op in name:
                if kernel not in found:
                    found.append(kernel)
                break
    return "+".join(sorted(found)) or "n/a"


def detect_sdpa_kernel(run_one_step: Callable[[], object]) -> str:
    """Run one step under torch.profiler (CPU activity: the dispatcher records every aten op,
    compiled graphs' attention included, since inductor calls SDPA as an extern kernel) and name
    the attention kernel(s) it dispatched to."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_one_step()
    return sdpa_kernels(e.key for e in prof.key_averages())


def sdpa_backend_context(backend: str):
    """`--sdpa-backend`: allow only that SDPA kernel (torch.nn.attention.sdpa_kernel); "auto"
    leaves SDPA's own choice."""
    import contextlib

    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend])


def planned_allocated_gib(cfg: C.Config, device: torch.device) -> float | None:
    """The memory planner's peak allocated memory for this one-GPU run (GPU only)."""
    import torch

    if device.type != "cuda":
        return None
    from mobilellm_train.plan import GIB, estimate_config

    total = torch.cuda.get_device_properties(device).total_memory
    return estimate_config(cfg, 1, total / GIB).allocated_bytes / GIB


# ---------------------------------------------------------------------------------------------
# The two ways of training.


def run_ours(cfg: C.Config, device: torch.device, steps: int, warmup_steps: int, dry_compile_s: float = 0.0) -> dict:
    """Time `train.train_step` on the model `train.build_model` builds for `cfg`, one rank.

    `compile_s` is the wall time of the first warm-up step, which compiles (so it includes one
    step's run time), `warmup_s` that of all warm-up steps. `dry_compile_s` (CPU only: a dry run
    of the GPU check) waits that long where the first step would compile."""
    from torch.distributed.tensor import DTensor

    from mobilellm_train.metrics import detect_peak_flops, flops_per_token, reset_peak_memory
    from mobilellm_train.model import count_params
    from mobilellm_train.optim import build_lr_scheduler, build_optimizer
    from mobilellm_train.parallelize import build_mesh
    from mobilellm_train.train import build_model, train_step

    tcfg = cfg.training
    model_args = C.build_model_args(cfg.model)
    reset_peak_memory(device)
    counts_begin = compile_counts()
    mesh = build_mesh(device.type, 1, 1)
    model = build_model(model_args, mesh, device, tcfg, cfg.parallelism, cfg.activation_checkpoint, cfg.compile)
    optimizer = build_optimizer(model, cfg.optimizer, C.peak_lr(cfg.optimizer, tcfg.local_batch_size * tcfg.seq_len))
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, warmup_steps + steps)
    batches = synthetic_batches(2, tcfg.local_batch_size, tcfg.seq_len, model_args.vocab_size, device.type == "cuda")

    def run_steps(first_step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss = grad_norm = None
        for step in range(first_step, first_step + n):
            loss, grad_norm = train_step(model, optimizer, [batches[step % len(batches)]], tcfg.max_norm)[:2]
            scheduler.step()
        return loss, grad_norm

    # As train.py: no cyclic GC inside the loop (its pauses land at random steps).
    gc.collect()
    gc.disable()
    try:
        warm = StepTimer(device)
        warm.begin()
        time.sleep(dry_compile_s)
        run_steps(1, min(1, warmup_steps))
        compile_s = warm.end() if warmup_steps else None
        run_steps(2, warmup_steps - 1)
        warmup_s = warm.end()
        counts_warm = compile_counts()
        timer = StepTimer(device)
        timer.begin()
        loss, grad_norm = run_steps(warmup_steps + 1, steps)
        elapsed_s = timer.end()
    finally:
        gc.enable()
    counts_end = compile_counts()
    sdpa_kernel_used = detect_sdpa_kernel(lambda: run_steps(warmup_steps + steps + 1, 1))
    result = {
        "status": "ok",
        "sdpa_kernel": sdpa_kernel_used,
        "planned_allocated_gib": planned_allocated_gib(cfg, device),
        "local_batch_size": tcfg.local_batch_size,
        **_throughput(elapsed_s, steps, tcfg.local_batch_size, tcfg.seq_len, flops_per_token(model_args, tcfg.seq_len),
                      detect_peak_flops(device, cfg.metrics.peak_tflops), device),
        "final_loss": loss.item(),
        "final_grad_norm": float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm),
        "params": count_params(model_args),
        "compile_s": None if compile_s is None else round(compile_s, 2),
        "warmup_s": round(warmup_s, 2),
        "graphs_compiled_in_warmup": counts_warm["graphs"] - counts_begin["graphs"],
        # Anything compiled after warm-up is a recompile: its cost lands inside the timed steps.
        "graphs_compiled_in_timed_steps": counts_end["graphs"] - counts_warm["graphs"],
        "graph_breaks": counts_end["graph_breaks"] - counts_begin["graph_breaks"],
    }
    return result


def run_hf_baseline(
    model_args: ModelArgs,
    batch_size: int,
    seq_len: int,
    opt: C.OptimizerConfig,
    max_norm: float,
    device: torch.device,
    steps: int,
    warmup_steps: int,
    fused_adamw: bool,
) -> dict:
    """Time the original code's way of training: HF LlamaForCausalLM, fp32 weights under bf16
    autocast, SDPA, the model's fp32-logits loss, clipping, AdamW, as HF Trainer's step does."""
    import torch

    from mobilellm_train.hf import hf_llama_config
    from mobilellm_train.metrics import detect_peak_flops, flops_per_token, reset_peak_memory

    from transformers import LlamaConfig, LlamaForCausalLM

    reset_peak_memory(device)
    config = LlamaConfig(**hf_llama_config(model_args), attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=fused_adamw and device.type == "cuda",
    )
    batches = synthetic_batches(2, batch_size, seq_len, model_args.vocab_size, device.type == "cuda")

    def run_steps(first_step: int, n: int) -> torch.Tensor:
        loss = None
        for step in range(first_step, first_step + n):
            optimizer.zero_grad(set_to_none=True)
            tokens = batches[step % len(batches)]["input"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                # The original passes the inputs as labels; the model shifts them and upcasts the
                # logits to fp32 for the loss. No KV cache in training.
                loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            # HF Trainer's logging_nan_inf_filter (on by default) tests every step's loss on the
            # host: one sync per step, kept because it is the original's behaviour.
            bool(torch.isnan(loss) | torch.isinf(loss))
            optimizer.step()
        return loss

    run_steps(1, warmup_steps)
    timer = StepTimer(device)
    timer.begin()
    loss = run_steps(warmup_steps + 1, steps)
    elapsed_s = timer.end()
    sdpa_kernel_used = detect_sdpa_kernel(lambda: run_steps(warmup_steps + steps + 1, 1))
    result = {
        "status": "ok",
        "sdpa_kernel": sdpa_kernel_used,
        "local_batch_size": batch_size,
        **_throughput(elapsed_s, steps, batch_size, seq_len, flops_per_token(model_args, seq_len),
                      detect_peak_flops(device), device),
        "final_loss": loss.item(),
        "params": sum(p.numel() for p in model.parameters()),  # a tied weight counts once
        "optimizer": "AdamW fused" if fused_adamw and device.type == "cuda" else "AdamW (adamw_torch)",
    }
    return result


# ---------------------------------------------------------------------------------------------
# Presets, output, command line.


def resolve_preset(name: str, config_dir: str) -> str:
    path = name if name.endswith(".toml") else os.path.join(config_dir, f"{name}.toml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(config_dir) if f.endswith(".toml")) if os.path.isdir(config_dir) else []
        raise SystemExit(f"bench: no preset {name!r}: {path} does not exist (presets in {config_dir}: {', '.join(known)})")
    return path


def build_config(toml_path: str, overrides: list[str], local_batch_size: int, seq_len: int) -> C.Config:
    """The preset's config as the trainer would load it, made data-free and checkpoint-free,
    one micro-batch per optimizer step on one rank."""
    # The bench feeds synthetic tokens: data.path only has to pass the config's checks (an
    # existing folder, so the demo corpus' vocabulary check does not apply); nothing is read.
    argv = ["--config", toml_path, "--data.path", os.curdir, "--data.tokenizer_path", "",
            "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false", *overrides]
    if seq_len:
        argv += ["--training.seq_len", str(seq_len)]
    cfg = C.load_config(argv + (["--training.local_batch_size", str(local_batch_size)] if local_batch_size else []),
                        world_size=1)
    cfg.training.global_batch_size = cfg.training.local_batch_size
    return cfg


def environment(device: torch.device) -> dict:
    import torch

    env = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(results: dict) -> str:
    e = results["environment"]
    lines = [
        f"{e['card']}, torch {e['torch']} (CUDA {e['cuda']}), transformers {e['transformers']}, {e['date']}; "
        f"seq_len {results['seq_len'] or 'preset'}, {results['warmup_steps']} warm-up + {results['steps']} timed steps",
        "",
        "| preset | batch | AC | compile | tokens/s/GPU | MFU | peak GiB | step ms | HF batch | HF tokens/s | "
        "HF MFU | HF peak GiB | speed-up | SDPA (ours / HF) | planned GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        ours, base = r["ours"], r.get("baseline") or {}

        def cells(m: dict) -> list[str]:
            if m.get("status") != "ok":
                return [m.get("status", "-")] + ["-"] * 3
            return [f"{m['tokens_per_second']:,.0f}", _fmt(m["mfu"], ".1%"), f"{m['peak_memory_gib']:.1f}",
                    f"{m['step_time_ms']:.0f}"]

        base_cells = cells(base) if base else ["-"] * 4
        lines.append("| " + " | ".join([
            r["preset"], str(ours.get("local_batch_size", "-")), r["activation_checkpoint"], str(r["compile"]).lower(),
            *cells(ours), str(base.get("local_batch_size", "-")), base_cells[0], base_cells[1], base_cells[2],
            _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            f"{ours.get('sdpa_kernel', '-')} / {base.get('sdpa_kernel', '-')}",
            _fmt(ours.get("planned_allocated_gib"), ".1f"),
        ]) + " |")
    oom = [f"{r['preset']} {who} at {m['oom_batch_sizes']}" for r in results["runs"]
           for who, m in (("ours", r["ours"]), ("HF", r.get("baseline") or {})) if m.get("oom_batch_sizes")]
    if oom:
        lines += ["", "Out of memory (then halved): " + "; ".join(oom)]
    errors = [f"{r['preset']}: {m['error']}" for r in results["runs"]
              for m in (r["ours"], r.get("baseline") or {}) if m.get("status") == "error"]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(lines)


def write_results(results: dict, out_dir: str, name: str, table: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=2)), (".md", table + "\n")):
        path = os.path.join(out_dir, name + suffix)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="mobilellm-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other --section.key VALUE arguments override the preset's config, as for mobilellm-train.",
    )
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS,
                        help="TOML names in --config-dir, or paths to TOML files")
    parser.add_argument("--config-dir", default=os.path.join(ROOT, "train_configs"))
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compile, allocator warm-up)")
    parser.add_argument("--local-batch-size", type=int, default=0, help="micro-batch for our trainer; 0: the preset's")
    parser.add_argument("--seq-len", type=int, default=0, help="0: the preset's (2048)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the original-style HF Llama (default: when transformers is installed)")
    parser.add_argument("--baseline-batch-size", type=int, default=0,
                        help="0: the reference measurement's batch for the size (the preset's micro-batch otherwise)")
    parser.add_argument("--baseline-fused-adamw", action="store_true",
                        help="the baseline uses fused AdamW (HF Trainer's default with torch >= 2.8)")
    parser.add_argument("--oom-retry", action=argparse.BooleanOptionalAction, default=True,
                        help="after an out-of-memory, retry at half the micro-batch")
    parser.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default="auto",
                        help="allow only this attention kernel (both trainers); auto: SDPA chooses")
    parser.add_argument("--loss", action="store_true", help="time the lm-head loss variants instead of training")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--loss-iters", type=int, default=5)
    parser.add_argument("--out", default="bench_results", help="folder for <name>.json and <name>.md")
    parser.add_argument("--name", default="", help="file name stem (default: bench, or loss_bench with --loss)")
    parser.add_argument("--dry-compile-s", type=float, default=0.0,
                        help="CPU only (a dry run of launch/gpu_bench.sh): wait this long where the first step compiles")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    i = 0
    while i < len(rest):  # pass --section.key value / --section.key=value through, refuse the rest
        arg = rest[i]
        name = arg[2:].partition("=")[0]
        if not arg.startswith("--") or "." not in name:
            parser.error(f"unrecognized argument: {arg}")
        if "=" in arg:
            overrides.append(arg)
            i += 1
        elif i + 1 < len(rest):
            overrides += rest[i:i + 2]
            i += 2
        else:
            parser.error(f"{arg} needs a value")
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 1 and --warmup-steps >= 0")
    return args, overrides


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Parse every preset's config before any process group or model: a typo fails at once.
    configs = {}
    for preset in args.presets:
        path = resolve_preset(preset, args.config_dir)
        try:
            configs[preset] = (path, build_config(path, overrides, args.local_batch_size, args.seq_len))
        except C.ConfigError as e:
            raise SystemExit(f"bench: {preset}: config error: {e}") from None
    with_baseline = False
    if not args.loss and args.baseline is not False:
        try:
            import transformers  # noqa: F401
        except ImportError:
            if args.baseline:
                raise SystemExit("bench: --baseline needs transformers (pip install transformers)") from None
        else:
            with_baseline = True

    import torch.distributed as dist  # only now: the command line is known to be usable

    from mobilellm_train.train import init_distributed

    _, _, device = init_distributed()
    if args.dry_compile_s and device.type != "cpu":
        raise SystemExit("bench: --dry-compile-s is for CPU dry runs only")
    results = {"environment": environment(device), "seq_len": args.seq_len, "steps": args.steps,
               "sdpa_backend": args.sdpa_backend,
               "warmup_steps": args.warmup_steps, "overrides": overrides}
    try:
        if args.loss:
            name = args.name or "loss_bench"
            results["loss"] = {}
            from mobilellm_train.loss_bench import format_loss_table, run_loss_bench

            for preset, (_, cfg) in configs.items():
                results["loss"][preset] = run_loss_bench(cfg, device, args.chunk_sizes, args.loss_iters)
                write_results(results, args.out, name, format_loss_table(results))
            print(format_loss_table(results))
            return

        name = args.name or "bench"
        results["runs"] = []
        for preset, (path, cfg) in configs.items():
            tcfg = cfg.training
            model_args = C.build_model_args(cfg.model)
            run = {
                "preset": os.path.basename(preset)[:-5] if preset.endswith(".toml") else preset, "config": os.path.relpath(path, ROOT) if path.startswith(ROOT) else path,
                "flavor": cfg.model.flavor, "layer_sharing": cfg.model.layer_sharing, "seq_len": tcfg.seq_len,
                "activation_checkpoint": cfg.activation_checkpoint.mode, "compile": cfg.compile.enable,
                "reshard_after_forward": cfg.parallelism.reshard_after_forward,
            }

            def ours(batch_size: int, cfg=cfg) -> dict:
                cfg = dataclasses.replace(cfg, training=dataclasses.replace(
                    cfg.training, local_batch_size=batch_size, global_batch_size=batch_size))
                return run_ours(cfg, device, args.steps, args.warmup_steps, args.dry_compile_s)

            print(f"bench: {preset}: ours, micro-batch {tcfg.local_batch_size} x {tcfg.seq_len}", flush=True)
            run["started_s"] = round(time.monotonic() - _PROCESS_START, 1)  # after imports, set-up and earlier presets
            with sdpa_backend_context(args.sdpa_backend):
                run["ours"] = with_oom_retry(ours, tcfg.local_batch_size, args.oom_retry, device)
            # Written before the baseline too: a run cut short there keeps our figures.
            partial = {**results, "runs": results["runs"] + [run]}
            write_results(partial, args.out, name, format_table(partial))
            if with_baseline:
                batch = args.baseline_batch_size or REFERENCE_BATCH.get(cfg.model.flavor, tcfg.local_batch_size)

                def baseline(batch_size: int, cfg=cfg, model_args=model_args) -> dict:
                    return run_hf_baseline(model_args, batch_size, cfg.training.seq_len, cfg.optimizer,
                                           cfg.training.max_norm, device, args.steps, args.warmup_steps,
                                           args.baseline_fused_adamw)

                print(f"bench: {preset}: HF baseline, batch {batch} x {tcfg.seq_len}", flush=True)
                with sdpa_backend_context(args.sdpa_backend):
                    run["baseline"] = with_oom_retry(baseline, batch, args.oom_retry, device)
                if run["ours"]["status"] == "ok" and run["baseline"]["status"] == "ok":
                    run["speedup"] = run["ours"]["tokens_per_second"] / run["baseline"]["tokens_per_second"]
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            write_results(results, args.out, name, format_table(results))
        print()
        print(format_table(results))
    finally:
        dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> None:
    """The `mobilellm-bench` command: `main`, then the process ends without the interpreter's
    teardown, which can abort a process that ran collectives (see process_end)."""
    from mobilellm_train.process_end import run_then_end

    run_then_end(main, argv)


if __name__ == "__main__":
    cli()
