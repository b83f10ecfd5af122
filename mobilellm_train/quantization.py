"""The quantization schemes of what ships to the phone, defined once: quantization-aware training
(the trainer's [qat] section) fake-quantizes with them, and the ExecuTorch export, mobilellm-eval
--quantize and mobilellm-generate --quantize quantize with them, so the two can never disagree.

    8da4w   int8 dynamic activations (asymmetric, one scale per token) and int4 weights
            (symmetric, one scale per group of `group_size` input columns): XNNPACK's LLM layout
    8da8w   int8 dynamic activations and int8 weights (symmetric, one scale per output channel)

Each is torchao's `Int8DynamicActivationIntxWeightConfig` with its granularity (`linear_config`).
`apply_ptq` quantizes every nn.Linear with it (torchao's `quantize_`, the export's quantization);
`apply_qat` swaps them for torchao's fake-quantized linear layers, whose fake quantizers are
those torchao derives from the same config (`qat_config`), so the fake-quantized model computes
what the quantized one computes. 8da4w's group scales are bfloat16, as the program stores them
(`weight_scale_dtype`). torchao's own convert step of such a model is
`apply_ptq` of its weights: the module swap back to nn.Linear, then the same config.

The embedding table stays fp32 in every scheme; the tied output layer is a linear layer and is
quantized (PTQ: on its own copy of the table; QAT: while still sharing it with the embedding).
An embedding scheme (a weight-only config of nn.Embedding) would be defined beside
`linear_config` and applied by the same functions.

torchao is the optional `edge` extra (pip install -e '.[edge]'); it is imported only here, and
only when a scheme is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

LINEAR_SCHEMES = ("8da4w", "8da8w")
QUANTIZE_CHOICES = ("none", *LINEAR_SCHEMES)
DEFAULT_GROUP_SIZE = 32
INSTALL_HINT = "pip install -e '.[edge]'"


class QuantizationError(ValueError):
    """A scheme or group size that cannot apply to this model, or torchao missing."""


@contextlib.contextmanager
def _quiet_import():
    # torchao's import prints lines about native kernels this machine does not need (CUDA ones on
    # a CPU build) and Enum notes; edge_model knows that noise and keeps only the rest.
    from mobilellm_train.edge_model import maybe_quiet_native_noise

    # And a logged warning that Triton (GPU kernels torchao does not use here) is missing.
    logging.getLogger("torchao.kernel.intmm").setLevel(logging.ERROR)
    with maybe_quiet_native_noise():
        yield


def require_torchao(what: str) -> None:
    """Raise QuantizationError naming `what` needs torchao and how to install it, when it is not
    importable."""
    try:
        with _quiet_import():
            import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise QuantizationError(f"{what} needs torchao ({e}); install the edge extra: {INSTALL_HINT}") from None


def linear_config(scheme: str, group_size: int = DEFAULT_GROUP_SIZE):
    """torchao's config of a linear scheme: the one definition training and export share.

    The weight scales are chosen by torchao's plain affine rule (max |w| per group over the int
    range), the only rule QAT's fake quantization simulates: no HQQ or other search."""
    import torch

    with _quiet_import():
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_api import IntxChooseQParamsAlgorithm

    if scheme == "8da4w":
        weight_dtype, granularity = torch.int4, PerGroup(group_size)
    elif scheme == "8da8w":
        weight_dtype, granularity = torch.int8, PerAxis(0)
    else:
        raise QuantizationError(f"unknown scheme {scheme!r}: choose one of {', '.join(LINEAR_SCHEMES)}")
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=weight_dtype, weight_granularity=granularity,
        weight_scale_dtype=weight_scale_dtype(scheme),
        intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.AFFINE,
    )


def weight_scale_dtype(scheme: str):
    """The dtype the phone multiplies a scheme's weights by: XNNPACK stores the scales of its
    blockwise (per-group) int4 weights as bfloat16 (ExecuTorch's XNNPACK serializer casts them), and
    per-channel scales as float32. A group scale is therefore chosen in bfloat16 here, before the
    weights are quantized against it, so that what eager evaluation, QAT and the program compute is
    one thing: with float32 scales the 8da4w program's logits were up to 0.03 off the eager
    quantized model's (a tiny model's greedy output could part from eager's at a near tie); with
    bfloat16 ones, 2e-6 (tests/test_edge.py)."""
    import torch

    return torch.bfloat16 if scheme == "8da4w" else None


def qat_config(scheme: str, group_size: int = DEFAULT_GROUP_SIZE):
    """torchao's QAT prepare config of a linear scheme: the fake quantizers torchao derives from
    `linear_config` (int8 per-token asymmetric activations; symmetric weights at the scheme's
    granularity), the weights' scales in the scheme's `weight_scale_dtype` as its quantization
    chooses them (torchao's own derivation refuses a scale dtype, so it is written out here and
    tests/test_qat.py holds the two equal)."""
    import torch

    with _quiet_import():
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    base = linear_config(scheme, group_size)
    # scale_precision None: the scale in the dtype of what is quantized, as torchao's derivation.
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False, scale_precision=None)
    weight = IntxFakeQuantizeConfig(dtype=base.weight_dtype, granularity=base.weight_granularity,
                                    mapping_type=base.weight_mapping_type, scale_precision=base.weight_scale_dtype)
    return QATConfig(activation_config=activation, weight_config=weight, step="prepare")


