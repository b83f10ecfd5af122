"""How a command that ran collectives ends its process: its exit handlers, then `os._exit`,
without the interpreter's teardown.

That teardown frees the Python objects still alive, tensors included, while the process groups'
worker threads (gloo's run loops) may still hold the last collective's tensors: freeing one of
those then needs the interpreter lock from a thread the finalizing interpreter no longer admits,
and the process aborts ("terminate called without an active exception", SIGABRT) after the
command has already done its work or printed its error. Seen with torch 2.11 and 2.13 in about
1 of 10 error exits of the trainer on a loaded machine. The exit handlers (logging, loader and
compile workers, file locks) still run; only the teardown is skipped.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def run_then_end(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> NoReturn:
    """`main(argv)` with Python's exit status and messages (SystemExit, a traceback: 1), then the
    exit handlers, and the process ends."""
    try:
        main(argv)
        status = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        status = 1
    # Not documented, but the exit handlers' own runner, as the interpreter calls it at exit.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
