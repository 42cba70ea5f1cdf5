"""Any quantized model qlightning makes -> a converted PT2E program (what every exporter consumes),
plus the torch model the exported file must agree with.

- PT2E converted (quantize/dequantize ops in the graph): exported as is; the reference is itself.
- PT2E prepared or finalized (torchao fake-quantize / observer modules in an exported graph, or the
  ``ExactQParamsObserver`` s that finalize leaves): every quantizer becomes an ``ExactQParamsObserver``
  with the qparams it applies, then converted; the reference is that program (its fake quantization is
  what training saw; for calibration observers, what conversion makes of them).
- FX or eager prepared (torch.ao quantizers): carried over by ``ao_to_pt2e`` with exactly their qparams,
  then converted; the reference is the FX/eager fake-quantized model.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from qlightning.errors import QuantizationConfigError
from qlightning.passes.graph import float_twin, is_fake_quantize

_QDQ_NAMESPACE = "quantized_decomposed"


@dataclass
class ExportableProgram:
    converted: nn.Module  # ExportedNetwork holding a converted (Q/DQ) graph
    reference: nn.Module  # what the exported file is compared with
    mode: str  # "eager" | "fx" | "pt2e"
    # The reference with every quantizer made the identity: the float network with the same weights,
    # against which the fake-quant model's and the runtime's errors are both measured. None for a
    # model that arrives converted (its float weights are gone).
    float_reference: nn.Module | None = None


def _graph_module(model: nn.Module) -> torch.fx.GraphModule | None:
    inner = getattr(model, "graph_module", model)
    return inner if isinstance(inner, torch.fx.GraphModule) else None


def _has_qdq(gm: torch.fx.GraphModule) -> bool:
    return any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == _QDQ_NAMESPACE for n in gm.graph.nodes
    )


def _has_quantizers(model: nn.Module, family: str) -> bool:
    """Whether ``model`` holds quantizers of ``family`` (``"pt2e"``: torchao's and qlightning's own;
    ``"ao"``: torch.ao's), as :func:`~qlightning.passes.graph.quantizer_family` classifies them."""
    from qlightning.passes.graph import quantizer_family

    return any(quantizer_family(m) == family for m in model.modules())


def _is_ao_int8(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def _frozen_copy(model: nn.Module) -> nn.Module:
    from qlightning.passes.graph import is_quantizer

    frozen = copy.deepcopy(model).cpu().eval()
    for m in frozen.modules():
        if is_quantizer(m) and hasattr(m, "disable_observer"):
            m.disable_observer()
    return frozen


_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def check_symmetric_zero_points(model: nn.Module) -> None:
    """Symmetric means zero point 0 (the middle of the range for unsigned types), in every channel;
    raise before export when a quantizer holds anything else, naming it and the channel. Runtimes
    refuse such files (LiteRT's XNNPACK: "unsupported zero-point value (-127) in channel ...") or run
    them with asymmetric kernels nobody asked for."""
    from qlightning.errors import ExportVerificationError
    from qlightning.passes.exact_qparams import current_qparams
    from qlightning.passes.graph import is_quantizer

    for name, quantizer in model.named_modules():
        if not is_quantizer(quantizer) or getattr(quantizer, "qscheme", None) not in _SYMMETRIC:
            continue
        quant_min, quant_max = getattr(quantizer, "quant_min", None), getattr(quantizer, "quant_max", None)
        if quant_min is None or quant_max is None:
            continue
        center = 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
        _, zero_point = current_qparams(quantizer)
        wrong = (zero_point.flatten() != center).nonzero().flatten()
        if len(wrong):
            channel = int(wrong[0])
            raise ExportVerificationError(
                f"quantizer {name} is {quantizer.qscheme} but holds zero point {int(zero_point.flatten()[channel])} "
                f"in channel {channel} ({len(wrong)} channel(s) off; symmetric means {center}); no file written"
            )


def _requantize_ops() -> dict:
    qd = torch.ops.quantized_decomposed
    return {
        qd.dequantize_per_tensor.default: qd.quantize_per_tensor.default,
        qd.dequantize_per_tensor.tensor: qd.quantize_per_tensor.tensor,
        qd.dequantize_per_channel.default: qd.quantize_per_channel.default,
    }


def unfold_quantized_weights(gm: torch.fx.GraphModule) -> int:
    """Turn each ``dequantize(int8 constant)`` of a converted graph back into
    ``dequantize(quantize(float constant))`` with the same qparams; returns how many. The float constant
    is the dequantized value, so quantizing it gives back exactly the same integers."""
    requantize = _requantize_ops()
    count = 0
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target in requantize else None
        if not (isinstance(source, torch.fx.Node) and source.op == "get_attr"):
            continue
        integers = functools.reduce(getattr, source.target.split("."), gm)
        if not isinstance(integers, torch.Tensor) or integers.is_floating_point():
            continue
        qparams = [functools.reduce(getattr, a.target.split("."), gm)
                   if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args[1:]]
        if any(isinstance(a, torch.fx.Node) for a in qparams):
            continue  # qparams computed in the graph: not a constant weight
        name = f"{source.target.replace('.', '_')}_unfolded"
        gm.register_buffer(name, node.target(integers, *qparams))
        with gm.graph.inserting_before(node):
            floats = gm.graph.get_attr(name)
            requantized = gm.graph.call_function(requantize[node.target], (floats, *node.args[1:]))
        node.replace_input_with(source, requantized)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def exportable_program(model: nn.Module, example_inputs: tuple, fold_quantize: bool = True) -> ExportableProgram:
    """Classify ``model`` and bring it to a converted PT2E program (see the module docstring).
    ``fold_quantize=False``: weights stay float behind quantize/dequantize (litert-torch's layout)."""
    from qlightning.modes.pt2e import ExportedNetwork, Pt2eMode

    gm = _graph_module(model)
    if gm is not None and _has_qdq(gm):
        converted = model if isinstance(model, ExportedNetwork) else ExportedNetwork(gm, inference_only=True)
        if not fold_quantize:
            unfolded = copy.deepcopy(converted.graph_module)
            if unfold_quantized_weights(unfolded):
                converted = ExportedNetwork(unfolded, inference_only=True)
        return ExportableProgram(converted, converted, "pt2e")
    if gm is not None and _has_quantizers(gm, "pt2e"):
        from qlightning.passes.exact_qparams import freeze_exact_qparams

        reference = _frozen_copy(model)
        prepared = reference if isinstance(reference, ExportedNetwork) else ExportedNetwork(reference, True)
        # convert_pt2e takes each quantizer's qparams from calculate_qparams(): for a fused moving-average
        # fake-quantizer that is its observer's estimate, not the scale its kernel applied (SQNR 32 dB
        # against the prepared SmallCNN after a short fit, measured), and a plain calibration observer is
        # the identity in forward. Frozen to exact observers, the program fake-quantizes with the very
        # numbers conversion emits, so it is the faithful reference.
        freeze_exact_qparams(prepared.graph_module)
        check_symmetric_zero_points(prepared)
        return ExportableProgram(Pt2eMode().convert(prepared, None, fold_quantize), prepared, "pt2e",
                                 float_twin(prepared))
    if _has_quantizers(model, "ao"):
        from qlightning.passes.to_pt2e import ao_to_pt2e

        reference = _frozen_copy(model)
        mode = "fx" if isinstance(model, torch.fx.GraphModule) else "eager"
        check_symmetric_zero_points(reference)
        program = ao_to_pt2e(reference, example_inputs)
        observers_only = not any(is_fake_quantize(m) for m in reference.modules())
        # Calibration observers do not fake-quantize: the carried-over program (whose observers do)
        # is the faithful torch reference then.
        return ExportableProgram(
            Pt2eMode().convert(program, None, fold_quantize), program if observers_only else reference, mode,
            float_twin(reference),
        )
    if _is_ao_int8(model):
        raise QuantizationConfigError(
            f"{type(model).__name__} is an eager/FX int8 model (packed torch.ao quantized modules), which cannot be "
            "exported to PT2E-based formats: export the prepared network instead (callback.finalized_network, "
            "or the LightningModule's network after QAT/calibration)"
        )
    raise QuantizationConfigError(
        f"{type(model).__name__} has no quantizers and no quantize/dequantize ops: nothing was quantized, so "
        "there is nothing to export as int8 (prepare it with QuantizationAwareTraining or PostTrainingQuantization)"
    )
