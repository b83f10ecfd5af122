"""Tests of model.py and hf.py: parameter counts, tying, layer sharing, meta-device init (also
sharded across 2 gloo ranks), Hugging Face Llama parity and the state-dict mapping, compile.

    python -m pytest tests/test_model.py -q            # all
    python -m pytest tests/test_model.py -q -m "not slow"
"""

import copy
from dataclasses import replace

import pytest
import torch

from mobilellm_train.hf import (
    args_from_hf_config,
    from_hf_state_dict,
    hf_llama_config,
    to_hf_state_dict,
    unfuse_projections,
)
from mobilellm_train.model import (
    MODEL_PRESETS,
    MobileLLM,
    ModelArgs,
    TransformerBlock,
    count_params,
    precompute_rope,
)

# docs/REFERENCE.md's table: parameters, tied, norms included.
PUBLISHED_PARAMS = {
    "125M": 124_635_456,
    "350M": 345_355_200,
    "600M": 603_188_352,
    "1B": 1_005_461_760,
    "1.5B": 1_511_188_800,
}


def tiny_args(**overrides) -> ModelArgs:
    return replace(MODEL_PRESETS["debug"], **{"vocab_size": 256, "max_seq_len": 64, **overrides})


def build(args: ModelArgs, seed: int = 0) -> MobileLLM:
    model = MobileLLM(args)
    model.init_weights(seed)
    return model


def random_tokens(args: ModelArgs, batch: int = 2, seq_len: int = 48, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, seq_len), generator=gen)


def meta_numel(args: ModelArgs) -> int:
    with torch.device("meta"):
        model = MobileLLM(args)
    return sum(p.numel() for p in model.parameters())


# --- sizes and tying ---------------------------------------------------------------------------


def test_presets_present():
    assert set(MODEL_PRESETS) == {"debug", *PUBLISHED_PARAMS}
    assert all(MODEL_PRESETS[name].head_dim == 64 for name in PUBLISHED_PARAMS)


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_param_count_matches_published_table(name):
    args = MODEL_PRESETS[name]
    assert count_params(args) == PUBLISHED_PARAMS[name]
    assert meta_numel(args) == PUBLISHED_PARAMS[name]
    ls = replace(args, layer_sharing=True)
    assert count_params(ls) == meta_numel(ls) == PUBLISHED_PARAMS[name]


def test_debug_count_and_untied_count():
    args = MODEL_PRESETS["debug"]
    assert count_params(args) == meta_numel(args)
    untied = replace(args, tie_embeddings=False)
    assert count_params(untied) == meta_numel(untied)
    assert count_params(untied) - count_params(args) == args.vocab_size * args.dim


