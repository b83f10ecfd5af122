"""Loading a model and its tokenizer for evaluation and generation, from either kind of folder:

- a DCP step folder of a training run (`<run>/checkpoints/step-N`, recognised by `.metadata`),
  whose tokenizer the trainer copied in as `tokenizer.model`;
- a Hugging Face folder (recognised by `config.json`): one that export.py wrote, or any Llama
  model whose shape MobileLLM can express (hf.load_hf_checkpoint).

The tokenizer is a SentencePiece `tokenizer.model` read with sentencepiece (identical ids to
transformers' LlamaTokenizer), or, for an HF folder that only has `tokenizer.json`, the folder's
tokenizer through transformers. A step of a quantization-aware training run also says which
scheme its weights were trained for (`trained_scheme`, and `trained_embedding` for the table),
which export, eval and generate check their --quantize and --embedding-quantize against.
"""

from __future__ import annotations

import logging
import os

import torch

from mobilellm_train.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    checked_load,
    is_complete,
    load_model_from_checkpoint,
    read_metadata,
    read_train_state,
)
from mobilellm_train.hf import is_hf_folder, load_hf_checkpoint
from mobilellm_train.model import MobileLLM
from mobilellm_train.quantization import (
    EmbeddingScheme,
    QATRecord,
    apply_embedding_ptq,
    apply_ptq,
    describe,
    parse_embedding_scheme,
    short_name,
)

logger = logging.getLogger("mobilellm_train")


class Tokenizer:
    """What evaluation and generation need of a tokenizer: text <-> ids, without special tokens
    (callers add BOS themselves), and the BOS/EOS ids (-1 when the tokenizer has none)."""

    def __init__(self, path: str):
        self.path = path
        self._sp = None
        self._hf = None
        if os.path.isdir(path):
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise FileNotFoundError(
                    f"{path} has no {TOKENIZER_FILE}; reading its tokenizer.json needs transformers"
                ) from None
            self._hf = AutoTokenizer.from_pretrained(path)
            self.bos_id = self._hf.bos_token_id if self._hf.bos_token_id is not None else -1
            self.eos_id = self._hf.eos_token_id if self._hf.eos_token_id is not None else -1
            self.vocab_size = len(self._hf)
        else:
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=path)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)


class TokenizerMismatchError(ValueError):
    """A tokenizer used with a model or token data it does not belong to."""


