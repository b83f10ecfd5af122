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

The tied output layer is a linear layer and is quantized by the linear scheme (PTQ: on its own
copy of the table; QAT: while still sharing it with the embedding). The embedding table (the
lookup) stays fp32 unless an embedding scheme is asked for, ExecuTorch's Llama recipe's `-E
BITS,GROUP` (`EmbeddingScheme`):

    8,0     int8 weights, symmetric, one scale per row (per token)
    4,32    int4 weights, symmetric, one scale per group of 32 columns of a row (any divisor of
            the width; 0 or the width: per row)

weight-only, its scales fp16: the type ExecuTorch's quantized embedding kernels read
(embedding_byte, embedding_4bit: fp32 or fp16, not bf16; fp16 keeps the 4,32 table's scales at
half the bytes). `apply_embedding_ptq` quantizes the table with torchao's IntxUnpackedToInt8Tensor
(eager: a dequantize in fp32, float(q) * float(scale), what the runtime kernel computes, and
edge_model.QuantizedEmbedding lowers it to that kernel); `apply_embedding_qat` makes it torchao's
FakeQuantizedEmbedding with the same scales (`embedding_fake_quantize_config`), so the
fake-quantized table is the quantized one, bit for bit.

torchao is the optional `edge` extra (pip install -e '.[edge]'); it is imported only here, and
only when a scheme is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    """Turn the fake quantizers of every fake-quantized linear layer (apply_qat) and embedding
    (apply_embedding_qat) on or off; off, such a layer computes exactly what nn.Linear or
    nn.Embedding does."""
    from torchao.quantization.qat.linear import enable_linear_fake_quant

    model.apply(functools.partial(enable_linear_fake_quant, enabled=enabled))
    _set_embedding_fake_quantization(model, enabled)


