"""The concerns the training loop touches, one small unit each, called by `train.Trainer` at a
named point of every step (before_step, after_step, at_log, at_save, at_stop):

    batches.py      this step's micro-batches from the loader; restarting it after a rewind
    log_record.py   the metrics record: interval loss, throughput, data wait, checkpoint blocking
    nonfinite.py    steps skipped for a non-finite gradient norm, and training.on_nonfinite
    spike_rewind.py a loss spike: back to the newest checkpoint, past the data that led to it
    validation.py   the validation loss every data.val_interval steps
    zero_shot.py    zero-shot tasks every eval.interval_checkpoints saves
    stops.py        stop requests agreed every job.stop_check_freq steps, training.stop_at_step
    garbage.py      Python's garbage collector at fixed steps

Units that train.py re-exports (nonfinite, garbage, validation) import torch only inside their
functions, so that `mobilellm-train --help` imports no torch; the others are imported by the
Trainer once training starts.
"""
