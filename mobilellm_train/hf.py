"""Mapping between MobileLLM and Hugging Face `LlamaForCausalLM`: config.json and state dicts.

A non-LS MobileLLM is a Llama model with tied embeddings; an LS model (L blocks, each run twice)
is a Llama model of 2L layers whose layer 2i+1 repeats layer 2i. The rotary embeddings in model.py
follow HF's rotate_half convention, so q/k weights map with no permutation.

`load_hf_checkpoint` reads a Hugging Face folder (config.json and safetensors or
pytorch_model.bin weights, sharded or not) into our ModelArgs and state dict, for evaluation and
generation; `load_hf_into_model` puts such a folder's weights into a (sharded) training model, for
continued pretraining. export.py writes such folders.

Tensor, dict and file plumbing: transformers is an optional dependency and is not imported here
(safetensors is imported only when a folder holds .safetensors files).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from torch import Tensor

from mobilellm_train.errors import parse_json
from mobilellm_train.model import ModelArgs

logger = logging.getLogger("mobilellm_train")

CONFIG_FILE = "config.json"
# config.json key that records an exported model's layer sharing, so importing it back needs no
# flag. transformers keeps unknown config keys as plain attributes and ignores them.
LAYER_SHARING_KEY = "mobilellm_layer_sharing"
# Weight files in the order from_pretrained prefers them: (single file, index of shards).
_WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)

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


# Our fused block weights and the Llama matrices stacked in them along the output dimension, in
# order: attention.wqkv = [wq; wk; wv], feed_forward.w13 = [w1 (gate); w3 (up)]. The names on the
# right are the unfused ones of _BLOCK_KEYS; splitting and joining are exact (no arithmetic).
_FUSED_KEYS = (
    ("attention.wqkv.weight", ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")),
    ("feed_forward.w13.weight", ("feed_forward.w1.weight", "feed_forward.w3.weight")),
)


def _fused_sizes(args: ModelArgs) -> dict[str, list[int]]:
    """Rows of each part of a fused weight."""
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"attention.wqkv.weight": [q_dim, kv_dim, kv_dim], "feed_forward.w13.weight": [args.ffn_dim, args.ffn_dim]}


def unfuse_projections(state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Our state dict with each block's wqkv and w13 replaced by the matrices stacked in them
    (views, not copies): the layout of Llama and of checkpoints from before the fusion."""
    out = dict(state_dict)
    sizes = _fused_sizes(args)
    for i in range(args.n_layers):
        for fused, parts in _FUSED_KEYS:
            weight = out.pop(f"layers.{i}.{fused}")
            for name, part in zip(parts, weight.split(sizes[fused], dim=0)):
                out[f"layers.{i}.{name}"] = part
    return out


