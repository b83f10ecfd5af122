"""The eight zero-shot common-sense tasks of the MobileLLM results table, read from local files
in the layouts of their public releases, turned into lm-evaluation-harness's requests.

Each task tries the file patterns in `TASKS[task].layouts` (relative to the data folder) in
order and takes the first that matches (docs/EVALUATION.md lists them): a folder named as the
task, or as the public dataset repository that lm-evaluation-harness reads (`ai2_arc/ARC-Easy/`,
`super_glue/boolq/`, `openbookqa/main/`, `social_i_qa/`, ...), as `huggingface-cli download
--local-dir` or a copy of the repository leaves it. Parquet files are the Hugging Face hub's;
JSONL files are the hub's records one per line, or the original releases (ARC and OpenBookQA's
nested `question`, PIQA and Social IQa's separate `*-labels.lst`). When nothing matches, the error
lists the accepted patterns and the files under the data folder that look like the task's.

Prompts, choices and gold answers follow the harness's task definitions (lm_eval/tasks/*):

| task | split | context | choices (each scored after a space) |
|---|---|---|---|
| arc_easy, arc_challenge | test | `Question: {question}\\nAnswer:` | choices.text |
| boolq | validation | `{passage}\\nQuestion: {question}?\\nAnswer:` | no, yes |
| piqa | validation | `Question: {goal}\\nAnswer:` | sol1, sol2 |
| siqa | validation | `Q: {context} {question}\\nA:` | answerA, answerB, answerC |
| hellaswag | validation | `preprocess({activity_label}: {ctx_a} {ctx_b.capitalize()})` | preprocess(ending) |
| obqa | test | `{question_stem}` | choices.text |
| winogrande | validation | sentence up to `_` with each option filled in | the rest of the sentence |

Winogrande is the harness's partial scoring: the choices differ in their contexts and share one
continuation, the part of the sentence after the blank.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from mobilellm_train.errors import TaskDataError


@dataclass(frozen=True)
class Example:
    """One multiple-choice question as loglikelihood requests."""

    requests: tuple[tuple[str, str], ...]
    """(context, continuation) per choice; the score of a choice is log p(continuation | context)."""
    choices: tuple[str, ...]
    """The harness's choice strings; acc_norm divides each choice's score by its length."""
    gold: int


@dataclass(frozen=True)
class Layout:
    pattern: str
    """Glob relative to the data folder (--data-dir)."""
    labels: str = ""
    """A file beside the matched one with one label per line (original PIQA / Social IQa)."""
    folder: str = ""
    """The folder part of `pattern`, to group the accepted files in messages."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    """Where the data comes from, for error messages and docs."""
    layouts: tuple[Layout, ...]
    table_metric: str
    """The metric of the MobileLLM table's column: acc_norm where the harness reports one."""
    to_example: Callable[[dict], Example]
    keywords: tuple[str, ...] = ()
    """Lower-case path fragments of the task's files, to point at near misses when none match."""


def _shared_context(context: str, choices: list[str]) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    # The harness's default target_delimiter: each choice is scored as " " + choice.
    return tuple((context, " " + c) for c in choices), tuple(choices)


def _labelled_choices(row: dict, stem_key: str) -> tuple[str, list[str], list[str]]:
    """(question, choice texts, choice labels) from the hub layout or the original nested one."""
    question = row["question"]
    if isinstance(question, dict):  # original ARC / OpenBookQA jsonl: question.stem, question.choices
        return question["stem"], [c["text"] for c in question["choices"]], [c["label"] for c in question["choices"]]
    choices = row["choices"]
    return row[stem_key], list(choices["text"]), list(choices["label"])


