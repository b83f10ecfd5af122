"""The model that `mobilellm-export --format executorch` lowers: a MobileLLM with a KV cache built
on ExecuTorch's LLM custom ops (`llama::update_cache`, `llama::custom_sdpa`), usable eagerly too.

    from mobilellm_train.edge_model import StaticCacheModel, load_custom_ops
    load_custom_ops()
    wrapper = StaticCacheModel(model, max_context=512, max_prefill=128)
    logits = wrapper(tokens, torch.tensor([start]))       # [1, vocab]: the last position's

It reuses the model's own modules (embedding, norms, projections, feed-forward, output) and
re-implements only the attention step:

- the cache of each attention pass is a mutable buffer [1, max_context, kv_heads, head_dim]
  (sequence before heads: the layout the ops expect), written in place by one `update_cache`
  call per tensor at the start position; the runtime keeps it between calls of a loaded method;
- `custom_sdpa` attends each query to the cached positions 0..its own and no further, so a
  decode step costs what the filled positions cost, not what the whole cache would; grouped
  query heads read their shared key/value head directly (nothing is expanded), and slots past
  the current position are never read (the runtime does not initialise them);
- the start position comes from `input_pos[0].item()`, a symbolic size in the exported graph,
  bounded so that the rotary tables and the cache are sliced within range;
- only the last position's logits are computed: generation needs no others, and [T, vocab]
  logits would be the program's largest activation;
- nothing in a block leaves XNNPACK for a split: the program is lowered from `unfused_copy(model)`
  (separate wq/wk/wv and w1/w3 again), and the rotary half-turn is a product with a constant
  signed permutation rather than a chunk and a concatenation. A split between two delegated
  ops cuts the delegated graph in two, and every extra delegate call costs time per token and
  memory for its runtime (30 fewer delegates at 125M).

Both ops are ExecuTorch's own (the `executorch` wheel's `extension.llm.custom_ops`), with CPU
kernels for eager PyTorch and for the runtime, registered by `load_custom_ops()`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mobilellm_train.model import Attention, FeedForward, MobileLLM


class EdgeError(RuntimeError):
    """The program cannot be built or run: missing packages, bad options or a bad .pte."""


def load_custom_ops() -> None:
    """Register ExecuTorch's LLM ops (update_cache, custom_sdpa) and its quantized kernels (the
    lookup of a quantized embedding table, QuantizedEmbedding) with PyTorch and with the Python
    runtime: importing each module loads its library, whose kernels serve both."""
    try:
        with maybe_quiet_native_noise():
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
            from executorch.kernels import quantized  # noqa: F401
    except (ImportError, OSError, AssertionError) as e:
        raise EdgeError(
            f"ExecuTorch's LLM custom ops cannot be loaded ({e}); install the edge extra: "
            "pip install -e '.[edge]' (see docs/EXPORT.md for the pinned versions)"
        ) from None


# What lowering and loading print that says nothing about the user's model: torchao's optional
# GPU kernels it cannot load on a CPU build (and its log record that Triton is missing), pytree's
# deprecation note at torchao's import, cpuinfo's probing of ARM-only files, the custom ops' per-
# call remark when run eagerly, and the log records of finding and loading the custom ops'
# library and of copying each constant shared by two delegates (INFO records of the root logger,
# printed once a command configures logging).
_NOISE = (
    "cpuinfo_utils.cpp",
    "kernel_runtime_context.h",
    "is an Enum subclass and is now natively supported",
    "Detected no triton",
    "Looking for libcustom_ops_aot_lib",
    "Loading custom ops library",
    "Copying constant nodes",
)


def _is_noise(line: str) -> bool:
    return any(marker in line for marker in _NOISE) or ("Failed to load" in line and "torchao" in line)


class _NoiseFilter(logging.Filter):
    """Drops the libraries' log records that are noise (_NOISE), whichever logger made them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_noise(record.getMessage())


