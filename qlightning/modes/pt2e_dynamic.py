"""A PT2E Quantizer for dynamic quantization of Linear, LSTM and GRU.

torchao's X86InductorQuantizer annotates ``aten.linear`` only; an exported ``nn.LSTM``/``nn.GRU`` is
one ``aten.lstm.input``/``aten.gru.input`` node whose weights arrive as a list argument. This
quantizer marks the first (sequence) input of each such op for run-time quantization and every
weight matrix for int8, so ``convert_pt2e`` stores the weights as int8 constants.
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e import observer as ao_observer
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

from qlightning.calibration_pt2e import observer_class
from qlightning.spec import TensorQuantSpec

aten = torch.ops.aten
# op -> position of its weight argument; RNN ops take a flat list of weights and biases there.
_WEIGHT_ARG = {aten.linear.default: 1, aten.lstm.input: 2, aten.gru.input: 2, aten.rnn_tanh.input: 2,
               aten.rnn_relu.input: 2}


def dynamic_activation_spec(spec: TensorQuantSpec) -> QuantizationSpec:
    return QuantizationSpec(
        dtype=torch.uint8 if spec.dtype == "uint8" else torch.int8,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        qscheme=torch.per_tensor_affine,
        is_dynamic=True,
        observer_or_fake_quant_ctr=ao_observer.PlaceholderObserver.with_args(eps=spec.eps),
    )


def static_spec(spec: TensorQuantSpec, observer_or_fake_quant_ctr) -> QuantizationSpec:
    """A torchao QuantizationSpec for ``spec``'s integer range and scheme, observed by the given
    observer / fake-quantize constructor."""
    return QuantizationSpec(
        dtype=spec.torch_dtype,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        qscheme=spec.qscheme,
        ch_axis=spec.ch_axis if spec.per_channel else None,
        is_dynamic=False,
        observer_or_fake_quant_ctr=observer_or_fake_quant_ctr,
    )


def observer_spec(spec: TensorQuantSpec, observer_name: str, **options) -> QuantizationSpec:
    """A spec observed by the named observer class (``options``: its keyword options, e.g. ``percentile``)."""
    return static_spec(spec, observer_class(observer_name).with_args(eps=spec.eps, **options))


class DynamicLinearRnnQuantizer(Quantizer):
    def __init__(self, activation: QuantizationSpec, weight: QuantizationSpec):
        super().__init__()
        self.activation = activation
        self.weight = weight

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            position = _WEIGHT_ARG.get(node.target)
            if position is None or "quantization_annotation" in node.meta:
                continue
            weights = node.args[position]
            weights = weights if isinstance(weights, (list, tuple)) else [weights]
            qspecs = {node.args[0]: self.activation}
            for w in weights:
                # Biases (1-D) stay float, as the int8 kernels expect.
                if isinstance(w, torch.fx.Node) and w.meta["val"].dim() >= 2:
                    qspecs[w] = self.weight
            node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass
