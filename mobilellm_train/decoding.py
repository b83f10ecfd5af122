"""Decoding with a KV cache: the cached forward pass, the next-token sampler, and the sampling
loop. `generate` (the command) and `edge` (the ExecuTorch program's eager baseline and its
sampler) both build on these, so neither imports the other.

The cached path reuses the model's own modules (embedding, norms, projections, feed-forward,
output) and only re-implements the attention step, to append each new position's keys and
values to a cache instead of recomputing the whole prefix: model.py stays a plain training
model. A layer-sharing block runs twice per token, each pass with its own cache slot, as in the
model's forward.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mobilellm_train.model import Attention, MobileLLM

# torch and the model are imported inside the functions that use them, so that the commands built
# on this module answer --help at once (importing torch takes seconds).


def _no_grad(fn):
    """torch.no_grad() as a decorator, importing torch at the first call instead of at import."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


class KVCache:
    """Keys and values of every attention pass, [passes, batch, kv_heads, max_len, head_dim];
    allocated at the first write, in the dtype the projections produce (bf16 under autocast)."""

    def __init__(self, model: MobileLLM, batch_size: int, max_len: int):
        args = model.args
        self.num_passes = args.n_layers * args.n_passes
        self.shape = (self.num_passes, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, index: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, T, head_dim] at positions start..start+T of pass `index`;
        return every key and value up to there."""
        import torch

        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = start + k.shape[2]
        self.k[index, :, :, start:end] = k
        self.v[index, :, :, start:end] = v
        return self.k[index, :, :, :end], self.v[index, :, :, :end]


def _cached_attention(
    attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    cache: KVCache, index: int, start: int, mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention.forward for positions start..start+T, attending to the cache and themselves."""
    import torch.nn.functional as F

    from mobilellm_train.model import apply_rope

    B, T, _ = x.shape
    q, k, v = attn.qkv(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.update(index, start, k, v)
    if start == 0:
        # A prompt alone: plain causal attention, the same kernel call as the model's forward.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return attn.wo(out.transpose(1, 2).reshape(B, T, -1))


@_no_grad
def forward_cached(model: MobileLLM, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """Logits [B, T, vocab] for `tokens` at positions start..start+T, given that the cache holds
    positions 0..start; the new keys and values are added to it."""
    import torch

    T = tokens.shape[1]
    end = start + T
    if end > min(cache.max_len, model.args.max_seq_len):
        raise ValueError(
            f"position {end} is beyond the cache ({cache.max_len}) or max_seq_len ({model.args.max_seq_len})"
        )
    cos, sin = model.rope_cos[start:end], model.rope_sin[start:end]
    mask = None
    if start > 0 and T > 1:
        # Query i (position start+i) sees keys 0..start+i.
        keys = torch.arange(end, device=tokens.device)
        mask = keys[None, :] <= keys[start:, None]
    h = model.tok_embeddings(tokens)
    index = 0
    for block in model.layers:
        for _ in range(block.n_passes):
            h = h + _cached_attention(block.attention, block.attention_norm(h), cos, sin, cache, index, start, mask)
            h = h + block.feed_forward(block.ffn_norm(h))
            index += 1
    return model.output(model.norm(h))


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]: greedy at temperature 0, else sampled from the
    smallest set of tokens whose probability reaches top_p."""
    import torch
    import torch.nn.functional as F

    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the ones before it already reach top_p; the first always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # multinomial normalises, so the truncated distribution needs no renormalising.
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@_no_grad
def generate(
    model: MobileLLM,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    eos_id: int = -1,
    seed: int = 0,
    vocab_limit: int = 0,
) -> list[list[int]]:
    """`num_samples` continuations of `prompt` (token ids), each up to max_new_tokens long and
    ending before the first EOS; the total length stops at the model's max_seq_len.

    vocab_limit > 0 never samples ids from there on: a model's vocabulary may be larger than
    its tokenizer's, and those ids have no text."""
    import torch

    if not prompt:
        raise ValueError("the prompt has no tokens")
    max_len = min(len(prompt) + max_new_tokens, model.args.max_seq_len)
    if len(prompt) >= model.args.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room within max_seq_len {model.args.max_seq_len}")
    device = model.rope_cos.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model, num_samples, max_len)
    tokens = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    logits = forward_cached(model, tokens, cache, 0)[:, -1]
    out = []
    finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for position in range(len(prompt), max_len):
        if vocab_limit:
            logits[:, vocab_limit:] = float("-inf")
        next_ids = sample_next(logits, temperature, top_p, generator)
        out.append(next_ids)
        finished |= next_ids == eos_id
        if finished.all() or position + 1 == max_len:
            break
        logits = forward_cached(model, next_ids[:, None], cache, position)[:, -1]
    samples = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(num_samples)]
    return [s[: s.index(eos_id)] if eos_id in s else s for s in samples]
