"""Crafted Hugging Face folders (hf.load_hf_checkpoint): a shard index that names files outside
its folder, and config.json sizes that would allocate without bound, are refused with an
HFCheckpointError naming the file, before any weight is read; real configs pass.

Run: python -m pytest -q tests/test_hf_crafted.py
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, init_model, subprocess_env
from mobilellm_train.export import write_hf_folder
from mobilellm_train.hf import HFCheckpointError, check_config_bounds, load_hf_checkpoint
from mobilellm_train.model import ModelArgs

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=96, max_seq_len=64,
                 tie_embeddings=False)


@pytest.fixture
def sharded(tmp_path):
    """(folder, index path, {shard file: tensor names}) of a two-shard safetensors folder."""
    from safetensors.torch import load_file, save_file

    src = write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "src"))
    state = load_file(os.path.join(src, "model.safetensors"))
    folder = tmp_path / "model"
    folder.mkdir()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(folder / file))
    (folder / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    index = folder / "model.safetensors.index.json"
    write_index(index, shards)
    return folder, index, shards


def write_index(index, shards):
    weight_map = {name: file for file, names in shards.items() for name in names}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_the_sharded_folder_loads(sharded):
    folder, _, _ = sharded
    assert load_hf_checkpoint(str(folder))[0] == ARGS


@pytest.mark.parametrize("how", ["absolute", "parent", "climbing"])
def test_a_shard_outside_the_folder_is_refused(sharded, tmp_path, how):
    folder, index, shards = sharded
    first, second = list(shards)
    # A valid shard outside the model folder: read, it would load.
    outside = tmp_path / "elsewhere.safetensors"
    os.rename(folder / second, outside)
    name = {"absolute": str(outside), "parent": "../elsewhere.safetensors",
            "climbing": "sub/../../elsewhere.safetensors"}[how]
    write_index(index, {first: shards[first], name: shards[second]})
    with pytest.raises(HFCheckpointError, match="is outside the model folder") as e:
        load_hf_checkpoint(str(folder))
    assert str(index) in str(e.value) and repr(name) in str(e.value)


def test_a_shard_in_a_subfolder_loads(sharded):
    folder, index, shards = sharded
    first, second = list(shards)
    (folder / "parts").mkdir()
    os.rename(folder / second, folder / "parts" / second)
    write_index(index, {first: shards[first], f"parts/{second}": shards[second]})
    assert load_hf_checkpoint(str(folder))[0] == ARGS


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a": 5}, {"a": ""}, {"a": ["x"]}])
def test_a_malformed_weight_map_is_refused(sharded, weight_map):
    folder, index, _ = sharded
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(HFCheckpointError, match=str(index)):
        load_hf_checkpoint(str(folder))


@pytest.mark.parametrize("key, value, says", [
    ("max_position_embeddings", 10**12, "from 1 to 1048576"),
    ("max_position_embeddings", 1 << 20, "rotary tables"),  # x head_dim 16 is fine; see below
    ("num_hidden_layers", 10**9, "from 1 to 1024"),
    ("hidden_size", 1 << 20, "from 1 to 65536"),
    ("intermediate_size", -1, "from 1 to 65536"),
    ("vocab_size", 1 << 24, "from 1 to 1048576"),
    ("num_attention_heads", 0, "from 1 to 65536"),
    ("num_key_value_heads", "2", "an integer"),
    ("hidden_size", True, "an integer"),
    ("head_dim", 4.0, "an integer"),
    ("rope_theta", float("nan"), "finite positive"),
    ("rms_norm_eps", float("inf"), "finite positive"),
    ("rope_parameters", ["default"], "expected a JSON object"),
])
def test_a_config_that_would_allocate_without_bound_is_refused(sharded, key, value, says):
    folder, _, _ = sharded
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = value
    if says == "rotary tables":
        cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"] = 8192, 32, 256  # 2^20 x 256 > 2^27
    path.write_text(json.dumps(cfg))  # NaN and Infinity are written as json.load reads them
    with pytest.raises(HFCheckpointError, match=says) as e:
        load_hf_checkpoint(str(folder))
    assert str(path) in str(e.value) and key in str(e.value)


def test_real_model_configs_are_within_bounds():
    llama_405b = {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                  "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
    million_context = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                       "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                       "max_position_embeddings": 1010000, "rope_theta": 10000000.0}
    big_vocab = {"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62, "head_dim": 128,
                 "num_attention_heads": 32, "vocab_size": 262208, "max_position_embeddings": 131072}
    mobilellm_ls = {"hidden_size": 1600, "intermediate_size": 4352, "num_hidden_layers": 108,
                    "num_attention_heads": 25, "num_key_value_heads": 5, "vocab_size": 32000,
                    "max_position_embeddings": 2048}
    for cfg in (llama_405b, million_context, big_vocab, mobilellm_ls):
        check_config_bounds(cfg, "config.json")


def test_generate_refuses_a_crafted_folder_in_words(sharded):
    folder, _, _ = sharded
    path = folder / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), max_position_embeddings=1 << 40)))
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.generate", "--checkpoint", str(folder),
                        "--prompt", "hi", "--device", "cpu"], env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "max_position_embeddings" in r.stderr and str(path) in r.stderr and "Traceback" not in r.stderr

