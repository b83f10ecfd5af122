"""Tests of edge_bench's weight mapping: the benchmark compares our program with ExecuTorch's Llama
recipe only if both run the same model, so the mapping from our layout (fused wqkv and w13,
Hugging Face's rotate-half RoPE, LS blocks run twice) to the recipe's Meta layout must give our
logits in the recipe's own eager model, and a wrong mapping must be refused before anything is
measured.

Skipped when ExecuTorch is not importable: install the edge extra (pip install -e '.[edge]').
"""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("executorch.examples.models.llama.llama_transformer",
                    reason="needs ExecuTorch: pip install -e '.[edge]'")

from conftest import init_model  # noqa: E402
from mobilellm_train import edge_bench  # noqa: E402
from mobilellm_train.model import ModelArgs  # noqa: E402

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97, max_seq_len=64)


@pytest.mark.parametrize("layer_sharing", [False, True])
def test_the_recipe_model_from_mapped_weights_gives_our_logits(layer_sharing):
    model = init_model(replace(ARGS, layer_sharing=layer_sharing), seed=7)
    state, params = edge_bench.meta_state_dict(model), edge_bench.meta_params(model.args)
    # An LS block runs twice in a row: two equal, adjacent layers in the recipe's model, which has
    # no layer sharing.
    assert params["n_layers"] == ARGS.n_layers * (2 if layer_sharing else 1)
    assert torch.equal(state["layers.0.attention.wq.weight"], state["layers.1.attention.wq.weight"]) == layer_sharing
    assert edge_bench.check_mapping(model, state, params) < 1e-4


def test_a_mapping_without_the_rope_permutation_is_refused():
    model = init_model(ARGS, seed=7)
    # Large enough weights that the wrong rotation shows in the logits, not only in rounding.
    with torch.no_grad():
        for block in model.layers:
            block.attention.wqkv.weight.mul_(20)
    state, params = edge_bench.meta_state_dict(model), edge_bench.meta_params(model.args)
    q_dim = ARGS.n_heads * ARGS.head_dim
    state["layers.0.attention.wq.weight"] = model.layers[0].attention.wqkv.weight[:q_dim].detach().clone()
    with pytest.raises(RuntimeError, match="weight mapping is wrong"):
        edge_bench.check_mapping(model, state, params)
