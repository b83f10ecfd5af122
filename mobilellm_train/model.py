"""The MobileLLM model: a Llama-style decoder as a plain nn.Module, its size presets and its
analytic parameter count.

Deep-and-thin pre-norm transformer with RMSNorm, rotary embeddings (Hugging Face Llama's
rotate_half convention, so weights map 1:1 onto `LlamaForCausalLM`; see hf.py), grouped-query
attention, a SwiGLU feed-forward, tied input/output embeddings and optional layer sharing
(MobileLLM-LS: each block runs twice in a row with the same weights).

Parallelism (FSDP2, activation checkpointing, torch.compile) is applied from outside, in
parallelize.py. The only distribution-aware code here is `MobileLLM.init_weights`, which must give
the same weights whether parameters are whole tensors or DTensor shards.

Typical construction, with no memory spent before sharding:

    with torch.device("meta"):
        model = MobileLLM(MODEL_PRESETS["125M"])
    ...  # parallelize(model, ...)
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mobilellm_train.losses import chunked_cross_entropy, unchunked_cross_entropy


@dataclass
class ModelArgs:
    """Shape of a MobileLLM. The presets below are shared: copy with `dataclasses.replace`."""

    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    vocab_size: int = 32000
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    layer_sharing: bool = False

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_passes(self) -> int:
        """How many times each block runs per forward: 2 for MobileLLM-LS."""
        return 2 if self.layer_sharing else 1


MODEL_PRESETS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "125M": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536),
    "350M": ModelArgs(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560),
    "600M": ModelArgs(dim=1152, n_layers=40, n_heads=18, n_kv_heads=6, ffn_dim=3072),
    "1B": ModelArgs(dim=1280, n_layers=54, n_heads=20, n_kv_heads=5, ffn_dim=3584),
    "1.5B": ModelArgs(dim=1600, n_layers=54, n_heads=25, n_kv_heads=5, ffn_dim=4352),
}


def count_params(args: ModelArgs) -> int:
    """Parameters of `MobileLLM(args)`, norms included, a tied embedding counted once.

    Layer sharing changes compute, not parameters, so LS and non-LS counts are equal.
    """
    q_dim = args.n_heads * args.head_dim
    kv_dim = args.n_kv_heads * args.head_dim
    attention = 2 * args.dim * q_dim + 2 * args.dim * kv_dim  # wqkv = [wq; wk; wv], and wo
    feed_forward = 3 * args.dim * args.ffn_dim  # w13 = [w1; w3], and w2
    block = attention + feed_forward + 2 * args.dim
    embeddings = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    return embeddings + args.n_layers * block + args.dim


def precompute_rope(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim], fp32, in HF Llama's layout: the frequencies
    repeat across the two halves of the head (cat(freqs, freqs)), to pair with `rotate_half`."""
    # Same arithmetic as HF's LlamaRotaryEmbedding (int64 arange -> float) so tables match bitwise.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, head_dim]; cos, sin: [T, head_dim], or [B, 1, T, head_dim] for per-sequence
    positions."""
    # The tables are fp32; cast them (as HF does) so bf16 activations stay bf16 rather than
    # being promoted to fp32 for the rest of the attention.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: token i may attend to token j iff j <= i and both are in the same
    document, documents starting where position_ids is 0."""
    doc_ids = (position_ids == 0).cumsum(dim=1)
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


_compiled_create_block_mask = None


def document_block_mask(position_ids: torch.Tensor, compiled: bool | None = None) -> BlockMask:
    """FlexAttention's block-sparse form of `document_causal_mask`: the same rule, stored per
    128 x 128 tile (empty tiles skipped, full tiles unmasked), so no [T, T] mask or score matrix
    is materialised and the fused kernel runs.

    compiled (default: on CUDA) builds it with a compiled create_block_mask, which evaluates the
    rule tile by tile; eagerly it is evaluated on a dense [B, T, T] grid first (~1 GB of int64
    at 32 x 2048). The guards are on shapes only, so new document boundaries do not recompile.
    """
    global _compiled_create_block_mask
    doc_ids = (position_ids == 0).cumsum(dim=1)
    B, T = position_ids.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

    build = create_block_mask
    if compiled or (compiled is None and position_ids.is_cuda):
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask)
        build = _compiled_create_block_mask
    # H=None: one mask broadcast over all heads.
    return build(same_document_causal, B, None, T, T, device=position_ids.device)


