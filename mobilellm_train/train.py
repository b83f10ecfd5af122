"""Pretrain a MobileLLM: `cli` -> `main` -> `run` (errors a user can act on: one line, exit 1) -> `train`
-> `Trainer`: its set-up in named phases, then `Trainer.train()`, the loop, which calls each
concern (mobilellm_train/loop/) at a named point of the step.

    mobilellm-train --config train_configs/debug.toml               # CPU, demo corpus, a minute
    NGPU=8 launch/run_train.sh --config train_configs/125M.toml --data.path /data/tokens
    python -m mobilellm_train.train --help                          # every config field

Restarting the same command in the same --job.dump_folder resumes from its newest complete
checkpoint, data position included.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

from mobilellm_train import config as C
from mobilellm_train.build import (
    build_checkpointer,
    build_model,
    build_train_data,
    init_distributed,
    plan_batches,
    resolve_data,
    setup_logging,
)
from mobilellm_train.errors import NonFiniteError
from mobilellm_train.loop.garbage import GarbageCollection
from mobilellm_train.loop.nonfinite import NonFiniteSteps
from mobilellm_train.loop.validation import Validation, _validation_loss, validation_loss  # noqa: F401
from mobilellm_train.run_config import report_config_change, write_effective_config
from mobilellm_train.run_parts import RunParts
from mobilellm_train.start_checks import (
    apply_data_vocab_size,
    check_checkpoint_space,
    check_initial_tokenizer,
    describe_run,
)
from mobilellm_train.step import clip_grad_norm_, step_on_device, train_step  # noqa: F401

# torch and the modules built on it are imported inside the functions that use them, so that
# --help and command-line errors answer at once (importing torch takes seconds).

logger = logging.getLogger("mobilellm_train")


class Trainer:
    """One start of a run. The constructor sets it up in order: the run folder and process group,
    the batch plan, the model, the optimizer, the data, the checkpointer. `resume()` restores the
    newest checkpoint; `train()` is the loop, and `shut_down()` its orderly end."""

    def __init__(self, cfg: C.Config, parts: RunParts):
        self.cfg, self.tcfg, self.parts = cfg, cfg.training, parts
        self.join_run()
        self.plan = plan_batches(self.tcfg, cfg.optimizer, self.world_size)
        self.set_up_model()
        self.set_up_optimizer()
        self.set_up_data()
        self.set_up_checkpointer()

    def join_run(self) -> None:
        """The run-folder lock, the process group, logging."""
        from mobilellm_train.resilience import StaleStopFile, exit_with_parent

        cfg = self.cfg
        exit_with_parent()  # under torchrun: a rank never trains on after its launcher died
        self.dump_folder = cfg.job.dump_folder
        if int(os.environ.get("RANK", "0")) == 0:
            # Before the process group: a busy folder stops the run before any rank waits on it.
            self.parts.hold_run_folder(self.dump_folder, cfg.checkpoint)
        self.rank, self.world_size, self.device = init_distributed(cfg.comm, cfg.job.dump_folder)
        setup_logging(self.rank)
        # Checked now (rank 0), removed only once the start is past every refusal (resume()).
        self.stale_stop_file = StaleStopFile(cfg.job.stop_file if self.rank == 0 else "")
        logger.info("%s: %d rank(s) on %s, run folder %s", describe_run(cfg), self.world_size, self.device.type,
                    self.dump_folder)

    def set_up_model(self) -> None:
        """The memory check, the profiler, the mesh and the wrapped, initialised model."""
        import torch

        from mobilellm_train.loop.ema import EMA
        from mobilellm_train.metrics import flops_per_token
        from mobilellm_train.model import count_params
        from mobilellm_train.parallelize import build_mesh
        from mobilellm_train.plan import check_memory
        from mobilellm_train.profiling import StepProfiler

        cfg, tcfg, device, plan = self.cfg, self.tcfg, self.device, self.plan
        torch.manual_seed(tcfg.seed)
        self.on_gpu = on_gpu = device.type == "cuda"
        apply_data_vocab_size(cfg, self.dump_folder)  # unless given: the data's, or a resumed checkpoint's
        self.model_args = model_args = C.build_model_args(cfg.model)
        # Before anything is allocated: a config that cannot fit stops here, not with an OOM mid-compile.
        check_memory(cfg, self.world_size, device, torch.cuda.get_device_name(device) if on_gpu else "cpu",
                     torch.cuda.get_device_properties(device).total_memory if on_gpu else None)
        self.profiler = StepProfiler(cfg.profiling, self.dump_folder, self.rank, device)
        self.mesh = build_mesh(device.type, self.world_size, cfg.parallelism.dp_replicate)
        self.model = build_model(
            model_args, self.mesh, device, tcfg, cfg.parallelism, cfg.activation_checkpoint, cfg.compile, cfg.qat
        )
        self.ema = EMA(self.model, tcfg.ema_decay)  # a no-op when training.ema_decay is 0
        self.flops_per_token = flops_per_token(model_args, tcfg.seq_len)
        logger.info(
            "model %s%s: %s parameters, %.2f GFLOPs/token; global batch %d x %d tokens (%d micro-batches of %d "
            "per rank), %d steps = %.3g tokens, peak lr %.3g",
            "LS-" if model_args.layer_sharing else "", cfg.model.flavor, f"{count_params(model_args):,}",
            self.flops_per_token / 1e9, plan.global_batch, tcfg.seq_len, plan.accum_steps, tcfg.local_batch_size,
            plan.total_steps, plan.total_steps * plan.global_batch_tokens, plan.lr,
        )

    def set_up_optimizer(self) -> None:
        from mobilellm_train.optim import build_lr_scheduler, build_optimizer

        self.optimizer = build_optimizer(self.model, self.cfg.optimizer, self.plan.lr)
        self.scheduler = build_lr_scheduler(self.optimizer, self.cfg.lr_scheduler, self.plan.total_steps)

    def set_up_data(self) -> None:
        """The training loader, the validation set, the zero-shot tasks and the distillation teacher or
        cache (each refuses bad input now)."""
        from mobilellm_train.distill.distiller import build_distiller, val_logits_folder
        from mobilellm_train.loop.zero_shot import ZeroShotEval

        cfg, tcfg = self.cfg, self.tcfg
        data_path, tokenizer_path = resolve_data(cfg.data, self.dump_folder, self.rank)
        self.loader, self.data_state, self.tokenizer_path = build_train_data(
            cfg.data, data_path, tokenizer_path, tcfg, self.model_args.vocab_size, self.rank, self.world_size,
            self.on_gpu, teacher_logits=cfg.distill.logits if cfg.distill.alpha > 0 else "",
        )
        if self.rank == 0 and hasattr(self.loader, "skip_steps"):  # prepared shards know their windows
            from mobilellm_train.data.budget import check_data_budget

            check_data_budget(self.loader, self.plan.total_steps)
        self.validation = Validation(cfg.data, tcfg, self.rank, self.world_size, self.model_args.vocab_size,
                                     self.tokenizer_path, self.plan.total_steps, self.ema, val_logits_folder(cfg.distill))
        self.distiller = build_distiller(cfg.distill, tcfg, cfg.compile, cfg.checkpoint.verify, self.model_args,
                                         self.tokenizer_path, self.mesh, self.device, self.rank)
        # The task files are found now, so a missing one stops the run before training, not hours in.
        self.zero_shot = ZeroShotEval(cfg.eval, self.tokenizer_path, self.plan.total_steps)

    def set_up_checkpointer(self) -> None:
        check_initial_tokenizer(self.cfg.checkpoint, self.dump_folder, self.tokenizer_path, self.rank)
        self.checkpointer, self.train_state = build_checkpointer(
            self.cfg.checkpoint, self.dump_folder, self.model, self.optimizer, self.scheduler, self.data_state,
            self.model_args, self.rank, self.world_size, self.tokenizer_path, C.to_toml(self.cfg), self.ema,
            self.cfg.qat,
        )
        self.parts.checkpointer = self.checkpointer

    def resume(self) -> bool:
        """Restore the newest checkpoint. False, with the run ended, when it already reaches the budget."""
        import torch.distributed as dist

        state, total_steps = self.train_state, self.plan.total_steps
        self.checkpointer.maybe_resume(state)
        if state.step >= total_steps:
            logger.info("step %d already reaches the budget of %d steps; nothing to do", state.step, total_steps)
            self.checkpointer.close()
            dist.destroy_process_group()
            return False
        # Past every other refusal, before the first step: room for the checkpoints to come.
        check_checkpoint_space(self.cfg.checkpoint, self.checkpointer.folder, self.model_args, self.tokenizer_path,
                               state.step, total_steps, self.rank, self.ema.enabled)
        if self.rank == 0:
            # Only now, past every refusal: config.toml describes the checkpoints beside it.
            previous = write_effective_config(self.cfg, self.dump_folder)
            report_config_change(self.checkpointer.resumed_train_state, previous, self.cfg, self.world_size, state.step)
            self.stale_stop_file.remove()
        self.parts.training_started = True  # from here on, an error keeps what the run folder holds
        return True

    def start_loop(self) -> None:
        """The units the loop calls, in the order their start matters."""
        from mobilellm_train.loop.batches import StepBatches
        from mobilellm_train.loop.log_record import LogRecord
        from mobilellm_train.loop.qat import QATSwitch
        from mobilellm_train.loop.spike_rewind import SpikeRewind
        from mobilellm_train.loop.stops import Stops
        from mobilellm_train.metrics import MetricsLogger, detect_peak_flops

        cfg, tcfg, plan = self.cfg, self.tcfg, self.plan
        # Records past the step resumed from belong to the interrupted run; this run logs them again.
        self.metrics = self.parts.metrics = MetricsLogger(self.dump_folder, self.rank, cfg.metrics.enable_tensorboard,
                                                          resume_step=self.train_state.step)
        peak_flops = detect_peak_flops(self.device, cfg.metrics.peak_tflops)
        self.stops = Stops(cfg.job.stop_file, cfg.job.stop_check_freq, tcfg.stop_at_step, self.train_state.step,
                           cfg.checkpoint.enable)
        self.batches = StepBatches(self.loader, plan.accum_steps, self.parts)
        self.spike_rewind = SpikeRewind(tcfg, self.world_size, self.checkpointer, self.train_state, self.batches,
                                        self.metrics)
        self.batches.start()  # after the resume, so it starts at the restored position
        self.garbage = GarbageCollection(tcfg.gc_freq, tcfg.gc_full_freq)
        self.qat = QATSwitch(cfg.qat, self.model, self.train_state.step)
        self.record = LogRecord(self.device, self.world_size, plan.global_batch_tokens, plan.total_steps,
                                self.flops_per_token, peak_flops, self.metrics.elapsed_before)
        self.nonfinite = NonFiniteSteps(tcfg.on_nonfinite, tcfg.max_skipped_steps, self.checkpointer.describe_newest)
        self.first_step = True

    def train(self) -> None:
        """The loop: one optimizer step per pass, each concern at its named point."""
        self.start_loop()
        state, total_steps = self.train_state, self.plan.total_steps
        while state.step < total_steps:
            step = state.step + 1
            self.before_step(step)
            wait_begin = time.perf_counter()
            batches = self.batches.next_step()
            self.record.data_wait_s += time.perf_counter() - wait_begin
            loss_terms = {}
            loss_sum, grad_norm, skipped = train_step(
                self.model, self.optimizer, batches, self.tcfg.max_norm,
                before_update=self.checkpointer.wait_for_staging, loss_terms=loss_terms, distiller=self.distiller,
            )
            self.ema.update(skipped)
            step_lr = self.after_step(step, loss_sum, grad_norm, skipped, loss_terms)
            # The spike check reads the loss on the host every step anyway, so it reads the flag too.
            if self.spike_rewind.enabled and step not in self.nonfinite.check(step):
                if self.spike_rewind.after_step(step, loss_sum):
                    self.record.restart()  # the interval's steps were undone
                    continue
            val = self.validation.maybe_run(self.model, step, self.distiller)
            if step % self.cfg.metrics.log_freq == 0 or step == total_steps or val is not None:
                self.at_log(step, step_lr, grad_norm, val)
            stopping = self.stops.after_step(step)
            if self.cfg.checkpoint.enable and (step % self.cfg.checkpoint.interval == 0 or step == total_steps
                                               or stopping):
                self.at_save(step)
            if stopping:
                self.at_stop(step)
                break
        self.shut_down()

    def before_step(self, step: int) -> None:
        self.checkpointer.raise_if_failed()  # a background save that failed stops the run here
        self.profiler.step_begin(step)
        self.garbage.collect(step)
        self.qat.before_step(step)  # fake quantization from qat.start_step on

    def after_step(self, step: int, loss_sum, grad_norm, skipped, loss_terms: dict) -> float:
        """The step's bookkeeping; returns the lr the step used."""
        self.nonfinite.record(step, skipped, grad_norm, loss_sum)
        if self.first_step:
            from mobilellm_train.resilience import set_train_timeout

            set_train_timeout(self.cfg.comm)
            self.first_step = False
        step_lr = self.scheduler.get_last_lr()[0]  # the lr this step used, before the schedule moves on
        self.scheduler.step()
        self.train_state.step = step
        self.train_state.tokens_seen += self.plan.global_batch_tokens
        self.record.add_step(loss_sum, loss_terms)
        self.profiler.step_end(step)
        return step_lr

    def at_log(self, step: int, step_lr: float, grad_norm, val: dict | None) -> None:
        self.nonfinite.check(step)
        record = self.record.take(step, step_lr, grad_norm, self.train_state.tokens_seen,
                                  self.nonfinite.skipped_steps, val)
        try:
            self.metrics.log(record)
        except OSError:
            # A full disk fails the save in flight too: report that, the cause, if it did.
            self.checkpointer.wait()
            raise

    def at_save(self, step: int) -> None:
        # A step the policy would stop at must not slip into a checkpoint first.
        self.nonfinite.check(step)
        save_begin = time.perf_counter()
        self.record.checkpoint_blocked_s = self.checkpointer.save(step)
        self.zero_shot.after_save(self.model, step, self.metrics)
        # Keep save and evaluation time out of the throughput figure.
        self.record.exclude(time.perf_counter() - save_begin)

    def at_stop(self, step: int) -> None:
        logger.info("stopping after step %d (%s); rerun the same command to resume", step, self.stops.reason)

    def shut_down(self) -> None:
        import torch.distributed as dist

        state = self.train_state
        self.checkpointer.close()  # the last save must be on disk before the process ends
        self.profiler.close()
        self.stops.close()
        self.garbage.close()
        logger.info("%s at step %d of %d, %.3g tokens seen",
                    "finished" if state.step >= self.plan.total_steps else "stopped",
                    state.step, self.plan.total_steps, state.tokens_seen)
        self.metrics.close()
        dist.destroy_process_group()


