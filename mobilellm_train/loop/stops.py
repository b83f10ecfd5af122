"""Stops: a stop request (signal or stop file, see resilience.StopRequest) agreed by all ranks
every `job.stop_check_freq` steps, and `training.stop_at_step`.

Imported once training starts (it imports torch).
"""

from __future__ import annotations

from mobilellm_train.resilience import StopRequest


class Stops:
    """Installs the stop-signal handlers on construction; `close()`, once the last checkpoint is
    complete, switches them to shutdown mode (a stop signal then ends the run quietly, exit 0).
    `start_step` is the step training resumes from; `saves` whether a stop writes a checkpoint."""

    def __init__(self, stop_file: str, check_freq: int, stop_at_step: int, start_step: int = 0, saves: bool = True):
        self.request = StopRequest(stop_file)
        self.check_freq = check_freq
        self.stop_at_step = stop_at_step
        self.saves = saves
        self.requested = False
        self._note_step(start_step)

    def next_stop_step(self, step: int) -> int:
        """The step a request made after `step` takes effect at: the next stop check (or
        stop_at_step, when that comes first)."""
        check = (step // self.check_freq + 1) * self.check_freq
        return min(check, self.stop_at_step) if self.stop_at_step > step else check

    def _note_step(self, step: int) -> None:
        # Read by the signal handler: a Ctrl-C says which step it stops at, not "this step".
        stop = self.next_stop_step(step)
        what = "and saving a checkpoint of it" if self.saves else "(checkpoint.enable is false: nothing is saved)"
        when = ("training.stop_at_step" if stop % self.check_freq else
                f"the next stop check, job.stop_check_freq {self.check_freq}")
        self.request.interrupt_note = f"stopping after step {stop} ({when}) {what}"

    def after_step(self, step: int) -> bool:
        """True when the run stops after `step`. A collective on the steps the request is agreed."""
        # Every rank agrees on the same steps (a multiple of stop_check_freq), so all stop together.
        self.requested = step % self.check_freq == 0 and self.request.agreed()
        if step % self.check_freq == 0 or step == self.stop_at_step:
            self._note_step(step)
        return self.requested or step == self.stop_at_step

    @property
    def reason(self) -> str:
        return self.request.reason if self.requested else "training.stop_at_step"

    def close(self) -> None:
        self.request.restore()
