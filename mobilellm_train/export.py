"""Export a training checkpoint (a DCP step folder) as a Hugging Face `LlamaForCausalLM` folder.

    mobilellm-export --checkpoint outputs/mobilellm_125M/checkpoints/step-480000 --out exported/125M
    python -m mobilellm_train.export --checkpoint STEP_FOLDER --out FOLDER \
        [--dtype float32|bfloat16] [--format safetensors|torch] [--tokenizer tokenizer.model | --no-tokenizer]
        [--weights model|ema] [--overwrite]

The folder holds config.json (a Llama config with tied embeddings, hf.hf_llama_config), the
weights (model.safetensors, or pytorch_model.bin with --format torch), generation_config.json and
the tokenizer: tokenizer.json (hf_tokenizer.build_tokenizer_json: SentencePiece's ids, id for id),
tokenizer_config.json, special_tokens_map.json and the SentencePiece tokenizer.model itself. It
loads with `AutoModelForCausalLM.from_pretrained(FOLDER)` and `AutoTokenizer.from_pretrained(FOLDER)`.
A layer-sharing model becomes a Llama model of 2L layers whose layers 2i and 2i+1 are equal;
`hf.load_hf_checkpoint` reads it back as L shared blocks.

`--format executorch --out model.pte` writes instead an on-device ExecuTorch program for the
XNNPACK backend, from a step folder or a Hugging Face folder, with the tokenizer beside it
(options --max-context, --quantize, --group-size, --embedding-quantize, --report; see
mobilellm_train/edge.py). A step trained by quantization-aware training is exported with the
scheme, group size and embedding scheme it was trained for; another is refused unless --force
(docs/QUANTIZATION.md).

The tokenizer comes from the step folder (the trainer copies it there), else from --tokenizer;
without either the model is exported alone, with a warning. Nothing is overwritten: an existing,
non-empty --out is refused unless --overwrite, and the folder is written under a temporary name
and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING

from mobilellm_train.quantization import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES

if TYPE_CHECKING:
    from torch import Tensor

    from mobilellm_train.model import ModelArgs

# torch and the checkpoint code are imported inside the functions that use them: --help and
# argument errors answer at once (importing torch takes seconds).

logger = logging.getLogger("mobilellm_train")

DTYPES = ("bfloat16", "float32")  # names of torch dtypes
WEIGHT_FILES = {"safetensors": "model.safetensors", "torch": "pytorch_model.bin"}


class ExportError(RuntimeError):
    """The export cannot be written: its destination, tokenizer or arguments are unusable."""


def _check_destination(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(
            f"--out {out_dir} exists and is not empty; choose another folder or pass --overwrite "
            "to replace it"
        )


def tokenizer_files(tokenizer_path: str, model_args: ModelArgs) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for a SentencePiece model.

    transformers' own reading of a tokenizer.model (LlamaTokenizer) gives other ids than
    SentencePiece for leading or repeated spaces and for unigram models, so the folder carries a
    tokenizer.json built from the model (hf_tokenizer) and names the generic fast tokenizer class,
    which loads it as it is. The special tokens are read from the model itself, so a tokenizer
    trained with other piece names or ids is described as it is.
    """
    import sentencepiece as spm

    from mobilellm_train.evaluation.loading import TokenizerMismatchError, check_tokenizer_fits
    from mobilellm_train.hf_tokenizer import UnsupportedTokenizer, build_tokenizer_json

    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{tokenizer_path}: not a SentencePiece model ({e})") from None
    try:
        check_tokenizer_fits(tokenizer_path, sp.vocab_size(), model_args.vocab_size)
    except TokenizerMismatchError as e:
        raise ExportError(str(e)) from None
    with open(tokenizer_path, "rb") as f:
        model_bytes = f.read()
    try:
        tokenizer_json = build_tokenizer_json(model_bytes, bos_id=sp.bos_id())
    except UnsupportedTokenizer as e:
        raise ExportError(
            f"{tokenizer_path}: transformers cannot reproduce this tokenizer's ids ({e}); export the model "
            "alone with --no-tokenizer and tokenize with sentencepiece"
        ) from None
    except ValueError as e:
        raise ExportError(f"{tokenizer_path}: not a SentencePiece model ({e})") from None

    def piece(token_id: int) -> str | None:
        return sp.id_to_piece(token_id) if token_id >= 0 else None

    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id())}
    config = {
        # As the training data: BOS before each text, no EOS after it, no pad token.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": sp.bos_id() >= 0,
        "add_eos_token": False,
        **special,
        "pad_token": None,
        # SentencePiece spells "<s>" written in a text with normal pieces; so does this tokenizer.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_args.max_seq_len,
    }
    # No unk_token: the unknown piece is not a special token, so that decode writes it as
    # SentencePiece does (" \u2047 ") instead of dropping it under skip_special_tokens.
    special_map = {k: v for k, v in special.items() if v is not None}
    return {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
    }


