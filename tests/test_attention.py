"""Tests of document masking with FlexAttention: the block mask holds the same rule as the boolean
[B,1,T,T] mask of the SDPA path, outputs agree on CPU (eager, and compiled with inductor), and on
CUDA the gradients agree too (FlexAttention has no CPU backward).

    python -m pytest tests/test_attention.py -q
"""

from dataclasses import replace

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from mobilellm_train.model import MODEL_PRESETS, MobileLLM, document_block_mask, document_causal_mask


def positions(lengths_per_row):
    """position_ids restarting at 0 at each document, one row per list of document lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


# Two rows of 200 tokens (not a multiple of the 128-token tile), documents crossing tile edges.
POSITIONS = positions([[70, 5, 125], [200]])


def tiny(layer_sharing=False, device="cpu"):
    args = replace(MODEL_PRESETS["debug"], vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   ffn_dim=96, max_seq_len=256, layer_sharing=layer_sharing)
    model = MobileLLM(args).to(device)
    model.init_weights(seed=0)
    return model.eval()


@pytest.mark.parametrize("compiled", [False, True])
def test_block_mask_is_the_boolean_document_mask(compiled):
    block_mask = document_block_mask(POSITIONS, compiled=compiled)
    dense = create_mask(block_mask.mask_mod, 2, 1, 200, 200, device="cpu")
    assert torch.equal(dense, document_causal_mask(POSITIONS))
    # The same tiles whichever way it was built.
    eager = document_block_mask(POSITIONS, compiled=False)
    assert torch.equal(block_mask.kv_num_blocks, eager.kv_num_blocks)
    assert torch.equal(block_mask.kv_indices, eager.kv_indices)
    # Tiles wholly outside every document are skipped, not computed and masked.
    many_docs = positions([[64] * 8])  # eight documents of half a tile in 512 tokens
    sparse = document_block_mask(many_docs)
    full_tiles = 0 if sparse.full_kv_num_blocks is None else int(sparse.full_kv_num_blocks.sum())
    assert int(sparse.kv_num_blocks.sum()) + full_tiles == 4  # the diagonal; a causal mask has 10


@pytest.mark.parametrize("layer_sharing", [False, True])
def test_flex_forward_equals_the_math_path_on_cpu(layer_sharing):
    model = tiny(layer_sharing)
    tokens = torch.randint(0, 64, POSITIONS.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens, position_ids=POSITIONS)
        model.flex_doc_mask = True
        flex = model(tokens, position_ids=POSITIONS)
    torch.testing.assert_close(flex, reference, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_compiled_flex_forward_equals_the_math_path_on_cpu():
    model = tiny()
    tokens = torch.randint(0, 64, POSITIONS.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens, position_ids=POSITIONS)
        model.flex_doc_mask = True
        torch._dynamo.reset()
        for name, block in model.layers.named_children():
            model.layers.register_module(name, torch.compile(block, fullgraph=True))  # inductor
        compiled = model(tokens, position_ids=POSITIONS)
    torch.testing.assert_close(compiled, reference, rtol=0, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_blocks", [False, True])
def test_flex_training_step_equals_the_math_path_on_cuda(compile_blocks):
    model = tiny(device="cuda")
    pos = POSITIONS.cuda()
    tokens = torch.randint(0, 64, pos.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels, position_ids=pos)
        loss.backward()
        return loss.detach(), {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()}

    reference_loss, reference_grads = loss_and_grads()
    model.flex_doc_mask = True
    if compile_blocks:
        torch._dynamo.reset()
        for name, block in model.layers.named_children():
            model.layers.register_module(name, torch.compile(block, fullgraph=True))
    flex_loss, flex_grads = loss_and_grads()
    torch.testing.assert_close(flex_loss, reference_loss, rtol=0, atol=1e-4)
    for name, g in reference_grads.items():
        torch.testing.assert_close(flex_grads[name], g, rtol=1e-3, atol=1e-4, msg=name)