def check_tokenizer_fits(tokenizer_path: str, tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Refuse a tokenizer with more ids than the model has embeddings: some texts would then
    index past the embedding (an IndexError) and the rest decode to garbage. Evaluation,
    generation and export all refuse through this one check."""
    if tokenizer_vocab_size > model_vocab_size:
        raise TokenizerMismatchError(
            f"{tokenizer_path}: {tokenizer_vocab_size} pieces, more than the model's vocab_size "
            f"{model_vocab_size}; this tokenizer does not belong to this model (use the tokenizer the "
            "model was trained with: the checkpoint's own tokenizer.model, or --tokenizer PATH)"
        )


def other_tokenizer(checkpoint: str, tokenizer_path: str) -> str:
    """The tokenizer.model `checkpoint` holds when it is not `tokenizer_path` (compared by sha256,
    as the trainer compares a run's tokenizer with its data's); "" when they are the same or
    either is missing. The one comparison evaluation, export and continued pretraining make."""
    from mobilellm_train.data.shards import file_sha256

    own = os.path.join(checkpoint, TOKENIZER_FILE)
    if not tokenizer_path or not os.path.isfile(own) or not os.path.isfile(tokenizer_path):
        return ""
    if os.path.samefile(own, tokenizer_path) or file_sha256(own) == file_sha256(tokenizer_path):
        return ""
    return own


def check_same_tokenizer(checkpoint: str, tokenizer_path: str) -> None:
    """An explicit tokenizer must be the one a checkpoint holds, when it holds one."""
    own = other_tokenizer(checkpoint, tokenizer_path)
    if not own:
        return
    raise TokenizerMismatchError(
        f"--tokenizer {tokenizer_path} is not the tokenizer {own} that the model was trained with "
        "(their sha256 differ); leave out --tokenizer to use the checkpoint's own"
    )


def find_tokenizer(checkpoint: str) -> str:
    """The tokenizer stored with a checkpoint: its tokenizer.model, or an HF folder's own
    tokenizer files; "" when there is none."""
    if os.path.isfile(os.path.join(checkpoint, TOKENIZER_FILE)):
        return os.path.join(checkpoint, TOKENIZER_FILE)
    if is_hf_folder(checkpoint) and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        return checkpoint
    return ""


def load_tokenizer(checkpoint: str, tokenizer_path: str = "") -> Tokenizer:
    """`tokenizer_path` when given, else the checkpoint's own; a FileNotFoundError names both."""
    path = tokenizer_path or find_tokenizer(checkpoint)
    if not path:
        newest = newest_step_folder(checkpoint)
        if newest:
            raise FileNotFoundError(run_folder_message(checkpoint, newest))
        raise FileNotFoundError(
            f"{checkpoint} holds no {TOKENIZER_FILE} (nor tokenizer.json); pass --tokenizer PATH"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tokenizer {path}: no such file")
    check_same_tokenizer(checkpoint, tokenizer_path)
    return Tokenizer(path)


def load_model(
    checkpoint: str, device: str | torch.device = "cpu", layer_sharing: bool | None = None, verify: bool = True,
    weights: str = "model",
) -> MobileLLM:
    """A plain fp32 MobileLLM in eval mode from a DCP step folder or a Hugging Face folder.

    layer_sharing applies to HF folders only (see hf.load_hf_checkpoint); a DCP checkpoint
    records its own, and `verify` checks its files against the checksums recorded at save.
    `weights` "ema" takes a step folder's weight EMA (training.ema_decay) instead of its weights.
    """
    check_checkpoint_folder(checkpoint)
    if is_complete(checkpoint):
        return load_model_from_checkpoint(checkpoint, device=device, verify=verify, weights=weights)
    if weights != "model":
        raise CheckpointError(f"{checkpoint} is a Hugging Face folder: it holds one set of weights and no weight "
                              "EMA (export the step folder with --weights ema to make one of the EMA)")
    args, state = load_hf_checkpoint(checkpoint, layer_sharing=layer_sharing)
    with torch.device("meta"):
        model = MobileLLM(args)
    model.to_empty(device=device)
    model.init_weights()  # the RoPE tables; every weight is overwritten next
    model.load_state_dict(state)
    return model.eval()


def refuse_run_folder(checkpoint: str) -> None:
    """A training run folder given as a checkpoint: a FileNotFoundError naming its newest step.
    mobilellm-eval checks this first, before anything it would say about the folder's contents
    (that it holds no tokenizer, say)."""
    if not (is_complete(checkpoint) or is_hf_folder(checkpoint)) and os.path.isdir(checkpoint):
        newest = newest_step_folder(checkpoint)
        if newest:
            raise FileNotFoundError(run_folder_message(checkpoint, newest))


def check_checkpoint_folder(checkpoint: str) -> None:
    """A DCP step folder or a Hugging Face folder, else a FileNotFoundError saying what it is."""
    if is_complete(checkpoint) or is_hf_folder(checkpoint):
        return
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder")
    refuse_run_folder(checkpoint)
    raise FileNotFoundError(
        f"--checkpoint {checkpoint}: neither a complete DCP step folder (no .metadata) nor a "
        "Hugging Face folder (no config.json)"
    )


def newest_step_folder(folder: str) -> str:
    """The newest complete `step-N` checkpoint when `folder` is a training run folder (or its
    checkpoint folder, named as its config.toml says), else "": what the user most likely meant."""
    from mobilellm_train.checkpoint import list_checkpoints

    candidates = [folder, os.path.join(folder, "checkpoints")]
    config = os.path.join(folder, "config.toml")
    if os.path.isfile(config):
        from mobilellm_train.config import parse_effective_config

        try:
            with open(config) as f:
                candidates.append(os.path.join(folder, parse_effective_config(f.read()).checkpoint.folder))
        except (OSError, ValueError):
            pass  # an unreadable config only costs the hint
    for candidate in candidates:
        complete, _ = list_checkpoints(candidate)
        if complete:
            return os.path.join(candidate, f"step-{complete[-1]}")
    return ""


def run_folder_message(checkpoint: str, newest: str) -> str:
    return (f"--checkpoint {checkpoint} is a training run folder, not a checkpoint; its newest complete "
            f"checkpoint is {newest}: pass --checkpoint {newest}")


def read_qat_record(step_folder: str) -> tuple[QATRecord | None, int]:
    """(the QAT record of a complete DCP step folder, None when its run had no QAT; its step),
    read through the checkpoint's safe loader like the train state."""
    stored = read_metadata(step_folder).state_dict_metadata
    step = read_train_state(step_folder).step
    if f"{QATRecord.KEY}.record" not in stored:
        return None, step
    record = QATRecord()
    checked_load({QATRecord.KEY: record}, step_folder)
    return record, step


def trained_scheme(checkpoint: str) -> tuple[str, int, int] | None:
    """(scheme, group size, start step) that a DCP step folder's weights were trained for by QAT:
    its record, when the step is at or past the start. None for an HF folder, a run without QAT,
    or a step saved before fake quantization started."""
    if not is_complete(checkpoint):
        return None
    record, step = read_qat_record(checkpoint)
    if record is None or step < max(record.start_step, 1):
        return None
    return record.scheme, record.group_size, record.start_step


def trained_embedding(checkpoint: str) -> EmbeddingScheme | None:
    """The embedding scheme a DCP step folder's table was trained for by QAT (qat.embedding_quantize),
    under trained_scheme's conditions; None when its table was not fake-quantized."""
    if not is_complete(checkpoint):
        return None
    record, step = read_qat_record(checkpoint)
    if record is None or step < max(record.start_step, 1):
        return None
    return parse_embedding_scheme(record.embedding, f"{checkpoint}: the QAT record's embedding scheme")


def embedding_mismatch(checkpoint: str, embedding: EmbeddingScheme | None) -> str:
    """Why looking the table of `checkpoint` up as `embedding` (None: fp32) is not what QAT trained
    it for, or "" when it is, or when its table was not trained fake-quantized (any scheme then
    quantizes it after training, as --quantize does the linear layers of a run without QAT)."""
    trained = trained_embedding(checkpoint)
    if trained is None or trained == embedding:
        return ""
    asked = "an fp32 table" if embedding is None else f"--embedding-quantize {embedding} ({embedding.describe()})"
    return (f"{checkpoint}'s embedding table was trained for {trained} ({trained.describe()}) by QAT; {asked} is not "
            f"what it was trained for: pass --embedding-quantize {trained}")


def scheme_mismatch(checkpoint: str, scheme: str, group_size: int) -> str:
    """Why quantizing the weights of `checkpoint` with `scheme` and `group_size` ("none": not at
    all) is not what QAT trained them for, or "" when it is (or when they had no QAT)."""
    trained = trained_scheme(checkpoint)
    if trained is None:
        return ""
    want_scheme, want_group, start = trained
    if scheme == want_scheme and (scheme != "8da4w" or group_size == want_group):
        return ""
    asked = "no quantization" if scheme == "none" else describe(scheme, group_size)
    return (f"{checkpoint} was trained for {describe(want_scheme, want_group)} by QAT from step {start}; {asked} "
            f"is not what its weights were trained for: pass --quantize {want_scheme}"
            + (f" --group-size {want_group}" if want_scheme == "8da4w" else ""))


def apply_program_quantization(model: MobileLLM, checkpoint: str, scheme: str, group_size: int,
                               embedding: EmbeddingScheme | None = None) -> dict | None:
    """Quantize `model` in place as the ExecuTorch program of `--quantize scheme
    --embedding-quantize embedding` is (the export's own quantization, quantization.apply_ptq and
    apply_embedding_ptq, run eagerly: the table is looked up with the program's values), warning
    when QAT trained `checkpoint` for another scheme; returns what a results record says of it
    (None: full precision)."""
    if scheme == "none" and embedding is None:
        return None
    mismatch = scheme_mismatch(checkpoint, scheme, group_size)
    if mismatch:
        logger.warning("%s; using %s as asked", mismatch, "no quantization" if scheme == "none"
                       else short_name(scheme, group_size))
    mismatch = embedding_mismatch(checkpoint, embedding)
    if mismatch:
        logger.warning("%s; using %s as asked", mismatch, embedding or "an fp32 table")
    apply_embedding_ptq(model, embedding)
    apply_ptq(model, scheme, group_size)
    record = {"scheme": scheme, "group_size": group_size if scheme == "8da4w" else None}
    if embedding is not None:
        record["embedding"] = str(embedding)
    return record
