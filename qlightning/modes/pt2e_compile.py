"""Compiled PT2E QAT: fake-quantizers that ``torch.compile`` traces whole, and the compiled training graph.

torchao 0.18's ``FakeQuantize`` and its min/max observers branch on tensor values
(``if self.observer_enabled[0] == 1``, ``if min_val == inf``, ``check_min_max_valid``'s asserts),
``resize_`` their buffers and turn a 0-d scale into a list through ``float()``: dynamo breaks the graph
at every quantizer (MobileNetV2 has 107) and then hits its recompile limit. The classes here are the
same modules with branch-free forwards: both sides of each data-dependent ``if`` are computed and
selected with ``torch.where``, so one graph covers observers on and off and fake-quant on and off.
Uncompiled they are bit-identical to torchao's (``tests/test_compile.py``); compiled, inductor's kernels
round differently in the last bits, which the tests hold to what a one-ulp input change does.

They replace the classes of the prepared network's quantizers in place (``__class__``): same
attributes, buffers, ``state_dict`` and qparams, so conversion, the monitor, checkpoints and DDP's
statistic sync see torchao's modules. ``FusedMovingAvgObsFakeQuantize`` keeps torchao's forward: it is
one ATen op that dynamo traces without a break (qlightning's faster subclass, ``pt2e_kernels``, reads the
qparams into Python for fbgemm's kernels, which dynamo cannot trace, so it goes back to torchao's class).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchao.quantization.pt2e import fake_quantize as ao_fake_quantize
from torchao.quantization.pt2e import observer as ao_observer

from qlightning.errors import QuantizationConfigError
from qlightning.modes.pt2e_kernels import QuantizeDequantizeFakeQuantize


def _aminmax_per_channel(x: torch.Tensor, ch_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    # torchao swaps axes 0 and ch_axis before flattening; min and max do not depend on the order.
    return torch.aminmax(x.movedim(ch_axis, 0).flatten(1), dim=1)


def _running_minmax(observer, current_min, current_max):
    return torch.min(current_min, observer.min_val), torch.max(current_max, observer.max_val)


def _moving_average(observer, current_min, current_max):
    # torchao starts the average at the first batch's range: a never-updated range is (inf, -inf).
    fresh = (observer.min_val == float("inf")) & (observer.max_val == float("-inf"))
    c = observer.averaging_constant
    min_val = torch.where(fresh, current_min, observer.min_val + c * (current_min - observer.min_val))
    max_val = torch.where(fresh, current_max, observer.max_val + c * (current_max - observer.max_val))
    return min_val, max_val


# The observers whose statistic update is written branch-free here, by exact class (the moving-average
# observers subclass the min/max ones), with whether they are per-channel.
_UPDATES: dict[type, tuple[bool, Callable]] = {
    ao_observer.MinMaxObserver: (False, _running_minmax),
    ao_observer.MovingAverageMinMaxObserver: (False, _moving_average),
    ao_observer.PerChannelMinMaxObserver: (True, _running_minmax),
    ao_observer.MovingAveragePerChannelMinMaxObserver: (True, _moving_average),
}


def _qparams(observer, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's ``UniformQuantizationObserverBase._calculate_qparams`` for an observed range, without
    its validity checks (a quantizer only asks after observing) and with ``reshape`` for its ``float()``."""
    quant_min, quant_max = observer.quant_min, observer.quant_max
    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    if observer.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric):
        max_val_pos = torch.max(-min_val_neg, max_val_pos)
        scale = torch.max(max_val_pos / (float(quant_max - quant_min) / 2), observer.eps)
        if observer.dtype in (torch.quint8, torch.uint8):
            middle = (quant_min + quant_max) // 2 if observer.has_customized_qrange else 128
        elif observer.dtype == torch.uint16:
            middle = 2**15
        else:
            middle = 0
        zero_point = torch.full_like(min_val_neg, middle, dtype=torch.int64)
    else:
        scale = torch.max((max_val_pos - min_val_neg) / float(quant_max - quant_min), observer.eps)
        zero_point = quant_min - torch.round(min_val_neg / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, quant_min, quant_max)
    return scale.reshape(-1), zero_point.reshape(-1)


