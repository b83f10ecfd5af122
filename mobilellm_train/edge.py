"""On-device export: a MobileLLM as an ExecuTorch program (`.pte`) for the XNNPACK backend, with a
static KV cache, and the ExecuTorch runtime from Python to run it.

    mobilellm-export --checkpoint STEP_OR_HF_FOLDER --format executorch --out model.pte \
        [--max-context 512] [--quantize none|8da4w|8da8w] [--group-size 32] \
        [--embedding-quantize 8,0|4,32] [--report]
    mobilellm-generate --pte model.pte --prompt "Return the"
    python -m mobilellm_train.edge --pte model.pte [--checkpoint FOLDER] [--report-data DATA]   # the report

The program has one method, `forward(tokens [1, T] int64, input_pos [1] int64) -> logits
[1, vocab] fp32`, for 1 <= T <= max_prefill (128 unless chosen): it computes positions
input_pos..input_pos+T, writes their keys and values into the cache (mutable buffers the runtime
keeps between calls of a loaded method), attends each query to the cached positions up to its own
and returns the last position's logits. A prompt is one call at input_pos 0 (prefill; longer
prompts are fed in chunks of max_prefill), then one call per generated token (decode). The cache
never needs clearing: a new sequence starts at input_pos 0 and nothing past a query's position is
ever read.

What is lowered is the model in model.py, its fused projections split again
(edge_model.unfused_copy: a split would cut XNNPACK's delegate), wrapped by
edge_model.StaticCacheModel: it reuses the model's embedding, norms, projections, feed-forward
and output and re-implements only the attention step, on ExecuTorch's LLM custom ops
(update_cache, custom_sdpa) so that a decode step costs what the filled cache positions cost. A
layer-sharing block stays one module called twice, so its weights are stored once in the
program; each of its passes has its own cache. Every op XNNPACK runs is delegated to it; with
`--quantize` the linear layers are first quantized by torchao (8da4w: int8 dynamic activations
with int4 weights in groups of --group-size, the layout XNNPACK runs for LLMs; 8da8w: int8
per-channel weights), the embedding staying fp32 unless --embedding-quantize (ExecuTorch's Llama
recipe's -E: int8 per row, or int4 in groups) stores the lookup table quantized, looked up by
ExecuTorch's quantized embedding kernels (edge_model.QuantizedEmbedding): the schemes of
quantization.py, which quantization-aware training simulates (docs/QUANTIZATION.md).

`executorch` and `torchao` are the optional `edge` extra (pip install -e '.[edge]'); they are
imported only when lowering or running a program.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mobilellm_train.edge_model import (
    EdgeError,
    StaticCacheModel,
    apply_quantized_lookup,
    load_custom_ops,
    maybe_quiet_native_noise,
    unfused_copy,
)
from mobilellm_train.model import MobileLLM
from mobilellm_train.quantization import (  # noqa: F401 (QUANTIZE_CHOICES: edge's public name)
    DEFAULT_GROUP_SIZE,
    QUANTIZE_CHOICES,
    EmbeddingScheme,
    QuantizationError,
    apply_embedding_ptq,
    apply_ptq,
    parse_embedding_scheme,
)

logger = logging.getLogger("mobilellm_train")

DEFAULT_MAX_CONTEXT = 512
# Tokens one call takes at most: longer prompts are fed in chunks. It bounds the activations the
# program plans memory for (as the token count of ExecuTorch's Llama recipe does).
DEFAULT_MAX_PREFILL = 128
# Written beside model.pte: what the program was built from and for, read by the runtime wrapper.
META_SUFFIX = ".json"


def require_executorch() -> None:
    """Raise an EdgeError saying how to install the extra when executorch is not importable."""
    try:
        with maybe_quiet_native_noise():
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
    except ImportError as e:
        raise EdgeError(
            f"--format executorch needs ExecuTorch ({e}); install the edge extra: "
            "pip install -e '.[edge]' (see docs/EXPORT.md for the pinned versions)"
        ) from None


def apply_quantization(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                       embedding: EmbeddingScheme | None = None) -> None:
    """Quantize every nn.Linear of `model` in place with the scheme's one definition
    (quantization.apply_ptq: torchao, the tied output layer on its own copy), and the embedding
    table with `embedding` (apply_embedding_ptq; None: it stays fp32)."""
    try:
        apply_embedding_ptq(model, embedding)
        apply_ptq(model, scheme, group_size)
    except QuantizationError as e:
        raise EdgeError(str(e)) from None


def export_program(
    model: MobileLLM, max_context: int = DEFAULT_MAX_CONTEXT, quantize: str = "none",
    group_size: int = DEFAULT_GROUP_SIZE, max_prefill: int = DEFAULT_MAX_PREFILL,
    embedding: EmbeddingScheme | None = None,
) -> bytes:
    """The serialized ExecuTorch program (.pte bytes) of `model`: StaticCacheModel through
    torch.export with a dynamic token count (1..max_prefill), every op XNNPACK runs delegated to
    it, a quantized embedding table (`embedding`) looked up by ExecuTorch's quantized embedding
    kernel. `model` is moved to the CPU in fp32; unfusing and quantization work on a copy."""
    require_executorch()
    with maybe_quiet_native_noise():
        return _export_program(model, max_context, quantize, group_size, min(max_prefill, max_context), embedding)


def _export_program(model: MobileLLM, max_context: int, quantize: str, group_size: int, max_prefill: int,
                    embedding: EmbeddingScheme | None) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim, export

    model = model.to(device="cpu", dtype=torch.float32).eval()
    # A copy (quantize_ replaces modules in place; the caller's model stays as it was) with the
    # projections unfused, so that XNNPACK's delegate is not cut at every split.
    model = unfused_copy(model)
    apply_quantization(model, quantize, group_size, embedding)
    apply_quantized_lookup(model)  # the table's int values and scales only: no fp32 copy in the program
    wrapper = StaticCacheModel(model, max_context, max_prefill).eval()
    example = (torch.zeros(1, min(2, max_prefill), dtype=torch.long), torch.zeros(1, dtype=torch.long))
    dynamic = {"tokens": {1: Dim("tokens", min=1, max=max_prefill)}, "input_pos": None} if max_prefill > 1 else None
    with torch.no_grad():
        exported = export(wrapper, example, dynamic_shapes=dynamic, strict=False)
    edge = to_edge_transform_and_lower(
        exported,
        partitioner=[XnnpackPartitioner()],
        # The cache update is an in-place write the edge dialect's verifier does not list.
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
    )
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            # Inputs are the caller's tensors, not planned memory; the cache buffers are planned
            # and live as long as the loaded method, so they persist across calls.
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            # Activations planned for the largest call the token bound allows, not the example's.
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            do_quant_fusion_and_const_prop=True,
        )
    )
    return program.buffer


@dataclass
class ProgramInfo:
    """What the program beside it was built from and for (written as <out>.json)."""

    max_context: int
    vocab_size: int
    quantize: str
    group_size: int
    layer_sharing: bool
    n_layers: int
    dim: int
    parameters: int
    source: str
    executorch_version: str
    torch_version: str
    # Tokens one call takes; absent from programs written before it existed (they took any count
    # up to max_context and returned every position's logits).
    max_prefill: int = 0
    # The embedding table's quantization ("8,0", "4,32"; "": fp32, and programs written before it).
    embedding_quantize: str = ""

    OPTIONAL = ("max_prefill", "embedding_quantize")

    @classmethod
    def read(cls, path: str) -> "ProgramInfo":
        with open(path) as f:
            data = json.load(f)
        missing = [k for k in cls.__dataclass_fields__ if k not in data and k not in cls.OPTIONAL]
        if missing:
            raise EdgeError(f"{path}: missing {', '.join(missing)}; re-export the program")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def meta_path(pte_path: str) -> str:
    return os.path.splitext(pte_path)[0] + META_SUFFIX


def tokenizer_path_for(pte_path: str) -> str:
    """Where export writes the tokenizer: tokenizer.model beside the program."""
    from mobilellm_train.checkpoint import TOKENIZER_FILE

    return os.path.join(os.path.dirname(os.path.abspath(pte_path)), TOKENIZER_FILE)


def executorch_version() -> str:
    """The installed ExecuTorch's version (the package has no __version__)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch")
    except PackageNotFoundError:
        return "unknown"


