"""The original MobileLLM data layout, read with exact resume.

Layout (the one the original code and LLM360's amber-data-prep write)::

    basepath/1/*.jsonl  basepath/2/*.jsonl  ...  basepath/F/*.jsonl

one folder per training node, each line ``{"token_ids": [int, ...]}``. A basepath that holds
``*.jsonl`` files itself is read as a single folder. Lines are documents of any length (amber's
are pre-chunked to 2049 tokens); their BOS/EOS are in the data, none are added here. Within a
folder, all its ``*.jsonl`` files in sorted name order form one stream of lines.

Which data-parallel rank reads what, with F folders and W ranks:

- W >= F and W % F == 0: ranks form F consecutive groups of G = W/F; group g reads folder g+1
  and rank k of the group takes lines k, k+G, k+2G, ... of that folder's stream. With 8 ranks
  per node and one folder per node this is exactly the original code (node n reads folder n,
  GPU k takes every 8th line from line k).
- W < F and F % W == 0: rank r reads folders r+1, r+1+W, r+1+2W, ... whole, one after another.
- Anything else is a DataError: some folder would be read twice or not at all.

Under a DataLoader with N > 1 workers, worker w takes lines w, w+N, ... of its rank's stream, so
every rank reads every line of its share once per epoch with no duplicates. Each worker packs its
own stream: token ids of consecutive documents are concatenated and cut into non-overlapping
windows of seq_len + 1, yielded as ``{"input": w[:-1], "label": w[1:]}``. When a stream runs out,
the next epoch starts from its first file again.

Every line a reader takes is validated (UTF-8, JSON, an object with a non-empty list of int
``token_ids`` in [0, vocab_size)); lines of other ranks are skipped unparsed. A bad line raises a
DataError naming ``file:line``; with ``skip_bad_lines=n`` up to n bad lines are skipped, each with
a WARNING, and the next one raises. The budget is per reader (a rank, or each of its workers: they
share no state). Only first-epoch skips count against it: later epochs meet the same lines again,
and a budget that ran out after n epochs would fail long runs on small data.

Resume state, from ``state_dict()`` (small and explicit, Lingua-style)::

    epoch, file_index, byte_offset, line_number, buffer, bad_lines_skipped, dp_world_size, dp_rank

It is the position just after the last yielded sample: ``byte_offset`` is where the line after the
last consumed one starts in file ``file_index`` (resume seeks there, it does not re-read),
``line_number`` is the count of lines before it in that file, and ``buffer`` holds the token ids
already read but not yet yielded. The last consumed line is always one of this reader's own, so
the reader's next line is stride - 1 lines further on; only a fresh stream (file 0, line 0) starts
at the reader's offset instead. Under N workers each worker has its own such state, which
StatefulDataLoader saves and restores per worker.
"""

import ctypes
import json
import logging
import os
import signal
import sys
import warnings

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

# Defined apart, in a module that imports nothing heavy, so that mobilellm-prepare starts fast.
from mobilellm_train.errors import JSON_TOO_DEEP, BadLine, CheckpointError, DataError, raw_text_hint

logger = logging.getLogger(__name__)

# Large reads: with W ranks per folder each reader scans W lines for every one it keeps.
_READ_BUFFER_BYTES = 1 << 20

_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a bool",
    int: "an int",
    float: "a float",
    type(None): "null",
}


