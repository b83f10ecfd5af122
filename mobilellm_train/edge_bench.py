"""Our ExecuTorch program against ExecuTorch's own Llama recipe, from the same weights: size,
prefill and decode tokens/s through the runtime on 1 and 2 threads, and peak RSS.

    python -m mobilellm_train.edge_bench --out-dir /tmp/edge_bench [--preset 125M] \
        [--contexts 512 2048] [--quantize 8da4w none] [--embedding-quantize none 8,0 4,32] \
        [--repeats 3] [--threads 1 2] [--jobs 3]

For each context, quantization and embedding quantization it writes our program
(edge.write_program) and the recipe's, exported by the CLI the `executorch` wheel ships:

    python -m executorch.examples.models.llama.export_llama -c ckpt.pth -p params.json \
        -kv --use_sdpa_with_kv_cache -X -qmode 8da4w -G 32 [-E 8,0] -d fp32 \
        --max_seq_length 129 --max_context_length C

(`--embedding-quantize` is ours as `-E` is the recipe's: the same option, the same meaning; the
recipe chooses its embedding scales by HQQ's search and stores them in fp32, ours by the plain
rule QAT simulates, in fp16: quantization.py.) At most --jobs exports run at once (a 125M export
holds a few GB).

from a checkpoint in the recipe's (Meta) layout that `meta_state_dict` maps from our model: the
fused wqkv and w13 split, and the q and k rows of each head permuted from Hugging Face's
rotate-half RoPE to Meta's interleaved pairs (the inverse of transformers' conversion script).
The mapping is checked before anything is measured: the recipe's eager model must give our
logits. Both programs take up to 128 tokens a call (max_seq_length 129: the recipe's bound is
exclusive) and return the last position's logits.

Each measurement is a fresh process (`--measure PTE`), so that its peak RSS is the program's:
load the program, set the runtime's thread count, one warm-up prompt, then a 128-token prompt in
one call (prefill) and 128 greedy single-token calls (decode). Programs and thread counts are
interleaved within each repeat, so that load from other jobs falls on all of them alike; the
first table gives medians, the second ours over the recipe's per repeat (median ratio and range),
with the load average before and after. Existing programs in --out-dir are reused (delete them to
export again): `--export-only` writes them while the machine is busy, a later run measures them.

The worker's own torch runs on one thread whatever the runtime's count: it only picks the next
token between calls, and a second OpenMP thread of torch spinning after that argmax takes a core
from the runtime's worker (on a 2-core VM, two-thread decode fell from ~320 to ~48 tok/s in most
runs). A phone runs the program without torch, so this is also the faithful setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROMPT_TOKENS = 128
DECODE_TOKENS = 128


def meta_state_dict(model) -> dict:
    """Our model's weights in the recipe's (Meta Llama) names and layout, fp32. An LS block is
    written as two equal layers: the recipe has no layer sharing."""
    import torch

    args = model.args
    head_dim, q_dim, kv_dim = args.head_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim

    def interleave(w, heads):
        # Rows of each head from HF's [first halves | second halves] to Meta's (even, odd) pairs.
        return w.view(heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    out = {"tok_embeddings.weight": model.tok_embeddings.weight, "norm.weight": model.norm.weight,
           "output.weight": model.output.weight}
    index = 0
    for block in model.layers:
        wq, wk, wv = block.attention.wqkv.weight.split([q_dim, kv_dim, kv_dim])
        w1, w3 = block.feed_forward.w13.weight.chunk(2)
        for _ in range(block.n_passes):
            p = f"layers.{index}."
            out.update({
                p + "attention.wq.weight": interleave(wq, args.n_heads),
                p + "attention.wk.weight": interleave(wk, args.n_kv_heads),
                p + "attention.wv.weight": wv, p + "attention.wo.weight": block.attention.wo.weight,
                p + "feed_forward.w1.weight": w1, p + "feed_forward.w3.weight": w3,
                p + "feed_forward.w2.weight": block.feed_forward.w2.weight,
                p + "attention_norm.weight": block.attention_norm.weight, p + "ffn_norm.weight": block.ffn_norm.weight,
            })
            index += 1
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def meta_params(args) -> dict:
    return {
        "dim": args.dim, "n_layers": args.n_layers * args.n_passes, "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "hidden_dim": args.ffn_dim,
        "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "use_scaled_rope": False,
    }


def check_mapping(model, state: dict, params: dict) -> float:
    """Largest |logit difference| between our model and the recipe's eager model built from the
    mapped weights, on 16 seeded tokens (raises when the mapping is wrong)."""
    import torch
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs as MetaArgs

    meta = construct_transformer(MetaArgs(**params, max_seq_len=model.args.max_seq_len, max_context_len=model.args.max_seq_len))
    meta.load_state_dict(state, strict=False)
    tokens = torch.randint(0, model.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)[0, -1]
        got = meta(tokens)
        got = (got[0] if isinstance(got, tuple) else got).reshape(-1, model.args.vocab_size)[-1]
    diff = (got - want).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"the recipe's model disagrees with ours by {diff}: the weight mapping is wrong")
    return diff


def recipe_command(folder: str, ckpt: str, params: str, context: int, quantize: str, group_size: int, out: str,
                   embedding: str = "none") -> list:
    cmd = [sys.executable, "-m", "executorch.examples.models.llama.export_llama", "-c", ckpt, "-p", params,
           "-kv", "--use_sdpa_with_kv_cache", "-X", "-d", "fp32", "--max_seq_length", str(PROMPT_TOKENS + 1),
           "--max_context_length", str(context), "--output-dir", folder, "--output_name", out]  # a bare name lands in the cwd
    if quantize != "none":
        cmd += ["-qmode", quantize, "-G", str(group_size)]
    if embedding != "none":
        cmd += ["-E", embedding]
    return cmd


def export_ours(opts, path: str, context: int, quantize: str, embedding: str) -> None:
    """The --export-ours worker: our program of the seeded preset."""
    from mobilellm_train import edge

    edge.write_program(seeded_model(opts.preset, opts.layers), path, max_context=context, quantize=quantize,
                       group_size=opts.group_size, overwrite=True, source=f"{opts.preset} init_weights(seed=0)",
                       embedding_quantize=embedding)


def seeded_model(preset: str, layers: int = 0):
    """The preset with init_weights(seed=0); `layers` > 0 keeps its width but not its depth."""
    from dataclasses import replace

    import torch

    from mobilellm_train.model import MODEL_PRESETS, MobileLLM

    torch.manual_seed(0)
    args = MODEL_PRESETS[preset]
    model = MobileLLM(replace(args, n_layers=layers) if layers else args)
    model.init_weights(seed=0)
    return model.eval()


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started: VmHWM, not getrusage's ru_maxrss,
    which Linux carries over exec from the parent (the benchmark's own model would be counted)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(pte: str, threads: int) -> dict:
    """One measurement in this process (the --measure worker): see the module docstring."""
    import torch

    from mobilellm_train.edge_model import load_custom_ops, maybe_quiet_native_noise

    load_custom_ops()
    torch.set_num_threads(1)  # torch only picks tokens here; the runtime's pool gets the cores
    with maybe_quiet_native_noise():
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(threads)
        method = Runtime.get().load_program(pte).load_method("forward")
    prompt = torch.randint(0, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))

    def call(tokens, start):
        (logits,) = method.execute([tokens, torch.tensor([start], dtype=torch.long)])
        return logits.reshape(-1, logits.shape[-1])[-1]

    call(prompt, 0)  # warm-up
    t0 = time.perf_counter()
    logits = call(prompt, 0)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(DECODE_TOKENS):
        logits = call(logits.argmax().reshape(1, 1), PROMPT_TOKENS + i)
    decode_s = time.perf_counter() - t0
    return {
        "prefill_tok_s": PROMPT_TOKENS / prefill_s,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(pte: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mobilellm_train.edge_bench", "--measure", pte, "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {pte} failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_programs(opts) -> list[dict]:
    """Write (or reuse) ours and the recipe's program for every context and quantization."""
    import torch

    model = seeded_model(opts.preset, opts.layers)
    os.makedirs(opts.out_dir, exist_ok=True)
    ckpt, params_path = os.path.join(opts.out_dir, "meta.pth"), os.path.join(opts.out_dir, "params.json")
    state, params = meta_state_dict(model), meta_params(model.args)
    print(f"mapping checked: max |logit diff| {check_mapping(model, state, params):.2e}", file=sys.stderr)
    if not os.path.isfile(ckpt):
        torch.save(state, ckpt)
        with open(params_path, "w") as f:
            json.dump(params, f)
    programs, commands = [], []
    for quantize in opts.quantize:
        for embedding in opts.embedding_quantize:
            for context in opts.contexts:
                for who in ("ours", "recipe"):
                    tag = "" if embedding == "none" else "_E" + embedding.replace(",", "-")
                    path = os.path.join(opts.out_dir, f"{who}_{quantize}{tag}_{context}.pte")
                    programs.append({"who": who, "quantize": quantize, "embedding": embedding, "context": context,
                                     "path": path})
                    if os.path.isfile(path):
                        continue
                    if who == "ours":
                        cmd = [sys.executable, "-m", "mobilellm_train.edge_bench", "--export-ours", path, "--preset",
                               opts.preset, "--layers", str(opts.layers), "--contexts", str(context), "--quantize",
                               quantize, "--group-size", str(opts.group_size), "--embedding-quantize", embedding]
                    else:
                        cmd = recipe_command(opts.out_dir, ckpt, params_path, context, quantize, opts.group_size, path,
                                             embedding)
                    commands.append((path, cmd))
    run_exports(commands, opts.jobs)
    for prog in programs:
        prog["bytes"] = os.path.getsize(prog["path"])
    return programs


