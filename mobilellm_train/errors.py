"""The errors a user can act on, the messages they share, and `parse_json` (JSON whose nesting
ends in an error of its kind, not a RecursionError): the bottom of the import graph.

Every layer may import this module; it imports nothing of the project and nothing heavy (the
command-line tools raise these errors before, or without ever, importing torch). So the data
readers raise `CheckpointError` without importing the checkpointer, and the config check raises
`DataError` without importing the loader. `mobilellm-train` reports each of these in one line
and exits 1 (a `ConfigError` before start: exit 2).
"""

import json
import os

# Python's json parser recurses once per nesting level; thousands of "[" exhaust the stack.
JSON_TOO_DEEP = "invalid JSON: nested too deeply to parse (a RecursionError)"


# Nesting a JSON file of ours may have (configs, manifests, records, per-rank state: at most ~15).
JSON_MAX_DEPTH = 100


def parse_json(data: str | bytes):
    """json.loads, with nesting too deep to parse raised as a ValueError (JSON_TOO_DEEP) like any
    other invalid JSON rather than as a RecursionError, which a reader's `except ValueError`
    would let escape as a traceback; and nesting that parses but goes deeper than JSON_MAX_DEPTH
    refused the same way, so no later recursion over the value (a repr, a comparison, a copy) can
    meet it. Every reader of a file from elsewhere parses through this."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(JSON_TOO_DEEP) from None
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:  # iterative: the check itself must not recurse
        item, depth = stack.pop()
        if depth > JSON_MAX_DEPTH:
            raise ValueError(f"invalid JSON: nested more than {JSON_MAX_DEPTH} deep")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return value


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or holds an impossible value."""


class DataError(ValueError):
    """Bad training data or a data layout/state that cannot be read; says which file and line."""


class BadLine(Exception):
    """What is wrong with one line; the reader adds file:line and decides to skip or raise."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or does not fit this run."""


class CheckpointAccessError(CheckpointError):
    """A checkpoint cannot be read (permissions): not damage, so a resume stops rather than
    falling back past it."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint that does not fit this run (another model, rank count or weight
    layout): an older step would not fit either, so a resume stops."""


class TaskDataError(ValueError):
    """A task's files are missing or a record in them is malformed; names the file and record."""


class RunFolderError(RuntimeError):
    """Another run holds this run folder, or the folder holds what a run must not write through
    (a symbolic link where one of its files belongs)."""


class NonFiniteError(RuntimeError):
    """The loss or gradient norm is NaN or infinite; the optimizer step was not taken."""


def raw_text_hint(path: str, tokenizer_path: str = "") -> str:
    """What to do when `path` holds text rather than token ids: the exact commands (the config
    check and the JSONL reader both end their refusal with it)."""
    base = os.path.splitext(os.path.abspath(path).rstrip(os.sep))[0]
    out = base + "_tokens"
    lines = ["If it is raw text (JSONL with a text field, Parquet or plain text), tokenize it first:"]
    if not tokenizer_path:
        tokenizer_path = base + "_tokenizer.model"
        lines.append(f"    mobilellm-prepare tokenizer --input {path} --out {tokenizer_path} --vocab-size 32000")
    lines.append(f"    mobilellm-prepare encode --input {path} --tokenizer {tokenizer_path} --out {out}")
    lines.append(f"then train with --data.path {out} (docs/DATA.md).")
    return "\n".join(lines)
