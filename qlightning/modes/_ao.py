"""``torch.ao.quantization`` pieces shared by the eager and FX modes (and only them)."""

from __future__ import annotations

import functools

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

from qlightning.calibration_ao import observer_class
from qlightning.errors import QuantizationConfigError
from qlightning.observers import get_observer
from qlightning.spec import QuantRecipe, TensorQuantSpec, fused_kernel_keeps

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


class LearnableFakeQuantize(_LearnableFakeQuantize):
    """LSQ (Esser et al. 2020) whose per-channel scale and zero point are sized on first use.

    ``torch.ao``'s class needs the channel count at construction, which a QConfig cannot know.
    Parameters keep their identity when resized, so an optimizer made afterwards trains them.
    """

    def __init__(self, observer, quant_min=0, quant_max=255, **observer_kwargs):
        super().__init__(observer, quant_min, quant_max, use_grad_scaling=True, **observer_kwargs)

    def _resize(self, channels: int) -> None:
        if self.scale.numel() != channels:
            self.scale.data = torch.ones(channels, dtype=self.scale.dtype, device=self.scale.device)
            self.zero_point.data = torch.zeros(channels, dtype=self.zero_point.dtype, device=self.zero_point.device)

    def forward(self, X):
        if self.qscheme in _PER_CHANNEL:
            self._resize(X.size(self.ch_axis))
        return super().forward(X)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scale = state_dict.get(prefix + "scale")
        if scale is not None:
            self._resize(scale.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)



def _spec_kwargs(spec: TensorQuantSpec) -> dict:
    kwargs = dict(
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        dtype=torch.quint8 if spec.dtype == "uint8" else torch.qint8,
        qscheme=spec.qscheme,
        eps=spec.eps,
    )
    if spec.per_channel:
        kwargs["ch_axis"] = spec.ch_axis
    return kwargs


def observer_ctor(spec: TensorQuantSpec, observer_name: str, **options):
    """A ``with_args`` constructor of the (calibration) observer for one kind of tensor (``options``: the
    observer's keyword options, e.g. ``percentile``)."""
    return observer_class(observer_name).with_args(**_spec_kwargs(spec), **options)


def fake_quant_ctor(spec: TensorQuantSpec, observer_name: str, learnable: bool):
    """A ``with_args`` constructor of the fake-quantize module for one kind of tensor."""
    kwargs = dict(observer=observer_class(observer_name), **_spec_kwargs(spec))
    if learnable:
        return LearnableFakeQuantize.with_args(**kwargs)
    if fused_kernel_keeps(spec, observer_name):
        # One fused kernel for observe + fake-quantize: the fast path PyTorch uses for QAT.
        return tq.FusedMovingAvgObsFakeQuantize.with_args(**kwargs)
    return tq.FakeQuantize.with_args(**kwargs)



def qat_qconfig(recipe: QuantRecipe) -> tq.QConfig:
    choice = get_observer(recipe.observer)
    weight_observer = choice.weight_per_channel_observer if recipe.weight.per_channel else choice.weight_observer
    return tq.QConfig(
        activation=fake_quant_ctor(recipe.activation, choice.activation_observer, choice.learnable),
        weight=fake_quant_ctor(recipe.weight, weight_observer, choice.learnable),
    )


def ptq_qconfig(recipe: QuantRecipe) -> tq.QConfig:
    """Observers only: static post-training quantization calibrates, it does not fake-quantize."""
    choice = get_observer(recipe.observer)
    weight_observer = choice.weight_per_channel_observer if recipe.weight.per_channel else choice.weight_observer
    return tq.QConfig(
        activation=observer_ctor(recipe.activation, choice.activation_observer, **dict(recipe.observer_options)),
        weight=observer_ctor(recipe.weight, weight_observer),
    )


def dynamic_qconfig(recipe: QuantRecipe) -> tq.QConfig:
    """int8 weights observed once at conversion; activations get their qparams at run time."""
    choice = get_observer(recipe.observer)
    weight_observer = choice.weight_per_channel_observer if recipe.weight.per_channel else choice.weight_observer
    act = recipe.activation
    return tq.QConfig(
        activation=tq.PlaceholderObserver.with_args(
            dtype=torch.quint8 if act.dtype == "uint8" else torch.qint8,
            quant_min=act.quant_min,
            quant_max=act.quant_max,
            is_dynamic=True,
        ),
        weight=observer_ctor(recipe.weight, weight_observer),
    )


