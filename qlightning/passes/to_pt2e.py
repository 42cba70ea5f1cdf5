"""Eager or FX quantized (prepared) model -> a PT2E program with exactly the same qparams.

PT2E's exporters (ONNX via dynamo, LiteRT, OpenVINO, inductor) take a ``convert_pt2e`` graph. A model
trained with eager or FX QAT (or calibrated with their observers) reaches them like this:

1. a copy has BatchNorm folded (:func:`~qlightning.passes.fold_qat_bn.fold_bn`), observers frozen;
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
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

from qlightning.passes.exact_qparams import exact_observer
from qlightning.passes.fold_qat_bn import fold_bn
from qlightning.passes.graph import is_quantizer

log = logging.getLogger(__name__)


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


class _AnnotateNothing(Quantizer):
    """Lets ``prepare_pt2e`` set up a program for ``convert_pt2e`` without adding any observer:
    ours, with the trained qparams, are put in afterwards."""

    def annotate(self, model):
        return model

    def validate(self, model):
        pass


def _swap_quantizers_for_markers(model: nn.Module) -> list[nn.Module]:
    """Replace every quantizer (aliases too, which FX uses to share one) with a marker, in place."""
    quantizers: list[nn.Module] = []
    index_of: dict[int, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and is_quantizer(child):
                if id(child) not in index_of:
                    index_of[id(child)] = len(quantizers)
                    quantizers.append(child)
                setattr(parent, name, _Marker(index_of[id(child)]))
    return quantizers


def _weight_owner(module: nn.Module) -> nn.Module | None:
    """The conv/linear holding the weight of a calibration-prepared (PTQ) module, if it has no
    weight quantizer of its own: torch.ao creates those only at conversion, from ``qconfig``."""
    if getattr(module, "qconfig", None) is None or hasattr(module, "weight_fake_quant"):
        return None
    owner = module[0] if isinstance(module, nn.Sequential) and len(module) else module  # fused ConvReLU2d...
    if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and not hasattr(owner, "weight_fake_quant"):
        return owner
    return None


def _mark_ptq_weights(model: nn.Module, quantizers: list[nn.Module]) -> None:
    """Give PTQ conv/linear weights a marker too, with the qparams their ``qconfig`` would give."""
    from torch.nn.utils import parametrize

    done = set()
    for module in list(model.modules()):
        owner = _weight_owner(module)
        if owner is None or id(owner) in done:
            continue
        done.add(id(owner))
        observer = module.qconfig.weight()
        observer(owner.weight.detach())
        quantizers.append(observer)
        parametrize.register_parametrization(owner, "weight", _Marker(len(quantizers) - 1), unsafe=True)


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
    _mark_ptq_weights(model, quantizers)
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
    log.debug("ao_to_pt2e: carried %d quantizers over to %d PT2E observer sites", len(quantizers), count)
    return ExportedNetwork(graph, inference_only=True)