def _json_type(value) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_token_ids(line: bytes, vocab_size: int) -> np.ndarray:
    """Return one line's token ids as int64, or raise BadLine saying what is wrong."""
    if not line.strip():
        raise BadLine("empty line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_byte = line[e.start]
        raise BadLine(f"invalid UTF-8 (byte 0x{bad_byte:02x} at byte {e.start + 1} of the line)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise BadLine(JSON_TOO_DEEP) from None
    if not isinstance(obj, dict):
        raise BadLine(f'expected a JSON object with key "token_ids", got {_json_type(obj)}')
    if "token_ids" not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise BadLine(f'no key "token_ids" (keys: {keys or "none"})')
    ids = obj["token_ids"]
    if not isinstance(ids, list):
        raise BadLine(f'"token_ids" must be a list of ints, got {_json_type(ids)}')
    if not ids:
        raise BadLine('"token_ids" is an empty list')
    try:
        arr = np.asarray(ids)
    except (ValueError, OverflowError):  # ragged nesting, ints beyond 2**64
        arr = None
    # numpy folds true/false into an int array, so bools need a look at the elements; the
    # substring test keeps that Python loop off the path of normal lines.
    if (
        arr is None
        or arr.ndim != 1
        or arr.dtype.kind not in "iu"
        or ((b"true" in line or b"false" in line) and any(type(x) is bool for x in ids))
    ):
        for i, x in enumerate(ids):
            if type(x) is not int:
                raise BadLine(f'"token_ids"[{i}] is {_json_type(x)} ({json.dumps(x)[:40]}), not an int')
            if not 0 <= x < vocab_size:
                raise BadLine(f"token id {x} outside [0, {vocab_size}) at index {i}")
        raise AssertionError(f"unclassified token_ids array of dtype {None if arr is None else arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        i = int(np.flatnonzero((arr < 0) | (arr >= vocab_size))[0])
        raise BadLine(f"token id {ids[i]} outside [0, {vocab_size}) at index {i}")
    return arr.astype(np.int64, copy=False)


def find_node_folders(path: str) -> list[str]:
    """The node folders 1..F under path (or path itself if it holds the .jsonl files)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: data path does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{path}: data path is not a directory")
    entries = sorted(os.listdir(path))
    node_names = [e for e in entries if e.isdigit() and os.path.isdir(os.path.join(path, e))]
    direct_files = [e for e in entries if e.endswith(".jsonl") and os.path.isfile(os.path.join(path, e))]
    if node_names and direct_files:
        raise DataError(
            f"{path}: holds both node folders ({', '.join(node_names[:4])}) and .jsonl files "
            f"({', '.join(direct_files[:4])}); use one layout or the other"
        )
    if direct_files:
        return [path]
    if not node_names:
        raise DataError(f"{path}: no node folders (1, 2, ...) and no *.jsonl files")
    numbers = sorted(int(n) for n in node_names)
    if numbers != list(range(1, len(numbers) + 1)) or any(str(int(n)) != n for n in node_names):
        raise DataError(
            f"{path}: node folders must be named 1..F with none missing; "
            f"found {', '.join(sorted(node_names, key=int))}"
        )
    return [os.path.join(path, str(n)) for n in numbers]


def list_jsonl_files(folder: str) -> list[str]:
    files = [
        os.path.join(folder, e)
        for e in sorted(os.listdir(folder))
        if e.endswith(".jsonl") and os.path.isfile(os.path.join(folder, e))
    ]
    if not files:
        raise DataError(f"{folder}: folder has no *.jsonl files")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{f}: empty file (0 bytes)")
    return files



# Files that hold text for mobilellm-prepare encode rather than token ids.
_RAW_TEXT_SUFFIXES = (".txt", ".text", ".md", ".parquet", ".json", ".json.gz", ".jsonl.gz", ".jsonl.zst")


def check_token_id_layout(path: str, tokenizer_path: str = "") -> None:
    """Before a JSONL-layout run starts its readers: a folder of raw text (text files, Parquet, or
    JSONL whose records hold text) is refused with the commands that tokenize it, not met as a
    bad line inside a loader worker."""
    try:
        files = [f for folder in find_node_folders(path) for f in list_jsonl_files(folder)]
    except DataError as e:
        raw = sorted(
            os.path.relpath(os.path.join(root, name), path)
            for root, _, names in os.walk(path) for name in names if name.endswith(_RAW_TEXT_SUFFIXES)
        )
        if raw:
            shown = ", ".join(raw[:3]) + (f" and {len(raw) - 3} more" if len(raw) > 3 else "")
            raise DataError(f"{e}. It holds {shown}: this looks like raw text, not token ids. "
                            + raw_text_hint(path, tokenizer_path)) from None
        raise
    with open(files[0], "rb") as f:
        for line in f:
            if line.strip():
                break
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return  # the reader reports it with file:line
    if isinstance(record, dict) and "token_ids" not in record and any(isinstance(v, str) for v in record.values()):
        keys = ", ".join(repr(k) for k in list(record)[:5])
        raise DataError(
            f'{files[0]}: records have no key "token_ids" (keys: {keys}): this looks like raw text in JSONL, '
            "not token ids. " + raw_text_hint(path, tokenizer_path)
        )


def _assign_folders(
    num_folders: int, dp_rank: int, dp_world_size: int, ranks_per_node: int, path: str
) -> tuple[list[int], int, int]:
    """(folder indices this rank reads in order, line stride, line offset) per the module docstring."""
    F, W = num_folders, dp_world_size
    if W >= F and W % F == 0:
        group_size = W // F
        return [dp_rank // group_size], group_size, dp_rank % group_size
    if W < F and F % W == 0:
        return list(range(dp_rank, F, W)), 1, 0
    raise DataError(
        f"{path}: cannot split {F} node folders over {W} data-parallel ranks. The number of ranks must "
        f"be a multiple of the number of folders (W/F ranks share a folder, each taking every (W/F)-th "
        f"line) or divide it (each rank reads F/W whole folders). With {ranks_per_node} ranks per node "
        f"and one folder per node (the original layout), {F} folders need {F * ranks_per_node} ranks; "
        f"otherwise re-split the data into a number of folders that divides or is a multiple of {W}."
    )


class JsonlTokenDataset(IterableDataset, Stateful):
    """Packed seq_len windows from the original JSONL layout; endless (epochs) and exactly resumable."""

    def __init__(
        self,
        path: str,
        seq_len: int,
        vocab_size: int,
        dp_rank: int,
        dp_world_size: int,
        ranks_per_node: int,
        skip_bad_lines: int = 0,
    ):
        super().__init__()
        if seq_len < 1 or vocab_size < 1 or skip_bad_lines < 0:
            raise ValueError(
                f"need seq_len >= 1, vocab_size >= 1, skip_bad_lines >= 0; "
                f"got {seq_len}, {vocab_size}, {skip_bad_lines}"
            )
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_world_size={dp_world_size})")
        self.path = path
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.ranks_per_node = ranks_per_node
        self.skip_bad_lines = skip_bad_lines

        folders = find_node_folders(path)
        # Check every folder, not only this rank's, so a broken share fails on all ranks at start-up.
        files_per_folder = [list_jsonl_files(f) for f in folders]
        folder_ids, self._rank_stride, self._rank_offset = _assign_folders(
            len(folders), dp_rank, dp_world_size, ranks_per_node, path
        )
        self._files = [f for i in folder_ids for f in files_per_folder[i]]

        self._epoch = 0
        self._file_index = 0
        self._byte_offset = 0
        self._line_number = 0
        # Leftover tokens are buffer[buffer_start:]; slicing lazily keeps the per-sample cost O(1).
        self._buffer = np.zeros(0, dtype=np.int64)
        self._buffer_start = 0
        self._bad_lines_skipped = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "file_index": self._file_index,
            "byte_offset": self._byte_offset,
            "line_number": self._line_number,
            "buffer": self._buffer[self._buffer_start :].tolist(),
            "bad_lines_skipped": self._bad_lines_skipped,
            "dp_world_size": self.dp_world_size,
            "dp_rank": self.dp_rank,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a position from state_dict(); it takes effect at the next iter()."""
        check_reader_state(state_dict, self.vocab_size)
        sd = state_dict
        if sd["dp_world_size"] != self.dp_world_size:
            raise DataError(
                f"the JSONL reader cannot resume on a different number of data-parallel ranks "
                f"(saved {sd['dp_world_size']}, now {self.dp_world_size}): each rank's position is "
                f"a place in its own share of the lines"
            )
        if sd["dp_rank"] != self.dp_rank:
            raise DataError(f"data state of dp rank {sd['dp_rank']} loaded into dp rank {self.dp_rank}")
        file_index, byte_offset = sd["file_index"], sd["byte_offset"]
        if not 0 <= file_index < len(self._files):
            raise DataError(
                f"{self.path}: saved data position is file #{file_index} of this rank's share, which has "
                f"{len(self._files)} files; the data changed since the checkpoint"
            )
        self._check_line_start(self._files[file_index], byte_offset)
        self._epoch = sd["epoch"]
        self._file_index = file_index
        self._byte_offset = byte_offset
        self._line_number = sd["line_number"]
        self._buffer = np.asarray(sd["buffer"], dtype=np.int64)
        self._buffer_start = 0
        self._bad_lines_skipped = sd["bad_lines_skipped"]

    @staticmethod
    def _check_line_start(path: str, byte_offset: int) -> None:
        # A checkpoint's offset must still fall on a line boundary, or resume would parse half a line.
        size = os.path.getsize(path)
        ok = byte_offset == 0 or byte_offset == size
        if 0 < byte_offset < size:
            with open(path, "rb") as f:
                f.seek(byte_offset - 1)
                ok = f.read(1) == b"\n"
        if not ok:
            raise DataError(
                f"{path}: saved byte offset {byte_offset} is not the start of a line (file size {size}); "
                f"the file changed since the checkpoint"
            )

    def __iter__(self):
        info = get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        # This reader takes stream lines i with i % stride == offset (see the module docstring).
        stride = self._rank_stride * num_workers
        offset = self._rank_offset + self._rank_stride * worker_id
        who = f"dp rank {self.dp_rank}" + (f" worker {worker_id}" if info is not None else "")
        window = self.seq_len + 1
        vocab_size = self.vocab_size
        files = self._files

        epoch = self._epoch
        file_index = self._file_index
        byte_offset = self._byte_offset
        line_number = self._line_number
        buffer = self._buffer[self._buffer_start :]
        bad_lines_skipped = self._bad_lines_skipped

        fresh_stream = file_index == 0 and line_number == 0
        to_skip = offset if fresh_stream else stride - 1
        # The too-small check needs a whole epoch: a resumed one may legitimately end with no window.
        whole_epoch = fresh_stream
        windows_in_epoch = lines_in_epoch = tokens_in_epoch = 0

        while True:
            path = files[file_index]
            with open(path, "rb", buffering=_READ_BUFFER_BYTES) as f:
                if byte_offset:
                    f.seek(byte_offset)
                # Offsets are counted, not f.tell()'d: tell() costs a syscall per line.
                for line in iter(f.readline, b""):
                    byte_offset += len(line)
                    line_number += 1
                    if to_skip:
                        to_skip -= 1
                        continue
                    to_skip = stride - 1
                    try:
                        ids = parse_token_ids(line, vocab_size)
                    except BadLine as e:
                        bad_lines_skipped = self._skip_or_raise(
                            e, path, line_number, epoch, bad_lines_skipped, who
                        )
                        continue
                    lines_in_epoch += 1
                    tokens_in_epoch += ids.size
                    buffer = np.concatenate((buffer, ids)) if buffer.size else ids
                    num_windows = buffer.size // window
                    if num_windows == 0:
                        continue
                    windows_in_epoch += num_windows
                    self._epoch, self._file_index = epoch, file_index
                    self._byte_offset, self._line_number = byte_offset, line_number
                    self._buffer, self._bad_lines_skipped = buffer, bad_lines_skipped
                    for i in range(num_windows):
                        w = torch.from_numpy(buffer[i * window : (i + 1) * window])
                        # The state must already be past this sample when the consumer snapshots it.
                        self._buffer_start = (i + 1) * window
                        yield {"input": w[:-1], "label": w[1:]}
                    buffer = buffer[num_windows * window :]
            file_index += 1
            byte_offset = line_number = 0
            if file_index < len(files):
                continue
            if whole_epoch and windows_in_epoch == 0:
                raise DataError(
                    f"{self.path}: {who} got no full window of seq_len + 1 = {window} tokens in a "
                    f"whole epoch ({lines_in_epoch} lines, {tokens_in_epoch} tokens from {len(files)} "
                    f"files, reading every {stride}th line from line {offset}); the data is too small "
                    f"for seq_len {self.seq_len} with {self.dp_world_size} data-parallel ranks x "
                    f"{num_workers} workers"
                )
            logger.info("epoch %d finished; starting epoch %d (%s, %s)", epoch, epoch + 1, who, self.path)
            epoch += 1
            file_index = 0
            to_skip = offset
            whole_epoch = True
            windows_in_epoch = lines_in_epoch = tokens_in_epoch = 0

    def _skip_or_raise(
        self, error: BadLine, path: str, line_number: int, epoch: int, bad_lines_skipped: int, who: str
    ) -> int:
        where = f"{path}:{line_number}: {error}"
        if self.skip_bad_lines == 0:
            raise DataError(f"{where} (pass --data.skip_bad_lines N to skip up to N bad lines with a warning)")
        if epoch > 0:
            logger.warning("%s; skipping it again (counted in epoch 0; %s)", where, who)
            return bad_lines_skipped
        if bad_lines_skipped >= self.skip_bad_lines:
            raise DataError(
                f"{where} (--data.skip_bad_lines budget exhausted: {bad_lines_skipped} of {self.skip_bad_lines} "
                f"bad lines already skipped on {who})"
            )
        bad_lines_skipped += 1
        logger.warning(
            "%s; skipping it (%d of at most %d bad lines skipped on %s)",
            where,
            bad_lines_skipped,
            self.skip_bad_lines,
            who,
        )
        return bad_lines_skipped


# The reader's position, as state_dict() writes it: each a count of one reader's stream.
_STATE_COUNTS = ("epoch", "file_index", "byte_offset", "line_number", "bad_lines_skipped", "dp_world_size", "dp_rank")


def check_reader_state(sd, vocab_size: int, who: str = "") -> None:
    """A saved reader position (state_dict()) as it is restored: its counts non-negative integers
    and every token id of its buffer (read before the checkpoint, fed to the model after it) inside
    the vocabulary, which an id beyond would fail in the embedding on every resume. A
    CheckpointError otherwise: the state is damaged, so an automatic resume falls back past it."""
    where = f"the saved JSONL data position{who}"
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} is a {type(sd).__name__}, not a reader state; the checkpoint is damaged")
    for key in _STATE_COUNTS:
        value = sd.get(key)
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{where}: {key} is {value!r:.80}, not a count; the checkpoint is damaged")
    buffer = sd.get("buffer")
    if not isinstance(buffer, list):
        raise CheckpointError(f"{where}: its token buffer is a {type(buffer).__name__}, not a list; the checkpoint "
                              "is damaged")
    bad = next((i for i, x in enumerate(buffer) if type(x) is not int or not 0 <= x < vocab_size), None)
    if bad is not None:
        raise CheckpointError(
            f"{where} holds the token id {buffer[bad]!r:.40} (buffer[{bad}]), not an id of this model's vocabulary "
            f"[0, {vocab_size}): the checkpoint is damaged, or was written for other data"
        )


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of every training loader: a worker ignores SIGTERM, SIGINT and SIGUSR1, and
    is killed when its parent dies.

    slurm signals every process of a job and Ctrl-C reaches the whole foreground process group;
    a worker that died of it would fail the step before the training process, which decides what
    a signal means, could save. But a worker that ignores them must not outlive its parent: after
    a kill -9, an OOM kill or a second Ctrl-C the loader's own watchdog notices only between
    batches, and a worker busy with one (or blocked on a full queue) would live on for minutes.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing).

    The signal follows the parent *thread* that forked this process: the loaders are iterated
    from the training process's main thread. A loader worker holds nothing that needs saving.
    """
    import multiprocessing

    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            zero = ctypes.c_ulong(0)  # prctl is variadic: pass full-width arguments
            if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), zero, zero, zero) != 0:
                warnings.warn(f"prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); this loader "
                              "worker will not end with its parent", RuntimeWarning, stacklevel=2)
        except (OSError, AttributeError):
            pass
    # A parent that died before the prctl took effect would never send the signal.
    if os.getppid() != parent_pid:
        os._exit(1)


def quiet_stateful_dataloader(dataset, loader_class: type = StatefulDataLoader, **kwargs) -> StatefulDataLoader:
    """A StatefulDataLoader without the deprecation warning about `torch.set_vital` that its
    constructor raises on every run: torchdata's own call, nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        return loader_class(dataset, **kwargs)


class JsonlLoader(StatefulDataLoader):
    """The JSONL reader's loader: a position saved with one number of loader workers is refused
    in words under another (torchdata's own check is a bare AssertionError at the first batch),
    since each worker holds its own share of the rank's lines."""

    def load_state_dict(self, state_dict: dict) -> None:
        snapshot = state_dict.get("_snapshot")
        saved = 0 if snapshot is None else snapshot.get("_main_snapshot", {}).get("_num_workers")
        # Each reader's position is checked here, as the checkpoint loads (a worker restores its
        # own only once it starts): a damaged one is refused in words, or passed over at auto-resume.
        workers = {} if snapshot is None else snapshot.get("_worker_snapshots") or {}
        states = {"": state_dict.get("dataset_state")} if snapshot is None else {
            f" (loader worker {name.removeprefix('worker_')})": (w or {}).get("dataset_state")
            for name, w in workers.items()}
        for who, state in states.items():
            if state is not None:  # a worker that had read nothing yet starts its share afresh
                check_reader_state(state, self.dataset.vocab_size, who)
        if saved != self.num_workers:
            raise CheckpointError(
                f"this run's data position (JSONL layout) was saved with --data.num_workers {saved}, and this "
                f"start asks for {self.num_workers}: each worker reads its own share of the lines, so the "
                f"position cannot move to another worker count. Resume with --data.num_workers {saved} (or "
                "prepare the data with mobilellm-prepare, whose position moves freely)."
            )
        super().load_state_dict(state_dict)


def build_dataloader(
    dataset: JsonlTokenDataset, local_batch_size: int, num_workers: int, pin_memory: bool
) -> StatefulDataLoader:
    """Batches of {"input", "label"} as [local_batch_size, seq_len] int64; state_dict() resumes exactly."""
    return quiet_stateful_dataloader(
        dataset,
        loader_class=JsonlLoader,
        batch_size=local_batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Workers hold their stream position; restarting them each epoch would throw it away.
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )
