"""Knowledge distillation from a larger teacher (docs/TRAINING.md, "Distillation"): the loss is
`alpha * KD + (1 - alpha) * CE`, the KD term against the teacher's distribution, online (the
teacher runs beside the student, sharded like it) or from the teacher's top-K log-probabilities
cached on disk beside the tokens (`mobilellm-prepare teacher-logits`). One file per part:

- kd_loss.py    the chunked CE + KD loss and its autograd function, the teacher's targets (top-K
                or full vocabulary), the teacher's top-K chunk by chunk
- teacher.py    the teacher: its shape and fit with the student checked, built sharded, loaded
- distiller.py  what a run adds per micro-batch: the teacher's targets, online or cached
- cache.py      the cached top-K format: manifest, shard writer, reader, verification
- memory.py     what distillation adds to the memory plan (mobilellm-plan)
- heldout.py    the held-out KL between a teacher and a student (python -m mobilellm_train.distill.heldout)

Nothing is imported here: the data loader imports cache.py alone, without torch's model code.
"""