def _gold_from_key(labels: list[str], answer_key: str) -> int:
    key = str(answer_key).strip()  # OpenBookQA keys carry stray whitespace; the harness lstrips
    if key not in labels:
        raise ValueError(f"answerKey {answer_key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def arc_example(row: dict) -> Example:
    question, texts, labels = _labelled_choices(row, "question")
    requests, choices = _shared_context(f"Question: {question}\nAnswer:", texts)
    return Example(requests, choices, _gold_from_key(labels, row["answerKey"]))


def obqa_example(row: dict) -> Example:
    if isinstance(row.get("question"), dict):
        stem, texts, labels = _labelled_choices(row, "question_stem")
    else:
        stem, texts, labels = row["question_stem"], list(row["choices"]["text"]), list(row["choices"]["label"])
    requests, choices = _shared_context(stem, texts)
    return Example(requests, choices, _gold_from_key(labels, row["answerKey"]))


def boolq_example(row: dict) -> Example:
    # google/boolq has a bool `answer`; SuperGLUE's copy an int `label`.
    if "answer" not in row and "label" not in row:
        raise KeyError("answer")
    answer = row["answer"] if "answer" in row else row["label"]
    if not isinstance(answer, (bool, int)) or int(answer) not in (0, 1):
        raise ValueError(f"answer must be a bool (or label 0/1), got {answer!r}")
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    requests, choices = _shared_context(context, ["no", "yes"])
    return Example(requests, choices, int(answer))


def piqa_example(row: dict) -> Example:
    requests, choices = _shared_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]])
    gold = int(row["label"])
    if gold not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {row['label']!r}")
    return Example(requests, choices, gold)


def siqa_example(row: dict) -> Example:
    context = f"Q: {row['context']} {row['question']}\nA:"
    requests, choices = _shared_context(context, [row["answerA"], row["answerB"], row["answerC"]])
    gold = int(row["label"]) - 1  # 1-based in the data
    if gold not in (0, 1, 2):
        raise ValueError(f"label must be 1, 2 or 3, got {row['label']!r}")
    return Example(requests, choices, gold)


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup: WikiHow's " [title]" markers become sentence breaks and other
    bracketed artefacts go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(row: dict) -> Example:
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    label = row["label"]
    if label in ("", None):
        raise ValueError("no label (the hellaswag test split is unlabelled; use validation)")
    requests, choices = _shared_context(context, [hellaswag_preprocess(e) for e in row["endings"]])
    return Example(requests, choices, int(label))


def winogrande_example(row: dict) -> Example:
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError(f"sentence has no blank '_': {sentence!r}")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    # Partial scoring: only the words after the blank are scored, so the options' own
    # likelihoods (one name may simply be rarer) do not decide.
    continuation = " " + sentence[blank + 1 :].strip()
    answer = str(row["answer"])
    if answer not in ("1", "2"):
        raise ValueError(f"answer must be '1' or '2', got {row['answer']!r}")
    return Example(tuple((c, continuation) for c in contexts), tuple(contexts), int(answer) - 1)


def _layouts(folders: tuple[str, ...], patterns: tuple[str, ...], labels: dict[str, str] | None = None
             ) -> tuple[Layout, ...]:
    """Every pattern under every folder, folder by folder; `labels` maps a pattern to the labels
    file beside its match."""
    labels = labels or {}
    return tuple(
        Layout(f"{folder}/{pattern}", labels.get(pattern, ""), folder) for folder in folders for pattern in patterns
    )


def _arc_layouts(task: str, config: str) -> tuple[Layout, ...]:
    in_config = (f"{config}/test-*.parquet", f"{config}/{config}-Test.jsonl")
    return (
        # A folder of its own may drop the config level; ai2_arc/ holds both configs, so not there.
        *_layouts((task,), (*in_config, "test-*.parquet", f"{config}-Test.jsonl")),
        *_layouts(("ai2_arc", "allenai/ai2_arc", "ARC-V1-Feb2018-2"), in_config),
    )


_PIQA_PATTERNS = ("valid.jsonl", "validation.parquet", "validation-*.parquet", "data/validation-*.parquet",
                  "plain_text/validation/*.parquet", "plain_text/validation-*.parquet")
_SIQA_PATTERNS = ("dev.jsonl", "socialiqa-train-dev/dev.jsonl", "validation.parquet", "validation-*.parquet",
                  "data/validation-*.parquet", "default/validation/*.parquet", "default/validation-*.parquet")
_HELLASWAG_PATTERNS = ("data/validation-*.parquet", "validation-*.parquet", "validation.parquet",
                       "default/validation/*.parquet", "hellaswag_val.jsonl", "data/hellaswag_val.jsonl")
_OBQA_PATTERNS = ("main/test-*.parquet", "test-*.parquet", "Main/test.jsonl", "test.jsonl",
                  "OpenBookQA-V1-Sep2018/Data/Main/test.jsonl", "Data/Main/test.jsonl")
_WINOGRANDE_PATTERNS = ("winogrande_xl/validation-*.parquet", "winogrande_xl/validation/*.parquet",
                        "validation-*.parquet", "dev.jsonl", "winogrande_1.1/dev.jsonl")

TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(
        "arc_easy", "allenai/ai2_arc, config ARC-Easy, split test", _arc_layouts("arc_easy", "ARC-Easy"),
        "acc_norm", arc_example, ("arc-easy", "arc_easy"),
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge", "allenai/ai2_arc, config ARC-Challenge, split test",
        _arc_layouts("arc_challenge", "ARC-Challenge"), "acc_norm", arc_example, ("arc-challenge", "arc_challenge"),
    ),
    "boolq": TaskSpec(
        "boolq", "google/boolq, split validation, or super_glue (aps/super_glue), config boolq",
        (
            *_layouts(("boolq", "google/boolq"), ("data/validation-*.parquet", "validation-*.parquet", "dev.jsonl",
                                                  "val.jsonl")),
            # SuperGLUE: the hub's boolq config, or the original release's BoolQ/val.jsonl.
            *_layouts(("super_glue", "aps/super_glue"), ("boolq/validation-*.parquet", "BoolQ/val.jsonl")),
            Layout("BoolQ/val.jsonl"),
        ),
        "acc", boolq_example, ("boolq",),
    ),
    "piqa": TaskSpec(
        "piqa", "ybisk/piqa (baber/piqa), split validation (original release: valid.jsonl + valid-labels.lst)",
        _layouts(("piqa", "ybisk/piqa", "baber/piqa"), _PIQA_PATTERNS, {"valid.jsonl": "valid-labels.lst"}),
        "acc_norm", piqa_example, ("piqa",),
    ),
    "siqa": TaskSpec(
        "siqa", "allenai/social_i_qa, split validation (original release: dev.jsonl + dev-labels.lst)",
        _layouts(("siqa", "social_i_qa", "allenai/social_i_qa"), _SIQA_PATTERNS,
                 {"dev.jsonl": "dev-labels.lst", "socialiqa-train-dev/dev.jsonl": "dev-labels.lst"}),
        "acc", siqa_example, ("siqa", "social_i_qa", "socialiqa"),
    ),
    "hellaswag": TaskSpec(
        "hellaswag", "Rowan/hellaswag, split validation (original release: hellaswag_val.jsonl)",
        _layouts(("hellaswag", "Rowan/hellaswag"), _HELLASWAG_PATTERNS),
        "acc_norm", hellaswag_example, ("hellaswag",),
    ),
    "obqa": TaskSpec(
        "obqa", "allenai/openbookqa, config main, split test",
        (*_layouts(("obqa", "openbookqa", "allenai/openbookqa"), _OBQA_PATTERNS),
         Layout("OpenBookQA-V1-Sep2018/Data/Main/test.jsonl")),
        "acc_norm", obqa_example, ("obqa", "openbookqa"),
    ),
    "winogrande": TaskSpec(
        "winogrande", "allenai/winogrande, config winogrande_xl, split validation (original release: dev.jsonl)",
        (*_layouts(("winogrande", "allenai/winogrande"), _WINOGRANDE_PATTERNS), Layout("winogrande_1.1/dev.jsonl")),
        "acc", winogrande_example, ("winogrande",),
    ),
}
"""The table's columns, in the order of the MobileLLM paper's results table."""


def _read_parquet(path: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for non-parquet bytes
        raise TaskDataError(f"{path}: cannot read as Parquet ({e})") from None
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def _read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TaskDataError(f"{path}:{line_number}: invalid JSON ({e})") from None
            except RecursionError:
                raise TaskDataError(f"{path}:{line_number}: invalid JSON (nested too deeply to parse)") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}:{line_number}: expected a JSON object")
            yield f"{path}:{line_number}", row


def _with_labels(rows: list[tuple[str, dict]], labels_path: str) -> list[tuple[str, dict]]:
    if not os.path.isfile(labels_path):
        raise TaskDataError(f"{labels_path}: missing; the original release keeps the labels there")
    with open(labels_path) as f:
        labels = [line.strip() for line in f if line.strip()]
    if len(labels) != len(rows):
        raise TaskDataError(f"{labels_path}: {len(labels)} labels for {len(rows)} records")
    return [(where, {**row, "label": label}) for (where, row), label in zip(rows, labels)]