def train(cfg: C.Config) -> None:
    """The run; on an error, what it started stops in a safe order before the error goes up."""
    parts = RunParts()
    try:
        run_training(cfg, parts)
    except BaseException:
        parts.shut_down_after_error()
        raise
    if parts.lock is not None:
        parts.lock.release()


def run_training(cfg: C.Config, parts: RunParts) -> None:
    """Set up, resume, train."""
    trainer = Trainer(cfg, parts)
    if trainer.resume():
        trainer.train()


def cli(argv: list[str] | None = None) -> None:
    """The `mobilellm-train` command: `main`, then the process ends without the interpreter's
    teardown, which can abort a process that ran collectives (see process_end)."""
    from mobilellm_train.process_end import run_then_end

    run_then_end(main, argv)


def main(argv: list[str] | None = None) -> None:
    from mobilellm_train.launch import report_one_line_error

    try:
        cfg = C.load_config(argv)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        report_one_line_error(f"config error: {e}")
        raise SystemExit(2) from None
    # Under torchrun, an unexpected exception's traceback lands in the failure summary.
    from torch.distributed.elastic.multiprocessing.errors import record

    record(run)(cfg)


def run(cfg: C.Config) -> None:
    """train(cfg), with the errors a user can act on reported in one line and exit status 1."""
    from mobilellm_train.checkpoint import CheckpointError
    from mobilellm_train.data.jsonl import DataError
    from mobilellm_train.evaluation.tasks import TaskDataError
    from mobilellm_train.launch import report_one_line_error
    from mobilellm_train.resilience import RunFolderError

    try:
        train(cfg)
    except (C.ConfigError, DataError, CheckpointError, NonFiniteError, TaskDataError, RunFolderError) as e:
        # Exit non-zero: torchrun then stops the other ranks instead of leaving them waiting.
        # The kinds of CheckpointError (access, mismatch) are told apart by their words.
        name = "CheckpointError" if isinstance(e, CheckpointError) else type(e).__name__
        line = f"{name}: {own_message(e)}"
        if isinstance(e, RunFolderError):  # raised before logging is set up
            print(line, file=sys.stderr)
        else:
            logger.error("%s", line)
        report_one_line_error(line)  # under a launcher: it prints this line once, for all ranks
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        # Ctrl-C before training started (the loop turns it into a clean stop): nothing to save.
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(130) from None


def own_message(e: BaseException) -> str:
    """The error's own words. One raised in a DataLoader worker reaches the training process
    re-raised with the worker's whole traceback as its text; only the last part is the message."""
    text = str(e)
    marker = "Original Traceback (most recent call last):"
    if marker in text:
        tail = text.split(marker, 1)[1]
        m = re.search(rf"^(?:[\w.]+\.)?{type(e).__name__}: (.*)", tail, re.MULTILINE | re.DOTALL)
        if m:
            return m.group(1).strip()
    return text


if __name__ == "__main__":
    cli()