class CompilableFakeQuantize(ao_fake_quantize.FakeQuantize):
    """torchao's ``FakeQuantize`` with a forward that has no data-dependent branch (see the module doc)."""

    def _is_sized(self) -> bool:
        # Per-channel observers start with empty buffers and size them on the first batch (resize_, which
        # dynamo cannot trace): until then the torchao forward runs; shapes are static under compile.
        min_val = self.activation_post_process.min_val
        return min_val.numel() > 0 and self.scale.shape == min_val.reshape(-1).shape

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        observer = self.activation_post_process
        if X.numel() == 0 or not self._is_sized():
            return super().forward(X)
        per_channel, update = _UPDATES[type(observer)]
        x = X.detach().to(observer.min_val.dtype)
        current = _aminmax_per_channel(x, observer.ch_axis) if per_channel else torch.aminmax(x)
        min_val, max_val = update(observer, *current)
        observing = self.observer_enabled[0] == 1
        observer.min_val.copy_(torch.where(observing, min_val, observer.min_val))
        observer.max_val.copy_(torch.where(observing, max_val, observer.max_val))
        scale, zero_point = _qparams(observer, min_val, max_val)
        self.scale.copy_(torch.where(observing, scale, self.scale))
        self.zero_point.copy_(torch.where(observing, zero_point.to(self.zero_point.dtype), self.zero_point))
        if self.is_per_channel:
            quantized = torch.fake_quantize_per_channel_affine(
                X, self.scale, self.zero_point, self.ch_axis, observer.quant_min, observer.quant_max)
        else:
            quantized = torch.fake_quantize_per_tensor_affine(
                X, self.scale, self.zero_point, observer.quant_min, observer.quant_max)
        return torch.where(self.fake_quant_enabled[0] == 1, quantized, X)


def check_compilable_observer(choice) -> None:
    """Raise unless every quantizer an observer choice (``qlightning.observers.ObserverChoice``) makes
    can be branch-free."""
    names = {cls.__name__ for cls in _UPDATES}
    classes = (choice.activation_observer, choice.weight_observer, choice.weight_per_channel_observer)
    if choice.learnable or not set(classes) <= names:
        raise QuantizationConfigError(
            f"compile=True cannot train observer {choice.name!r} through torch.compile: compiled QAT supports "
            f"the observers 'minmax' and 'moving_average_minmax' (learned scales and histograms keep "
            f"data-dependent branches); use one of those, or compile=False"
        )


def compilable_quantizers(network: nn.Module) -> int:
    """Give every unfused ``FakeQuantize`` of ``network`` the branch-free forward; returns how many.

    Raises ``QuantizationConfigError`` for a quantizer it cannot make branch-free (learnable scales,
    another observer), before any training."""
    swapped = 0
    for name, module in network.named_modules():
        if type(module) is QuantizeDequantizeFakeQuantize:
            module.__class__ = ao_fake_quantize.FusedMovingAvgObsFakeQuantize  # same state, torch's fused op
            continue
        if type(module) in (CompilableFakeQuantize, ao_fake_quantize.FusedMovingAvgObsFakeQuantize):
            continue
        if type(module) is ao_fake_quantize.FakeQuantize and type(module.activation_post_process) in _UPDATES:
            module.__class__ = CompilableFakeQuantize
            swapped += 1
        elif isinstance(module, ao_fake_quantize.FakeQuantizeBase):
            supported = sorted(cls.__name__ for cls in _UPDATES)
            observer = getattr(module, "activation_post_process", None)
            raise QuantizationConfigError(
                f"compile=True cannot compile quantizer {name!r} ({type(module).__name__} with "
                f"{type(observer).__name__}): compiled QAT supports FakeQuantize with {supported} "
                f"(observers 'minmax' and 'moving_average_minmax'); use one of those, or compile=False"
            )
    return swapped


def quantizers_sized(network: nn.Module) -> bool:
    """Whether every branch-free quantizer of ``network`` has sized its buffers (seen a batch)."""
    return all(m._is_sized() for m in network.modules() if isinstance(m, CompilableFakeQuantize))