def run_exports(commands: list[tuple[str, list]], jobs: int) -> None:
    """Run the export commands, at most `jobs` at once (they are single-threaded for most of their
    time, and a 125M export holds a few GB); each writes its log beside its program."""
    running: list[tuple] = []
    pending = list(commands)
    while pending or running:
        while pending and len(running) < jobs:
            path, cmd = pending.pop(0)
            log = open(path + ".log", "w")
            running.append((path, time.time(), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        path, t0, proc, log = running.pop(0)
        code = proc.wait(timeout=7200)
        log.close()
        if code != 0 or not os.path.isfile(path):
            for _, _, other, other_log in running:
                other.kill()
                other.wait()
                other_log.close()
            raise RuntimeError(f"exporting {path} failed ({code}); see {path}.log")
        print(f"exported {path} in {time.time() - t0:.0f} s", file=sys.stderr)


def program_name(p: dict) -> str:
    return f"{p['who']} {p['quantize']}" + ("" if p.get("embedding", "none") == "none" else f" -E {p['embedding']}")


def table(programs: list[dict], threads: list[int]) -> str:
    head = ["program", "context", "size MB", "prefill tok/s (1 thread)"]
    head += [f"decode tok/s, {t} thread{'s' if t > 1 else ''}" for t in threads] + ["peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in programs:
        r = p["results"]
        row = [program_name(p), str(p["context"]), f"{p['bytes'] / 1e6:.2f}",
               f"{r[threads[0]]['prefill_tok_s']:.0f}"]
        row += [f"{r[t]['decode_tok_s']:.1f}" for t in threads]
        row.append(f"{max(r[t]['peak_rss_mb'] for t in threads):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(programs: list[dict], threads: list[int]) -> str:
    """Ours over the recipe's, per repeat (the two ran back to back, under the same load), as the
    median ratio with its range: steadier than the ratio of medians when the machine's speed
    drifts over the run. Peak RSS as the difference in MB."""
    head = ["ours / recipe", "context", "prefill (1 thread)"]
    head += [f"decode, {t} thread{'s' if t > 1 else ''}" for t in threads] + ["peak RSS, ours - recipe's (all thread counts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ours in (p for p in programs if p["who"] == "ours"):
        recipe = next(p for p in programs if p["who"] == "recipe" and p["quantize"] == ours["quantize"]
                      and p["embedding"] == ours["embedding"] and p["context"] == ours["context"])

        def pairs(*counts):
            return [(a, b) for t in counts for a, b in zip(ours["runs"][t], recipe["runs"][t])]

        def cell(key, t):
            ratios = [a[key] / b[key] for a, b in pairs(t)]
            return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"

        def rss_cell():
            diffs = [a["peak_rss_mb"] - b["peak_rss_mb"] for a, b in pairs(*threads)]
            return f"{statistics.median(diffs):+.2f} MB [{min(diffs):+.2f} to {max(diffs):+.2f}]"

        row = [program_name(ours).removeprefix("ours "), str(ours["context"]), cell("prefill_tok_s", threads[0])]
        row += [cell("decode_tok_s", t) for t in threads] + [rss_cell()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def torchao_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mobilellm_train.edge_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="/tmp/edge_bench")
    p.add_argument("--preset", default="125M")
    p.add_argument("--layers", type=int, default=0,
                   help="override the preset's depth (its width kept): a quicker export on a busy machine")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--quantize", nargs="+", default=["8da4w"], choices=["none", "8da4w", "8da8w"])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--embedding-quantize", nargs="+", default=["none"],
                   help="embedding schemes (none, 8,0, 4,32): ours --embedding-quantize, the recipe's -E")
    p.add_argument("--jobs", type=int, default=3, help="exports run at once")
    p.add_argument("--export-only", action="store_true",
                   help="write the programs and stop: measure later, on a quiet machine, with the same options")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--measure", default="", help=argparse.SUPPRESS)
    p.add_argument("--export-ours", default="", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.export_ours:
        export_ours(opts, opts.export_ours, opts.contexts[0], opts.quantize[0], opts.embedding_quantize[0])
        return
    if opts.measure:
        print(json.dumps(measure(opts.measure, opts.threads[0])))
        return
    if opts.repeats < 1 or opts.jobs < 1:
        p.error("--repeats and --jobs must be at least 1")
    programs = build_programs(opts)
    if opts.export_only:
        return
    load_before = os.getloadavg()
    runs: dict[tuple, list[dict]] = {}
    for _ in range(opts.repeats):
        for threads in opts.threads:
            for prog in programs:
                runs.setdefault((prog["path"], threads), []).append(run_worker(prog["path"], threads))
    for prog in programs:
        prog["results"] = {
            t: {k: statistics.median(r[k] for r in runs[(prog["path"], t)]) for k in runs[(prog["path"], t)][0]}
            for t in opts.threads
        }
        prog["runs"] = {t: runs[(prog["path"], t)] for t in opts.threads}
    import torch

    from mobilellm_train.edge import executorch_version

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "executorch": executorch_version(),
        "preset": opts.preset, "layers": opts.layers or "preset", "prompt_tokens": PROMPT_TOKENS, "decode_tokens": DECODE_TOKENS,
        "torchao": torchao_version(),
        "repeats": opts.repeats, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "programs": programs,
    }
    with open(os.path.join(opts.out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(table(programs, opts.threads))
    print()
    print(paired_table(programs, opts.threads))
    print(f"\nload average before {load_before}, after {result['load_average_after']}; {result['date']}; "
          f"torch {result['torch']}, executorch {result['executorch']}, torchao {result['torchao']}")


if __name__ == "__main__":
    main()
