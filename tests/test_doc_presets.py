"""Every statement docs/TRAINING.md makes about the presets comes from the preset files: the
preset table (batch, accumulation, activation checkpointing, resharding, compile, planned memory)
and the checkpoint-size table are compared with what train_configs/*.toml and the planner give,
and prose naming a checkpointing mode for a preset must match a preset that has it.

When a preset changes, `python tests/test_doc_presets.py` prints both tables anew for the doc.
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "TRAINING.md")
GPUS, CARD = 32, "a100-80gb"


def presets():
    """{config file name: Config} of the paper-sized presets (every TOML but the debug-model ones)."""
    from mobilellm_train import plan as P

    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "train_configs", "*.toml"))):
        cfg = P.load_plan_config(["--config", path], GPUS)
        if cfg.model.flavor != "debug":
            out[os.path.basename(path)] = cfg
    return out


def _order(item):
    flavors = ["125M", "350M", "600M", "1B", "1.5B"]
    name, cfg = item
    return flavors.index(cfg.model.flavor), cfg.model.layer_sharing


def preset_table() -> list[str]:
    from mobilellm_train import config as C
    from mobilellm_train import plan as P
    from mobilellm_train.model import count_params

    rows = ["| config | model | parameters | tokens per step | micro-batch per GPU | micro-batches per step on 32 GPUs "
            "| activation checkpointing | reshard_after_forward | compile | planned peak per GPU, 32 x 80 GB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cfg in sorted(presets().items(), key=_order):
        t = cfg.training
        model = f"{'LS-' if cfg.model.layer_sharing else ''}{cfg.model.flavor}"
        peak = P.estimate_config(cfg, GPUS, P.CARDS_GIB[CARD]).peak_gib
        rows.append(
            f"| `{name}` | {model} | {count_params(C.build_model_args(cfg.model)) / 1e6:.1f}M "
            f"| {C.global_batch_size(t, GPUS)} x {t.seq_len} | {t.local_batch_size} "
            f"| {C.grad_accum_steps(t, GPUS)} | {cfg.activation_checkpoint.mode} "
            f"| {str(cfg.parallelism.reshard_after_forward).lower()} | {str(cfg.compile.enable).lower()} "
            f"| {peak:.1f} GiB |"
        )
    return rows


def state_table() -> list[str]:
    from mobilellm_train import config as C
    from mobilellm_train.model import count_params

    rows = ["| preset | parameters | training state |", "|---|---|---|"]
    seen = set()
    for _, cfg in sorted(presets().items(), key=_order):
        if cfg.model.flavor in seen:
            continue  # an LS variant has the same parameters
        seen.add(cfg.model.flavor)
        params = count_params(C.build_model_args(cfg.model))
        rows.append(f"| {cfg.model.flavor} | {params / 1e6:.1f}M | {12 * params / 1e9:.1f} GB |")
    return rows


def doc_table(header_start: str) -> list[str]:
    lines = open(DOC).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_the_preset_table_is_the_preset_files():
    expected = preset_table()
    assert doc_table("| config | model |") == expected, "docs/TRAINING.md preset table, anew:\n" + "\n".join(expected)


def test_the_checkpoint_size_table_is_the_preset_models():
    expected = state_table()
    assert doc_table("| preset | parameters |") == expected, "docs/TRAINING.md state table, anew:\n" + "\n".join(expected)


def test_every_preset_fits_as_the_doc_says():
    from mobilellm_train import plan as P

    text = " ".join(open(DOC).read().split())
    assert "Every preset fits an 80 GB card on 32 GPUs with 10% to spare" in text
    for name, cfg in presets().items():
        assert P.estimate_config(cfg, GPUS, P.CARDS_GIB[CARD]).fits(0.1), name


def test_prose_about_preset_checkpointing_matches_the_presets():
    """The sentence that said "the 1B and 1.5B presets use full checkpointing" (they use none) is
    the kind this catches: a preset named with a mode no preset has."""
    modes = {cfg.activation_checkpoint.mode for cfg in presets().values()}
    text = " ".join(open(DOC).read().split())
    for sentence in re.split(r"(?<=[.;:])\s", text):
        if "preset" not in sentence:
            continue
        for mode in ("full", "selective", "op"):
            if re.search(rf"\b{mode}\b (activation )?checkpointing", sentence) or f"mode = \"{mode}\"" in sentence:
                assert mode in modes, f"docs/TRAINING.md: {sentence!r}, but the presets use {sorted(modes)}"


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    print("\n".join(preset_table()))
    print()
    print("\n".join(state_table()))
