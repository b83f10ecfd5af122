"""Mapping between MobileLLM and Hugging Face `LlamaForCausalLM`: config.json and state dicts.

A non-LS MobileLLM is a Llama model with tied embeddings; an LS model (L blocks, each run twice)
is a Llama model of 2L layers whose layer 2i+1 repeats layer 2i. The rotary embeddings in model.py
follow HF's rotate_half convention, so q/k weights map with no permutation.

Pure tensor and dict plumbing: transformers is an optional dependency and is not imported here.
"""

from __future__ import annotations

from torch import Tensor

from mobilellm_train.model import ModelArgs

# (our name inside layers.{i}, HF name inside model.layers.{j})
_BLOCK_KEYS = (
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)


def _key_map(args: ModelArgs) -> list[tuple[str, list[str]]]:
    """Each of our keys with the HF keys that hold it (two per block key under layer sharing)."""
    pairs = [("tok_embeddings.weight", ["model.embed_tokens.weight"])]
    for i in range(args.n_layers):
        hf_layers = [i * args.n_passes + p for p in range(args.n_passes)]
        for ours, theirs in _BLOCK_KEYS:
            pairs.append((f"layers.{i}.{ours}", [f"model.layers.{j}.{theirs}" for j in hf_layers]))
    pairs.append(("norm.weight", ["model.norm.weight"]))
    if not args.tie_embeddings:
        pairs.append(("output.weight", ["lm_head.weight"]))
    return pairs


def _check_keys(got: set[str], expected: set[str], what: str):
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"{what} state dict: missing keys {missing}, unexpected keys {unexpected}")


def hf_llama_config(args: ModelArgs) -> dict:
    """A config.json dict for `LlamaForCausalLM` equivalent to `MobileLLM(args)`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers * args.n_passes,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def args_from_hf_config(cfg: dict, layer_sharing: bool = False) -> ModelArgs:
    """ModelArgs from a Llama config.json dict. With `layer_sharing`, the HF model's 2L layers
    are read as L shared blocks (from_hf_state_dict then checks that pairs are equal)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU needs silu)")
    for bias in ("attention_bias", "mlp_bias"):
        if cfg.get(bias, False):
            raise ValueError(f"{bias}=True is not supported: MobileLLM has no biases")
    # transformers 5 writes rope settings under rope_parameters; older configs use rope_theta.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported, only plain RoPE")
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))

    n_layers = cfg["num_hidden_layers"]
    if layer_sharing:
        if n_layers % 2:
            raise ValueError(
                f"a layer-shared import needs an even num_hidden_layers, got {n_layers}"
            )
        n_layers //= 2
    args = ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=n_layers,
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_seq_len=cfg["max_position_embeddings"],
        norm_eps=cfg["rms_norm_eps"],
        rope_theta=float(rope_theta),
        # LlamaConfig's own default is untied.
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        layer_sharing=layer_sharing,
    )
    if cfg.get("head_dim") not in (None, args.head_dim):
        raise ValueError(
            f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads = {args.head_dim}"
        )
    return args


def to_hf_state_dict(state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Our state dict -> LlamaForCausalLM names. Tensors are shared, not copied: under layer
    sharing HF layers 2i and 2i+1 are the same tensor (clone before safetensors' save_file, which
    refuses shared storage). A tied model gets no lm_head.weight, as HF saves tied models."""
    state_dict = dict(state_dict)
    if args.tie_embeddings and "output.weight" in state_dict:
        # MobileLLM.state_dict() lists the tied weight under both names.
        out = state_dict.pop("output.weight")
        embed = state_dict.get("tok_embeddings.weight")
        if embed is not None and out is not embed and not out.equal(embed):
            raise ValueError("tie_embeddings is set but output.weight != tok_embeddings.weight")
    pairs = _key_map(args)
    _check_keys(set(state_dict), {ours for ours, _ in pairs}, "MobileLLM")
    return {theirs: state_dict[ours] for ours, hf_keys in pairs for theirs in hf_keys}


def from_hf_state_dict(hf_state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """LlamaForCausalLM names -> our state dict, loadable with `MobileLLM.load_state_dict`
    (tied models get output.weight too, as the same tensor). Under layer sharing, HF layers
    2i and 2i+1 must be equal; a mismatch raises a ValueError naming them."""
    hf_state_dict = dict(hf_state_dict)
    if args.tie_embeddings and "lm_head.weight" in hf_state_dict:
        # HF's in-memory state_dict() of a tied model includes lm_head; accept it if it is a tie.
        lm_head = hf_state_dict.pop("lm_head.weight")
        embed = hf_state_dict.get("model.embed_tokens.weight")
        if embed is not None and lm_head is not embed and not lm_head.equal(embed):
            raise ValueError(
                "tie_embeddings is set but lm_head.weight != model.embed_tokens.weight"
            )
    pairs = _key_map(args)
    _check_keys(set(hf_state_dict), {k for _, hf_keys in pairs for k in hf_keys}, "HF Llama")
    out = {}
    for ours, hf_keys in pairs:
        first = hf_state_dict[hf_keys[0]]
        for other in hf_keys[1:]:
            if not first.equal(hf_state_dict[other]):
                raise ValueError(
                    f"layer sharing: {hf_keys[0]} and {other} differ; HF layers must repeat in "
                    "pairs (2i, 2i+1) to import as a MobileLLM-LS model"
                )
        out[ours] = first
    if args.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out
