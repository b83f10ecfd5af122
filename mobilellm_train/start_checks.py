"""Start-up decisions and checks of a training run that read the data and the disk, not only the
config: the model's vocabulary taken from the data (and a contradiction refused), the free
space of the checkpoint folder against the size of a checkpoint, and what a start added to the
run folder, removed again when the start is refused. `train.Trainer` calls these; each is
usable on its own (tests call them in-process).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

from mobilellm_train import config as C
from mobilellm_train.errors import CheckpointError, ConfigError

logger = logging.getLogger("mobilellm_train")

GIB = 2**30
# A checkpoint holds the fp32 weights and AdamW's two fp32 moments: 12 bytes per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12
EMA_BYTES_PER_PARAM = 4  # the fp32 weight EMA (training.ema_decay), when on


def describe_run(cfg: C.Config) -> str:
    """job.description, or when empty what the run is: the model and the data it trains on."""
    if cfg.job.description:
        return cfg.job.description
    model = f"MobileLLM-{'LS-' if cfg.model.layer_sharing else ''}{cfg.model.flavor}"
    data = cfg.data.sources or cfg.data.path or "the demo corpus"
    return f"{model} on {data}" + (f", validation on {cfg.data.val_path}" if cfg.data.val_interval else "")


# ---------------------------------------------------------------------------------------------
# The vocabulary


@dataclasses.dataclass(frozen=True)
class DataVocab:
    """The vocabulary the training data was made with."""

    size: int  # the tokenizer's vocabulary (a prepared dataset's manifest records it)
    needed: int  # the smallest model vocabulary the data's ids fit: max token id + 1 (or size)
    where: str  # where it was read, for the log and the messages


def data_vocabulary(data: C.DataConfig) -> DataVocab | None:
    """The data's vocabulary: a prepared dataset's manifest (every source of a mixture), the
    tokenizer of JSONL-layout data, or the demo corpus's; None when nothing records it (JSONL
    token ids without data.tokenizer_path)."""
    from mobilellm_train.data.shards import is_dataset, read_manifest
    from mobilellm_train.data.sources import parse_sources

    if data.sources or (data.path and is_dataset(data.path)):
        folders = [path for path, _ in parse_sources(data.sources)] if data.sources else [data.path]
        manifests = [read_manifest(folder) for folder in folders]
        largest = max(manifests, key=lambda m: m.vocab_size)
        needed = max(m.max_token_id for m in manifests) + 1
        return DataVocab(largest.vocab_size, max(needed, 1), largest.path)
    if not data.path:
        return DataVocab(data.demo_vocab_size, data.demo_vocab_size, "the demo corpus (data.demo_vocab_size)")
    if data.tokenizer_path:
        import sentencepiece as spm

        try:
            size = spm.SentencePieceProcessor(model_file=data.tokenizer_path).get_piece_size()
        except (OSError, RuntimeError):
            return None  # the data checks name an unreadable tokenizer
        return DataVocab(size, size, data.tokenizer_path)
    return None


def checkpoint_vocab_size(cfg: C.CheckpointConfig, dump_folder: str) -> int | None:
    """The vocabulary of the checkpoint this start will resume (or of checkpoint.initial_load_path
    when it resumes none), if any: a resumed model keeps the shape it was saved with, whatever the
    data records (a run begun before the vocabulary was taken from the data kept the preset's)."""
    from mobilellm_train.checkpoint import is_complete, list_checkpoints, read_metadata

    path = ""
    if cfg.enable and cfg.load_step != 0:
        folder = os.path.join(dump_folder, cfg.folder)
        complete, _ = list_checkpoints(folder)
        step = cfg.load_step if cfg.load_step in complete else (complete[-1] if complete else None)
        path = "" if step is None else os.path.join(folder, f"step-{step}")
    # A new run from other weights (checkpoint.initial_load_path) takes their shape too.
    path = path or cfg.initial_load_path
    try:
        if path and is_complete(path):
            # The embedding's shape in DCP's index: no tensor is read and, inside a process
            # group, no collective runs (ranks may not agree on whether this succeeds).
            return int(read_metadata(path).state_dict_metadata["model.tok_embeddings.weight"].size[0])
        if path and os.path.isfile(os.path.join(path, "config.json")):  # a Hugging Face folder
            import json

            with open(os.path.join(path, "config.json")) as f:
                return int(json.load(f)["vocab_size"])
    except Exception:  # noqa: BLE001 - a damaged checkpoint is reported by its load itself
        return None
    return None


def choose_vocab_size(model: C.ModelConfig, data: DataVocab | None, resumed: int | None) -> tuple[int, str]:
    """(model.vocab_size to use, what to log, "" for nothing). An explicit model.vocab_size (TOML
    or command line, non-zero) is the user's, refused in words when the data does not fit it;
    otherwise the resumed checkpoint's, else the data's, else the flavor's preset."""
    if model.vocab_size:
        if data is not None and model.vocab_size < max(data.size, data.needed):
            ids = f", token ids up to {data.needed - 1}" if data.where.endswith("manifest.json") else ""
            raise ConfigError(
                f"model.vocab_size {model.vocab_size} is smaller than the data's vocabulary: {data.where} records "
                f"{data.size} tokens{ids}. Set --model.vocab_size {max(data.size, data.needed)}, or leave "
                "model.vocab_size out (also of the TOML) to take the data's"
            )
        return model.vocab_size, ""
    if resumed is not None:
        if data is not None and resumed != data.size:
            return resumed, (f"model.vocab_size {resumed}, the checkpoint's this run starts from (the data records {data.size}; "
                             "a resumed model keeps its shape)")
        return resumed, ""
    if data is not None:
        return max(data.size, data.needed), (f"model.vocab_size {max(data.size, data.needed)}, taken from "
                                             f"{data.where} (--model.vocab_size sets another)")
    return C.build_model_args(model).vocab_size, ""


def apply_data_vocab_size(cfg: C.Config, dump_folder: str) -> None:
    """Set cfg.model.vocab_size as choose_vocab_size decides, and log the choice. The effective
    config.toml then records the vocabulary the model has."""
    vocab, note = choose_vocab_size(cfg.model, data_vocabulary(cfg.data), checkpoint_vocab_size(cfg.checkpoint,
                                                                                               dump_folder))
    if note:
        logger.info("%s", note)
    cfg.model.vocab_size = vocab


# ---------------------------------------------------------------------------------------------
# Free space for the checkpoints to come


def checkpoint_bytes(num_params: int, tokenizer_path: str = "", bytes_per_param: int = CHECKPOINT_BYTES_PER_PARAM) -> int:
    """The size of one checkpoint: weights and AdamW moments in fp32 (and the weight EMA when
    `bytes_per_param` counts it), the tokenizer copy, and a MiB for the small state (schedule, data
    position, RNG, manifests, metadata)."""
    tokenizer = os.path.getsize(tokenizer_path) if tokenizer_path and os.path.isfile(tokenizer_path) else 0
    return bytes_per_param * num_params + tokenizer + 2**20


def saves_left(step: int, total_steps: int, interval: int) -> int:
    """Checkpoints the run still writes after `step`: every `interval` steps and at the last."""
    return total_steps // interval - step // interval + (1 if total_steps % interval else 0)


def _gib(n: float) -> str:
    """A size in GiB, or MiB below one GiB (a test model's checkpoint is a few MiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def check_free_space(folder: str, one_checkpoint: int, num_params: int, saves: int, keep_latest_k: int,
                     existing: int, bytes_per_param: int = CHECKPOINT_BYTES_PER_PARAM) -> str:
    """Refuse (CheckpointError) when the file system of the checkpoint folder cannot hold one
    more checkpoint; return a warning (else "") when it cannot hold the ones this run keeps at
    once: keep_latest_k plus the save in flight (the oldest is deleted only after a newer one is
    complete), at least two for a margin, or every save left when keep_latest_k is 0."""
    if saves <= 0:
        return ""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    free = st.f_bavail * st.f_frsize
    what = (f"one checkpoint of this model takes {_gib(one_checkpoint)} ({num_params / 1e6:.1f}M parameters x "
            f"{bytes_per_param} bytes: fp32 weights and AdamW moments"
            f"{' and the weight EMA' if bytes_per_param > CHECKPOINT_BYTES_PER_PARAM else ''})")
    if free < one_checkpoint:
        raise CheckpointError(
            f"checkpoint folder {folder}: {_gib(free)} free, and {what}; free space there, or save on a larger "
            "disk with --checkpoint.folder /path/on/it (an absolute path), or train without saving with "
            "--checkpoint.enable false"
        )
    if keep_latest_k:
        count = min(saves, max(2, keep_latest_k + 1 - existing))
        why = f"checkpoint.keep_latest_k {keep_latest_k} plus the save in flight"
    else:
        count = saves
        why = "checkpoint.keep_latest_k 0 keeps every one"
    if free >= count * one_checkpoint:
        return ""
    return (f"checkpoint folder {folder}: {_gib(free)} free, but this run will need room for {count} more "
            f"checkpoints ({_gib(count * one_checkpoint)}; {why}), and {what}. A save that finds the disk full "
            "stops the run (the older checkpoints are kept); lower --checkpoint.keep_latest_k, free space, or "
            "use --checkpoint.folder on a larger disk")


def check_checkpoint_space(cfg: C.CheckpointConfig, folder: str, model_args, tokenizer_path: str, step: int,
                           total_steps: int, rank: int, ema: bool = False) -> None:
    """The trainer's check before its first step (check_free_space), warning on rank 0. `ema`: the
    checkpoints also hold the fp32 weight EMA."""
    from mobilellm_train.checkpoint import list_checkpoints
    from mobilellm_train.model import count_params

    if not cfg.enable:
        return
    num_params = count_params(model_args)
    per_param = CHECKPOINT_BYTES_PER_PARAM + (EMA_BYTES_PER_PARAM if ema else 0)
    warning = check_free_space(folder, checkpoint_bytes(num_params, tokenizer_path, per_param), num_params,
                               saves_left(step, total_steps, cfg.interval), cfg.keep_latest_k,
                               len(list_checkpoints(folder)[0]), per_param)
    if warning and rank == 0:
        logger.warning("%s", warning)


# ---------------------------------------------------------------------------------------------
# A refused start leaves the run folder as it was


class RunFolderRecord:
    """What a start adds to the run folder before it trains: the folder itself (and any missing
    parent) when it did not exist, else the entries it adds (run.lock, demo_data/, ...). `undo()`
    removes exactly that; it is called only by the start that holds the run-folder lock, so no
    other run is writing there."""

    def __init__(self, dump_folder: str):
        created, path = None, os.path.abspath(dump_folder)
        while not os.path.exists(path):
            created, parent = path, os.path.dirname(path)
            if parent == path:
                break
            path = parent
        self.folder = dump_folder
        self.created_folder = created  # the top-most folder this start makes, or None
        self.entries = None if created is not None else set(os.listdir(dump_folder))

    def undo(self) -> None:
        if self.created_folder is not None:
            shutil.rmtree(self.created_folder, ignore_errors=True)
            return
        for name in set(os.listdir(self.folder)) - self.entries:
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
