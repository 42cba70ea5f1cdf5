"""Quantizers frozen at their current qparams, as torchao observers.

:class:`ExactQParamsObserver` is what ``convert_pt2e`` needs to emit quantize/dequantize with given
numbers, and its forward fake-quantizes with them, so a graph of them behaves as it will once
converted. :func:`exact_observer` builds one from any torch.ao or torchao observer / fake-quantize
module; :func:`freeze_exact_qparams` swaps every quantizer a graph calls for one, for good;
:func:`simulating_quantization` swaps a graph's plain observers (identity in forward) for such
fake-quantizers for as long as a check runs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn
from torchao.quantization.pt2e.observer import ObserverBase

from qlightning.passes.graph import is_fake_quantize, is_learnable, quantizer_node

_DTYPES = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.uint8: torch.uint8, torch.int8: torch.int8,
           torch.int16: torch.int16, torch.uint16: torch.uint16}
_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


class ExactQParamsObserver(ObserverBase):
    """A torchao observer that observes nothing: it fake-quantizes with, and returns, the qparams it
    was built with, so the program behaves like the trained fake-quantized model before and after
    ``convert_pt2e``."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype, quant_min: int,
                 quant_max: int, qscheme: torch.qscheme, ch_axis: int = 0):
        super().__init__(dtype=dtype)
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int64))
        self.quant_min, self.quant_max, self.qscheme, self.ch_axis = quant_min, quant_max, qscheme, ch_axis

    def forward(self, x):
        if self.qscheme in _PER_CHANNEL:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point.int(), self.ch_axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point.int(), self.quant_min, self.quant_max
        )

    def calculate_qparams(self):
        return self.scale, self.zero_point

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, qscheme={self.qscheme}, range=[{self.quant_min}, {self.quant_max}]"


def current_qparams(quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero_point) a quantizer applies now."""
    if is_fake_quantize(quantizer) and not is_learnable(quantizer):
        # The buffers are what forward() used: with frozen observers they may differ from what the
        # observer would compute now.
        return quantizer.scale, quantizer.zero_point
    # observers, and LSQ (whose calculate_qparams applies its |scale| and rounding)
    return quantizer.calculate_qparams()


def exact_observer(quantizer: nn.Module) -> ExactQParamsObserver:
    """The current qparams of a torch.ao / torchao fake-quantize or observer module, frozen."""
    scale, zero_point = current_qparams(quantizer)
    qscheme = quantizer.qscheme
    if qscheme == torch.per_channel_affine_float_qparams:
        raise ValueError("per_channel_affine_float_qparams (embedding) quantizers have no PT2E equivalent here")
    per_channel = qscheme in _PER_CHANNEL
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return ExactQParamsObserver(
        scale,
        zero_point.round(),
        _DTYPES[quantizer.dtype],
        int(quantizer.quant_min),
        int(quantizer.quant_max),
        qscheme,
        int(getattr(quantizer, "ch_axis", 0)) if per_channel else 0,
    )


def _set_called_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent_name), attr, module)


def freeze_exact_qparams(gm: fx.GraphModule, fake_quantizers_only: bool = False) -> int:
    """Swap every quantizer ``gm`` calls for an :class:`ExactQParamsObserver` holding the qparams it
    applies now (a fake-quantizer: those of its last forward; a plain observer: those conversion would
    use), in place; returns how many modules were swapped.

    Every call site is visited, not every child: PT2E shares one quantizer module under several names
    (a max-pool's input and output, a flatten), and ``named_children()`` yields a shared module once,
    so a walk over children left the aliases as the original fake-quantizers, converted from their
    observers' statistics instead of the applied qparams. A shared module stays shared (one exact
    observer for all its names), as the trained model shared it. ``fake_quantizers_only``: leave plain
    (calibration) observers, whose qparams conversion computes the same way, with their statistics.
    """
    exact: dict[int, ExactQParamsObserver] = {}
    for node in gm.graph.nodes:
        if not quantizer_node(gm, node):
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, ExactQParamsObserver) or (fake_quantizers_only and not is_fake_quantize(module)):
            continue
        if id(module) not in exact:
            exact[id(module)] = exact_observer(module)
        _set_called_module(gm, node.target, exact[id(module)])
    return len(exact)


@contextlib.contextmanager
def simulating_quantization(gm: fx.GraphModule):
    """Within the block, every plain observer called by ``gm`` fake-quantizes with its current
    qparams (observers are identity in forward; their quantization only exists after conversion)."""
    swapped = []
    for node in gm.graph.nodes:
        if quantizer_node(gm, node):
            module = gm.get_submodule(node.target)
            if not is_fake_quantize(module) and not isinstance(module, ExactQParamsObserver):
                swapped.append((node.target, module))
                _set_called_module(gm, node.target, exact_observer(module))
    try:
        yield
    finally:
        for target, module in reversed(swapped):
            _set_called_module(gm, target, module)
