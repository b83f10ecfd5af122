"""Stops: a stop request (signal or stop file, see resilience.StopRequest) agreed by all ranks
every `job.stop_check_freq` steps, and `training.stop_at_step`.

Imported once training starts (it imports torch).
"""

from __future__ import annotations

from mobilellm_train.resilience import StopRequest


class Stops:
    """Installs the stop-signal handlers on construction; `close()` puts the old ones back."""

    def __init__(self, stop_file: str, check_freq: int, stop_at_step: int):
        self.request = StopRequest(stop_file)
        self.check_freq = check_freq
        self.stop_at_step = stop_at_step
        self.requested = False

    def after_step(self, step: int) -> bool:
        """True when the run stops after `step`. A collective on the steps the request is agreed."""
        # Every rank agrees on the same steps (a multiple of stop_check_freq), so all stop together.
        self.requested = step % self.check_freq == 0 and self.request.agreed()
        return self.requested or step == self.stop_at_step

    @property
    def reason(self) -> str:
        return self.request.reason if self.requested else "training.stop_at_step"

    def close(self) -> None:
        self.request.restore()
