"""torchrun for training runs: the same arguments, with stop signals handed to the ranks.

    python -m mobilellm_train.launch --standalone --nproc_per_node=8 -m mobilellm_train.train --config ...

Plain torchrun turns SIGTERM and SIGINT into its own shutdown: it passes the signal on, kills the
ranks 30 s later whether or not they have saved, and exits non-zero; SIGUSR1 kills it outright and
leaves its ranks training. Here SIGTERM, SIGINT and SIGUSR1 are passed to every rank and torchrun
goes on supervising them: the ranks save at the next step boundary and exit 0, and so does the
launcher. SIGHUP and SIGQUIT keep torchrun's own handling. Once the ranks have exited, the three
are ignored: a Ctrl-C as a run ends does not turn it into a failure. The ranks get this process's
id (MOBILELLM_LAUNCHER_PID) to tell whether their launcher died while they started
(resilience.exit_with_parent). launch/run_train.sh and launch/train.slurm start ranks through
this module.
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.launcher.api import LaunchConfig
from torch.distributed.run import main as torchrun_main

from mobilellm_train.resilience import LAUNCHER_PID_ENV

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def child_pids() -> list[int]:
    """This process's children (torchrun's ranks; it starts each in a session of its own, so a
    signal to the launcher's process group does not reach them)."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name, in parentheses, may contain spaces: the parent id follows the last ")".
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass  # the process ended while we looked
    return pids


def forward_to_ranks(signum: int, frame) -> None:
    for pid in child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "signals_to_handle" not in LaunchConfig.__dataclass_fields__ or not os.path.isdir("/proc"):
        # An older torchrun installs its own handlers over ours; it still stops the ranks, less gently.
        print("mobilellm_train.launch: this torchrun cannot leave signals to the ranks; running it as is",
              file=sys.stderr)
    else:
        for sig in FORWARDED:
            signal.signal(sig, forward_to_ranks)
        argv = ["--signals_to_handle", "SIGHUP,SIGQUIT", *argv]
    # The ranks check that this process still is their parent once they can ask the kernel to
    # signal its death (resilience.exit_with_parent): one started just before a kill -9 here
    # would otherwise train on, unsupervised.
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        torchrun_main(argv)
    finally:
        # Every rank has exited: a stop signal now has nothing to stop. Ignored, it cannot turn a
        # finished run into an exit by signal while Python shuts down (it resets its handlers).
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main()
