"""Start-up decisions and checks of a training run that read the data and the disk, not only the
config: the model's vocabulary taken from the data (and a contradiction refused), the tokenizer of
the weights a new run starts from against its data's, the free space of the checkpoint folder
against the size of a checkpoint, and what a start added to the run folder, removed again when
the start is refused. `train.Trainer` calls these; each is
usable on its own (tests call them in-process).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

from mobilellm_train import config as C
from mobilellm_train.errors import CheckpointError, CheckpointMismatchError, ConfigError

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


def resumed_step_folder(cfg: C.CheckpointConfig, dump_folder: str) -> str:
    """The step folder of this run that this start will resume, "" when it resumes none."""
    from mobilellm_train.checkpoint import list_checkpoints

    if not cfg.enable or cfg.load_step == 0:
        return ""
    folder = os.path.join(dump_folder, cfg.folder)
    complete, _ = list_checkpoints(folder)
    step = cfg.load_step if cfg.load_step in complete else (complete[-1] if complete else None)
    return "" if step is None else os.path.join(folder, f"step-{step}")


def checkpoint_vocab_size(cfg: C.CheckpointConfig, dump_folder: str) -> int | None:
    """The vocabulary of the checkpoint this start will resume (or of checkpoint.initial_load_path
    when it resumes none), if any: a resumed model keeps the shape it was saved with, whatever the
    data records (a run begun before the vocabulary was taken from the data kept the preset's).

    Read, newest first as the resume tries them, from the first step whose index matches its
    checksum (checkpoint.verify) and is accepted: the resume falls back past a damaged step, and
    the older step it loads must not meet a model shaped by the damage. No tensor is read and,
    inside a process group, no collective runs (ranks may not agree on whether this succeeds)."""
    from mobilellm_train.checkpoint import list_checkpoints, read_metadata, read_verified_index
    from mobilellm_train.hf import MAX_VOCAB, HFCheckpointError, is_hf_folder, read_hf_config

    read_index = read_verified_index if cfg.verify else read_metadata
    paths = []
    if cfg.enable and cfg.load_step != 0:
        folder = os.path.join(dump_folder, cfg.folder)
        complete, _ = list_checkpoints(folder)
        paths = [os.path.join(folder, f"step-{step}") for step in
                 ([cfg.load_step] if cfg.load_step in complete else complete[::-1])]
    for path in paths or ([cfg.initial_load_path] if cfg.initial_load_path else []):
        if path == cfg.initial_load_path and is_hf_folder(path):  # a Hugging Face folder: its checked config
            try:
                return read_hf_config(path)["vocab_size"]
            except (HFCheckpointError, KeyError):
                return None  # its load names the problem
        try:
            embedding = read_index(path).state_dict_metadata.get("model.tok_embeddings.weight")
        except CheckpointError:  # damaged or refused: the resume falls back past it, and so does this
            continue
        size = getattr(embedding, "size", None)
        if size and 1 <= size[0] <= MAX_VOCAB:
            return int(size[0])
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


def check_initial_tokenizer(cfg: C.CheckpointConfig, dump_folder: str, tokenizer_path: str, rank: int) -> None:
    """checkpoint.initial_load_path, when this start loads it (it resumes no checkpoint of its
    own): the tokenizer.model it holds must be the tokenizer of this run's data, `tokenizer_path`
    (by sha256: the comparison evaluation and export make). Else CheckpointMismatchError, unless
    checkpoint.initial_load_other_tokenizer asks for it, which is warned about."""
    from mobilellm_train.evaluation.loading import other_tokenizer

    path = cfg.initial_load_path
    if not path or resumed_step_folder(cfg, dump_folder):
        return
    own = os.path.join(path, "tokenizer.model")
    if not (os.path.isfile(own) and tokenizer_path and os.path.isfile(tokenizer_path)):
        missing = "it holds no tokenizer.model" if not os.path.isfile(own) else "this run's data names no tokenizer"
        if rank == 0:
            logger.warning("checkpoint.initial_load_path %s: %s, so it cannot be checked that its weights were "
                           "trained with the tokenizer of this run's data", path, missing)
        return
    if not other_tokenizer(path, tokenizer_path):
        return
    if cfg.initial_load_other_tokenizer:
        if rank == 0:
            logger.warning("checkpoint.initial_load_other_tokenizer: starting from the weights of %s, trained with "
                           "the tokenizer %s, on data of another tokenizer, %s: the same token ids mean other text "
                           "to them, and this run's checkpoints hold the data's tokenizer", path, own, tokenizer_path)
        return
    raise CheckpointMismatchError(
        f"checkpoint.initial_load_path {path} was trained with the tokenizer {own}, and this run's data was made with "
        f"another, {tokenizer_path} (their sha256 differ): the same token ids mean other text to the two. Prepare the "
        f"data with the model's tokenizer (mobilellm-prepare encode --tokenizer {own} ...), or set "
        "--checkpoint.initial_load_other_tokenizer true to start from these weights on purpose"
    )


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
    """What a start adds to the run folder before it trains: the folder itself and any missing
    parents when they did not exist, else the entries it adds (run.lock, demo_data/, ...).
    `undo()` removes exactly what this start added and no more: the new entries of the run folder
    (the whole folder's content when this start made it), then each folder it made, deepest first,
    only once it is empty. So a parent made for a sweep (outputs/sweep-7/ for sweep-7/lr1) stays
    while another run of the sweep has put its folder there. Called only by the start that holds
    the run-folder lock, so no other run is writing in the run folder itself."""

    def __init__(self, dump_folder: str):
        created, path = [], os.path.abspath(dump_folder)
        while not os.path.lexists(path):
            created.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        self.folder = os.path.abspath(dump_folder)
        self.created_folders = created  # deepest (the run folder) first
        self.entries = set() if created else set(os.listdir(dump_folder))

    def undo(self) -> None:
        try:
            names = set(os.listdir(self.folder)) - self.entries
        except OSError:  # never made, or already gone
            names = set()
        for name in names:
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)  # removes links inside, never their targets
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
        for folder in self.created_folders:
            try:
                os.rmdir(folder)  # only an empty one: what another start put there stays
            except OSError:
                return
