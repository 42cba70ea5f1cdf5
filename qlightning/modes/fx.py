"""FX graph mode: symbolic trace, QConfigMapping + BackendConfig, ``prepare_qat_fx``/``convert_fx``."""

from __future__ import annotations

import copy

import torch

import torch.ao.quantization as tq
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from qlightning.backends import Backend
from qlightning.modes import _ao
from qlightning.modes.base import QuantMode
from qlightning.observers import get_observer
from qlightning.quantized_engine import bind_quantized_engine, quantized_engine
from qlightning.spec import QuantRecipe


_FIXED_QPARAMS = (tq.FixedQParamsFakeQuantize, tq.FixedQParamsObserver)


def qconfig_mapping(qconfig: tq.QConfig, engine: str, qat: bool) -> tq.QConfigMapping:
    """Our QConfig everywhere, except ops with fixed output ranges (sigmoid, tanh, softmax...),
    which keep PyTorch's fixed-qparams quantizers: their range is known, not observed."""
    defaults = tq.get_default_qat_qconfig_mapping(engine) if qat else tq.get_default_qconfig_mapping(engine)
    mapping = tq.QConfigMapping().set_global(qconfig)
    for op, default in defaults.object_type_qconfigs.items():
        if default is not None and isinstance(default.activation(), _FIXED_QPARAMS):
            mapping.set_object_type(op, default)
    return mapping


def dynamic_qconfig_mapping(recipe: QuantRecipe) -> tq.QConfigMapping:
    qconfig = _ao.dynamic_qconfig(recipe)
    # Global, not per layer type: FX fuses linear-relu and conv-relu before quantizing and refuses a fusion
    # whose parts have different qconfigs ("During fusion, we need to specify the same qconfigs for all
    # module types", torch 2.14). Ops without a dynamic int8 pattern in the BackendConfig stay float.
    return tq.QConfigMapping().set_global(qconfig)


def keep_float(mapping: tq.QConfigMapping, skip) -> tq.QConfigMapping:
    """``mapping`` with no qconfig for the ``skip``ped modules (and so their submodules): FX leaves
    them float and puts dequantize / quantize at their edges. Module names outrank the object-type
    entries of the fixed-qparams ops in QConfigMapping's priority order."""
    for name in skip:
        mapping.set_module_name(name, None)
    return mapping


def training_dependent_leaves(network: torch.nn.Module) -> list[type]:
    """Classes of parameter-free modules outside torch.nn whose forward reads ``self.training``
    (torchvision's StochasticDepth, timm's DropPath). Symbolic tracing evaluates ``self.training``
    once, at trace time: traced during QAT prepare (train mode), stochastic depth stayed random in
    eval, so BN folding, conversion and every export saw a random graph (efficientnet_b0 in FX:
    outputs moving by 0.77 between two eval passes, issue 17). Kept as leaves they run their own
    forward, which follows ``train()`` / ``eval()``."""
    import inspect

    classes = []
    for module in network.modules():
        cls = type(module)
        if cls in classes or cls.__module__.startswith("torch.") or any(True for _ in module.parameters()):
            continue
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if "self.training" in source:
            classes.append(cls)
    return classes


class FxMode(QuantMode):
    name = "fx"

    def _prepare(self, prepare_fn, network, mapping, example_inputs, backend):
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

        from qlightning.modes.fx_rewrites import decompose_silu, split_timm_batchnorm_act

        split_timm_batchnorm_act(network)
        if backend.fx_silu_as_sigmoid_mul:
            decompose_silu(network)
        leaves = PrepareCustomConfig().set_non_traceable_module_classes(training_dependent_leaves(network))
        try:
            prepared = prepare_fn(network, mapping, example_inputs, prepare_custom_config=leaves,
                                  backend_config=backend.fx_backend_config())
        except Exception as exc:  # noqa: BLE001 - symbolic tracing raises many exception types
            raise self.untraceable(network, exc) from exc
        from qlightning.passes.graph import clone_parameter_views_into_quantizers

        clone_parameter_views_into_quantizers(prepared)
        # Kept for convert: FX needs the same mapping and backend config on both sides.
        prepared.meta["qlightning_qconfig_mapping"] = mapping
        # Kept for backends without PyTorch int8 kernels, converted through PT2E instead.
        prepared.meta["qlightning_example_inputs"] = tuple(
            x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs
        )
        return prepared

    def prepare_qat(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, skip=(), **_):
        mapping = keep_float(qconfig_mapping(_ao.qat_qconfig(recipe), backend.engine, qat=True), skip)
        prepared = self._prepare(prepare_qat_fx, network.train(), mapping, example_inputs, backend)
        _ao.check_fused_bn_gamma(prepared, self.name)
        if get_observer(recipe.observer).learnable:
            _ao.seed_lsq(prepared, example_inputs)
        return prepared

    def prepare_ptq(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, skip=(), **_):
        mapping = keep_float(qconfig_mapping(_ao.ptq_qconfig(recipe), backend.engine, qat=False), skip)
        return self._prepare(prepare_fx, copy.deepcopy(network).eval(), mapping, example_inputs, backend)

    def quantize_dynamic(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, skip=(), **_):
        model = copy.deepcopy(network).cpu().eval()
        example_inputs = tuple(x.cpu() if hasattr(x, "cpu") else x for x in example_inputs)
        mapping = keep_float(dynamic_qconfig_mapping(recipe), skip)
        prepared = self._prepare(prepare_fx, model, mapping, example_inputs, backend)
        return self.convert(prepared, backend)

    def convert(self, prepared, backend):
        if not backend.torch_int8_kernels:
            # No PyTorch kernel runs this backend's integer layout (e.g. TFLite's int8 activations):
            # the int8 model is the PT2E Q/DQ program with exactly the trained qparams, as exporters use.
            from qlightning.modes.pt2e import Pt2eMode
            from qlightning.passes.to_pt2e import ao_to_pt2e

            return Pt2eMode().convert(ao_to_pt2e(prepared, prepared.meta["qlightning_example_inputs"]), backend)
        model = copy.deepcopy(prepared).cpu().eval()
        _forget_removed_nodes(model)
        with quantized_engine(backend.engine):
            converted = convert_fx(
                model,
                qconfig_mapping=prepared.meta.get("qlightning_qconfig_mapping"),
                backend_config=backend.fx_backend_config(),
            )
            # Inside the engine block: set_weight_bias repacks the weight for this engine's kernels.
            clamp_weights_to_quant_range(converted, prepared)
        return bind_quantized_engine(converted, backend.engine)

    def fold_bn(self, model, example_inputs):
        from qlightning.passes.fold_qat_bn import fold_bn

        fold_bn(model, example_inputs, keep_weight_fake_quant=True)

    def graph_of(self, model):
        return model

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