# flex_attention outside torch.compile runs an unfused reference that materialises the scores;
# compiled, it is one fused kernel. Inside a compiled block the call is traced as it is, so this
# compiled copy serves only uncompiled models (built on first use: compiling costs nothing until
# then).
_compiled_flex_attention = None


def run_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    global _compiled_flex_attention
    # Contiguous [B, H, T, head_dim] inputs: inside a compiled block, inductor's CPU FlexAttention
    # template reads q and k wrongly when they come out of a fused elementwise op (RoPE) in the
    # transposed [B, T, H, head_dim] layout (torch 2.13, found by tests/test_attention.py). At most
    # one copy each; kept on every device until the CUDA test shows it is not needed there.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # CPU: the eager reference (FlexAttention has no CPU backward, so CPU training takes the
    # boolean-mask path; see MobileLLM.flex_doc_mask).
    if torch.compiler.is_compiling() or q.device.type == "cpu":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def output_operands(output: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, weight) of the output layer as its own forward would use them, for the chunked loss,
    which multiplies by the weight instead of calling the layer. Under quantization-aware training
    the layer is torchao's FakeQuantizedLinear (quantization.apply_qat), whose fake quantizers
    quantize both; a plain nn.Linear has none."""
    activation = getattr(output, "activation_fake_quantizer", None)
    weight = getattr(output, "weight_fake_quantizer", None)
    return (hidden if activation is None else activation(hidden),
            output.weight if weight is None else weight(output.weight))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares is taken in fp32 because bf16 loses it; normalising, casting back,
        # and only then scaling is HF Llama's order, which the parity tests rely on.
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.q_dim = args.n_heads * args.head_dim
        self.kv_dim = args.n_kv_heads * args.head_dim
        # q, k and v in one matmul: one larger GEMM instead of three (at 125M, k and v are only
        # 192 wide). The weight is [wq; wk; wv] stacked on the output dimension, so it splits
        # back into Llama's q_proj, k_proj and v_proj exactly (hf.py).
        self.wqkv = nn.Linear(args.dim, self.q_dim + 2 * self.kv_dim, bias=False)
        self.wo = nn.Linear(self.q_dim, args.dim, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, dim] -> q [B, n_heads, T, head_dim], k and v [B, n_kv_heads, T, head_dim]."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # A copy of v of its own: attention keeps v for backward, and a view would keep the whole
        # fused output alive with it, q and k before RoPE included ((dim + kv) values per token
        # per block that nothing needs; the planner's count in plan.py assumes they are freed).
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2).contiguous()
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
    ):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = apply_rope(q, rope_cos, rope_sin)
        k = apply_rope(k, rope_cos, rope_sin)
        # enable_gqa lets the kernel share each k/v head across its query group instead of
        # materialising n_heads / n_kv_heads copies of k and v (HF's repeat_kv).
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif isinstance(attn_mask, BlockMask):
            out = run_flex_attention(q, k, v, attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        # The gate (w1) and up (w3) projections in one matmul, weight [w1; w3]; hf.py splits it
        # into Llama's gate_proj and up_proj.
        self.w13 = nn.Linear(dim, 2 * ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_passes = args.n_passes
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
    ):
        # Layer sharing repeats the block here, inside one forward call, rather than having the
        # root call the block twice: FSDP2 wraps each block, so one call means one all-gather
        # (and one reduce-scatter in backward) serving both passes, and activation checkpointing
        # and torch.compile, which also wrap the block, see both passes as one unit.
        for _ in range(self.n_passes):
            x = x + self.attention(self.attention_norm(x), rope_cos, rope_sin, attn_mask)
            x = x + self.feed_forward(self.ffn_norm(x))
        return x


class MobileLLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # How forward(tokens, labels) computes the loss; training settings, not architecture.
        self.loss_chunk_tokens = 4096
        self.compile_loss = False
        self.z_loss = 0.0  # z-loss coefficient (training.z_loss); in training mode only
        # How documents are masked apart when forward gets position_ids: True, FlexAttention with
        # a block mask (fused, sparse; the trainer's choice on GPU); False, SDPA with a boolean
        # [B, 1, T, T] mask, which only SDPA's math kernel takes (~T^2 scores per head kept).
        # False by default because FlexAttention has no CPU backward.
        self.flex_doc_mask = False
        # Non-persistent: derived from args, so checkpoints need not carry them; init_weights
        # recomputes them after a meta-device build.
        cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, *apply_args, **apply_kwargs):
        # nn.Module._apply gives each module its own new Parameter when the tensor type changes
        # (meta -> cpu/cuda in to_empty), which silently unties output from tok_embeddings:
        # two parameters, trained apart. Re-tie after every conversion. Under FSDP2 this runs
        # inside FSDPModule._apply, before it re-registers its sharded parameters.
        ret = super()._apply(*apply_args, **apply_kwargs)
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        return ret

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_terms: dict[str, torch.Tensor] | None = None,
        distill=None,
    ) -> torch.Tensor:
        """tokens: LongTensor [B, T] -> logits [B, T, vocab_size], or with `labels` [B, T] the mean
        cross-entropy over the labels that are not -100 (an fp32 scalar).

        `loss_terms`, a mapping (the step's LossTerms: FSDP2 would hand forward a copy of a dict),
        receives each term of the returned loss by name, detached ("ce" for the cross-entropy,
        "z_loss" when `z_loss` is set), so that the trainer can log them apart. The z-loss is a
        training regulariser: in eval mode (validation) the loss is the cross-entropy alone.

        `distill` (a distill.kd_loss.Distillation: the teacher's targets for these tokens) makes
        the loss alpha * KD + (1 - alpha) * CE, computed in the same chunks (terms "ce" and "kd").

        The loss is computed here, not by the caller, because under FSDP2 the (tied) output weight
        is gathered only inside this forward; and in chunks of `loss_chunk_tokens` tokens, so the
        [B, T, vocab] logits are never materialised in training (8.4 GB in fp32 at 32 x 2048).

        position_ids [B, T], when given, restart at 0 at each document packed into a sequence:
        RoPE then uses them and attention stays within each document (block-diagonal causal).
        """
        h = self.hidden_states(tokens, position_ids)
        if labels is None:
            return self.output(h)
        if distill is not None:
            hidden, weight = output_operands(self.output, h.flatten(0, 1))
            return distill.loss(hidden, weight, labels.flatten(), self.loss_chunk_tokens, loss_terms)
        z_loss = self.z_loss if self.training else 0.0
        if self.loss_chunk_tokens == 0:
            loss = unchunked_cross_entropy(self.output(h).flatten(0, 1), labels.flatten(), z_loss, terms=loss_terms)
        else:
            hidden, weight = output_operands(self.output, h.flatten(0, 1))
            loss = chunked_cross_entropy(
                hidden, weight, labels.flatten(), self.loss_chunk_tokens, compile_chunk=self.compile_loss,
                z_loss=z_loss, terms=loss_terms,
            )
        return loss

    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output [B, T, dim]: what the output projection (and a distillation
        teacher's targets) are computed from. Under FSDP2 call it from a forward: the root's
        parameters are gathered only there."""
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds max_seq_len {self.args.max_seq_len} "
                "(the rotary tables are precomputed up to max_seq_len)"
            )
        attn_mask = None
        if position_ids is None:
            rope_cos, rope_sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            rope_cos, rope_sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
            # Built once per forward, outside the (compiled, checkpointed) blocks, and shared by all.
            attn_mask = document_block_mask(position_ids) if self.flex_doc_mask else document_causal_mask(position_ids)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rope_cos, rope_sin, attn_mask)
        return self.norm(h)

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """Linear and embedding weights ~ N(0, 0.02), norm weights 1 (as the original code), and
        the rotary tables recomputed (they hold garbage after `to_empty`). A fused projection
        (wqkv, w13) is drawn whole: each original matrix in it is N(0, 0.02), as when separate.

        Each parameter is drawn whole from its own generator, seeded by its position in
        `named_parameters()`, and a DTensor keeps only its shard of that full draw. So the
        weights are the same on 1 rank or N ranks, whatever the sharding, for a given seed and
        device type (CPU and CUDA generators give different streams).
        """
        norm_params = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for index, (_, p) in enumerate(self.named_parameters()):
            if id(p) in norm_params:
                full = torch.ones(p.shape, dtype=torch.float32, device=p.device)
            else:
                gen = torch.Generator(device=p.device).manual_seed(seed + index)
                full = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                full.normal_(mean=0.0, std=0.02, generator=gen)
            if isinstance(p, DTensor):
                # src_data_rank=None: every rank drew the same full tensor, so each just slices
                # its own shard with no communication.
                shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
            else:
                p.copy_(full)
        cos, sin = precompute_rope(
            self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.rope_cos.device
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
