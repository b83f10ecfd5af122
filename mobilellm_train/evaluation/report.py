"""Results in the layout of the MobileLLM results table (docs/REFERENCE.md) (a row per model, the eight tasks and their
average, accuracy in %), the paper's own rows to compare with, and TensorBoard scalars.

Each column is one metric per task, `TASKS[task].table_metric`: acc_norm where the harness
reports one (arc_easy, arc_challenge, piqa, hellaswag, obqa), acc otherwise (boolq, siqa,
winogrande). The average is over all eight and is left out while any is missing.
"""

from __future__ import annotations

from mobilellm_train.evaluation.scoring import TaskResult
from mobilellm_train.evaluation.tasks import TASKS

TABLE_TASKS = tuple(TASKS)

# The MobileLLM results table, docs/REFERENCE.md (the MobileLLM README's rows; its header lists the columns in another
# order than its numbers, which are in this one).
PAPER_RESULTS: dict[str, tuple[float, ...]] = {
    "MobileLLM-125M": (43.9, 27.1, 60.2, 65.3, 42.4, 38.9, 39.5, 53.1),
    "MobileLLM-LS-125M": (45.8, 28.7, 60.4, 65.7, 42.9, 39.5, 41.1, 52.1),
    "MobileLLM-350M": (53.8, 33.5, 62.4, 68.6, 44.7, 49.6, 40.0, 57.6),
    "MobileLLM-LS-350M": (54.4, 32.5, 62.8, 69.8, 44.1, 50.6, 45.8, 57.2),
    "MobileLLM-600M": (58.1, 35.8, 61.0, 72.3, 44.9, 55.9, 47.9, 58.6),
    "MobileLLM-1B": (63.0, 39.0, 66.7, 74.4, 45.0, 61.4, 46.8, 62.3),
    "MobileLLM-1.5B": (67.5, 40.9, 65.7, 74.8, 46.4, 64.5, 50.5, 64.7),
}


def table_scores(results: dict[str, TaskResult]) -> dict[str, float]:
    """Each task's table metric, in %."""
    return {name: 100.0 * r.score for name, r in results.items()}


def average(scores: dict[str, float]) -> float | None:
    if not all(t in scores for t in TABLE_TASKS):
        return None
    return sum(scores[t] for t in TABLE_TASKS) / len(TABLE_TASKS)


def format_table(rows: dict[str, dict[str, float]], reference: tuple[str, ...] = ()) -> str:
    """A Markdown table: `rows` maps a model name to its table scores in %; `reference` adds the
    paper's rows of those names below them."""
    lines = [
        "| model | " + " | ".join(TABLE_TASKS) + " | avg |",
        "|---" * (len(TABLE_TASKS) + 2) + "|",
    ]
    all_rows = dict(rows)
    for name in reference:
        all_rows[f"{name} (paper)"] = dict(zip(TABLE_TASKS, PAPER_RESULTS[name]))
    for name, scores in all_rows.items():
        avg = average(scores)
        cells = [f"{scores[t]:.1f}" if t in scores else "-" for t in TABLE_TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if avg is None else f'{avg:.1f}'} |")
    return "\n".join(lines)


def results_to_scalars(results: dict[str, TaskResult], prefix: str = "eval/") -> dict[str, float]:
    """Flat scalars for TensorBoard or metrics.jsonl: <task> (the table metric, in %),
    <task>_acc and <task>_acc_norm (fractions), and avg when all eight tasks are there."""
    scalars: dict[str, float] = {}
    for name, r in results.items():
        scalars[f"{prefix}{name}"] = 100.0 * r.score
        scalars[f"{prefix}{name}_acc"] = r.acc
        scalars[f"{prefix}{name}_acc_norm"] = r.acc_norm
    avg = average(table_scores(results))
    if avg is not None:
        scalars[f"{prefix}avg"] = avg
    return scalars


def log_to_tensorboard(writer, scalars: dict[str, float], step: int) -> None:
    """Write `scalars` with a torch.utils.tensorboard SummaryWriter (None: nothing)."""
    if writer is None:
        return
    for key, value in scalars.items():
        writer.add_scalar(key, value, step)
    writer.flush()
