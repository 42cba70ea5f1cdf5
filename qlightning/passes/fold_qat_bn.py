"""Fold BatchNorm into the convolution / linear layer of torch.ao QAT fused modules (eager and FX).

During QAT a ``ConvBn2d`` keeps BatchNorm as a separate, trainable step and fake-quantizes the weight
already scaled by ``gamma / sqrt(running_var + eps)``. Exporters that see the fake-quantized model
(ONNX Runtime's QDQ format, for one) need a plain conv whose weight *is* that folded weight. PyTorch's
``convert`` folds for its own int8 modules; this pass does it on the prepared model itself.

PT2E graphs are folded by :func:`qlightning.passes.pt2e_fold_bn.fold_qat_conv_bn` at conversion.
"""

from __future__ import annotations

import logging

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn import qat as nnqat
from torch.ao.nn.intrinsic import qat as nniqat

from qlightning.passes.verify import check_close, run

log = logging.getLogger(__name__)

# Fused QAT module -> the QAT module it becomes once BatchNorm is folded in (weight fake-quant kept).
_FOLDED_QAT = {
    nniqat.ConvBn1d: nnqat.Conv1d,
    nniqat.ConvBn2d: nnqat.Conv2d,
    nniqat.ConvBn3d: nnqat.Conv3d,
    nniqat.ConvBnReLU1d: nniqat.ConvReLU1d,
    nniqat.ConvBnReLU2d: nniqat.ConvReLU2d,
    nniqat.ConvBnReLU3d: nniqat.ConvReLU3d,
    nniqat.LinearBn1d: nnqat.Linear,
}


def _fold_one(module: nn.Module, keep_weight_fake_quant: bool) -> nn.Module:
    folded_float = module.to_float()  # conv/linear (+ReLU) with BN folded in from its running statistics
    if not keep_weight_fake_quant:
        return folded_float
    for m in folded_float.modules():
        m.qconfig = module.qconfig
    folded = _FOLDED_QAT[type(module)].from_float(folded_float)
    # The trained weight quantizer already saw the folded weight (QAT scales the weight by
    # gamma / sqrt(running_var + eps) before fake-quantizing it): keep it, with its exact qparams.
    folded.weight_fake_quant = module.weight_fake_quant
    # Eager mode observes a module's output through an attribute and a forward hook on the module.
    if hasattr(module, "activation_post_process"):
        folded.activation_post_process = module.activation_post_process
    folded._forward_hooks.update(module._forward_hooks)
    folded._forward_pre_hooks.update(module._forward_pre_hooks)
    return folded.train(module.training)


def _fused_bn_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for parent in model.modules():
        for name, child in parent._modules.items():  # aliases included, unlike named_children()
            if type(child) in _FOLDED_QAT:
                found.append((parent, name, child))
    return found


def fold_bn(model: nn.Module, example_inputs: tuple | None = None, *, keep_weight_fake_quant: bool = True,
            rtol: float = 1e-4) -> int:
    """Fold every QAT conv-bn / linear-bn module of an eager or FX prepared model, in place.

    With ``keep_weight_fake_quant`` (the default) the folded layer is a QAT conv/linear that still
    fake-quantizes its weight with the trained quantizer, as ONNX Runtime and ``convert`` need;
    otherwise a float layer. With ``example_inputs`` the float outputs (fake quantization off) before
    and after are compared and :class:`~qlightning.passes.verify.PassToleranceError` is raised, with
    the model unchanged, if they differ by more than ``rtol``. Returns the number of modules folded.
    """
    targets = _fused_bn_modules(model)
    if not targets:
        log.debug("fold_bn: no QAT conv-bn / linear-bn module to fold; model unchanged")
        return 0
    before = None
    if example_inputs is not None:
        before = _float_outputs(model, example_inputs)
    originals = [(parent, name, child) for parent, name, child in targets]
    replacements = {}
    for parent, name, child in targets:
        if id(child) not in replacements:
            replacements[id(child)] = _fold_one(child, keep_weight_fake_quant)
        setattr(parent, name, replacements[id(child)])
    if before is not None:
        try:
            check_close("fold_bn", before, _float_outputs(model, example_inputs), rtol=rtol,
                        atol=rtol * before.abs().max().item())
        except Exception:
            for parent, name, child in originals:
                setattr(parent, name, child)
            raise
    log.debug("fold_bn: folded BatchNorm into %d modules", len(replacements))
    return len(replacements)


def _float_outputs(model: nn.Module, example_inputs: tuple) -> torch.Tensor:
    """Outputs in eval mode with fake quantization off, restoring both afterwards."""
    was_training = model.training
    enabled = {m: bool(m.fake_quant_enabled) for m in model.modules() if isinstance(m, tq.FakeQuantizeBase)}
    model.eval().apply(tq.disable_fake_quant)
    try:
        return run(model, example_inputs)
    finally:
        for m, on in enabled.items():
            m.enable_fake_quant(on)
        model.train(was_training)


__all__ = ["fold_bn"]
