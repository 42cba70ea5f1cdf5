"""Eager or FX quantized (prepared) model -> a PT2E program with exactly the same qparams.

PT2E's exporters (ONNX via dynamo, LiteRT, OpenVINO, inductor) take a ``convert_pt2e`` graph. A model
trained with eager or FX QAT (or calibrated with their observers) reaches them like this:

1. a copy has BatchNorm folded (:func:`~qlightning.passes.fold_bn.fold_bn`), observers frozen;
2. every fake-quantize / observer module, whatever the backend config that placed it, is swapped for
   a marker, an opaque custom op that carries the quantizer's index through ``torch.export``;
3. the copy is exported (dynamic batch) and each marker node becomes a call to an
   :class:`ExactQParamsObserver` holding the trained scale and zero point, so ``convert_pt2e`` emits
   quantize/dequantize with exactly those numbers (nothing is re-observed).

Because the markers stand where the modes put their quantizers, this works for any BackendConfig and
for eager models (whose observers run from forward hooks), not only for one backend's patterns.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torchao.quantization.pt2e.observer import ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

from qlightning.passes.fold_bn import fold_bn

log = logging.getLogger(__name__)

_DTYPES = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.uint8: torch.uint8, torch.int8: torch.int8}


@torch.library.custom_op("qlightning::quant_marker", mutates_args=())
def quant_marker(x: torch.Tensor, index: int) -> torch.Tensor:
    """Identity that ``torch.export`` keeps as one node: where quantizer ``index`` stood."""
    return x.clone()


@quant_marker.register_fake
def _(x, index):
    return torch.empty_like(x)


class _Marker(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x):
        return quant_marker(x, self.index)


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
        if self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
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


def exact_observer(quantizer: nn.Module) -> ExactQParamsObserver:
    """The trained qparams of a torch.ao fake-quantize or observer module, frozen."""
    if isinstance(quantizer, _LearnableFakeQuantize):
        scale, zero_point = quantizer.calculate_qparams()
    elif isinstance(quantizer, tq.FakeQuantizeBase):
        # The buffers are what forward() used: with frozen observers they may differ from what the
        # observer would compute now.
        scale, zero_point = quantizer.scale, quantizer.zero_point
    else:
        scale, zero_point = quantizer.calculate_qparams()
    qscheme = quantizer.qscheme
    if qscheme == torch.per_channel_affine_float_qparams:
        raise ValueError("per_channel_affine_float_qparams (embedding) quantizers have no PT2E equivalent here")
    per_channel = qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
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


class _AnnotateNothing(Quantizer):
    """Lets ``prepare_pt2e`` set up a program for ``convert_pt2e`` without adding any observer:
    ours, with the trained qparams, are put in afterwards."""

    def annotate(self, model):
        return model

    def validate(self, model):
        pass


def _is_quantizer(module: nn.Module) -> bool:
    return isinstance(module, (tq.FakeQuantizeBase, tq.ObserverBase))


def _swap_quantizers_for_markers(model: nn.Module) -> list[nn.Module]:
    """Replace every quantizer (aliases too, which FX uses to share one) with a marker, in place."""
    quantizers: list[nn.Module] = []
    index_of: dict[int, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and _is_quantizer(child):
                if id(child) not in index_of:
                    index_of[id(child)] = len(quantizers)
                    quantizers.append(child)
                setattr(parent, name, _Marker(index_of[id(child)]))
    return quantizers


def ao_to_pt2e(prepared: nn.Module, example_inputs: tuple) -> nn.Module:
    """A PT2E prepared program (observers in the graph) equivalent to an eager or FX prepared model.

    ``prepared`` is not modified. The result is ready for ``convert_pt2e`` (``Pt2eMode.convert``), and
    runs like the fake-quantized original with observers frozen.
    """
    from qlightning.modes.pt2e import ExportedNetwork, export_network

    model = copy.deepcopy(prepared).cpu().eval()
    model.apply(tq.disable_observer)
    fold_bn(model, keep_weight_fake_quant=True)
    quantizers = _swap_quantizers_for_markers(model)
    if not quantizers:
        raise ValueError(f"{type(prepared).__name__} has no fake-quantize or observer module: nothing to carry over")
    example_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    graph = prepare_pt2e(export_network(model, example_inputs), _AnnotateNothing())

    observers = [exact_observer(q) for q in quantizers]
    count = 0
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.qlightning.quant_marker.default:
            name = f"activation_post_process_{count}"
            # A fresh observer per use site: convert_pt2e turns each into its own quantize/dequantize.
            graph.add_module(name, copy.deepcopy(observers[node.args[1]]))
            with graph.graph.inserting_before(node):
                observed = graph.graph.call_module(name, (node.args[0],))
            observed.meta = dict(node.meta)
            node.replace_all_uses_with(observed)
            graph.graph.erase_node(node)
            count += 1
    graph.graph.eliminate_dead_code()
    graph.recompile()
    log.info("ao_to_pt2e: carried %d quantizers over to %d PT2E observer sites", len(quantizers), count)
    return ExportedNetwork(graph, inference_only=True)