def check_destination(out_path: str, with_tokenizer: bool, overwrite: bool) -> None:
    """Refuse an --out that is not a .pte file name, or whose files exist, unless overwrite."""
    out_path = os.path.abspath(out_path)
    if os.path.isdir(out_path):
        raise EdgeError(f"--out {out_path} is a folder; give the program's file name, e.g. model.pte")
    if not out_path.endswith(".pte"):
        raise EdgeError(f"--out {out_path}: an ExecuTorch program's name ends in .pte")
    targets = [out_path, meta_path(out_path)] + ([tokenizer_path_for(out_path)] if with_tokenizer else [])
    existing = [p for p in targets if os.path.exists(p)]
    if existing and not overwrite:
        raise EdgeError(f"{', '.join(existing)} exists; choose another --out or pass --overwrite")


def write_program(
    model: MobileLLM, out_path: str, tokenizer_path: str = "", max_context: int = DEFAULT_MAX_CONTEXT,
    quantize: str = "none", group_size: int = DEFAULT_GROUP_SIZE, overwrite: bool = False, source: str = "",
    max_prefill: int = DEFAULT_MAX_PREFILL, embedding_quantize: str = "none",
) -> str:
    """Write `out_path` (the .pte), its .json description and the tokenizer beside it; returns
    the .pte path. `embedding_quantize` is the table's scheme as --embedding-quantize spells it
    ("8,0", "4,32"; "none"). Nothing existing is replaced unless `overwrite`; files appear only
    complete."""
    out_path = os.path.abspath(out_path)
    tok_dest = tokenizer_path_for(out_path)
    check_destination(out_path, bool(tokenizer_path), overwrite)
    if tokenizer_path and not os.path.isfile(tokenizer_path):
        raise EdgeError(f"--tokenizer {tokenizer_path}: no such file")
    if quantize not in QUANTIZE_CHOICES:
        raise EdgeError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    try:
        embedding = parse_embedding_scheme(embedding_quantize)
    except QuantizationError as e:
        raise EdgeError(str(e)) from None
    args = model.args
    info = ProgramInfo(
        max_context=max_context, vocab_size=args.vocab_size, quantize=quantize, group_size=group_size,
        layer_sharing=args.layer_sharing, n_layers=args.n_layers, dim=args.dim,
        parameters=sum(p.numel() for p in model.parameters()), source=source,
        executorch_version=executorch_version(), torch_version=torch.__version__,
        max_prefill=min(max_prefill, max_context), embedding_quantize=str(embedding) if embedding else "",
    )
    buffer = export_program(model, max_context, quantize, group_size, max_prefill, embedding)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    writes = [(out_path, buffer), (meta_path(out_path), (json.dumps(info.__dict__, indent=2) + "\n").encode())]
    tmp_paths = []
    try:
        for path, data in writes:
            tmp = f"{path}.tmp-{os.getpid()}"
            tmp_paths.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
        if tokenizer_path and os.path.abspath(tokenizer_path) != tok_dest:
            tmp = f"{tok_dest}.tmp-{os.getpid()}"
            tmp_paths.append(tmp)
            shutil.copyfile(tokenizer_path, tmp)
            writes.append((tok_dest, b""))
        # The program last: its presence means the description and tokenizer are in place.
        for (path, _), tmp in reversed(list(zip(writes, tmp_paths))):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmp_paths:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return out_path


class EdgeProgram:
    """A loaded .pte run through ExecuTorch's runtime: `forward(tokens, start)` as
    StaticCacheModel's, for any number of tokens (fed in chunks of the program's max_prefill),
    with the position checks the program itself cannot make."""

    def __init__(self, pte_path: str):
        require_executorch()
        from executorch.runtime import Runtime

        if not os.path.isfile(pte_path):
            raise EdgeError(f"--pte {pte_path}: no such file")
        meta = meta_path(pte_path)
        if not os.path.isfile(meta):
            raise EdgeError(f"{meta} is missing: the program's description is written beside it by mobilellm-export")
        self.info = ProgramInfo.read(meta)
        self.path = pte_path
        try:
            load_custom_ops()  # the program's attention runs ExecuTorch's LLM ops
            with maybe_quiet_native_noise():
                program = Runtime.get().load_program(pte_path)
                self._method = program.load_method("forward")
        except Exception as e:  # the runtime raises RuntimeError/ValueError by release
            raise EdgeError(f"{pte_path}: the ExecuTorch runtime cannot load it ({e})") from None
        self.max_context = self.info.max_context
        self.max_prefill = self.info.max_prefill or self.max_context
        self.vocab_size = self.info.vocab_size

    def forward(self, tokens: list[int] | torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, vocab] of the last of `tokens`, at positions start..start+T-1 (the cache
        holds 0..start)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
        end = start + tokens.shape[1]
        if tokens.shape[1] < 1 or start < 0 or end > self.max_context:
            raise ValueError(f"positions {start}..{end} do not fit the program's context of {self.max_context}")
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}, the program's vocabulary")
        for chunk_start in range(0, tokens.shape[1], self.max_prefill):
            chunk = tokens[:, chunk_start : chunk_start + self.max_prefill]
            (logits,) = self._method.execute([chunk, torch.tensor([start + chunk_start], dtype=torch.long)])
        # Programs written before max_prefill returned every position's logits.
        return logits.reshape(-1, self.vocab_size)[-1:]