class QATRecord:
    """What a checkpoint says about the QAT that trained it: the scheme, its group size, the step
    fake quantization started at, and the embedding scheme ("8,0", "4,32"; "" when the table was
    not fake-quantized, and in records written before it existed). Saved in every checkpoint of a
    QAT run (build_checkpointer), never loaded at resume; `mobilellm-export` reads it
    (evaluation.loading.trained_scheme, trained_embedding) to ship what the weights were trained for."""

    KEY = "qat"

    def __init__(self, scheme: str = "", group_size: int = 0, start_step: int = 0, embedding: str = ""):
        self.scheme, self.group_size, self.start_step = scheme, group_size, start_step
        self.embedding = embedding

    def state_dict(self) -> dict:
        record = {"scheme": self.scheme, "group_size": self.group_size, "start_step": self.start_step}
        if self.embedding:  # absent otherwise: a record as runs without it wrote
            record["embedding"] = self.embedding
        return {"record": json.dumps(record, sort_keys=True)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Read back from a step folder that may come from elsewhere: a record that is not this
        shape is a CheckpointError, not a value the export would act on."""
        from mobilellm_train.errors import CheckpointError, parse_json

        try:
            data = parse_json(state_dict["record"])
            scheme, group_size, start_step = data["scheme"], data["group_size"], data["start_step"]
            embedding = data.get("embedding", "")
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"the step's QAT record is not readable ({e!r:.200}); the checkpoint is damaged") from None
        if scheme not in LINEAR_SCHEMES or any(type(v) is not int or v < 0 for v in (group_size, start_step)):
            raise CheckpointError(f"the step's QAT record {data!r:.200} names no scheme of this version "
                                  f"({', '.join(LINEAR_SCHEMES)}) with a group size and start step")
        try:
            parse_embedding_scheme(embedding if isinstance(embedding, str) else "?")
        except QuantizationError:
            raise CheckpointError(f"the step's QAT record {data!r:.200} names an embedding scheme this version does "
                                  "not know (8,GROUP or 4,GROUP)") from None
        self.scheme, self.group_size, self.start_step = scheme, group_size, start_step
        self.embedding = embedding


# The embedding scheme (ExecuTorch's Llama recipe's -E): see the module docstring.

EMBEDDING_BITS = (8, 4)


@dataclasses.dataclass(frozen=True)
class EmbeddingScheme:
    """The lookup table's weight-only quantization: `bits` (8 or 4) and `group_size` columns per
    scale (0: one scale per row). str() is the option's own spelling, "8,0" or "4,32"."""

    bits: int
    group_size: int = 0

    def __str__(self) -> str:
        return f"{self.bits},{self.group_size}"

    def describe(self) -> str:
        """'int8 per row', 'int4 in groups of 32': the table's quantization in logs and errors."""
        per = f"in groups of {self.group_size}" if self.group_size else "per row"
        return f"int{self.bits} {per}"


def parse_embedding_scheme(text: str, key: str = "--embedding-quantize") -> EmbeddingScheme | None:
    """'BITS[,GROUP]' (the recipe's -E: '8,0', '4,32'; GROUP 0 or left out: per row) as an
    EmbeddingScheme; 'none' or '' -> None. Raises QuantizationError naming `key` otherwise."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        bits, group_size = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        bits = group_size = -1
    if len(parts) > 2 or bits not in EMBEDDING_BITS or group_size < 0:
        raise QuantizationError(f"{key} {text!r}: give BITS[,GROUP] with BITS 8 or 4 and GROUP the columns per "
                                "scale (0: one scale per row), e.g. 8,0 or 4,32; or none")
    return EmbeddingScheme(bits, group_size)


def embedding_scheme_problem(width: int, scheme: EmbeddingScheme, key: str) -> str:
    """Why `scheme` (the option `key`) cannot quantize a table of `width` columns, or "" when it
    can: a group must tile each row, and int4 values are stored two to a byte."""
    group_size = scheme.group_size
    if group_size and (group_size < 2 or width % group_size):
        divisors = [d for d in range(2, width + 1) if width % d == 0]
        return (f"{key} {scheme}: group size {group_size} does not divide the embedding width {width}; choose 0 "
                f"(one scale per row) or one of its divisors: {', '.join(map(str, divisors))}")
    if scheme.bits == 4 and width % 2:
        return f"{key} {scheme}: int4 values are stored two to a byte, and the embedding width {width} is odd"
    return ""


def _embedding_block(width: int, scheme: EmbeddingScheme) -> tuple[int, int]:
    return (1, scheme.group_size or width)


def _embedding_dtype(scheme: EmbeddingScheme):
    import torch

    return torch.int8 if scheme.bits == 8 else torch.int4


def _scale_eps() -> float:
    # The smallest normal fp16: a scale never rounds to 0 or to a subnormal in fp16 (an all-zero
    # row keeps a usable scale), and 1 / scale, which torchao's quantize computes in the scales'
    # fp16, stays finite (at most 2^14).
    import torch

    return torch.finfo(torch.float16).smallest_normal


def embedding_qparams(weight, scheme: EmbeddingScheme):
    """(scales fp16 [rows, groups], zero points int8, all 0) of a table `weight` under `scheme`:
    torchao's symmetric choice, max |w| of each group over half the int range, at least _scale_eps,
    then rounded to fp16."""
    import torch

    with _quiet_import():
        from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    qmin, qmax = -(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1
    return choose_qparams_affine(
        weight.detach(), MappingType.SYMMETRIC, _embedding_block(weight.shape[1], scheme), torch.int8, qmin, qmax,
        eps=_scale_eps(), scale_dtype=torch.float16, zero_point_dtype=torch.int8, keepdim=True,
    )


def embedding_fake_quantize_config(scheme: EmbeddingScheme):
    """torchao's fake-quantize config that computes what apply_embedding_ptq's table holds:
    the same symmetric scales, eps and fp16 rounding (checked bit for bit by tests/test_qat.py)."""
    import torch

    with _quiet_import():
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.quant_primitives import MappingType

    granularity = PerGroup(scheme.group_size) if scheme.group_size else PerAxis(0)
    return IntxFakeQuantizeConfig(dtype=_embedding_dtype(scheme), granularity=granularity,
                                  mapping_type=MappingType.SYMMETRIC, scale_precision=torch.float16,
                                  eps=_scale_eps())


def _checked_embedding(model: nn.Module, scheme: EmbeddingScheme, key: str, what: str):
    embedding = getattr(model, "tok_embeddings", None)
    if embedding is None:
        raise QuantizationError(f"{key}: the model has no embedding table (tok_embeddings)")
    problem = embedding_scheme_problem(embedding.embedding_dim, scheme, key)
    if problem:
        raise QuantizationError(problem)
    require_torchao(f"{key} {what}")
    return embedding


def apply_embedding_ptq(model: nn.Module, scheme: EmbeddingScheme | None, key: str = "--embedding-quantize") -> None:
    """Quantize the embedding table of `model` in place with `scheme` (None does nothing): its
    weight becomes torchao's IntxUnpackedToInt8Tensor (int values and embedding_qparams' fp16
    scales), which eager PyTorch looks up through a dequantize. A tied output layer first gets its
    own copy of the table, which the linear scheme (apply_ptq) quantizes or leaves fp32. Raises
    QuantizationError naming `key` for a scheme that does not fit the table."""
    if scheme is None:
        return
    from torch import nn

    embedding = _checked_embedding(model, scheme, key, "quantization")
    output = getattr(model, "output", None)
    if output is not None and output.weight is embedding.weight:
        output.weight = nn.Parameter(output.weight.detach().clone())
    with _quiet_import():
        from torchao.quantization import IntxUnpackedToInt8Tensor
        from torchao.quantization.quant_primitives import MappingType

    weight = embedding.weight.detach()
    scale, zero_point = embedding_qparams(weight, scheme)
    quantized = IntxUnpackedToInt8Tensor.from_hp(
        weight, _embedding_block(weight.shape[1], scheme), _embedding_dtype(scheme),
        mapping_type=MappingType.SYMMETRIC, intx_choose_qparams_algorithm=None,
        custom_scale=scale, custom_zero_point=zero_point,
    )
    embedding.weight = nn.Parameter(quantized, requires_grad=False)


def _is_embedding(module: nn.Module, _fqn: str) -> bool:
    from torch import nn

    return isinstance(module, nn.Embedding)


def apply_embedding_qat(model: nn.Module, scheme: EmbeddingScheme | None, key: str = "qat.embedding_quantize") -> None:
    """Make the embedding of `model` torchao's FakeQuantizedEmbedding of `scheme` (None does
    nothing), keeping a tied output layer on its Parameter; fake quantization starts off (turn it
    on with set_fake_quantization). Works on a meta-device model, as apply_qat."""
    if scheme is None:
        return
    embedding = _checked_embedding(model, scheme, key, "quantization-aware training")
    output = getattr(model, "output", None)
    tied = output is not None and output.weight is embedding.weight
    with _quiet_import():
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        config = QATConfig(weight_config=embedding_fake_quantize_config(scheme), step="prepare")
        quantize_(model, config, filter_fn=_is_embedding)
    if tied:
        # One Parameter, trained by the lookup and the output layer, as without QAT.
        model.output.weight = model.tok_embeddings.weight
    _set_embedding_fake_quantization(model, False)


def _set_embedding_fake_quantization(model: nn.Module, enabled: bool) -> None:
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding

    for module in model.modules():
        if isinstance(module, FakeQuantizedEmbedding) and module.weight_fake_quantizer is not None:
            module.weight_fake_quantizer.enabled = enabled
