"""The step time of quantization-aware training: one config's model trained with fake quantization
on and off, the two alternating in rounds so that a busy machine slows both alike.

    python -m mobilellm_train.qat_bench --config train_configs/debug.toml [--rounds 5] [--steps 5] \
        [--section.key value ...]

Each round times `--steps` optimizer steps (train_step: forward, backward, clipping, AdamW) of each
model on the same random batch, after one untimed step each; prints the median seconds per step
of each, the median and quartiles of the per-round ratio, the machine, torch and thread count, as
JSON. The config's [qat]
scheme and group size are used; its enable and start_step are not (one model is always on, the
other off). One process, no data or checkpoints.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rounds, steps = 5, 5
    for flag in ("--rounds", "--steps"):
        if flag in argv:
            i = argv.index(flag)
            value = int(argv[i + 1])
            rounds, steps = (value, steps) if flag == "--rounds" else (rounds, value)
            del argv[i: i + 2]
    from mobilellm_train import config as C

    try:
        cfg = C.load_config(argv + ["--qat.enable", "true", "--qat.start_step", "0"], world_size=1)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    import torch
    import torch.distributed as dist

    from mobilellm_train.build import build_model, init_distributed
    from mobilellm_train.optim import build_optimizer
    from mobilellm_train.parallelize import build_mesh
    from mobilellm_train.quantization import describe, set_fake_quantization
    from mobilellm_train.step import train_step

    rank, world_size, device = init_distributed(cfg.comm)
    args, t = C.build_model_args(cfg.model), cfg.training
    if not cfg.model.vocab_size:
        args.vocab_size = cfg.data.demo_vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (t.local_batch_size, t.seq_len + 1), generator=gen)
    batches = [{"input": tokens[:, :-1], "label": tokens[:, 1:]}]
    runs = {}
    for on in (False, True):
        model = build_model(args, build_mesh(device.type, world_size, 1), device, t, cfg.parallelism,
                            cfg.activation_checkpoint, cfg.compile, cfg.qat)
        set_fake_quantization(model, on)
        optimizer = build_optimizer(model, cfg.optimizer, cfg.optimizer.lr)
        train_step(model, optimizer, batches, t.max_norm)  # untimed: first-call allocations, compile
        runs["qat" if on else "plain"] = (model, optimizer, [])
    for _ in range(rounds):
        for model, optimizer, times in runs.values():
            begin = time.perf_counter()
            for _ in range(steps):
                loss, _, _ = train_step(model, optimizer, batches, t.max_norm)
            loss.item()
            times.append((time.perf_counter() - begin) / steps)
    plain, qat = (statistics.median(runs[k][2]) for k in ("plain", "qat"))
    # Each round's two measurements are neighbours in time: their ratio is the robust figure on
    # a shared machine, the quartiles of it say how much the machine moved.
    ratios = sorted(q / p for p, q in zip(runs["plain"][2], runs["qat"][2]))
    print(json.dumps({
        "model": {"dim": args.dim, "n_layers": args.n_layers, "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size},
        "tokens_per_step": t.local_batch_size * t.seq_len, "scheme": describe(cfg.qat.scheme, cfg.qat.group_size),
        "compile": cfg.compile.enable, "ac": cfg.activation_checkpoint.mode,
        "step_s_plain": round(plain, 4), "step_s_qat": round(qat, 4),
        "qat_over_plain": round(statistics.median(ratios), 3),
        "qat_over_plain_quartiles": ([round(q, 3) for q in statistics.quantiles(ratios, n=4)[::2]]
                                     if len(ratios) > 1 else None),
        "rounds": rounds, "steps_per_round": steps, "device": platform.processor() or device.type,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
