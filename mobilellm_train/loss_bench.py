"""`mobilellm-bench --loss`: the language-model head's loss alone at each preset's shape (micro-batch
x seq_len tokens), the plain fp32-logits cross-entropy against `losses.chunked_cross_entropy` at
several chunk sizes, eager and (on GPU) with the per-chunk arithmetic compiled: time per
forward+backward and peak memory above the inputs.

    mobilellm-bench --loss --presets 125M 1.5B --out bench_results

bench.py parses the command line and writes the results; this module runs and formats them.
"""

from __future__ import annotations

import gc
import json
from typing import TYPE_CHECKING

from mobilellm_train import config as C
from mobilellm_train.measure import StepTimer, with_oom_retry

if TYPE_CHECKING:
    import torch




def run_loss_variant(
    name: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
    compile_chunk: bool, iters: int, device: torch.device,
) -> dict:
    """Time forward+backward of one loss variant and its peak memory above the inputs."""
    import torch.nn.functional as F

    from mobilellm_train.losses import chunked_cross_entropy
    from mobilellm_train.metrics import current_memory_bytes, peak_memory_bytes, reset_peak_memory


    def once() -> torch.Tensor:
        hidden.grad = weight.grad = None
        if chunk_size:
            loss = chunked_cross_entropy(hidden, weight, labels, chunk_size, compile_chunk=compile_chunk)
        else:
            loss = F.cross_entropy((hidden @ weight.T).float(), labels)
        loss.backward()
        return loss.detach()

    once()  # warm-up (and compile)
    hidden.grad = weight.grad = None
    gc.collect()
    base = current_memory_bytes(device)
    reset_peak_memory(device)
    timer = StepTimer(device)
    timer.begin()
    for _ in range(iters):
        loss = once()
    elapsed_s = timer.end()
    peak = peak_memory_bytes(device)
    return {"status": "ok", "variant": name, "chunk_size": chunk_size, "compiled": compile_chunk, "loss": loss.item(),
            "time_ms": 1e3 * elapsed_s / iters, "peak_above_inputs_gib": max(0, peak - base) / 2**30}


def run_loss_bench(cfg: C.Config, device: torch.device, chunk_sizes: list[int], iters: int) -> list[dict]:
    import torch

    model_args = C.build_model_args(cfg.model)
    num_tokens = cfg.training.local_batch_size * cfg.training.seq_len
    # bf16 as under FSDP's mixed precision on GPU; fp32 as the trainer runs on CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(num_tokens, model_args.dim, generator=gen).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(model_args.vocab_size, model_args.dim, generator=gen)).to(device, dtype)
    weight.requires_grad_()
    labels = torch.randint(0, model_args.vocab_size, (num_tokens,), generator=gen).to(device)
    variants = [("plain", 0, False)] + [(f"chunked-{c}", c, False) for c in chunk_sizes]
    if device.type == "cuda":
        variants += [(f"chunked-{c}-compiled", c, True) for c in chunk_sizes]
    results = []
    for name, chunk_size, compiled in variants:
        entry = with_oom_retry(
            lambda _: run_loss_variant(name, hidden, weight, labels, chunk_size, compiled, iters, device),
            1, False, device,
        )
        entry.update(variant=name, num_tokens=num_tokens, dim=model_args.dim, vocab_size=model_args.vocab_size)
        results.append(entry)
        print(json.dumps(entry), flush=True)
    return results


def format_loss_table(results: dict) -> str:
    e = results["environment"]
    lines = [f"{e['card']}, torch {e['torch']}, {e['date']}: lm-head loss, forward + backward",
             "", "| preset | tokens | variant | ms | peak GiB above inputs | loss |", "|---|---|---|---|---|---|"]
    for preset, entries in results["loss"].items():
        for x in entries:
            if x.get("status") == "ok":
                lines.append(f"| {preset} | {x['num_tokens']} | {x['variant']} | {x['time_ms']:.1f} | "
                             f"{x['peak_above_inputs_gib']:.3f} | {x['loss']:.5f} |")
            else:
                lines.append(f"| {preset} | {x['num_tokens']} | {x['variant']} | {x['status']} | - | - |")
    return "\n".join(lines)