def generate_pte(
    program: EdgeProgram, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, num_samples: int = 1, eos_id: int = -1, seed: int = 0, vocab_limit: int = 0,
) -> list[list[int]]:
    """generate.generate through the program: `num_samples` continuations, each its own pass
    (the program's batch is 1), sampled with decoding.sample_next; total length stops at the
    program's max_context."""
    from mobilellm_train.decoding import sample_next

    if not prompt:
        raise ValueError("the prompt has no tokens")
    if len(prompt) >= program.max_context:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room within the program's context {program.max_context}")
    max_len = min(len(prompt) + max_new_tokens, program.max_context)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        logits = program.forward(prompt, 0)
        out: list[int] = []
        for position in range(len(prompt), max_len):
            if vocab_limit:
                logits[:, vocab_limit:] = float("-inf")
            next_id = int(sample_next(logits, temperature, top_p, generator)[0])
            if next_id == eos_id:
                break
            out.append(next_id)
            if position + 1 == max_len:
                break
            logits = program.forward([next_id], position)
        samples.append(out)
    return samples


def measure_throughput(forward, prompt_len: int, decode_tokens: int, vocab_size: int, repeats: int = 3) -> dict:
    """Prefill and decode tokens/s of `forward(tokens, start)`: a prompt of prompt_len tokens in
    one call, then decode_tokens single-token calls; the best of `repeats` runs of each."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (prompt_len,), generator=gen).tolist()
    forward(prompt, 0)  # warm-up: first-call allocations and XNNPACK weight packing
    prefill_s = decode_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(prompt, 0)
        prefill_s = min(prefill_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(decode_tokens):
            forward([prompt[i % prompt_len]], prompt_len + i)
        decode_s = min(decode_s, time.perf_counter() - t0)
    return {
        "prefill_tokens_per_s": prompt_len / prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
    }


def eager_forward(model: MobileLLM, max_context: int):
    """forward(tokens, start) -> logits [T, vocab] of the eager model with its KV cache
    (decoding.forward_cached), the baseline the program is measured beside."""
    from mobilellm_train.decoding import KVCache, forward_cached

    cache = KVCache(model, 1, max_context)

    @torch.no_grad()
    def forward(tokens, start):
        return forward_cached(model, torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1), cache, start)[0]

    return forward


@torch.no_grad()
def compare_with_eager(program: EdgeProgram, model: MobileLLM, windows: torch.Tensor) -> dict:
    """How the program's predictions agree with the eager fp32 model's on token windows
    [N, L] (L <= the program's context), each fed token by token from position 0 (the program
    returns the last position's logits of a call).

    kl: mean KL(eager || program) of the next-token distributions, nats per token; top1: the
    fraction of positions whose argmax agrees; max_abs_logit_diff; and the perplexity of both on
    the windows' next tokens (every token but the first is predicted)."""
    if windows.shape[1] > program.max_context:
        raise EdgeError(f"windows of {windows.shape[1]} tokens exceed the program's context {program.max_context}")
    kl_sum = agree = nll_program = nll_eager = 0.0
    max_diff = 0.0
    count = 0
    for window in windows:
        got = torch.cat([program.forward(window[i : i + 1], i) for i in range(window.shape[0])]).float()
        want = model(window[None])[0].float()
        log_p, log_q = F.log_softmax(want, -1), F.log_softmax(got, -1)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (got.argmax(-1) == want.argmax(-1)).sum().item()
        max_diff = max(max_diff, (got - want).abs().max().item())
        targets = window[1:]
        nll_program += F.cross_entropy(log_q[:-1], targets, reduction="sum").item()
        nll_eager += F.cross_entropy(log_p[:-1], targets, reduction="sum").item()
        count += window.shape[0]
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return {
        "positions": count,
        "kl": kl_sum / count,
        "top1": agree / count,
        "max_abs_logit_diff": max_diff,
        "perplexity_program": math.exp(nll_program / predicted) if predicted else float("nan"),
        "perplexity_eager": math.exp(nll_eager / predicted) if predicted else float("nan"),
    }


def report_windows(data_path: str, vocab_size: int, window_len: int, max_windows: int = 8) -> torch.Tensor:
    """Held-out token windows for the report: from `data_path` (token JSONL or a prepared shard
    dataset, as mobilellm-eval's perplexity reads), else random tokens (agreement only: their
    perplexity means nothing)."""
    if data_path:
        from mobilellm_train.evaluation.perplexity import pack_windows, token_documents

        return pack_windows(token_documents(data_path, vocab_size), window_len, max_windows)
    return torch.randint(0, vocab_size, (max_windows, window_len), generator=torch.Generator().manual_seed(0))


def report(
    program: EdgeProgram, model: MobileLLM | None, data_path: str = "", prompt_tokens: int = 128,
    decode_tokens: int = 64, max_windows: int = 8,
) -> dict:
    """What a device would pay: program size, and the runtime's prefill and decode tokens/s on
    this machine's CPU; with `model` (fp32) also eager KV-cache tokens/s beside them and the
    program's agreement with eager (compare_with_eager) on held-out windows of `data_path`."""
    # A short context is measured within itself: at most half of it decoded.
    decode_tokens = max(1, min(decode_tokens, program.max_context // 2))
    prompt_tokens = max(1, min(prompt_tokens, program.max_context - decode_tokens))
    if program.max_context < 2:
        raise EdgeError("a program of context 1 has no decode step to measure")
    result = {
        "program": program.path,
        "program_bytes": os.path.getsize(program.path),
        "parameters": program.info.parameters,
        "fp32_parameter_bytes": 4 * program.info.parameters,
        "quantize": program.info.quantize,
        "embedding_quantize": program.info.embedding_quantize or "none",
        "max_context": program.max_context,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "torch": torch.__version__,
        "executorch": executorch_version(),
        "torch_threads": torch.get_num_threads(),
        "runtime": measure_throughput(program.forward, prompt_tokens, decode_tokens, program.vocab_size),
    }
    if model is not None:
        model = model.to(device="cpu", dtype=torch.float32).eval()
        result["eager"] = measure_throughput(
            eager_forward(model, program.max_context), prompt_tokens, decode_tokens, program.vocab_size
        )
        windows = report_windows(data_path, program.vocab_size, program.max_context, max_windows)
        result["agreement"] = {"data": data_path or "random tokens", **compare_with_eager(program, model, windows)}
    return result


def main(argv: list[str] | None = None) -> None:
    """The report of an existing program, beside the checkpoint it came from when given."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m mobilellm_train.edge",
        description="Size, agreement with eager and runtime tokens/s of an ExecuTorch program (a JSON report).",
    )
    p.add_argument("--pte", required=True, help="the program, from mobilellm-export --format executorch")
    p.add_argument("--checkpoint", default="", help="its step or HF folder: adds eager tokens/s and agreement")
    p.add_argument("--report-data", default="", help="held-out token data (JSONL or prepared shards)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length measured")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps measured")
    args = p.parse_args(argv)
    from mobilellm_train.checkpoint import CheckpointError
    from mobilellm_train.evaluation.loading import load_model
    from mobilellm_train.hf import HFCheckpointError

    try:
        program = EdgeProgram(args.pte)
        model = load_model(args.checkpoint) if args.checkpoint else None
        result = report(program, model, args.report_data, args.prompt_tokens, args.decode_tokens)
    except (EdgeError, CheckpointError, HFCheckpointError, OSError, ValueError) as e:
        print(f"edge report error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