def _special_ids(tokenizer_path: str) -> tuple[int, int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    return sp.bos_id(), sp.eos_id()


def write_hf_folder(
    model_args: ModelArgs,
    state_dict: dict[str, Tensor],
    out_dir: str,
    dtype: str = "float32",
    weight_format: str = "safetensors",
    tokenizer_path: str = "",
    overwrite: bool = False,
) -> str:
    """Write `state_dict` (ours, as MobileLLM.state_dict()) as a Hugging Face folder; returns it."""
    import torch

    from mobilellm_train.checkpoint import TOKENIZER_FILE
    from mobilellm_train.hf import hf_llama_config, to_hf_state_dict

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if weight_format not in WEIGHT_FILES:
        raise ExportError(f"--format {weight_format!r}: choose one of {sorted(WEIGHT_FILES)}")
    if tokenizer_path and not os.path.isfile(tokenizer_path):
        raise ExportError(f"--tokenizer {tokenizer_path}: no such file")
    if weight_format == "safetensors" and importlib.util.find_spec("safetensors") is None:
        raise ExportError("--format safetensors needs the safetensors package (pip install safetensors), "
                          "or use --format torch")
    out_dir = os.path.abspath(out_dir)
    _check_destination(out_dir, overwrite)

    files: dict[str, str] = {}
    config = hf_llama_config(model_args, dtype=dtype)
    bos_id, eos_id = config["bos_token_id"], config["eos_token_id"]
    if tokenizer_path:
        files.update(tokenizer_files(tokenizer_path, model_args))
        bos_id, eos_id = _special_ids(tokenizer_path)
        config.update(bos_token_id=bos_id if bos_id >= 0 else None, eos_token_id=eos_id if eos_id >= 0 else None)
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    files["generation_config.json"] = json.dumps(
        {"_from_model_config": True, "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
        indent=2,
    ) + "\n"

    # A fresh, contiguous tensor per HF name: safetensors refuses tensors sharing storage, and
    # under layer sharing layers 2i and 2i+1 are one tensor until here.
    torch_dtype = getattr(torch, dtype)
    hf_state = {
        name: tensor.detach().to(device="cpu", dtype=torch_dtype, copy=True).contiguous()
        for name, tensor in to_hf_state_dict(state_dict, model_args).items()
    }

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # only ever ours: the name carries our pid
    os.makedirs(tmp_dir)
    try:
        for name, text in files.items():
            with open(os.path.join(tmp_dir, name), "w", encoding="utf-8") as f:
                f.write(text)
        weights_path = os.path.join(tmp_dir, WEIGHT_FILES[weight_format])
        if weight_format == "safetensors":
            from safetensors.torch import save_file

            # transformers checks this metadata entry to know the tensors are PyTorch's.
            save_file(hf_state, weights_path, metadata={"format": "pt"})
            # safetensors creates its file private (0600); it gets the user's umask like the others,
            # so that colleagues on shared storage can read the weights as they read config.json.
            os.chmod(weights_path, 0o666 & ~_umask())
        else:
            torch.save(hf_state, weights_path)
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(tmp_dir, TOKENIZER_FILE))
        _move_into_place(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _umask() -> int:
    """This process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(tmp_dir: str, out_dir: str, overwrite: bool) -> None:
    # Checked again: the destination may have changed while the weights were written.
    _check_destination(out_dir, overwrite)
    if not os.path.isdir(out_dir):
        os.rename(tmp_dir, out_dir)
    elif not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.rename(tmp_dir, out_dir)
    else:
        # --overwrite: the old folder goes only once the new one is in place.
        old_dir = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old_dir)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(old_dir)


def export_checkpoint(
    checkpoint: str,
    out_dir: str,
    dtype: str = "float32",
    weight_format: str = "safetensors",
    tokenizer_path: str = "",
    overwrite: bool = False,
    verify: bool = True,
    with_tokenizer: bool = True,
    weights: str = "model",
) -> str:
    """Export a DCP step folder (see the module docstring); returns the written folder.

    `with_tokenizer=False` writes the model alone, whatever tokenizer the step folder holds;
    `weights="ema"` exports the step's weight EMA instead of its weights.
    """
    from mobilellm_train.checkpoint import TOKENIZER_FILE, load_model_from_checkpoint
    from mobilellm_train.evaluation.loading import TokenizerMismatchError, check_same_tokenizer
    from mobilellm_train.model import ModelArgs

    _check_destination(os.path.abspath(out_dir), overwrite)  # fail before the slow load
    try:
        check_same_tokenizer(checkpoint, tokenizer_path)
    except TokenizerMismatchError as e:
        raise ExportError(str(e)) from None
    if not with_tokenizer:
        tokenizer_path = ""
    elif not tokenizer_path:
        in_step = os.path.join(checkpoint, TOKENIZER_FILE)
        if os.path.isfile(in_step):
            tokenizer_path = in_step
        else:
            logger.warning(
                "%s holds no %s and --tokenizer is not given: exporting the model without a tokenizer",
                checkpoint, TOKENIZER_FILE,
            )
    if tokenizer_path:
        # An unusable tokenizer is found before the slow load; the vocabulary check waits for the model.
        if not os.path.isfile(tokenizer_path):
            raise ExportError(f"--tokenizer {tokenizer_path}: no such file")
        tokenizer_files(tokenizer_path, ModelArgs(vocab_size=1 << 31))
    model = load_model_from_checkpoint(checkpoint, verify=verify, weights=weights)
    return write_hf_folder(
        model.args, model.state_dict(), out_dir, dtype, weight_format, tokenizer_path, overwrite
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mobilellm-export", description="Export a DCP checkpoint step folder as a Hugging Face Llama folder."
    )
    parser.add_argument("--checkpoint", required=True, help="DCP step folder, e.g. <run>/checkpoints/step-1000")
    parser.add_argument("--out", required=True, help="folder to create (refused if it exists and is not empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default float32)")
    parser.add_argument("--format", dest="weight_format", choices=sorted(WEIGHT_FILES) + ["executorch"],
                        default="safetensors",
                        help="model.safetensors (default), pytorch_model.bin, or executorch: an on-device "
                             ".pte program for XNNPACK (--out names the .pte; see mobilellm_train/edge.py)")
    parser.add_argument("--tokenizer", default="", help="SentencePiece tokenizer.model, when the step folder has none")
    parser.add_argument("--no-tokenizer", dest="with_tokenizer", action="store_false",
                        help="write the model alone, without the step folder's tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the files against the checksums recorded at save")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="the step's weights (default) or its weight EMA (training.ema_decay)")
    edge_options = parser.add_argument_group("--format executorch")
    edge_options.add_argument("--max-context", type=int, default=512,
                              help="tokens the program's KV cache holds, prompt and generation together (default 512)")
    edge_options.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                              help="linear layers: none (fp32), 8da4w (int8 dynamic activations, int4 weights "
                                   "in groups) or 8da8w (int8 per-channel weights)")
    edge_options.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                              help=f"8da4w weight group size (default {DEFAULT_GROUP_SIZE})")
    edge_options.add_argument("--embedding-quantize", default="none", metavar="BITS[,GROUP]",
                              help="the embedding table (the lookup): none (fp32, default), 8,0 (int8, a scale per "
                                   "row) or 4,GROUP (int4 in groups of GROUP columns, e.g. 4,32; 0: per row), run "
                                   "by ExecuTorch's quantized embedding kernels: ExecuTorch's Llama recipe's -E")
    edge_options.add_argument("--force", action="store_true",
                              help="export a step trained by QAT with another --quantize, --group-size or "
                                   "--embedding-quantize than it was trained for (refused otherwise)")
    edge_options.add_argument("--report", action="store_true",
                              help="after writing, load the program in the ExecuTorch runtime and print its size, "
                                   "agreement with the eager model and prefill/decode tokens/s beside eager")
    edge_options.add_argument("--report-data", default="",
                              help="held-out token data (JSONL or prepared shards, as mobilellm-eval reads) for "
                                   "the report's perplexity and agreement; without it, random tokens (agreement only)")
    args = parser.parse_args(argv)
    if args.tokenizer and not args.with_tokenizer:
        parser.error("--tokenizer and --no-tokenizer contradict each other; pass one")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if args.weight_format == "executorch":
        _main_executorch(args)
        return
    from mobilellm_train.checkpoint import CheckpointError  # only now: the command line is usable

    try:
        out = export_checkpoint(
            args.checkpoint, args.out, args.dtype, args.weight_format, args.tokenizer, args.overwrite, args.verify,
            args.with_tokenizer, args.weights,
        )
    except (ExportError, CheckpointError) as e:
        print(f"export error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(out)


def _main_executorch(args: argparse.Namespace) -> None:
    """--format executorch: the checkpoint (step or HF folder) as a .pte, with mobilellm_train.edge."""
    from mobilellm_train import edge
    from mobilellm_train.checkpoint import TOKENIZER_FILE, CheckpointError
    from mobilellm_train.data.jsonl import DataError
    from mobilellm_train.evaluation.loading import (
        TokenizerMismatchError,
        check_same_tokenizer,
        check_tokenizer_fits,
        find_tokenizer,
        embedding_mismatch,
        load_model,
        scheme_mismatch,
    )
    from mobilellm_train.hf import HFCheckpointError
    from mobilellm_train.quantization import parse_embedding_scheme

    try:
        if args.dtype != "float32":
            raise ExportError("--format executorch takes the fp32 weights; use --quantize for smaller weights")
        embedding = parse_embedding_scheme(args.embedding_quantize)
        edge.require_executorch()
        if not os.path.isdir(args.checkpoint):
            raise ExportError(f"--checkpoint {args.checkpoint}: no such folder")
        check_same_tokenizer(args.checkpoint, args.tokenizer)
        tokenizer = args.tokenizer or find_tokenizer(args.checkpoint)
        if tokenizer and os.path.isdir(tokenizer):
            raise ExportError(f"{args.checkpoint} has only tokenizer.json; the program ships a SentencePiece "
                              "tokenizer.model: pass --tokenizer")
        if not tokenizer:
            logger.warning("%s holds no %s and --tokenizer is not given: writing the program without a tokenizer",
                           args.checkpoint, TOKENIZER_FILE)
        edge.check_destination(args.out, bool(tokenizer), args.overwrite)  # before the slow load
        for mismatch in (scheme_mismatch(args.checkpoint, args.quantize, args.group_size),
                         embedding_mismatch(args.checkpoint, embedding)):
            if mismatch and not args.force:
                raise ExportError(f"{mismatch}; or pass --force to export it so anyway")
            if mismatch:
                logger.warning("%s; exporting it so anyway (--force)", mismatch)
        model = load_model(args.checkpoint, verify=args.verify, weights=args.weights)
        if tokenizer:
            import sentencepiece as spm

            check_tokenizer_fits(tokenizer, spm.SentencePieceProcessor(model_file=tokenizer).vocab_size(),
                                 model.args.vocab_size)
        out = edge.write_program(
            model, args.out, tokenizer, args.max_context, args.quantize, args.group_size, args.overwrite,
            source=os.path.abspath(args.checkpoint), embedding_quantize=args.embedding_quantize,
        )
        print(out)
        if args.report:
            result = edge.report(edge.EdgeProgram(out), model, args.report_data)
            print(json.dumps(result, indent=2))
    except (ExportError, CheckpointError, HFCheckpointError, TokenizerMismatchError, edge.EdgeError, DataError,
            OSError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
