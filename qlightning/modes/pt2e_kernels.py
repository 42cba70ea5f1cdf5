"""Activation fake-quantize for PT2E QAT through ATen's vectorized quantize / dequantize kernels.

torch 2.14.1's CPU fake-quantize kernels (``fake_quantize_per_tensor_affine`` and the cachemask variant
that ``torch.fused_moving_avg_obs_fake_quant`` calls) round element by element with scalar
``std::nearbyint``. On MobileNetV2's 55 activation quantizers (batch 16, 64x64: 8.96 M elements a step)
they took 56 ms at 2 threads, while ``quantize_per_tensor`` + ``dequantize`` (fbgemm's AVX2 kernels, which
compute the same ``z + nearbyint(x * (1 / s))``) took 7.7 ms on the same tensors and matched bit for bit.
:class:`QuantizeDequantizeFakeQuantize` is torchao's ``FusedMovingAvgObsFakeQuantize`` (same buffers,
``state_dict`` and qparams) that keeps torch's fused op for the statistics and the qparams, feeding it
only the batch's (min, max), and fake-quantizes through those kernels. Its outputs, gradients and state
are bit-identical to torchao's module (``tests/test_qat_kernels.py``); a range that is not a quantized
dtype's whole range (int16 activations, ``reduce_range``), a per-channel quantizer or a non-float32
input runs torchao's forward.

The gradient is the straight-through estimate with ATen's mask, ``quant_min <= z + nearbyint(x * (1 / s))
<= quant_max``. That quantity never decreases as ``x`` grows, so the mask is ``lo <= x <= hi`` for two
float32 bounds found once per step (:func:`in_range_bounds`): two comparisons instead of a rounding pass.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torchao.quantization.pt2e import fake_quantize as ao_fake_quantize

# The quantized dtypes whose whole range a fake-quantize range can be; quantize_per_tensor saturates to it.
# torch deprecates quantized tensors (pytorch/pytorch#184982, warned since 2.14): without them every range
# takes torchao's forward.
_QUANTIZED_DTYPE = ({(0, 255): torch.quint8, (-128, 127): torch.qint8}
                    if hasattr(torch, "quantize_per_tensor") and hasattr(torch, "quint8") else {})
# The deprecation warning is about torch's API, which users cannot act on here: this module keeps it quiet.
_DEPRECATION = "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation"
# How many float32 steps from the estimate the bound search may walk before giving up (it takes 0-3).
_MAX_STEPS = 64


def in_range_bounds(scale: float, zero_point: int, quant_min: int, quant_max: int) -> tuple[float, float] | None:
    """The smallest and the largest float32 ``x`` for which ``zero_point + nearbyint(x * (1 / scale))``,
    computed in float32 as ATen's fake-quantize kernel does, lies in ``[quant_min, quant_max]``; None if
    the search does not settle (the caller then uses ATen's kernel)."""
    inverse = np.float32(1.0) / np.float32(scale)

    def quantized(x: np.float32) -> float:
        return zero_point + float(np.rint(x * inverse))

    def walk(start: float, inside, towards_inside: float) -> float | None:
        # From an estimate, step outwards until outside, then inwards to the first value inside.
        x, away = np.float32(start), -towards_inside
        for _ in range(_MAX_STEPS):
            if not inside(quantized(x)):
                break
            x = np.nextafter(x, np.float32(away))
        else:
            return None
        for _ in range(_MAX_STEPS):
            if inside(quantized(x)):
                return float(x)
            x = np.nextafter(x, np.float32(towards_inside))
        return None

    with np.errstate(over="ignore"):  # x * (1 / scale) may overflow to inf, as in float32 C code
        low = walk((quant_min - zero_point - 0.5) * scale, lambda q: q >= quant_min, np.inf)
        high = walk((quant_max - zero_point + 0.5) * scale, lambda q: q <= quant_max, -np.inf)
    return None if low is None or high is None else (low, high)


def _fits_int32(extremes: torch.Tensor, scale: float) -> bool:
    """Whether every ``x / scale`` of the batch fits int32 with room to spare. fbgemm's quantize converts
    ``x * (1 / s)`` to int32 before it clamps (x86's conversion turns anything larger, and NaN, into
    INT32_MIN), so a batch 2^30 steps past its grid (a diverging run) or holding NaN takes ATen's kernel."""
    low, high = extremes.tolist()
    return math.isfinite(low) and math.isfinite(high) and max(-low, high) / scale < 2.0**30


class _QuantizeDequantize(torch.autograd.Function):
    """``dequantize(quantize_per_tensor(x))`` forward; ATen's straight-through mask backward."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, dtype: torch.dtype, bounds: tuple[float, float]):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((x >= bounds[0]) & (x <= bounds[1]))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION)
            return torch.quantize_per_tensor(x, scale, zero_point, dtype).dequantize()

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        # ATen's fake_quantize_per_tensor_affine_cachemask_backward is dY * mask (a NaN gradient stays NaN).
        return grad * mask, None, None, None, None


class QuantizeDequantizeFakeQuantize(ao_fake_quantize.FusedMovingAvgObsFakeQuantize):
    """torchao's fused moving-average activation quantizer, fake-quantizing through quantize /
    dequantize kernels (see the module doc)."""

    def _quantized_dtype(self, X: torch.Tensor) -> torch.dtype | None:
        observer = self.activation_post_process
        if self.is_per_channel or X.dtype != torch.float32 or X.numel() == 0:
            return None
        return _QUANTIZED_DTYPE.get((observer.quant_min, observer.quant_max))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        dtype = self._quantized_dtype(X)
        if dtype is None:
            return super().forward(X)
        observer = self.activation_post_process
        # torch's fused op updates the running range and the qparams from the batch's (min, max) alone:
        # its statistic is aminmax, so a two-element tensor holding them updates the state identically.
        extremes = torch.stack(torch.aminmax(X.detach()))
        torch.fused_moving_avg_obs_fake_quant(
            extremes, self.observer_enabled, self.fake_quant_enabled, observer.min_val, observer.max_val,
            self.scale, self.zero_point, observer.averaging_constant, observer.quant_min, observer.quant_max,
            self.ch_axis, self.is_per_channel, self.is_symmetric_quant,
        )
        if self.fake_quant_enabled[0] != 1:
            return X
        scale, zero_point = float(self.scale), int(self.zero_point)
        bounds = in_range_bounds(scale, zero_point, observer.quant_min, observer.quant_max)
        if bounds is None or not _fits_int32(extremes, scale):
            return torch.fake_quantize_per_tensor_affine(X, scale, zero_point, observer.quant_min, observer.quant_max)
        return _QuantizeDequantize.apply(X, scale, zero_point, dtype, bounds)