@contextlib.contextmanager
def maybe_quiet_native_noise():
    """Drop the known noise (_NOISE) that ExecuTorch's and torchao's libraries write to the
    process's stderr, C++ included, while the block runs; every other line is passed on after it."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to redirect: nothing would be printed anyway
        yield
        return
    with tempfile.TemporaryFile() as capture, warnings.catch_warnings(), _quiet_log_records():
        # ExecuTorch's op registrations call torch._check_is_size, which torch 2.13 deprecates.
        warnings.filterwarnings("ignore", message=".*_check_is_size will be removed", category=FutureWarning)
        # torch.export's pytree note on ExecuTorch's specs, and the emitter's remark that mutated
        # buffers start undefined (the cache is built for that: no slot is read before written).
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected", category=UserWarning)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(True) if not _is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def _quiet_log_records():
    """_NoiseFilter on the log handlers while the block runs: on the handlers, not on a logger,
    as records of any logger propagate to them (the root's, which a command's logging.basicConfig
    sets up, and the last-resort one)."""
    handlers = [h for h in (*logging.getLogger().handlers, logging.lastResort) if h is not None]
    noise = _NoiseFilter()
    for handler in handlers:
        handler.addFilter(noise)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(noise)


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, T, n_heads, head_dim], k and v [B, T, n_kv_heads, head_dim] of x [B, T, dim].

    The one place here that knows how the projections are stored: one fused wqkv whose output is
    [q | k | v], or (older step folders) separate wq/wk/wv."""
    B, T, _ = x.shape
    q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    fused = getattr(attn, "wqkv", None)
    if fused is not None:
        q, k, v = fused(x).split([q_dim, kv_dim, kv_dim], dim=-1)
    else:
        q, k, v = attn.wq(x), attn.wk(x), attn.wv(x)
    return (
        q.view(B, T, attn.n_heads, attn.head_dim),
        k.view(B, T, attn.n_kv_heads, attn.head_dim),
        v.view(B, T, attn.n_kv_heads, attn.head_dim),
    )