def fuse_projections(state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """The inverse of `unfuse_projections`: separate q/k/v and gate/up matrices stacked into
    wqkv and w13. Each part must have its expected shape; a mismatch raises a ValueError naming it."""
    out = dict(state_dict)
    expected = _expected_shapes(args)
    for i in range(args.n_layers):
        for fused, parts in _FUSED_KEYS:
            tensors = []
            for name in parts:
                key = f"layers.{i}.{name}"
                tensor = out.pop(key)
                if tuple(tensor.shape) != expected[key]:
                    raise ValueError(f"{key} has shape {tuple(tensor.shape)}, but the model's shape implies {expected[key]}")
                tensors.append(tensor)
            out[f"layers.{i}.{fused}"] = torch.cat(tensors, dim=0)
    return out


def _our_keys(args: ModelArgs) -> set[str]:
    """The keys of `MobileLLM(args).state_dict()` (fused projections; output.weight only untied)."""
    keys = {ours for ours, _ in _key_map(args)}
    for i in range(args.n_layers):
        for fused, parts in _FUSED_KEYS:
            keys -= {f"layers.{i}.{name}" for name in parts}
            keys.add(f"layers.{i}.{fused}")
    return keys


def _key_map(args: ModelArgs) -> list[tuple[str, list[str]]]:
    """Each of our keys, with the projections unfused (see `unfuse_projections`), with the HF
    keys that hold it (two per block key under layer sharing)."""
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


def hf_llama_config(args: ModelArgs, dtype: str = "float32") -> dict:
    """A config.json dict for `LlamaForCausalLM` equivalent to `MobileLLM(args)`, for weights
    stored in `dtype` ("float32" or "bfloat16")."""
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
        # transformers >= 4.56 reads "dtype"; 5.x warns that the older "torch_dtype" is deprecated.
        "dtype": dtype,
        LAYER_SHARING_KEY: args.layer_sharing,
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
    if not isinstance(rope, dict):
        raise ValueError(f"rope settings {rope!r}: expected a JSON object")
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
    """Our state dict -> LlamaForCausalLM names, wqkv and w13 split into q/k/v_proj and
    gate/up_proj. Tensors are shared, not copied (the split parts are views): under layer
    sharing HF layers 2i and 2i+1 are the same tensor (clone before safetensors' save_file, which
    refuses shared storage). A tied model gets no lm_head.weight, as HF saves tied models."""
    state_dict = dict(state_dict)
    if args.tie_embeddings and "output.weight" in state_dict:
        # MobileLLM.state_dict() lists the tied weight under both names.
        out = state_dict.pop("output.weight")
        embed = state_dict.get("tok_embeddings.weight")
        if embed is not None and out is not embed and not out.equal(embed):
            raise ValueError("tie_embeddings is set but output.weight != tok_embeddings.weight")
    _check_keys(set(state_dict), _our_keys(args), "MobileLLM")
    state_dict = unfuse_projections(state_dict, args)
    return {theirs: state_dict[ours] for ours, hf_keys in _key_map(args) for theirs in hf_keys}


def from_hf_state_dict(hf_state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """LlamaForCausalLM names -> our state dict, loadable with `MobileLLM.load_state_dict`
    (tied models get output.weight too, as the same tensor; q/k/v and gate/up joined into wqkv
    and w13). Under layer sharing, HF layers 2i and 2i+1 must be equal; a mismatch raises a
    ValueError naming them, as does a projection of the wrong shape."""
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
    out = fuse_projections(out, args)
    if args.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# --- Reading a Hugging Face folder ------------------------------------------------------------


class HFCheckpointError(ValueError):
    """A Hugging Face folder is missing files, holds an unsupported model or inconsistent weights."""


# Ceilings on what a config.json may ask for, so that a crafted one cannot make eval or generate
# allocate without bound (the rotary tables and the layer/key bookkeeping are sized from the
# config before any weight is compared with it). They admit every real Llama with room to spare:
# the largest, Llama 3.1 405B, has hidden_size 16384, intermediate_size 53248, 126 layers,
# 128 heads, a 128256 vocabulary and 131072 positions x head_dim 128 (2^24); million-position
# models (head_dim 128) fit under MAX_ROPE_ELEMENTS too.
MAX_DIM = 1 << 16  # hidden_size, intermediate_size, head counts, head_dim
MAX_LAYERS = 1024  # num_hidden_layers (as stored: 2L for a layer-shared model)
MAX_VOCAB = 1 << 20
MAX_POSITIONS = 1 << 20  # max_position_embeddings
MAX_ROPE_ELEMENTS = 1 << 27  # max_position_embeddings x head_dim: cos + sin tables of 1 GiB in fp32
_CONFIG_LIMITS = {
    "hidden_size": MAX_DIM, "intermediate_size": MAX_DIM, "num_attention_heads": MAX_DIM,
    "num_key_value_heads": MAX_DIM, "head_dim": MAX_DIM, "num_hidden_layers": MAX_LAYERS,
    "vocab_size": MAX_VOCAB, "max_position_embeddings": MAX_POSITIONS,
}


def check_config_bounds(cfg: dict, path: str) -> None:
    """Refuse a config.json whose sizes are not positive integers within the ceilings above
    (HFCheckpointError naming `path`, the key and the ceiling). Missing keys are left to the
    reader, which names them."""
    for key, limit in _CONFIG_LIMITS.items():
        value = cfg.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue  # optional: derived from the others
        if key not in cfg:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise HFCheckpointError(
                f"{path}: {key} = {value!r}; expected an integer from 1 to {limit} (a ceiling far above "
                "any real Llama model, so that a damaged or crafted config cannot allocate without bound)"
            )
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    positions = cfg.get("max_position_embeddings")
    if heads and hidden and positions:
        head_dim = cfg.get("head_dim") or hidden // heads
        if positions * head_dim > MAX_ROPE_ELEMENTS:
            raise HFCheckpointError(
                f"{path}: max_position_embeddings {positions} x head_dim {head_dim} = {positions * head_dim} "
                f"exceeds {MAX_ROPE_ELEMENTS}: the rotary tables alone would take over 1 GiB. Lower "
                "max_position_embeddings in the config to the context the model was trained for."
            )
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope = cfg.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise HFCheckpointError(f"{path}: {rope_key} = {rope!r}; expected a JSON object")
    for key, value in (("rms_norm_eps", cfg.get("rms_norm_eps")),
                       ("rope_theta", cfg.get("rope_theta", rope.get("rope_theta")))):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise HFCheckpointError(f"{path}: {key} = {value!r}; expected a finite positive number")


# config.json and a shard index are a few KB (a 400B model's index: 100 KB).
_JSON_MAX_BYTES = 64 << 20


def _read_json(path: str):
    """A JSON file of the folder, size checked before reading; HFCheckpointError naming it when it
    is not valid JSON (too deeply nested included)."""
    try:
        if os.path.getsize(path) > _JSON_MAX_BYTES:
            raise HFCheckpointError(f"{path}: over {_JSON_MAX_BYTES:,} bytes; not a model's JSON file")
        with open(path, "rb") as f:
            return parse_json(f.read(_JSON_MAX_BYTES + 1))
    except (ValueError, OSError) as e:
        if isinstance(e, HFCheckpointError):
            raise
        raise HFCheckpointError(f"{path}: not valid JSON ({str(e)[:300]})") from None


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise HFCheckpointError(f"{folder}: not a folder")
    if not os.path.isfile(path):
        raise HFCheckpointError(f"{folder}: no {CONFIG_FILE} (not a Hugging Face model folder)")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise HFCheckpointError(f"{path}: expected a JSON object")
    model_type = cfg.get("model_type", "llama")
    architectures = cfg.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or "LlamaForCausalLM" not in architectures:
        raise HFCheckpointError(
            f"{path}: model_type {model_type!r}, architectures {architectures}; only Llama "
            "(LlamaForCausalLM) models map onto MobileLLM"
        )
    check_config_bounds(cfg, path)
    return cfg


def _check_shard_name(shard, index_path: str) -> None:
    """A shard index may only name files inside its own folder: a name that is absolute or climbs
    out with `..` would read any file the user can read. (A shard that is a symlink, as in the
    Hugging Face hub cache, is followed: the folder's owner put it there.)"""
    if not isinstance(shard, str) or not shard:
        raise HFCheckpointError(f"{index_path}: shard name {shard!r} is not a file name")
    if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
        raise HFCheckpointError(
            f"{index_path}: shard {shard!r} is outside the model folder; a shard index may only name files "
            "inside its own folder"
        )


def _weight_files(folder: str) -> list[str]:
    """The weight files of a folder, per the first layout found (see _WEIGHT_FILES)."""
    for single, index in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            try:
                weight_map = _read_json(index_path)["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (KeyError, TypeError, AttributeError) as e:
                raise HFCheckpointError(f"{index_path}: not a shard index with a weight_map ({e!r})") from None
            for shard in shards:
                _check_shard_name(shard, index_path)
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise HFCheckpointError(f"{index_path} lists shards that are not in {folder}: {missing}")
            return [os.path.join(folder, s) for s in shards]
    expected = ", ".join(name for pair in _WEIGHT_FILES for name in pair)
    raise HFCheckpointError(f"{folder}: no weights; expected one of {expected}")


def read_hf_state_dict(folder: str) -> dict[str, Tensor]:
    """Every tensor of a folder's weight files (HF names, as stored, on CPU)."""
    state: dict[str, Tensor] = {}
    for path in _weight_files(folder):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                part = load_file(path, device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise HFCheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        else:
            try:
                # weights_only: a .bin is a pickle, and unpickling runs code; tensors need none.
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise HFCheckpointError(f"{path}: cannot read torch weights ({e})") from None
            _check_stored_tensors(part, path)
        duplicated = sorted(set(part) & set(state))
        if duplicated:
            raise HFCheckpointError(f"{path}: tensors also found in another shard: {duplicated[:5]}")
        state.update(part)
    return state


def _check_stored_tensors(part, path: str) -> None:
    """A pickled weight file's tensors must each hold the bytes their shape implies: contiguous,
    inside their storage. A stride-0 view of a few bytes can claim a shape of many GiB, which the
    first copy (the fp32 cast) would allocate. Checked before anything is copied."""
    if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in part.items()):
        raise HFCheckpointError(f"{path}: not a state dict (names to tensors)")
    for name, tensor in part.items():
        end = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
        if not tensor.is_contiguous() or end > tensor.untyped_storage().nbytes():
            raise HFCheckpointError(
                f"{path}: {name[:200]} (shape {tuple(tensor.shape)}, strides {tensor.stride()}) is not a contiguous "
                f"tensor inside its stored bytes ({tensor.untyped_storage().nbytes():,}); a weight file stores each "
                "tensor whole, so this one is damaged or crafted"
            )


def _pairs_equal(hf_state_dict: dict[str, Tensor], num_hidden_layers: int) -> bool:
    """Whether every HF layer 2i+1 repeats layer 2i (a layer-shared model exported as 2L layers)."""
    if num_hidden_layers % 2:
        return False
    for i in range(0, num_hidden_layers, 2):
        for _, theirs in _BLOCK_KEYS:
            a = hf_state_dict.get(f"model.layers.{i}.{theirs}")
            b = hf_state_dict.get(f"model.layers.{i + 1}.{theirs}")
            if a is None or b is None or a.shape != b.shape or not a.equal(b):
                return False
    return True


def load_hf_checkpoint(
    folder: str, layer_sharing: bool | None = None
) -> tuple[ModelArgs, dict[str, Tensor]]:
    """ModelArgs and an fp32 state dict (our names, loadable with `MobileLLM.load_state_dict`)
    from a Hugging Face LlamaForCausalLM folder.

    layer_sharing: True reads the 2L HF layers as L shared blocks (pairs 2i, 2i+1 must be equal),
    False as 2L independent blocks (always possible: the same function, twice the parameters).
    None decides: the `mobilellm_layer_sharing` key that export.py writes, or else True exactly
    when every pair of layers is equal. A config with MobileLLM's own `"layer_sharing": true`
    (its modeling code stores L blocks and runs each twice) imports as L shared blocks unless
    layer_sharing is False.
    """
    cfg = read_hf_config(folder)
    config_path = os.path.join(folder, CONFIG_FILE)
    hf_sd = read_hf_state_dict(folder)
    # Older transformers saved the rotary inverse frequencies; they are derived, not weights.
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}
    cfg = dict(cfg)
    if "lm_head.weight" not in hf_sd and not cfg.get("tie_word_embeddings", False):
        # MobileLLM's own release marks embedding sharing with a custom `share_embedding` flag
        # and tie_word_embeddings false; either way one matrix is stored, so the head is tied.
        logger.warning(
            "%s: tie_word_embeddings is false but there is no lm_head.weight; importing the "
            "output projection as tied to the input embedding", config_path,
        )
        cfg["tie_word_embeddings"] = True
    num_hidden_layers = cfg.get("num_hidden_layers")
    # MobileLLM's own modeling code stores L blocks and runs each twice when its config says
    # "layer_sharing": true; plain transformers would run them once, another function.
    repeats_stored_blocks = cfg.get("layer_sharing") is True
    if repeats_stored_blocks and layer_sharing is False:
        logger.warning("%s: config.json says layer_sharing (each stored block runs twice); importing "
                       "without the repeat as asked, which computes a different function", config_path)
    elif repeats_stored_blocks:
        layer_sharing = True
    elif layer_sharing is None:
        hint = cfg.get(LAYER_SHARING_KEY)
        layer_sharing = bool(hint) if hint is not None else _pairs_equal(hf_sd, num_hidden_layers or 0)
        if layer_sharing:
            logger.info("%s: importing %s layers as %s shared blocks (MobileLLM-LS)", folder,
                        num_hidden_layers, (num_hidden_layers or 0) // 2)
    split_pairs = layer_sharing and not repeats_stored_blocks
    try:
        stored_args = args_from_hf_config(cfg, layer_sharing=split_pairs)
    except KeyError as e:
        raise HFCheckpointError(f"{config_path}: missing key {e}") from None
    except (ValueError, TypeError) as e:
        raise HFCheckpointError(f"{config_path}: {e}") from None
    bad_dtype = sorted({str(v.dtype) for v in hf_sd.values() if not v.is_floating_point()})
    if bad_dtype:
        raise HFCheckpointError(f"{folder}: non-float weights ({bad_dtype}); quantized checkpoints are not supported")
    try:
        state = from_hf_state_dict(hf_sd, stored_args)
    except ValueError as e:
        raise HFCheckpointError(f"{folder}: {e}") from None
    # Our parameter names do not depend on the repeat, so the stored blocks map as they are.
    args = dataclasses.replace(stored_args, layer_sharing=bool(layer_sharing))
    expected = _expected_shapes(args)
    for key, value in state.items():
        if tuple(value.shape) != expected[key]:
            raise HFCheckpointError(
                f"{folder}: {key} has shape {tuple(value.shape)}, but {CONFIG_FILE} implies {expected[key]}"
            )
    # Cast once per tensor, so a tied head stays the same tensor as the embedding.
    fp32: dict[int, Tensor] = {}
    for value in state.values():
        if id(value) not in fp32:
            fp32[id(value)] = value.float()
    return args, {key: fp32[id(value)] for key, value in state.items()}


def _expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    block = {
        "attention.wq.weight": (q_dim, args.dim),
        "attention.wk.weight": (kv_dim, args.dim),
        "attention.wv.weight": (kv_dim, args.dim),
        "attention.wo.weight": (args.dim, q_dim),
        "feed_forward.w1.weight": (args.ffn_dim, args.dim),
        "feed_forward.w3.weight": (args.ffn_dim, args.dim),
        "feed_forward.w2.weight": (args.dim, args.ffn_dim),
        "attention_norm.weight": (args.dim,),
        "ffn_norm.weight": (args.dim,),
    }
    sizes = _fused_sizes(args)
    for fused, _ in _FUSED_KEYS:
        block[fused] = (sum(sizes[fused]), args.dim)
    shapes = {f"layers.{i}.{k}": v for i in range(args.n_layers) for k, v in block.items()}
    shapes["tok_embeddings.weight"] = (args.vocab_size, args.dim)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    shapes["norm.weight"] = (args.dim,)
    return shapes


def load_hf_into_model(model, folder: str) -> None:
    """Copy a Hugging Face folder's weights into `model`, a MobileLLM, plain or FSDP-sharded.

    Under a process group this is a collective, called on every rank: rank 0 reads the folder
    and broadcasts tensor by tensor, each rank keeps its shard, so no other rank holds the whole
    model. The folder must describe the model's shape, layer sharing as the model has it
    (max_seq_len may differ: it only sizes the rotary tables). For `checkpoint.initial_load_path`.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    state: dict[str, Tensor] = {}
    error = None
    if not distributed or dist.get_rank() == 0:
        try:
            args, state = load_hf_checkpoint(folder, layer_sharing=model.args.layer_sharing)
            ours, theirs = dataclasses.asdict(model.args), dataclasses.asdict(args)
            diff = {k: (theirs[k], v) for k, v in ours.items() if k != "max_seq_len" and theirs[k] != v}
            if diff:
                raise HFCheckpointError(f"{folder} holds another model: (folder, this model) differ in {diff}")
        except HFCheckpointError as e:
            error = str(e)
    if distributed:
        # Every rank raises together rather than waiting forever for rank 0's broadcast.
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise HFCheckpointError(error)
    set_model_state_dict(
        model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    )
