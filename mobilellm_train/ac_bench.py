"""What each activation-checkpointing mode costs and saves, per `activation_checkpoint.mode`, for
a preset's block shapes: the tensor memory forward leaves for backward (the saved activations),
the peak tensor memory of forward + backward (gradients included) beyond the model and its
inputs, the time of that step, and how many matmuls backward runs (recomputed ones included).

    python -m mobilellm_train.ac_bench --flavor 125M --n-layers 4 --batch 2 --seq-len 1024
    python -m mobilellm_train.ac_bench --flavor 1B --batch 8 --seq-len 2048 --out ac.json   # GPU, bf16

No FSDP and no compile: the modes are compared on the eager model, one device (on GPU the
parameters are bf16 as in training, on CPU fp32). Memory is counted per tensor storage as ops
create and free them (exact, the same on any machine; no allocator overhead). Time is the median
of --repeats steps after one untimed step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mobilellm_train.config import ActivationCheckpointConfig
from mobilellm_train.model import MODEL_PRESETS, MobileLLM
from mobilellm_train.parallelize import apply_ac

MODES = ("none", "selective", "op", "full")
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _TensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while this mode is on, counted exactly (no
    allocator caching or fragmentation), and their peak; also the number of matmuls run.

    A storage is counted when an op first returns it and dropped when it is freed; what existed
    before the mode was entered (parameters, inputs) is not counted.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = self.peak_bytes = self.matmuls = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func in _MATMULS
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def current_bytes(self) -> int:
        self._sweep()
        return self.live_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: MobileLLM, tokens: torch.Tensor, repeats: int) -> dict:
    device = tokens.device
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        model.zero_grad(set_to_none=True)
        model(inputs, labels=labels).backward()

    step()  # untimed: warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        begin = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - begin)
    model.zero_grad(set_to_none=True)
    with _TensorMemory() as memory:
        loss = model(inputs, labels=labels)
        saved = memory.current_bytes()  # what forward leaves for backward: the activations
        matmuls_before = memory.matmuls
        loss.backward()
        del loss
    return {
        "saved_activations_gib": round(saved / 2**30, 4),
        "peak_gib": round(memory.peak_bytes / 2**30, 4),
        "step_s": round(statistics.median(times), 4),
        "backward_matmuls": memory.matmuls - matmuls_before,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="125M", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--n-layers", type=int, default=0, help="fewer blocks than the preset (0: the preset's)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss-chunk-tokens", type=int, default=512,
                        help="tokens per lm-head chunk: small, so the loss's logits do not hide the blocks' activations")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq_len < 2 or args.repeats < 1 or args.n_layers < 0:
        parser.error("--batch, --repeats must be >= 1, --seq-len >= 2, --n-layers >= 0")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_args = dataclasses.replace(MODEL_PRESETS[args.flavor], max_seq_len=max(args.seq_len, 2048))
    if args.n_layers:
        model_args.n_layers = args.n_layers
    if args.seq_len + 1 > model_args.max_seq_len:
        model_args.max_seq_len = args.seq_len + 1
    torch.manual_seed(0)
    base = MobileLLM(model_args).to(device)
    base.init_weights(seed=0)
    base.to(dtype)
    base.loss_chunk_tokens = args.loss_chunk_tokens
    tokens = torch.randint(0, model_args.vocab_size, (args.batch, args.seq_len + 1), device=device)
    results = {
        "flavor": args.flavor, "n_layers": model_args.n_layers, "batch": args.batch, "seq_len": args.seq_len,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "loss_chunk_tokens": args.loss_chunk_tokens, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "modes": {},
    }
    for mode in args.modes:
        model = copy.deepcopy(base)
        apply_ac(model, ActivationCheckpointConfig(mode=mode, selective_every=2))
        results["modes"][mode] = measure(model, tokens, args.repeats)
        del model
        print(f"{mode:>10}: {results['modes'][mode]}", flush=True)
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