def _feed_forward(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """FeedForward's output, from its fused w13 or (after unfused_copy) separate w1 and w3."""
    if hasattr(ff, "w13"):
        return ff(x)
    return ff.w2(F.silu(ff.w1(x)) * ff.w3(x))


def unfused_copy(model: MobileLLM) -> MobileLLM:
    """A copy of `model` whose fused projections are separate linear layers again: wqkv as wq,
    wk, wv and w13 as w1, w3, each holding its rows of the fused weight. The outputs are the
    same numbers; quantization per output row (8da4w, 8da8w) gives the same values too. Every
    other parameter and buffer is shared with `model`, not copied; modules are copied, so
    quantizing the copy (which replaces its modules' weights) leaves `model` as it was. A
    layer-sharing block stays one module, so its weights are still stored once."""

    def split(fused: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
        parts = []
        for rows in fused.weight.detach().split(sizes):
            part = nn.Linear(fused.in_features, rows.shape[0], bias=False)
            part.weight = nn.Parameter(rows.clone(), requires_grad=False)
            parts.append(part)
        return parts

    fused = {id(m.weight) for b in model.layers for m in (getattr(b.attention, "wqkv", None),
                                                        getattr(b.feed_forward, "w13", None)) if m is not None}
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in fused}
    model = copy.deepcopy(model, shared)
    for block in model.layers:
        attn, ff = block.attention, block.feed_forward
        if hasattr(attn, "wqkv"):
            q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
            attn.wq, attn.wk, attn.wv = split(attn.wqkv, [q_dim, kv_dim, kv_dim])
            del attn.wqkv
        if hasattr(ff, "w13"):
            ff.w1, ff.w3 = split(ff.w13, [ff.w13.out_features // 2] * 2)
            del ff.w13
    return model


class QuantizedEmbedding(nn.Module):
    """The lookup of an embedding table quantized by quantization.apply_embedding_ptq, as the
    program runs it: ExecuTorch's quantized_decomposed::embedding_byte (int8) or embedding_4bit
    (int4, two a byte) with fp32 output, whose runtime kernel dequantizes only the rows looked up,
    float(q) * float(scale) per value, scales in fp16: what the eager table (torchao's dequantize)
    computes, value for value. Only the table's int values and scales are stored, no fp32 copy.

    This is the form that is lowered, made by apply_quantized_lookup. Run eagerly, PyTorch's
    reference of these ops would multiply in the scales' fp16; eager evaluation keeps torchao's
    table instead (mobilellm-eval and mobilellm-generate --embedding-quantize)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        # The ops' definitions for export (their runtime kernels: load_custom_ops).
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401

        qdata, scale, zero_point = weight.qdata, weight.scale, weight.zero_point
        if torch.any(zero_point != 0):
            raise EdgeError("the embedding table's quantization is not symmetric (nonzero zero points)")
        self.bits = 4 if weight.target_dtype == torch.int4 else 8
        if self.bits == 4:
            # The kernel's layout: the even column in the high nibble, each value offset by 8.
            table = ((qdata[:, 0::2] + 8).to(torch.uint8) << 4) | (qdata[:, 1::2] + 8).to(torch.uint8)
        else:
            table = qdata.to(torch.int8)
        self.register_buffer("table", table.contiguous())
        self.register_buffer("scales", scale.reshape(scale.shape[0], -1).contiguous())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        if self.bits == 4:
            return ops.embedding_4bit.dtype(self.table, self.scales, None, -8, 7, tokens, dtype=torch.float32)
        return ops.embedding_byte.dtype(self.table, self.scales, None, -128, 127, tokens, dtype=torch.float32)


def apply_quantized_lookup(model: MobileLLM) -> None:
    """Replace a quantized embedding table of `model` (apply_embedding_ptq) by its lowered form,
    QuantizedEmbedding; an fp32 table is left as it is."""
    weight = model.tok_embeddings.weight
    if hasattr(weight, "qdata"):  # torchao's IntxUnpackedToInt8Tensor
        model.tok_embeddings = QuantizedEmbedding(weight)


class StaticCacheModel(nn.Module):
    """`model` with a KV cache of `max_context` positions for batch 1, as the exported program
    computes it.

    forward(tokens [1, T], input_pos [1]) -> logits [1, vocab] of position input_pos + T - 1,
    after caching positions input_pos..input_pos+T-1. The caller keeps 1 <= T <= max_prefill
    and input_pos + T <= max_context (EdgeProgram does).
    """

    def __init__(self, model: MobileLLM, max_context: int, max_prefill: int | None = None):
        super().__init__()
        args = model.args
        if not 1 <= max_context <= args.max_seq_len:
            raise EdgeError(
                f"--max-context {max_context}: must be between 1 and the model's max_seq_len "
                f"{args.max_seq_len} (the rotary tables end there)"
            )
        max_prefill = max_context if max_prefill is None else max_prefill
        if not 1 <= max_prefill <= max_context:
            raise EdgeError(f"--max-prefill {max_prefill}: must be between 1 and --max-context {max_context}")
        load_custom_ops()
        self.model = model
        self.max_context = max_context
        self.max_prefill = max_prefill
        self.num_passes = args.n_layers * args.n_passes
        # The rotary tables up to max_context only, and their first half only: each row is
        # cat(freqs, freqs) (model.precompute_rope), so the program stores half and joins the
        # halves per call, for the T rows it reads.
        half = args.head_dim // 2
        dtype = model.norm.weight.dtype  # the embedding's may be quantized (QuantizedEmbedding)
        self.register_buffer("rope_cos", model.rope_cos[:max_context, :half].clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin[:max_context, :half].clone(), persistent=False)
        # rotate_half(x) = cat(-x2, x1) as x @ turn.T: a signed permutation, exact in fp32, and a
        # product XNNPACK keeps inside its delegate (a chunk and a cat it would not).
        turn = torch.zeros(args.head_dim, args.head_dim)
        turn[torch.arange(half), torch.arange(half) + half] = -1.0
        turn[torch.arange(half) + half, torch.arange(half)] = 1.0
        self.register_buffer("half_turn", turn.to(dtype), persistent=False)
        shape = (1, max_context, args.n_kv_heads, args.head_dim)
        # One buffer per pass: each update is an in-place write into its own buffer, and a
        # layer-sharing block's two passes keep two caches over one set of weights.
        for i in range(self.num_passes):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=dtype), persistent=False)

    def _attention(
        self, attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start, index: int
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = _qkv(attn, x)
        q = q * cos + F.linear(q, self.half_turn) * sin
        k = k * cos + F.linear(k, self.half_turn) * sin
        k_cache, v_cache = getattr(self, f"k_cache_{index}"), getattr(self, f"v_cache_{index}")
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        # Causal from `start`: query i attends to cache slots 0..start+i.
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True)
        return attn.wo(out.reshape(B, T, -1))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        model = self.model
        T = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + T <= self.max_context)
        # [T, 1, head_dim]: broadcast over the heads of [B, T, heads, head_dim].
        cos, sin = self.rope_cos.narrow(0, start, T), self.rope_sin.narrow(0, start, T)
        cos, sin = torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([sin, sin], dim=-1).unsqueeze(1)
        h = model.tok_embeddings(tokens)
        index = 0
        for block in model.layers:
            for _ in range(block.n_passes):
                h = h + self._attention(block.attention, block.attention_norm(h), cos, sin, start, index)
                h = h + _feed_forward(block.feed_forward, block.ffn_norm(h))
                index += 1
        return model.output(model.norm(h[:, -1, :]))
