"""An exponential moving average of the weights (`training.ema_decay`): after each optimizer step
`ema = decay x ema + (1 - decay) x weights`, in fp32, kept sharded exactly like the parameters
(each rank updates its own shard; nothing is gathered), saved in every checkpoint as `ema.<name>`
(resharded on load like the model) and resumed exactly. Validation reports its loss beside the
model's; eval, export and generate read it with `--weights ema`.

    ema = EMA(model, decay=0.999)    # does nothing when decay is 0
    ...optimizer step...
    ema.update(skipped)              # on the device: a skipped (non-finite) step leaves it unchanged
    with ema.swapped_in(model):      # the model holds the average inside, its own weights after
        loss = validation_loss(model, batches)

The average starts from the weights the run starts with: the initial weights, those of
checkpoint.initial_load_path, or (resuming a checkpoint written without an EMA) the weights
resumed; the checkpointer calls `start_fresh` then (it is an optional state of the checkpoint).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

logger = logging.getLogger("mobilellm_train")

# Wrapper modules put these into parameter names; the average is stored under the plain model's
# names (those of the checkpoint's "model" entry), so that the tools load it into a plain model.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (the tensor itself when not sharded), sharing its memory."""
    return t.to_local() if isinstance(t, DTensor) else t


def _fp32_copy(p: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of a parameter with its placements: a DTensor of this rank's shard alone."""
    local = _local(p).detach().to(torch.float32, copy=True)
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return local


class EMA(Stateful):
    """The average of `model`'s parameters (a tied weight once, under its first name)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params: dict[str, torch.Tensor] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        if decay:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    self.params[plain_name(name)] = p
                    self.shadow[plain_name(name)] = _fp32_copy(p)

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def start_fresh(self, reason: str) -> None:
        """Start the average from the current weights, logging why."""
        for name, e in self.shadow.items():
            _local(e).copy_(_local(self.params[name]))
        logger.info("weight EMA (training.ema_decay %g) starts from the current weights: %s", self.decay, reason)

    @torch.no_grad()
    def update(self, skipped: torch.Tensor) -> None:
        """After an optimizer step. `skipped`, the step's bool flag on the device, gives a weight of
        0 to a skipped step, so the average stays exactly as it was and the host never waits."""
        if not self.shadow:
            return
        weight = (1.0 - self.decay) * (~skipped).to(torch.float32)
        # One in-place lerp per tensor with a device weight: no temporaries of the shard's size,
        # and no host read of the flag (a foreach lerp takes the weight as a host number).
        for name, e in self.shadow.items():
            _local(e).lerp_(_local(self.params[name]), weight)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Inside, the model's parameters hold the average and the average the weights; both are
        exchanged back, bit for bit, on the way out."""
        self._swap(model)
        try:
            yield
        finally:
            self._swap(model)

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        # FSDP may still hold gathered copies of the shards (reshard_after_forward off): dropped, so
        # that the next forward gathers the shards as they are now.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        for name, e in self.shadow.items():
            weights, average = _local(self.params[name]), _local(e)
            kept = weights.clone()  # one tensor at a time: a block's worth of memory at most
            weights.copy_(average)
            average.copy_(kept)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state_dict: dict) -> None:
        # DCP loads into the tensors state_dict() handed out; anything else is copied in.
        with torch.no_grad():
            for name, value in state_dict.items():
                if value is not self.shadow[name]:
                    self.shadow[name].copy_(value)
