"""Module rewrites made before FX's symbolic trace, for layers FX would otherwise capture wrongly or
leave float. Each rewrite keeps the network's math and its Parameter and buffer objects (an optimizer
built before ``prepare`` keeps training the same tensors); only the module tree changes.
"""

from __future__ import annotations

import torch
from torch import nn


class SigmoidMul(nn.Module):
    """SiLU written as ``x * sigmoid(x)``: the two ops ONNX Runtime has integer kernels for
    (QLinearSigmoid, QLinearMul), each quantized by the BackendConfig's sigmoid and mul patterns.
    ONNX has no SiLU op before opset 24, so an FX-quantized ``nn.SiLU`` reached ORT as a float Sigmoid
    and Mul between DQ and Q: efficientnet_b0's 49 SiLUs ran in float, 1.9x the latency of ORT's own
    quantize_static (issue 17)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _is_timm_batchnorm_act(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")
            and isinstance(module, nn.BatchNorm2d) and hasattr(module, "act") and hasattr(module, "drop"))


def _plain_batchnorm(module: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A torch ``nn.BatchNorm2d`` holding the very same parameters and buffers."""
    plain = nn.BatchNorm2d(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=module.track_running_stats, device="meta")
    for name, param in module.named_parameters(recurse=False):
        setattr(plain, name, param)
    for name, buffer in module.named_buffers(recurse=False):
        plain.register_buffer(name, buffer)
    plain.train(module.training)
    return plain


def split_timm_batchnorm_act(network: nn.Module) -> int:
    """timm's ``BatchNormAct2d`` (a BatchNorm2d subclass that applies dropout and the activation in its own
    forward) becomes ``Sequential(BatchNorm2d, drop, act)``. Traced as it is, its forward calls
    ``F.batch_norm`` with ``training`` evaluated at trace time: traced for QAT (train mode), the converted
    model kept normalizing with batch statistics in eval, and no conv-bn pattern matched, so BN was never
    folded (timm mobilenetv3_small_100 in FX: 34 float BatchNormalization ops in the ONNX file, ORT 7 dB
    further from float than the fake-quant model, issue 17). Returns how many were split."""
    count = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if _is_timm_batchnorm_act(child):
                setattr(parent, name, nn.Sequential(_plain_batchnorm(child), child.drop, child.act))
                count += 1
    return count


def decompose_silu(network: nn.Module) -> int:
    """Every ``nn.SiLU`` module becomes :class:`SigmoidMul`. Returns how many."""
    count = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.SiLU:
                setattr(parent, name, SigmoidMul())
                count += 1
    return count
