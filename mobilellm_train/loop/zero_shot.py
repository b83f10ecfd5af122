"""Zero-shot evaluation during training: the `eval.tasks` every `eval.interval_checkpoints`
saves and after the last step's save, logged as eval records.

Imported once training starts (it imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mobilellm_train import config as C
from mobilellm_train.evaluation.loading import Tokenizer
from mobilellm_train.evaluation.report import results_to_scalars
from mobilellm_train.evaluation.scoring import evaluate_tasks
from mobilellm_train.evaluation.tasks import TaskDataError, check_task_files, parse_task_names

if TYPE_CHECKING:
    import torch

    from mobilellm_train.metrics import MetricsLogger


class ZeroShotEval:
    """Checks at set-up that every task file exists (a missing one stops the run before
    training, not hours in); `after_save` evaluates when due. A no-op when eval.tasks is empty."""

    def __init__(self, cfg: C.EvalConfig, tokenizer_path: str, total_steps: int):
        self.cfg = cfg
        self.total_steps = total_steps
        self.tasks = parse_task_names(cfg.tasks)
        check_task_files(self.tasks, cfg.data_dir)
        if self.tasks and not tokenizer_path:
            raise TaskDataError("eval.tasks needs the data's tokenizer: set data.tokenizer_path")
        self.tokenizer = Tokenizer(tokenizer_path) if self.tasks else None
        self.saves_since_eval = 0

    def after_save(self, model: torch.nn.Module, step: int, metrics: MetricsLogger) -> None:
        self.saves_since_eval += 1
        if self.tasks and (self.saves_since_eval >= self.cfg.interval_checkpoints or step == self.total_steps):
            # On every rank: FSDP gathers weights inside forward. pad_to_multiple 64 keeps the
            # shapes few, so compiled blocks recompile little.
            results = evaluate_tasks(model, self.tokenizer, self.tasks, self.cfg.data_dir, self.cfg.batch_size,
                                     self.cfg.limit, pad_to_multiple=64)
            metrics.log_eval(step, results_to_scalars(results))
            self.saves_since_eval = 0
