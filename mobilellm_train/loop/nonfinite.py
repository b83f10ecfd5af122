"""Non-finite steps: which updates were skipped for a non-finite gradient norm, read without a
sync per step, and the `training.on_nonfinite` policy (skip up to max_skipped_steps, or stop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from mobilellm_train.errors import NonFiniteError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("mobilellm_train")


class NonFiniteSteps:
    """The steps whose update was skipped for a non-finite gradient norm, and the
    `training.on_nonfinite` policy applied to them.

    Each step's skip flag stays on the device; `check()` reads all flags since the last check in
    one transfer (on log and checkpoint steps), so no step waits for the host. A skipped update
    changed nothing (see `step_on_device`), so learning of it a few steps late loses nothing.
    """

    def __init__(self, policy: str, max_skipped_steps: int, describe_checkpoint: Callable[[], str]):
        self.policy = policy
        self.describe_checkpoint = describe_checkpoint  # says "intact" only after verifying it
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0  # in this process
        self._pending: list[tuple[int, torch.Tensor]] = []

    def record(self, step: int, skipped: torch.Tensor, grad_norm: torch.Tensor, loss: torch.Tensor) -> None:
        import torch

        self._pending.append((step, torch.stack([skipped.float(), grad_norm.float(), loss.float()])))

    def check(self, current_step: int) -> list[int]:
        """The steps skipped since the last check (each logged); raises NonFiniteError when the
        policy says stop."""
        import torch

        if not self._pending:
            return []
        steps = [step for step, _ in self._pending]
        rows = torch.stack([values for _, values in self._pending]).tolist()  # the one sync
        self._pending.clear()
        skipped = []
        for step, (flag, grad_norm, loss) in zip(steps, rows):
            if not flag:
                continue
            skipped.append(step)
            self.skipped_steps += 1
            problem = f"step {step}: non-finite gradient norm ({grad_norm}), local loss {loss}"
            if self.policy == "stop" or self.skipped_steps > self.max_skipped_steps:
                budget = f" ({self.skipped_steps - 1} steps already skipped)" if self.policy == "skip" else ""
                raise NonFiniteError(
                    f"{problem}; its update was skipped{budget}; stopped at step {current_step}, where the flag "
                    "was read. No non-finite gradient reached the weights. " + self.describe_checkpoint()
                )
            logger.warning("%s; update skipped (%d of at most %d)", problem, self.skipped_steps, self.max_skipped_steps)
        return skipped
