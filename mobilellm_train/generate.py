"""Sample text from a checkpoint, for a quick look: greedy, temperature and top-p, with a KV cache.

    mobilellm-generate --checkpoint outputs/debug/checkpoints/step-200 --prompt "Return the"
    python -m mobilellm_train.generate --checkpoint FOLDER --prompt "..." [--prompt ...] \
        [--max-new-tokens 64] [--temperature 0.8] [--top-p 0.95] [--num-samples 3] [--seed 0]

--checkpoint is a DCP step folder or a Hugging Face folder (export.py's, or any Llama that maps
onto MobileLLM). Temperature 0 (the default) is greedy decoding. `--pte model.pte` instead samples
from an ExecuTorch program (mobilellm-export --format executorch) in the ExecuTorch runtime, with
the same sampling, so what is seen is the artifact that ships; `--quantize 8da4w
[--embedding-quantize 8,0]` samples from the checkpoint quantized as that program is (its greedy
output is the program's).

The decoding itself (the KV cache, the cached forward pass, the sampler) is in decoding.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

# The decoding helpers import torch only when called, so --help and argument errors answer at once.
from mobilellm_train.decoding import KVCache, forward_cached, generate, sample_next  # noqa: F401 (the API)
from mobilellm_train.quantization import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="mobilellm-generate", description="Sample continuations of prompts from a checkpoint."
    )
    p.add_argument("--checkpoint", default="", help="DCP step folder or Hugging Face folder")
    p.add_argument("--pte", default="",
                   help="an ExecuTorch program from mobilellm-export --format executorch, run in the ExecuTorch "
                        "runtime instead of --checkpoint (its tokenizer.model is read from beside it)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for several")
    p.add_argument("--prompt-file", default="", help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with BOS")
    p.add_argument("--device", default="", help="cuda, cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bf16 autocast on GPU")
    p.add_argument("--layer-sharing", choices=("auto", "true", "false"), default="auto", help="HF folders only")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="--checkpoint: sample from the model as the ExecuTorch program runs it, its linear layers "
                        "quantized as mobilellm-export --quantize does (8da4w, 8da8w)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"8da4w weight group size (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--embedding-quantize", default="none", metavar="BITS[,GROUP]",
                   help="--checkpoint: the embedding table looked up as mobilellm-export --embedding-quantize "
                        "stores it (8,0: int8 per row; 4,32: int4 in groups of 32; none: fp32)")
    p.add_argument("--tokenizer", default="", help="tokenizer.model, when the checkpoint holds none")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking DCP checkpoint files against the checksums recorded at save")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="a step folder's weights (default) or its weight EMA (training.ema_decay)")
    args = p.parse_args(argv)
    if bool(args.checkpoint) == bool(args.pte):
        p.error("give exactly one of --checkpoint FOLDER and --pte PROGRAM")
    if args.pte and args.weights != "model":
        p.error("--weights chooses a step folder's weights; a --pte program holds the ones it was exported with")
    if args.pte and (args.quantize != "none" or args.embedding_quantize != "none"):
        p.error("--quantize and --embedding-quantize apply to --checkpoint; a program is quantized when it is exported")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    import torch  # only now: the command line is known to be usable

    from mobilellm_train.checkpoint import CheckpointError
    from mobilellm_train.evaluation.loading import (
        apply_program_quantization,
        check_tokenizer_fits,
        load_model,
        load_tokenizer,
    )
    from mobilellm_train.hf import HFCheckpointError
    from mobilellm_train.quantization import parse_embedding_scheme

    prompts = list(args.prompt)
    try:
        if args.prompt_file:
            with open(args.prompt_file) as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError("give --prompt TEXT or --prompt-file FILE")
        if args.max_new_tokens < 1 or args.num_samples < 1 or not 0 < args.top_p <= 1 or args.temperature < 0:
            raise ValueError("need --max-new-tokens >= 1, --num-samples >= 1, 0 < --top-p <= 1, --temperature >= 0")
        if args.pte:
            _main_pte(args, prompts)
            return
        embedding = parse_embedding_scheme(args.embedding_quantize)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        layer_sharing = {"auto": None, "true": True, "false": False}[args.layer_sharing]
        model = load_model(args.checkpoint, device=device, layer_sharing=layer_sharing, verify=args.verify,
                           weights=args.weights)
        apply_program_quantization(model, args.checkpoint, args.quantize, args.group_size, embedding)
        tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
        check_tokenizer_fits(tokenizer.path, tokenizer.vocab_size, model.args.vocab_size)
    except (ValueError, OSError, CheckpointError, HFCheckpointError) as e:
        print(f"generate error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    for i, text in enumerate(prompts):
        ids = tokenizer.encode(text)
        if not args.no_bos and tokenizer.bos_id >= 0:
            ids = [tokenizer.bos_id] + ids
        with autocast:
            samples = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p,
                               args.num_samples, tokenizer.eos_id, args.seed + i, tokenizer.vocab_size)
        for j, sample in enumerate(samples):
            header = f"=== prompt {i + 1}" + (f", sample {j + 1}" if args.num_samples > 1 else "") + " ==="
            # Decoded together with the prompt: SentencePiece drops the leading space of a
            # sequence's first piece, which would glue the continuation to the prompt.
            print(f"{header}\n{tokenizer.decode(ids + sample)}\n")


def _main_pte(args: argparse.Namespace, prompts: list[str]) -> None:
    """--pte: the same sampling through the ExecuTorch program (mobilellm_train/edge.py)."""
    from mobilellm_train import edge
    from mobilellm_train.evaluation.loading import check_tokenizer_fits, load_tokenizer

    try:
        program = edge.EdgeProgram(args.pte)
        tokenizer_path = args.tokenizer or edge.tokenizer_path_for(args.pte)
        tokenizer = load_tokenizer("", tokenizer_path)
        check_tokenizer_fits(tokenizer_path, tokenizer.vocab_size, program.vocab_size)
    except (edge.EdgeError, OSError, ValueError) as e:  # TokenizerMismatchError is a ValueError
        print(f"generate error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    for i, text in enumerate(prompts):
        ids = tokenizer.encode(text)
        if not args.no_bos and tokenizer.bos_id >= 0:
            ids = [tokenizer.bos_id] + ids
        try:
            samples = edge.generate_pte(program, ids, args.max_new_tokens, args.temperature, args.top_p,
                                        args.num_samples, tokenizer.eos_id, args.seed + i, tokenizer.vocab_size)
        except ValueError as e:
            print(f"generate error: prompt {i + 1}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        for j, sample in enumerate(samples):
            header = f"=== prompt {i + 1}" + (f", sample {j + 1}" if args.num_samples > 1 else "") + " ==="
            print(f"{header}\n{tokenizer.decode(ids + sample)}\n")


if __name__ == "__main__":
    main()
