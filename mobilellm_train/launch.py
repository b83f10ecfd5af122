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

When the ranks stop with one of our one-line errors (a bad config, data or checkpoint: each rank
writes its line to the error file torchrun gives it, `report_one_line_error`), the launcher prints
that line once, last, and exits with the ranks' status, in place of torchrun's failure block for
every rank; any other failure keeps torchrun's report, tracebacks included.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# The key that marks a rank's error file as holding one of our one-line errors.
ONE_LINE_ERROR = "mobilellm_one_line_error"


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


def report_one_line_error(line: str) -> None:
    """In a rank: hand `line`, the one-line error it exits with, to its launcher, through the
    error file torchrun names (TORCHELASTIC_ERROR_FILE), in torchrun's format. Not under torchrun:
    nothing. Light (no torch): a config error is reported before torch is imported."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}},
              ONE_LINE_ERROR: line}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the launcher then prints torchrun's report instead


def one_line_errors(failures: dict) -> list[str] | None:
    """The distinct one-line errors of the failed ranks, the root cause (the earliest) last; None
    unless the root cause is one (a crash keeps torchrun's report).

    Timestamps are whole seconds: a rank torchrun stopped because another failed has no error
    file and the time torchrun noticed, usually the same second as the failure that caused it.
    Within a second a failure that wrote its error file is therefore the earlier one."""
    ordered = sorted(failures.values(), key=lambda f: (f.timestamp, not os.path.isfile(f.error_file), f.local_rank),
                     reverse=True)
    lines = [f.error_file_data.get(ONE_LINE_ERROR) if isinstance(f.error_file_data, dict) else None
             for f in ordered]
    if not ordered or not isinstance(lines[-1], str):
        return None
    return list(dict.fromkeys(line for line in lines if isinstance(line, str)))


def main(argv: list[str] | None = None) -> None:
    # torchrun's record(): a failure it reports goes on to the error file of an outer launcher.
    from torch.distributed.elastic.multiprocessing.errors import record

    record(launch_reporting)(argv)


def launch_reporting(argv: list[str] | None = None) -> None:
    """launch(); ranks that stopped with our one-line error are reported by that line alone."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch(argv)
    except ChildFailedError as e:
        lines = one_line_errors(e.failures)
        if lines is None:
            raise
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(e.get_first_failure()[1].exitcode or 1) from None


def launch(argv: list[str] | None = None) -> None:
    """torchrun with the stop signals handed to the ranks (the module docstring)."""
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.run import parse_args, run

    from mobilellm_train.resilience import LAUNCHER_PID_ENV

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
        run(parse_args(argv))  # torchrun's main, without its record(): main() reports
    finally:
        # Every rank has exited: a stop signal now has nothing to stop. Ignored, it cannot turn a
        # finished run into an exit by signal while Python shuts down (it resets its handlers).
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main()
