"""Mode-independent description of how tensors are quantized.

A :class:`TensorQuantSpec` names the integer range and scheme of one kind of tensor (activations or
weights). A :class:`QuantRecipe` joins the two with the observer choice; every mode turns a recipe into
its own objects (eager/FX ``QConfig``, PT2E ``QuantizationSpec``), so the numbers live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

DTYPE_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}
SIGNED_DTYPES = frozenset({"int8", "int16"})
SIXTEEN_BIT_DTYPES = frozenset({"uint16", "int16"})
# Smallest scale of a 16-bit activation quantizer: float32's epsilon, torch's observer default. The
# 8-bit floor (2**-12, qnnpack's) would cap 16-bit resolution: a [-4, 4] range has scale 1.2e-4 < 2**-12.
SIXTEEN_BIT_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class TensorQuantSpec:
    dtype: str  # "uint8", "int8", "uint16" or "int16"
    quant_min: int
    quant_max: int
    symmetric: bool
    per_channel: bool
    ch_axis: int = 0
    # Smallest scale an observer may produce; some backends (qnnpack) require 2**-12.
    eps: float = 2.0**-12

    def __post_init__(self):
        if self.dtype not in DTYPE_RANGES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_RANGES)}, got {self.dtype!r}")
        lo, hi = DTYPE_RANGES[self.dtype]
        if not lo <= self.quant_min < self.quant_max <= hi:
            raise ValueError(
                f"quant range [{self.quant_min}, {self.quant_max}] does not fit {self.dtype} [{lo}, {hi}]"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The plain integer dtype PT2E's quantize / dequantize ops take for this spec."""
        return getattr(torch, self.dtype)

    @property
    def bits(self) -> int:
        return 16 if self.dtype in SIXTEEN_BIT_DTYPES else 8

    @property
    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    def with_scheme(self, symmetric: bool | None = None, per_channel: bool | None = None) -> "TensorQuantSpec":
        return replace(
            self,
            symmetric=self.symmetric if symmetric is None else symmetric,
            per_channel=self.per_channel if per_channel is None else per_channel,
        )


@dataclass(frozen=True)
class QuantRecipe:
    activation: TensorQuantSpec
    weight: TensorQuantSpec
    observer: str
    # Keyword options of the activation observer (``ObserverChoice.options``), as (name, value) pairs,
    # e.g. (("percentile", 99.99),); empty: the observer's defaults.
    observer_options: tuple[tuple[str, float], ...] = ()


def qparams_from_range(min_val: float, max_val: float, spec: TensorQuantSpec) -> tuple[float, int]:
    """Scale and zero point for an observed range, by the guide's formulas (computed in float32,
    as the observers do).

    The range is first widened to include 0, so that 0 is exactly representable (needed for padding
    and ReLU). Asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zp = qmin - round(min / scale)``
    clamped to the range. Symmetric: ``scale = 2 * max(|min|, |max|) / (qmax - qmin)``; ``zp`` is 0
    for signed types and ``(qmin + qmax) // 2`` for unsigned ones (uint16: ``2**15``).
    """
    f32 = np.float32
    qmin, qmax = spec.quant_min, spec.quant_max
    lo, hi = f32(min(min_val, 0.0)), f32(max(max_val, 0.0))
    eps = f32(spec.eps)
    if spec.symmetric:
        bound = max(-lo, hi)
        scale = max(bound / (f32(qmax - qmin) / f32(2)), eps)
        if spec.dtype in SIGNED_DTYPES:
            zero_point = 0
        elif spec.dtype == "uint16":  # torchao 0.18's observers put it at 2**15, whatever the range
            zero_point = 2**15
        else:  # the centre of an unsigned range, as PyTorch computes it for an explicit quant range
            zero_point = (qmin + qmax) // 2
        return float(scale), zero_point
    with np.errstate(over="ignore"):
        width = hi - lo
    if not np.isfinite(width):  # a range wider than float32's largest value: halve both ends first
        scale = max((hi / f32(2) - lo / f32(2)) / (f32(qmax - qmin) / f32(2)), eps)
    else:
        scale = max(width / f32(qmax - qmin), eps)
    zero_point = int(np.clip(qmin - np.round(lo / scale), qmin, qmax))
    return float(scale), zero_point


def fused_kernel_keeps(spec: TensorQuantSpec, observer_name: str) -> bool:
    """Whether torch's fused observe + fake-quantize kernel computes ``spec``'s qparams correctly.

    The kernel (``fused_moving_avg_obs_fake_quant``, torch 2.14.1) makes qparams symmetric only for
    a range that spans zero (``ChooseQuantizationParams`` in ATen's QuantUtils.h symmetrizes when
    ``min < 0 < max``): a one-signed weight channel gets zero point -127 or +127 under a symmetric
    scheme, which LiteRT's XNNPACK refuses and which is not what "symmetric" promises. The unfused
    FakeQuantize's observer gets it right (zero point 0) at no measured cost (bench: 2.00 vs 2.04
    QAT/float step), so symmetric specs use that one.
    """
    return observer_name.startswith("MovingAverage") and not spec.symmetric