def expected_files(name: str, data_dir: str) -> list[str]:
    """The accepted files, one line per folder: `<data_dir>/<folder>/: pattern, pattern, ...`."""
    by_folder: dict[str, list[str]] = {}
    for layout in TASKS[name].layouts:
        rel = layout.pattern[len(layout.folder) + 1:] if layout.folder else layout.pattern
        by_folder.setdefault(layout.folder, []).append(rel + (f" (+ {layout.labels})" if layout.labels else ""))
    return [f"{os.path.join(data_dir, folder, '')}: {', '.join(patterns)}" for folder, patterns in by_folder.items()]


NEAR_MISS_SUFFIXES = (".parquet", ".jsonl", ".json", ".lst", ".csv", ".tsv", ".txt", ".arrow", ".zip", ".gz")


def near_misses(data_dir: str, keywords: tuple[str, ...], limit: int = 8, max_entries: int = 20000) -> list[str]:
    """Data files under `data_dir` whose path (lower case) holds one of `keywords`: what the user
    probably meant, in another split, name or depth. A bounded walk: a huge folder is not read whole."""
    found: list[str] = []
    seen = 0
    for root, dirs, files in os.walk(data_dir):
        dirs.sort()
        rel_root = os.path.relpath(root, data_dir)
        if rel_root.count(os.sep) >= 5:
            dirs[:] = []
        for f in sorted(files):
            seen += 1
            rel = os.path.normpath(os.path.join(rel_root, f))
            if f.lower().endswith(NEAR_MISS_SUFFIXES) and any(k in rel.lower() for k in keywords):
                found.append(rel)
                if len(found) == limit:
                    return found
        if seen > max_entries:
            break
    return found


def find_task_files(name: str, data_dir: str) -> tuple[list[str], Layout]:
    """The files of the first layout that matches under data_dir; TaskDataError if none, listing
    the accepted patterns and the near misses."""
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    for layout in TASKS[name].layouts:
        files = sorted(glob.glob(os.path.join(data_dir, layout.pattern)))
        if files:
            return files, layout
    expected = "\n  ".join(expected_files(name, data_dir))
    message = f"{name}: no data found ({TASKS[name].source}); expected one of:\n  {expected}"
    misses = near_misses(data_dir, TASKS[name].keywords) if os.path.isdir(data_dir) else []
    if misses:
        message += ("\n  these files look like the task's but match none of the above (another split, "
                    "name or folder?):\n    " + "\n    ".join(os.path.join(data_dir, m) for m in misses))
    raise TaskDataError(message)


def check_task_files(names: list[str], data_dir: str) -> None:
    """Find every task's files; one TaskDataError naming every task that has none."""
    problems = []
    for name in names:
        try:
            find_task_files(name, data_dir)
        except TaskDataError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise TaskDataError(problems[0])
    if problems:
        raise TaskDataError(f"{len(problems)} of {len(names)} tasks have no data under {data_dir}:\n"
                            + "\n".join(problems))


def load_task(name: str, data_dir: str, limit: int = 0) -> list[Example]:
    """The task's examples in file order; the first `limit` of them when limit > 0."""
    files, layout = find_task_files(name, data_dir)
    spec = TASKS[name]
    examples: list[Example] = []
    for path in files:
        rows = list(_read_parquet(path) if path.endswith(".parquet") else _read_jsonl(path))
        if layout.labels:
            rows = _with_labels(rows, os.path.join(os.path.dirname(path), layout.labels))
        for where, row in rows:
            try:
                examples.append(spec.to_example(row))
            except KeyError as e:
                raise TaskDataError(f"{where}: missing field {e} for {name} ({spec.source})") from None
            except (ValueError, TypeError, AttributeError) as e:
                raise TaskDataError(f"{where}: {e}") from None
            if limit and len(examples) == limit:
                return examples
    if not examples:
        raise TaskDataError(f"{name}: {', '.join(files)} hold no records")
    return examples


def parse_task_names(spec: str) -> list[str]:
    """A comma list of task names, `commonsense` standing for all eight, as the names in table
    order; a ValueError names an unknown one."""
    names: set[str] = set()
    for item in (s.strip() for s in spec.split(",")):
        if item == "commonsense":
            names.update(TASKS)
        elif item in TASKS:
            names.add(item)
        elif item:
            raise ValueError(f"unknown task {item!r}; tasks: commonsense, {', '.join(TASKS)}")
    return [name for name in TASKS if name in names]
