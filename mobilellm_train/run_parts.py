"""The shutdown order of a run that fails: what it started stops in a safe order (loader workers,
the save in flight, the metrics, the process group, the run-folder lock) before the error goes up.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mobilellm_train.checkpoint import Checkpointer
    from mobilellm_train.config import CheckpointConfig
    from mobilellm_train.metrics import MetricsLogger
    from mobilellm_train.resilience import RunFolderLock
    from mobilellm_train.start_checks import RunFolderRecord

logger = logging.getLogger("mobilellm_train")


class RunParts:
    """What a run has started that must stop in order however the run ends: loader workers
    first (they feed nothing any more), then the save in flight (its writer thread runs
    collectives, so the process group must still exist), the metrics (TensorBoard's unflushed
    records), then the process group, and last the
    run-folder lock (after removing what a refused start added to the folder). Leaving any of
    them to interpreter exit lets C++ threads die in an arbitrary order, which can abort."""

    def __init__(self) -> None:
        self.data_iter = None
        self.checkpointer: Checkpointer | None = None
        self.metrics: MetricsLogger | None = None  # TensorBoard's writer holds what it has not flushed
        self.lock: RunFolderLock | None = None  # set once held
        self.folder_record: RunFolderRecord | None = None  # what this start added to the run folder
        self.training_started = False  # past every start-up refusal

    def hold_run_folder(self, dump_folder: str, checkpoint: CheckpointConfig) -> None:
        """Take the run-folder lock (rank 0), noting first what this start adds to the folder:
        once the lock is held, this start alone may remove that again if it is refused. The lock
        covers the checkpoint folder too: an absolute one may be another run's. A relative one
        must not lead out of the run folder through a link (run_files)."""
        from mobilellm_train.resilience import RunFolderLock
        from mobilellm_train.run_files import check_no_links_below
        from mobilellm_train.start_checks import RunFolderRecord

        checkpoint_folder = os.path.join(dump_folder, checkpoint.folder) if checkpoint.enable else ""
        if checkpoint_folder:  # before its lock file is written there
            check_no_links_below(dump_folder, checkpoint_folder)
        lock = RunFolderLock(dump_folder, checkpoint_folder)
        record = RunFolderRecord(dump_folder)
        lock.acquire()
        self.lock, self.folder_record = lock, record

    def shut_down_after_error(self) -> None:
        import torch.distributed as dist

        close = getattr(self.data_iter, "close", None) or getattr(self.data_iter, "_shutdown_workers", None)
        if close is not None:
            try:
                close()
            except Exception as e:  # the run is failing already; report the first error, not this
                logger.warning("stopping the data loader: %s: %s", type(e).__name__, e)
        # Workers the error's traceback still holds on to (an error raised in a worker keeps its
        # loader iterator alive) would be ended at exit with SIGTERM, which loader workers ignore
        # (see data.jsonl.ignore_stop_signals), and exit would wait for them forever.
        # They are killed instead, after the loader's SIGCHLD handler (which would turn a killed
        # worker into a new error in place of the one being reported) is put back to the default.
        import multiprocessing
        import signal

        if multiprocessing.active_children():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            child.kill()
            child.join(timeout=5)
        if self.checkpointer is not None:
            try:
                self.checkpointer.close()
            except Exception as e:
                logger.warning("the checkpoint in flight did not complete: %s: %s", type(e).__name__, e)
        if self.metrics is not None:
            try:
                self.metrics.close()
            except Exception as e:  # a full disk, most likely: the records written so far stay
                logger.warning("closing the metrics: %s: %s", type(e).__name__, e)
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.lock is not None:
            # A refused start leaves the run folder as it was; removed while the lock is still
            # held, so no other run can be starting in it.
            if not self.training_started and self.folder_record is not None:
                self.folder_record.undo()
            self.lock.release()
