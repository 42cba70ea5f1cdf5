"""Eager mode: QuantStub/DeQuantStub around the network, module fusion, ``prepare_qat``/``convert``."""

from __future__ import annotations

import copy
import difflib
import warnings

import torch
import torch.ao.quantization as tq
from torch import nn

from qlightning.backends import Backend
from qlightning.errors import QuantizationConfigError
from qlightning.modes import _ao
from qlightning.modes.base import QuantMode, statistics_quantizers
from qlightning.modes.fusion import _FUSABLE, find_modules_to_fuse, input_modules  # noqa: F401 - find_modules_to_fuse is eager's API
from qlightning.observers import get_observer
from qlightning.quantized_engine import bind_quantized_engine, quantized_engine
from qlightning.spec import QuantRecipe


class EagerQuantWrapper(nn.Module):
    """Quantize the input, run the network, dequantize the output."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.quant = tq.QuantStub()
        self.net = net
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.net(self.quant(x)))


class FloatRegion(nn.Module):
    """A run of ``skip``ped modules kept float inside an eager int8 network.

    Eager conversion swaps modules and never inserts quantize / dequantize by itself, so the edges
    of a float region are explicit: the region's first module dequantizes what arrives (a no-op on a
    float tensor) and its last re-quantizes what leaves, for the int8 module after it. ``qconfig =
    None`` on the wrapped module keeps it, and everything inside it, float.
    """

    def __init__(self, module: nn.Module, enters: bool, leaves: bool):
        super().__init__()
        self.dequant = tq.DeQuantStub() if enters else None
        self.module = module
        self.module.qconfig = None
        self.quant = tq.QuantStub() if leaves else None

    def forward(self, *args, **kwargs):
        if self.dequant is not None:
            args = tuple(self.dequant(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = self.module(*args, **kwargs)
        return self.quant(out) if self.quant is not None else out


def float_region_edges(network: nn.Module, skip) -> dict[str, tuple[bool, bool]]:
    """For each ``skip``ped module of the float ``network``: (enters a float region, leaves it).
    Consecutive skipped modules of one call chain (conv-bn-relu kept float together) form one region,
    so values cross a single dequantize / quantize pair, not one per module. Read before fusion,
    which hides the chain inside fused modules."""
    from qlightning.modes.fusion import module_chains

    enters = {name: True for name in skip}
    leaves = {name: True for name in skip}
    if skip:
        for chain in module_chains(network):
            for before, after in zip(chain, chain[1:]):
                if before in enters and after in enters:
                    leaves[before] = False
                    enters[after] = False
    return {name: (enters[name], leaves[name]) for name in skip}


def keep_float(network: nn.Module, edges: dict[str, tuple[bool, bool]]) -> None:
    """Replace modules of ``network`` by :class:`FloatRegion` wrappers, in place (``edges``: from
    :func:`float_region_edges`)."""
    for name, (enters, leaves) in edges.items():
        parent_name, _, attr = name.rpartition(".")
        parent = network.get_submodule(parent_name)
        setattr(parent, attr, FloatRegion(getattr(parent, attr), enters, leaves))


def _check_fusion_groups(network: nn.Module, groups: list[list[str]]) -> None:
    """User-given fusion groups must name submodules, in a sequence torch.ao can fuse."""
    names = dict(network.named_modules())
    for group in groups:
        missing = [n for n in group if n not in names]
        if missing:
            close = sorted({c for n in missing for c in difflib.get_close_matches(n, names, n=3)})
            raise QuantizationConfigError(
                f"modules_to_fuse={groups!r}: {missing} not found in {type(network).__name__}"
                + (f" (closest names: {close})" if close else "")
                + "; name submodules as in named_modules(), e.g. ['conv1', 'bn1', 'relu1']"
            )
        kinds = tuple(type(names[n]) for n in group)
        if not any(len(kinds) == len(seq) and all(issubclass(k, t) for k, t in zip(kinds, seq))
                   for seq in _FUSABLE):
            allowed = ", ".join("-".join("/".join(c.__name__ for c in t) for t in seq) for seq in _FUSABLE)
            raise QuantizationConfigError(
                f"modules_to_fuse group {group} is {'-'.join(k.__name__ for k in kinds)}, which torch.ao cannot fuse; "
                f"fusable sequences are: {allowed}"
            )


def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class EagerMode(QuantMode):
    name = "eager"

    def _wrap_and_fuse(self, network, example_inputs, modules_to_fuse, qat: bool, skip=()) -> nn.Module:
        edges = float_region_edges(network, skip)
        first = input_modules(network) if skip else []
        prepared = self._wrap_and_fuse_all(network, example_inputs, modules_to_fuse, qat)
        # After fusion: a skipped conv-bn-relu is fused like the others and then kept float whole.
        keep_float(prepared.net if isinstance(prepared, EagerQuantWrapper) else prepared, edges)
        if isinstance(prepared, EagerQuantWrapper) and first and all(name in edges for name in first):
            # Only float layers read the input: quantizing it would add rounding and nothing else.
            prepared.quant = nn.Identity()
        return prepared

    def _wrap_and_fuse_all(self, network, example_inputs, modules_to_fuse, qat: bool) -> nn.Module:
        if len(example_inputs) != 1:
            raise self.untraceable(
                network, TypeError(f"eager mode wraps a single tensor input, got {len(example_inputs)} inputs")
            )
        attention = [n for n, m in network.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if attention:
            # torch.ao's eager swap turns MHA's out_proj (NonDynamicallyQuantizableLinear) into
            # qat.Linear and fails ("from_float only works for Linear"), and MHA computes its
            # projections functionally, out of reach of eager QuantStubs.
            raise QuantizationConfigError(
                f"mode='eager' cannot quantize nn.MultiheadAttention ({_shown(attention)} in {type(network).__name__}) "
                "for static PTQ or QAT: eager mode only swaps modules, and attention computes its projections in "
                "functional code. Use mode='fx' or mode='pt2e' (or dynamic PTQ, which quantizes its Linear layers)"
            )
        if any(isinstance(m, tq.QuantStub) for m in network.modules()):
            return self._fuse_written_for_eager(network, modules_to_fuse, qat)
        if modules_to_fuse is None:
            groups = find_modules_to_fuse(network)
        else:
            groups = [list(g) for g in modules_to_fuse]
            _check_fusion_groups(network, groups)
        wrapper = EagerQuantWrapper(network).train(qat)
        if groups:
            # QAT keeps BN as a trainable part of the fused module; PTQ folds it into the conv now.
            fuse = tq.fuse_modules_qat if qat else tq.fuse_modules
            fuse(wrapper, [[f"net.{n}" for n in g] for g in groups], inplace=True)
        return wrapper

    @staticmethod
    def _fuse_written_for_eager(network, modules_to_fuse, qat: bool) -> nn.Module:
        """A network that places its own QuantStub / DeQuantStub (torchvision.models.quantization's
        variants, or one written for eager mode) is prepared as it is, not wrapped in another pair of
        stubs; it fuses itself when it knows how (torchvision's ``fuse_model(is_qat)``)."""
        network.train(qat)  # PTQ fusion folds BN and needs eval; QAT fusion keeps BN trainable
        if modules_to_fuse is not None:
            groups = [list(g) for g in modules_to_fuse]
            _check_fusion_groups(network, groups)
            (tq.fuse_modules_qat if qat else tq.fuse_modules)(network, groups, inplace=True)
        elif hasattr(network, "fuse_model"):
            network.fuse_model(is_qat=qat)
        else:
            groups = find_modules_to_fuse(network)
            if groups:
                (tq.fuse_modules_qat if qat else tq.fuse_modules)(network, groups, inplace=True)
        return network

    def prepare_qat(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, modules_to_fuse=None,
                    skip=(), **_):
        wrapper = self._wrap_and_fuse(network, example_inputs, modules_to_fuse, qat=True, skip=skip)
        wrapper.qconfig = _ao.qat_qconfig(recipe)
        tq.prepare_qat(wrapper, inplace=True)
        _ao.check_fused_bn_gamma(wrapper, self.name)
        self._check_convertible(wrapper, example_inputs, backend)
        if get_observer(recipe.observer).learnable:
            _ao.seed_lsq(wrapper, example_inputs)
        return wrapper

    def prepare_ptq(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, modules_to_fuse=None,
                    skip=(), **_):
        wrapper = self._wrap_and_fuse(copy.deepcopy(network), example_inputs, modules_to_fuse, qat=False, skip=skip)
        wrapper.qconfig = _ao.ptq_qconfig(recipe)
        tq.prepare(wrapper, inplace=True)
        self._check_convertible(wrapper, example_inputs, backend)
        return wrapper

    def quantize_dynamic(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, skip=(), **_):
        qconfig = _ao.dynamic_qconfig(recipe)
        model = copy.deepcopy(network).cpu().eval()
        # Dynamic layers take and return float tensors: a skipped one only needs no qconfig (a name
        # entry outranks the type entries in torch.ao's propagation).
        spec = {**{layer: qconfig for layer in _ao.DYNAMIC_LAYERS}, **{name: None for name in skip}}
        with quantized_engine(backend.engine):
            quantized = tq.quantize_dynamic(model, spec)
        return bind_quantized_engine(quantized, backend.engine)

    def _check_convertible(self, wrapper, example_inputs, backend):
        # Eager QAT runs in float, so ops without int8 kernels (``x + y``, functional calls on
        # quantized tensors) only fail after conversion: find out now, before any training.
        trial = copy.deepcopy(wrapper).eval()
        try:
            with torch.no_grad(), quantized_engine(backend.engine), warnings.catch_warnings():
                # Observers have seen nothing yet; their default qparams are fine for this check.
                warnings.filterwarnings("ignore", message="must run observer before calling calculate_qparams")
                tq.convert(trial, inplace=True)
                trial(*example_inputs)
        except Exception as exc:  # noqa: BLE001 - any failure here means the int8 model cannot run
            raise self.untraceable(getattr(wrapper, "net", wrapper), exc) from exc

    def unobserved_on_the_forward_path(self, prepared) -> list[str]:
        """Eager networks may hold modules their forward never calls: torchvision's quantizable
        mobilenet_v2 gives every block a ``skip_add`` FloatFunctional and calls it only in blocks with
        a residual connection. Unobserved quantizers count only when none observed (the network never
        ran); the unused ones are harmless (conversion and export follow forward)."""
        unobserved = super().unobserved_on_the_forward_path(prepared)
        observed_any = len(unobserved) < len(statistics_quantizers(prepared))
        return [] if observed_any else unobserved

    def convert(self, prepared, backend):
        model = copy.deepcopy(prepared).cpu().eval()
        with quantized_engine(backend.engine):
            return bind_quantized_engine(tq.convert(model, inplace=True), backend.engine)

    def fold_bn(self, model, example_inputs):
        from qlightning.passes.fold_qat_bn import fold_bn

        fold_bn(model, example_inputs, keep_weight_fake_quant=True)

    def quantizers(self, prepared):
        return _ao.quantizers(prepared)

    def observers(self, prepared):
        return _ao.observers(prepared)

    def set_observers_enabled(self, prepared, enabled):
        _ao.set_observers_enabled(prepared, enabled)

    def freeze_qparams(self, model):
        _ao.report_applied_qparams(model)

    def freeze_bn(self, prepared):
        _ao.freeze_bn(prepared)

    def enforce_frozen_bn(self, prepared):
        _ao.enforce_frozen_bn(prepared)

    def bn_modules_or_nodes(self, prepared):
        return _ao.batchnorms(prepared)