# Layers with dynamic int8 kernels in torch.ao (weights int8, activations quantized per call).
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def observers(prepared: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in prepared.named_modules() if isinstance(m, tq.ObserverBase)]


def quantizers(prepared: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in prepared.named_modules() if isinstance(m, tq.FakeQuantizeBase)]


def _applied_qparams(fake_quant: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return fake_quant.scale.detach().clone(), fake_quant.zero_point.detach().clone()


def report_applied_qparams(prepared: nn.Module) -> None:
    """Make torch.ao's convert build the int8 model from the qparams each fake-quantizer applied.

    convert asks a fake-quantizer's *observer* (``calculate_qparams``), and a fake-quantizer's
    ``scale`` / ``zero_point`` buffers hold what its last training forward applied: with a moving
    average, or after BN folding re-scaled the weights, the two differ. Measured on the guide's
    network after 2 QAT epochs on Fashion-MNIST (torch 2.14): 26 % of the first conv's int8 outputs
    one step off the fake-quantized model, 136 of 10,000 test predictions changed. LSQ quantizers
    already convert from their trained parameters.
    """
    for _, fake_quant in quantizers(prepared):
        if not isinstance(fake_quant, _LearnableFakeQuantize):
            fake_quant.activation_post_process.calculate_qparams = functools.partial(_applied_qparams, fake_quant)


def set_observers_enabled(prepared: nn.Module, enabled: bool) -> None:
    for _, fq in quantizers(prepared):
        if isinstance(fq, _LearnableFakeQuantize):
            # LSQ has no running statistics after its seed; "observing" means learning the qparams.
            fq.toggle_qparam_learning(enabled)
        else:
            fq.enable_observer(enabled)


def seed_lsq(prepared: nn.Module, example_inputs: tuple) -> None:
    """Seed LSQ scales from the example inputs (eval mode: BN statistics untouched), then switch the
    quantizers to gradient learning so the optimizer made after setup trains them."""
    was_training = prepared.training
    with torch.no_grad():
        prepared.eval()(*example_inputs)
    prepared.train(was_training)
    for _, fq in quantizers(prepared):
        if isinstance(fq, _LearnableFakeQuantize):
            fq.enable_param_learning()


_FUSED_BN = (nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.ConvBnReLU1d, nniqat.ConvBnReLU2d,
             nniqat.ConvBnReLU3d, nniqat.LinearBn1d)


def check_fused_bn_gamma(prepared: nn.Module, mode: str) -> None:
    """torch.ao's QAT conv-bn divides the conv output by ``gamma / running_std``: a BatchNorm weight
    of exactly 0 (a switched-off channel, torchvision's ``zero_init_residual``) makes the whole
    network NaN from the first step. Refuse it before training rather than train on NaN."""
    offenders = []
    for name, module in prepared.named_modules():
        if isinstance(module, _FUSED_BN):
            zeros = int((module.bn.weight == 0).sum())
            if zeros:
                offenders.append(f"{name} ({zeros} of {module.bn.weight.numel()} channels)")
    if offenders:
        raise QuantizationConfigError(
            f"mode={mode!r} QAT cannot train conv-bn pairs whose BatchNorm weight (gamma) is exactly 0: "
            f"{', '.join(offenders)}. torch.ao's conv-bn simulation divides by gamma and the network turns NaN. "
            "Use mode='pt2e' (qlightning handles gamma == 0 there), or give those BatchNorms a non-zero "
            "weight (e.g. torchvision models with zero_init_residual=False)"
        )


def batchnorms(prepared: nn.Module) -> list[nn.Module]:
    return [m for m in prepared.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_bn(prepared: nn.Module) -> None:
    # Fused QAT modules switch to running statistics and keep them through later ``train()`` calls.
    prepared.apply(nniqat.freeze_bn_stats)
    enforce_frozen_bn(prepared)


def enforce_frozen_bn(prepared: nn.Module) -> None:
    # BatchNorms outside fused modules have no freeze flag: eval() them again after every train().
    for m in batchnorms(prepared):
        m.eval()