_INT_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric, torch.per_channel_affine,
                 torch.per_channel_symmetric)


def clamp_weights_to_quant_range(converted: torch.fx.GraphModule, prepared: torch.fx.GraphModule) -> int:
    """Clamp every int8 weight of ``converted`` to its quantizer's ``[quant_min, quant_max]``, in place;
    returns how many weight entries moved.

    ``convert_fx`` lowers through reference modules, whose ``get_quantized_weight`` (torch 2.14.1,
    ``ao/nn/quantized/reference/modules/utils.py``, the non-decomposed ``_quantize_weight``) ignores the
    weight quantizer's ``quant_min`` / ``quant_max`` and clamps to the dtype's [-128, 127] only (eager's
    ``from_float`` clamps, ``_clamp_weights``). With the x86 backend's 7-bit weights (CPUs without VNNI)
    the fake-quantized model clamps to [-64, 63] while the int8 model kept 64..69 and -65..-69 (a max
    weight lands on 63.5 steps, and weights move after the observers freeze): 163 entries on the digits
    QAT test, conv1 5 and conv2 10 output steps off the fake-quant model, logits 2-4 steps and argmax
    changed; clamped, every layer is within 1 step and each int8 kernel matches an exact integer
    reference. Out-of-range weights also reopen the ``vpmaddubsw`` saturation 7 bits were chosen for.
    """
    mapping = prepared.meta.get("qlightning_qconfig_mapping")
    global_qconfig = getattr(mapping, "global_qconfig", None)
    default = global_qconfig.weight() if global_qconfig is not None else None
    moved = 0
    for name, module in converted.named_modules():
        weight_fn = getattr(module, "weight", None)
        if not callable(weight_fn) or not hasattr(module, "set_weight_bias"):
            continue
        weight = weight_fn()
        if not (isinstance(weight, torch.Tensor) and weight.is_quantized and weight.qscheme() in _INT_QSCHEMES):
            continue
        try:
            quantizer = getattr(prepared.get_submodule(name), "weight_fake_quant", None)
        except AttributeError:
            quantizer = None
        quantizer = default if quantizer is None else quantizer
        if quantizer is None:
            continue
        ints = weight.int_repr()
        bounded = ints.clamp(int(quantizer.quant_min), int(quantizer.quant_max))
        if torch.equal(bounded, ints):
            continue
        moved += int((bounded != ints).sum())
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            weight = torch._make_per_channel_quantized_tensor(
                bounded, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), weight.q_per_channel_axis()
            )
        else:
            weight = torch._make_per_tensor_quantized_tensor(bounded, weight.q_scale(), weight.q_zero_point())
        module.set_weight_bias(weight, module.bias())
    return moved


def _forget_removed_nodes(model: torch.fx.GraphModule) -> None:
    """Drop the nodes that graph passes removed (merge_relu_clamp erases clamps, their quantizers and
    the ``getattr`` nodes only they used) from the qconfig map ``prepare_qat_fx`` stored: torch
    2.14.1's ``convert_fx`` requires every key of it in the graph it converts and raised "Expected key
    getattr_2 in convert node_name_to_qconfig" on timm's mobilenetv3 after the merge."""
    attrs = model.meta.get("_observed_graph_module_attrs")
    if attrs is None:
        return
    present = {node.name for node in model.graph.nodes}
    attrs.node_name_to_qconfig = {k: v for k, v in attrs.node_name_to_qconfig.items() if k in present}