def test_tied_output_is_embedding():
    model = build(tiny_args())
    assert model.output.weight is model.tok_embeddings.weight
    untied = build(tiny_args(tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert not torch.equal(untied.output.weight, untied.tok_embeddings.weight)


def test_to_empty_keeps_tie():
    # nn.Module._apply on its own would leave two separate parameters here.
    with torch.device("meta"):
        model = MobileLLM(tiny_args())
    model.to_empty(device="cpu")
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == count_params(model.args)


# --- layer sharing -----------------------------------------------------------------------------


def test_layer_sharing_equals_repeated_layers():
    args = tiny_args(n_layers=2, layer_sharing=True)
    ls = build(args, seed=1).eval()
    unrolled = build(replace(args, n_layers=4, layer_sharing=False), seed=2).eval()
    sd = ls.state_dict()
    unrolled_sd = {}
    for key, value in sd.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            for j in (2 * int(i), 2 * int(i) + 1):
                unrolled_sd[f"layers.{j}.{rest}"] = value
        else:
            unrolled_sd[key] = value
    unrolled.load_state_dict(unrolled_sd)
    tokens = random_tokens(args)
    with torch.no_grad():
        logits = ls(tokens)
        torch.testing.assert_close(logits, unrolled(tokens), rtol=1e-5, atol=1e-5)
        # The same weights without the repeat must give something else.
        no_share = MobileLLM(replace(args, layer_sharing=False)).eval()
        no_share.load_state_dict(sd)
        assert (no_share(tokens) - logits).abs().max() > 1e-2


def test_shared_block_repeats_inside_one_call():
    # The repeat must live in TransformerBlock.forward (one FSDP all-gather for both passes).
    args = tiny_args(layer_sharing=True)
    torch.manual_seed(0)
    shared = TransformerBlock(args)
    single = TransformerBlock(replace(args, layer_sharing=False))
    single.load_state_dict(shared.state_dict())
    cos, sin = precompute_rope(args.head_dim, 16, args.rope_theta)
    x = torch.randn(2, 16, args.dim)
    with torch.no_grad():
        torch.testing.assert_close(shared(x, cos, sin), single(single(x, cos, sin), cos, sin))


# --- initialisation ----------------------------------------------------------------------------


def test_meta_init_equals_cpu_init():
    for args in (tiny_args(), tiny_args(tie_embeddings=False, layer_sharing=True)):
        cpu = build(args, seed=7)
        with torch.device("meta"):
            meta = MobileLLM(args)
        meta.to_empty(device="cpu")
        meta.init_weights(7)
        cpu_sd, meta_sd = cpu.state_dict(), meta.state_dict()
        assert cpu_sd.keys() == meta_sd.keys()
        for key in cpu_sd:
            assert torch.equal(cpu_sd[key], meta_sd[key]), key
        assert torch.equal(meta.rope_cos, cpu.rope_cos)
        assert torch.equal(meta.rope_sin, cpu.rope_sin)
        tokens = random_tokens(args)
        with torch.no_grad():
            assert torch.equal(cpu(tokens), meta(tokens))


def test_init_statistics_and_seeds():
    model = build(MODEL_PRESETS["debug"], seed=0)
    # Each original matrix, also inside the fused wqkv and w13, is N(0, 0.02).
    matrices = unfuse_projections(dict(model.named_parameters()), MODEL_PRESETS["debug"])
    assert "layers.0.attention.wk.weight" in matrices and "layers.0.feed_forward.w3.weight" in matrices
    for name, p in matrices.items():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.mean().abs() < 2e-3, name
            assert abs(p.std().item() - 0.02) < 1e-3, name
    # Each tensor has its own stream: no two weight matrices of the same shape are equal.
    wqkv = [layer.attention.wqkv.weight for layer in model.layers]
    assert not torch.equal(wqkv[0], wqkv[1])
    other = build(MODEL_PRESETS["debug"], seed=1)
    assert not torch.equal(model.layers[0].attention.wqkv.weight, other.layers[0].attention.wqkv.weight)
    assert not torch.equal(model.tok_embeddings.weight, other.tok_embeddings.weight)


def test_init_casts_into_param_dtype():
    model = MobileLLM(tiny_args()).to(torch.bfloat16)
    model.init_weights(3)
    reference = build(tiny_args(), seed=3)
    torch.testing.assert_close(
        model.layers[1].feed_forward.w2.weight,
        reference.layers[1].feed_forward.w2.weight.to(torch.bfloat16),
        rtol=0,
        atol=0,
    )


def _sharded_init_worker(rank: int, world_size: int, store_path: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
    )
    try:
        # vocab 255 and n_kv_heads * head_dim = 64 rows: uneven and even shards both occur.
        args = tiny_args(vocab_size=255, layer_sharing=True)
        mesh = init_device_mesh("cpu", (world_size,))
        with torch.device("meta"):
            model = MobileLLM(args)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        model.init_weights(11)
        assert model.output.weight is model.tok_embeddings.weight
        reference = build(args, seed=11)
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(p.full_tensor(), ref_params[name]), name
        tokens = random_tokens(args)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sharded_init_equals_single_process_init(tmp_path):
    world_size = 2
    torch.multiprocessing.spawn(
        _sharded_init_worker, args=(world_size, str(tmp_path / "store")), nprocs=world_size
    )


# --- forward and backward ----------------------------------------------------------------------


def test_too_long_sequence_raises():
    args = tiny_args()
    model = build(args)
    model(random_tokens(args, seq_len=args.max_seq_len))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(args, seq_len=args.max_seq_len + 1))


def test_backward_grads_finite():
    args = tiny_args(layer_sharing=True)
    model = build(args)
    tokens = random_tokens(args)
    logits = model(tokens)
    assert logits.shape == (*tokens.shape, args.vocab_size)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_compiled_block_matches_eager():
    # fullgraph=True is the property the model owns: no graph break in the block, the layer-
    # sharing loop included. aot_eager runs dynamo and AOTAutograd (decompositions, backward
    # graph) without inductor's C++ codegen, which costs ~16 s cold on 2 CPU cores.
    args = ModelArgs(
        dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32,
        layer_sharing=True,
    )
    torch.manual_seed(0)
    block = TransformerBlock(args)
    compiled_block = copy.deepcopy(block)
    compiled = torch.compile(compiled_block, fullgraph=True, backend="aot_eager")
    cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
    x = torch.randn(2, 32, args.dim)
    out, out_compiled = block(x, cos, sin), compiled(x, cos, sin)
    torch.testing.assert_close(out_compiled, out, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_compiled.square().sum().backward()
    for (name, p), p_compiled in zip(block.named_parameters(), compiled_block.parameters()):
        torch.testing.assert_close(p_compiled.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)


# --- Hugging Face ------------------------------------------------------------------------------

# rope_theta is off both sides' default (and our norm_eps 1e-5 is off LlamaConfig's 1e-6), so a
# config field dropped by hf_llama_config shows up as a mismatch rather than an equal default.
HF_VARIANTS = {
    "tied": tiny_args(rope_theta=50000.0),
    "untied": tiny_args(rope_theta=50000.0, tie_embeddings=False),
    "ls": tiny_args(rope_theta=50000.0, n_layers=2, layer_sharing=True),
}


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_llama_parity(variant):
    transformers = pytest.importorskip("transformers")
    args = HF_VARIANTS[variant]
    model = build(args, seed=5).eval()
    cfg = transformers.LlamaConfig(**hf_llama_config(args), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf_sd = to_hf_state_dict(model.state_dict(), args)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if args.tie_embeddings else [])
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == args.tie_embeddings
    tokens = random_tokens(args)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # And back: HF's own state dict (lm_head included when tied) imports to the same weights.
    back = from_hf_state_dict(hf.state_dict(), args)
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_state_dict_round_trip(variant):
    args = HF_VARIANTS[variant]
    sd = build(args).state_dict()
    hf_sd = to_hf_state_dict(sd, args)
    expected_layers = args.n_layers * args.n_passes
    assert f"model.layers.{expected_layers - 1}.mlp.up_proj.weight" in hf_sd
    assert f"model.layers.{expected_layers}.mlp.up_proj.weight" not in hf_sd
    assert ("lm_head.weight" in hf_sd) != args.tie_embeddings
    back = from_hf_state_dict(hf_sd, args)
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
    assert args_from_hf_config(hf_llama_config(args), layer_sharing=args.layer_sharing) == args


def test_hf_weight_names_map_to_the_right_modules():
    args = tiny_args(tie_embeddings=False)
    model = build(args)
    hf_sd = to_hf_state_dict(dict(model.named_parameters()), args)
    layers = model.layers
    q_dim, kv_dim, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_dim
    w13, wqkv = layers[3].feed_forward.w13.weight, layers[0].attention.wqkv.weight
    # The fused weights split into the rows Llama's projections hold, as views (no copies).
    sliced = {
        "model.layers.3.mlp.gate_proj.weight": w13[:ffn],
        "model.layers.3.mlp.up_proj.weight": w13[ffn:],
        "model.layers.0.self_attn.q_proj.weight": wqkv[:q_dim],
        "model.layers.0.self_attn.k_proj.weight": wqkv[q_dim:q_dim + kv_dim],
        "model.layers.0.self_attn.v_proj.weight": wqkv[q_dim + kv_dim:],
    }
    for hf_name, rows in sliced.items():
        assert hf_sd[hf_name].shape == rows.shape and hf_sd[hf_name].data_ptr() == rows.data_ptr(), hf_name
    expected = {
        "model.layers.3.mlp.down_proj.weight": layers[3].feed_forward.w2.weight,
        "model.layers.1.input_layernorm.weight": layers[1].attention_norm.weight,
        "model.layers.1.post_attention_layernorm.weight": layers[1].ffn_norm.weight,
        "lm_head.weight": model.output.weight,
    }
    for hf_name, param in expected.items():
        assert hf_sd[hf_name] is param, hf_name


def test_hf_corrupted_ls_pair_raises():
    args = HF_VARIANTS["ls"]
    hf_sd = {k: v.clone() for k, v in to_hf_state_dict(build(args).state_dict(), args).items()}
    hf_sd["model.layers.3.self_attn.v_proj.weight"][0, 0] += 1.0
    pair = r"model\.layers\.2\.self_attn\.v_proj.*model\.layers\.3\.self_attn\.v_proj"
    with pytest.raises(ValueError, match=pair):
        from_hf_state_dict(hf_sd, args)


def test_hf_bad_keys_raise():
    args = tiny_args()
    hf_sd = to_hf_state_dict(build(args).state_dict(), args)
    missing = dict(hf_sd)
    del missing["model.layers.2.input_layernorm.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.2\.input_layernorm\.weight"):
        from_hf_state_dict(missing, args)
    extra = dict(hf_sd, **{"model.layers.4.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"model\.layers\.4\.mlp\.up_proj\.weight"):
        from_hf_state_dict(extra, args)
    untied_head = dict(hf_sd)
    untied_head["lm_head.weight"] = torch.zeros_like(hf_sd["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="lm_head"):
        from_hf_state_dict(untied_head, args)
    ours = build(args).state_dict()
    del ours["layers.0.attention.wqkv.weight"]
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wqkv\.weight"):
        to_hf_state_dict(ours, args)
    # An HF projection of the wrong width is named, not a shape error from torch.cat.
    narrow = dict(hf_sd, **{"model.layers.1.self_attn.k_proj.weight": hf_sd["model.layers.1.self_attn.k_proj.weight"][:-2]})
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wk\.weight has shape"):
        from_hf_state_dict(narrow, args)


def test_hf_config_import():
    cfg = hf_llama_config(MODEL_PRESETS["125M"])
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    ls_cfg = hf_llama_config(replace(MODEL_PRESETS["125M"], layer_sharing=True))
    assert ls_cfg["num_hidden_layers"] == 60
    assert args_from_hf_config(ls_cfg, layer_sharing=True) == replace(
        MODEL_PRESETS["125M"], layer_sharing=True
    )
    # transformers 5 nests rope_theta under rope_parameters.
    v5 = {k: v for k, v in cfg.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert args_from_hf_config(v5).rope_theta == 500000.0
    with pytest.raises(ValueError, match="even"):
        args_from_hf_config(dict(cfg, num_hidden_layers=31), layer_sharing=True)
    with pytest.raises(ValueError, match="rope_type"):
        args_from_hf_config(dict(cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_document_masking_equals_separate_documents():
    """Two documents packed in one sequence with restarting position ids give each document the
    logits it has alone: positions restart and attention does not cross the boundary."""
    args = replace(MODEL_PRESETS["debug"], vocab_size=97, max_seq_len=64, layer_sharing=True)
    torch.manual_seed(0)
    model = MobileLLM(args)
    model.init_weights(seed=3)
    doc_a, doc_b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 21))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(21)]).unsqueeze(0)
    with torch.no_grad():
        masked = model(packed, position_ids=positions)
        alone_a, alone_b = model(doc_a), model(doc_b)
        unmasked = model(packed)
    torch.testing.assert_close(masked[:, :11], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[:, 11:], alone_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, 11:], alone_b, atol=1e-3)  # packing without masking leaks
    # A single document with explicit positions 0..T-1 is plain causal attention.
    with torch.no_grad():
        torch.testing.assert_close(model(packed, position_ids=torch.arange(32).unsqueeze(0)), unmasked,
                                   rtol=1e-5, atol=1e-5)