def describe(scheme: str, group_size: int) -> str:
    """'8da4w (group size 32)', '8da8w': a scheme as the logs and errors name it."""
    return f"{scheme} (group size {group_size})" if scheme == "8da4w" else scheme


def short_name(scheme: str, group_size: int) -> str:
    """'8da4w-g32', '8da8w': a scheme in a results row's name."""
    return f"{scheme}-g{group_size}" if scheme == "8da4w" else scheme


def group_size_problem(widths: list[int], scheme: str, group_size: int, key: str) -> str:
    """Why `group_size` (the option `key`) cannot serve linear layers of input widths `widths`
    under `scheme`, or "" when it can: 8da4w groups must tile every row."""
    if scheme != "8da4w":
        return ""
    widths = sorted(set(widths))
    if group_size < 2 or any(w % group_size for w in widths):
        import math

        return (f"{key} {group_size} does not divide the input width of every linear layer ({widths}); "
                f"choose a divisor of {math.gcd(*widths)} of at least 2")
    return ""


def linear_widths(model: nn.Module) -> list[int]:
    from torch import nn

    return sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})


def _is_linear(module: nn.Module, _fqn: str) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)


def apply_ptq(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE, key: str = "--group-size") -> None:
    """Quantize every nn.Linear of `model` in place with `scheme` (torchao's quantize_); "none"
    does nothing. A tied output layer gets its own copy of the table first, so the embedding
    keeps its fp32 weights. Raises QuantizationError naming `key` for a group size that does not fit."""
    if scheme == "none":
        return
    config = _checked_config(model, scheme, group_size, key, "quantization")
    from torch import nn

    output, embedding = getattr(model, "output", None), getattr(model, "tok_embeddings", None)
    if output is not None and embedding is not None and output.weight is embedding.weight:
        output.weight = nn.Parameter(output.weight.detach().clone())
    with _quiet_import():
        from torchao.quantization import quantize_

        quantize_(model, config, filter_fn=_is_linear)


def apply_qat(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE, key: str = "qat.group_size") -> None:
    """Swap every nn.Linear of `model` for torchao's FakeQuantizedLinear of `scheme` (torchao's
    QAT prepare step), keeping a tied output layer on the embedding's Parameter. Fake quantization
    starts off: turn it on with set_fake_quantization. Works on a meta-device model, before any
    wrapping (see build.build_model)."""
    _checked_config(model, scheme, group_size, key, "quantization-aware training")
    output, embedding = getattr(model, "output", None), getattr(model, "tok_embeddings", None)
    tied = output is not None and embedding is not None and output.weight is embedding.weight
    with _quiet_import():
        from torchao.quantization import quantize_

        quantize_(model, qat_config(scheme, group_size), filter_fn=_is_linear)
    if tied:
        # The output layer keeps computing from the embedding's table: one Parameter trained by
        # both uses, as without QAT (from_linear makes a new one on the meta device).
        model.output.weight = model.tok_embeddings.weight
    set_fake_quantization(model, False)


def _checked_config(model: nn.Module, scheme: str, group_size: int, key: str, what: str):
    if scheme not in LINEAR_SCHEMES:
        raise QuantizationError(f"unknown scheme {scheme!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    problem = group_size_problem(linear_widths(model), scheme, group_size, key)
    if problem:
        raise QuantizationError(problem)
    require_torchao(f"{scheme} {what}")
    return linear_config(scheme, group_size)


def set_fake_quantization(model: nn.Module, enabled: bool) -> None:
    """Turn the fake quantizers of every fake-quantized linear layer (apply_qat) on or off; off,
    such a layer computes exactly what nn.Linear does."""
    from torchao.quantization.qat.linear import enable_linear_fake_quant

    model.apply(functools.partial(enable_linear_fake_quant, enabled=enabled))


class QATRecord:
    """What a checkpoint says about the QAT that trained it: the scheme, its group size and the
    step fake quantization started at. Saved in every checkpoint of a QAT run (build_checkpointer),
    never loaded at resume; `mobilellm-export` reads it (evaluation.loading.trained_scheme) to ship
    the scheme the weights were trained for."""

    KEY = "qat"

    def __init__(self, scheme: str = "", group_size: int = 0, start_step: int = 0):
        self.scheme, self.group_size, self.start_step = scheme, group_size, start_step

    def state_dict(self) -> dict:
        return {"record": json.dumps({"scheme": self.scheme, "group_size": self.group_size,
                                      "start_step": self.start_step}, sort_keys=True)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Read back from a step folder that may come from elsewhere: a record that is not this
        shape is a CheckpointError, not a value the export would act on."""
        from mobilellm_train.errors import CheckpointError, parse_json

        try:
            data = parse_json(state_dict["record"])
            scheme, group_size, start_step = data["scheme"], data["group_size"], data["start_step"]
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"the step's QAT record is not readable ({e!r:.200}); the checkpoint is damaged") from None
        if scheme not in LINEAR_SCHEMES or any(type(v) is not int or v < 0 for v in (group_size, start_step)):
            raise CheckpointError(f"the step's QAT record {data!r:.200} names no scheme of this version "
                                  f"({', '.join(LINEAR_SCHEMES)}) with a group size and start step")
        self.scheme, self.group_size, self.start_step = scheme, group_size, start_step
