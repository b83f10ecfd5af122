"""How long a checkpoint save blocks training, per async mode, for a preset's full training state
(model, AdamW moments, schedule, train state) on one device.

    python -m mobilellm_train.checkpoint_bench --flavor 125M 1.5B --out ckpt_bench.json
    torchrun --nproc_per_node 8 -m mobilellm_train.checkpoint_bench --flavor 1.5B

"blocked" is the time the training loop waits in `Checkpointer.save` (for async modes: until the
state is copied and the write handed to a thread), "total" the time until the checkpoint is
complete on disk, "checksum" the part of it spent computing the CRC-32 manifest of this rank's
files (in the background writer in async modes, so inside "total" but not "blocked"), and
"verify" the time a load spends checking the newest checkpoint against its manifests. Each figure
is the median of --repeats saves after one untimed save.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from mobilellm_train import config as C
from mobilellm_train.checkpoint import Checkpointer, ModelState, OptimizerState, SchedulerState, TrainState
from mobilellm_train.model import count_params
from mobilellm_train.optim import build_lr_scheduler, build_optimizer
from mobilellm_train.parallelize import build_mesh
from mobilellm_train.train import build_model, init_distributed, train_step

MODES = ("disabled", "async", "async_with_pinned_mem")


def measure(flavor: str, modes: list[str], folder: str, repeats: int, device: torch.device, world_size: int) -> dict:
    cfg = C.load_config(["--model.flavor", flavor, "--training.seq_len", "256", "--training.local_batch_size", "1"],
                        world_size=world_size)
    args = C.build_model_args(cfg.model)
    mesh = build_mesh(device.type, world_size, 1)
    model = build_model(args, mesh, device, cfg.training, cfg.parallelism, cfg.activation_checkpoint, cfg.compile)
    optimizer = build_optimizer(model, cfg.optimizer, 1e-4)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, 100)
    tokens = torch.randint(0, args.vocab_size, (1, 257))
    # One real step so that AdamW's moments exist and are saved, as in training.
    train_step(model, optimizer, [{"input": tokens[:, :-1], "label": tokens[:, 1:]}], 1.0)
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer),
              "lr_scheduler": SchedulerState(scheduler), "train_state": TrainState()}
    result = {"parameters": count_params(args), "modes": {}}
    for mode in modes:
        if mode == "async_with_pinned_mem" and device.type != "cuda":
            continue
        ckpt_cfg = C.CheckpointConfig(async_mode=mode, keep_latest_k=1)
        checkpointer = Checkpointer(ckpt_cfg, os.path.join(folder, mode), states, dist.get_rank())
        blocked, total, checksum = [], [], []
        for i in range(repeats + 1):
            dist.barrier()
            begin = time.perf_counter()
            blocked_s = checkpointer.save(i + 1)
            checkpointer.wait()
            if i:  # the first save pays one-time costs (folders, plans, pinned buffers)
                blocked.append(blocked_s)
                total.append(time.perf_counter() - begin)
                checksum.append(checkpointer.writer.checksum_seconds)
        dist.barrier()
        begin = time.perf_counter()
        checkpointer.verify(repeats + 1)
        verify_s = time.perf_counter() - begin
        checkpointer.close()
        result["modes"][mode] = {"blocked_s": statistics.median(blocked), "total_s": statistics.median(total),
                                 "checksum_s": statistics.median(checksum), "verify_s": verify_s,
                                 "checksum_gb_per_rank": checkpointer.writer.checksum_bytes / 1e9}
        shutil.rmtree(os.path.join(folder, mode), ignore_errors=True)
    del model, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", nargs="+", default=["125M"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default="", help="where to write (default: a temporary folder)")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()

    rank, world_size, device = init_distributed()
    folder = args.folder or tempfile.mkdtemp(prefix="ckpt_bench_")
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "ranks": world_size, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "flavors": {},
    }
    for flavor in args.flavor:
        report["flavors"][flavor] = measure(flavor, args.modes, folder, args.repeats, device, world_size)
        if rank == 0:
            for mode, r in report["flavors"][flavor]["modes"].items():
                print(f"{flavor:>5} {mode:<22} blocked {r['blocked_s']:7.3f}s  total {r['total_s']:7.3f}s  "
                      f"checksum {r['checksum_s']:6.3f}s ({r['checksum_gb_per_rank']:.2f} GB)  "
                      f"verify {r['verify_s']:6.3f}s", flush=True)
    if rank == 0:
        print(json.dumps(report))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from mobilellm_train.process_end import run_then_end  # see there: a process that ran collectives

    run_then_end(lambda _argv: main())
