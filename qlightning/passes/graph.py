"""What the graph passes need to know about FX and PT2E graphs: which nodes are quantizers, which
are clamps (ReLU, ReLU6, hardtanh, clamp) and which split a tensor.

FX prepared graphs and PT2E prepared graphs share one shape for quantizers: a ``call_module`` node of
an observer or fake-quantize module. Clamps and splits differ (``torch``/``nn`` calls in FX, ``aten``
ops in PT2E); both spellings are listed here.
"""

from __future__ import annotations

import copy

import math

import torch
from torch import fx, nn
from torch.nn import functional as F

aten = torch.ops.aten


def _pt2e_quantizer_classes() -> tuple[type, ...]:
    try:  # torchao's PT2E quantizers
        from torchao.quantization.pt2e import FakeQuantizeBase
        from torchao.quantization.pt2e.observer import ObserverBase

        return (FakeQuantizeBase, ObserverBase)
    except ImportError:  # pragma: no cover - torchao is a dependency; keep FX usable without it
        return ()


def _ao_quantizer_classes() -> tuple[type, ...]:
    try:  # torch.ao's eager/FX quantizers (may be removed from a future torch)
        import torch.ao.quantization as tq

        return (tq.FakeQuantizeBase, tq.ObserverBase)
    except ImportError:  # pragma: no cover
        return ()


# The two hierarchies are disjoint (torchao copied torch.ao's classes; none subclasses the other).
_PT2E_QUANTIZERS = _pt2e_quantizer_classes()
_AO_QUANTIZERS = _ao_quantizer_classes()
_QUANTIZERS = _PT2E_QUANTIZERS + _AO_QUANTIZERS


def is_quantizer(module) -> bool:
    """Any quantizer qlightning makes or meets: torch.ao or torchao fake-quantize / observer modules,
    and qlightning's own subclasses of them (``ExactQParamsObserver``, the finalized PT2E quantizer)."""
    return isinstance(module, _QUANTIZERS)


def quantizer_family(module) -> str | None:
    """``"pt2e"`` for torchao quantizers (which ``convert_pt2e`` converts; ``ExactQParamsObserver`` is
    one), ``"ao"`` for torch.ao eager/FX quantizers, ``None`` for anything else.

    Decided by class hierarchy, never by the module a class is defined in: qlightning defines
    quantizers of its own, and a check on ``type(m).__module__`` (``"torchao..."``) missed them, so a
    finalized PT2E network, whose quantizers are all ``ExactQParamsObserver``, was "not quantized".
    """
    if isinstance(module, _PT2E_QUANTIZERS):
        return "pt2e"
    if isinstance(module, _AO_QUANTIZERS):
        return "ao"
    return None


def is_fake_quantize(module) -> bool:
    """Fake-quantizers (torch.ao and torchao) quantize in forward; plain observers only watch."""
    return hasattr(module, "fake_quant_enabled")


def is_learnable(module) -> bool:
    """LSQ-style quantizers hold their scale / zero point as trained parameters."""
    return any(isinstance(p, nn.Parameter) for p in module.parameters(recurse=False))


def statistics_observers(quantizers) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, quantizer, observer) for each of ``quantizers`` ((name, module) pairs) whose statistics
    live in ``min_val`` / ``max_val`` tensors. A fake-quantize module stands for its inner observer
    (listed or not); fixed-qparams, placeholder (dynamic) and learnable quantizers have no statistics."""
    quantizers = list(quantizers)
    owned = {id(m.activation_post_process) for _, m in quantizers if is_fake_quantize(m)}
    found = []
    for name, module in quantizers:
        if id(module) in owned or is_learnable(module):
            continue
        observer = getattr(module, "activation_post_process", module)
        if isinstance(getattr(observer, "min_val", None), torch.Tensor) and isinstance(
            getattr(observer, "max_val", None), torch.Tensor
        ):
            found.append((name, module, observer))
    return found


def quantizer_node(gm: fx.GraphModule, node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and is_quantizer(gm.get_submodule(node.target))
    )


def _arg(node: fx.Node, position: int, name: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _bounds(lo, hi) -> tuple[float, float] | None:
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return None  # data-dependent bounds: not a constant range
    return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


_RELU = {F.relu, torch.relu, torch.relu_, "relu", "relu_", aten.relu.default, aten.relu_.default}
_RELU6 = {F.relu6, aten.relu6.default}
_HARDTANH = {F.hardtanh, F.hardtanh_, aten.hardtanh.default, aten.hardtanh_.default}
if hasattr(torch._C._nn, "hardtanh_"):  # the builtin that F.hardtanh(inplace=True) calls
    _HARDTANH.add(torch._C._nn.hardtanh_)
_CLAMP = {torch.clamp, torch.clip, "clamp", "clamp_", "clip", aten.clamp.default, aten.clamp_.default}


def clamp_range(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """The constant output range of a ReLU / ReLU6 / hardtanh / clamp node, else ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.ReLU:
            return (0.0, math.inf)
        if type(module) is nn.ReLU6:
            return (0.0, 6.0)
        if type(module) is nn.Hardtanh:
            return (float(module.min_val), float(module.max_val))
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    if target in _RELU:
        return (0.0, math.inf)
    if target in _RELU6:
        return (0.0, 6.0)
    if target in _HARDTANH:
        return _bounds(_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))
    if target in _CLAMP:
        return _bounds(_arg(node, 1, "min", None), _arg(node, 2, "max", None))
    return None


_SPLITS = {
    torch.split, torch.chunk, torch.tensor_split, torch.unbind, "split", "chunk", "tensor_split", "unbind",
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.tensor_split.sections, aten.tensor_split.indices,
}


def is_split(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _SPLITS


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def unique_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def erase(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and drop it from the bookkeeping FX's ``convert_fx`` checks node by node."""
    attrs = gm.meta.get("_observed_graph_module_attrs")
    if attrs is not None:
        for table in ("node_name_to_qconfig", "node_name_to_scope", "equalization_node_name_to_qconfig"):
            getattr(attrs, table, {}).pop(node.name, None)
        getattr(attrs, "observed_node_names", set()).discard(node.name)
    gm.graph.erase_node(node)


class Saturate(nn.Module):
    """Clamp to a quantizer's representable range, without rounding: what a quantizer does besides
    rounding (per channel along ``ch_axis`` when the bounds are vectors)."""

    def __init__(self, lowest: torch.Tensor, highest: torch.Tensor, ch_axis: int = 0):
        super().__init__()
        self.register_buffer("lowest", lowest.detach().float().clone())
        self.register_buffer("highest", highest.detach().float().clone())
        self.ch_axis = ch_axis

    def forward(self, x):
        lowest, highest = self.lowest, self.highest
        if lowest.numel() > 1:
            shape = [1] * x.dim()
            shape[self.ch_axis] = -1
            lowest, highest = lowest.reshape(shape), highest.reshape(shape)
        return torch.maximum(torch.minimum(x, highest), lowest)


def _saturation_of(quantizer: nn.Module) -> nn.Module:
    from qlightning.passes.exact_qparams import current_qparams

    quant_min, quant_max = getattr(quantizer, "quant_min", None), getattr(quantizer, "quant_max", None)
    inner = getattr(quantizer, "activation_post_process", quantizer)
    quant_min = quant_min if quant_min is not None else getattr(inner, "quant_min", None)
    quant_max = quant_max if quant_max is not None else getattr(inner, "quant_max", None)
    try:
        scale, zero_point = current_qparams(quantizer)
    except Exception:  # noqa: BLE001 - a quantizer without qparams yet: nothing to saturate to
        return nn.Identity()
    if quant_min is None or quant_max is None or not torch.isfinite(scale).all():
        return nn.Identity()
    scale, zero_point = scale.float(), zero_point.float()
    return Saturate((quant_min - zero_point) * scale, (quant_max - zero_point) * scale,
                    int(getattr(quantizer, "ch_axis", getattr(inner, "ch_axis", 0))))


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing in float what its quantizers compute without rounding: every
    quantizer (the outermost: a fake-quantizer, not its inner observer) becomes a clamp to its
    representable range. Saturation stays because passes rely on it: ``merge_relu_clamp`` removes a
    ReLU whose following quantizer saturates at 0, so an identity twin was a network without those
    ReLUs (1-3 dB SQNR against every QAT zoo model, measured). Weights and graph are unchanged."""
    twin = copy.deepcopy(model).cpu().eval()
    replaced: list[str] = []
    for name, module in list(twin.named_modules()):
        if not name or not is_quantizer(module) or any(name.startswith(r + ".") for r in replaced):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, attr, _saturation_of(module))
        replaced.append(name)
    return twin


_VIEW_FUNCTIONS = {
    torch.ops.aten.expand.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims, torch.ops.aten.slice.Tensor, torch.ops.aten.select.int,
    torch.ops.aten.t.default, torch.ops.aten.alias.default,
}
_VIEW_METHODS = {"expand", "expand_as", "view", "view_as", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "t"}


def _is_parameter_view(gm: fx.GraphModule, node) -> bool:
    viewed = False
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and (
        node.target in _VIEW_FUNCTIONS or node.target in _VIEW_METHODS
    ):
        node, viewed = node.args[0], True
    if not viewed or not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return False
    return isinstance(value, nn.Parameter)


def clone_parameter_views_into_quantizers(gm: fx.GraphModule) -> int:
    """Feed quantizers a copy, not a view, of a parameter (ViT's class token, expanded to the batch).

    torch 2.14.1's ModuleTracker (``torch.utils.module_tracker``, used by ``FlopCounterMode`` and so
    by Lightning's model summary) hooks every module input that requires grad; a view of a parameter
    made under ``no_grad`` reports ``requires_grad`` without a grad_fn, and the hook asserts "Expected
    gradient function to be set": a default Trainer crashed at fit start on the ViT whenever a backend
    quantizes the class token. A clone is a plain tensor under ``no_grad`` and costs one small copy.
    Returns the number of clones inserted."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args or not is_quantizer(gm.get_submodule(node.target)):
            continue
        source = node.args[0]
        if not _is_parameter_view(gm, source):
            continue
        with gm.graph.inserting_before(node):
            copy_node = gm.graph.call_function(torch.ops.aten.clone.default, (source,))
        if "val" in source.meta:
            copy_node.meta["val"] = source.meta["val"]
        node.replace_input_with(source, copy_node)
        count += 1
        # An FX prepared model's convert looks every node up in the scope map prepare recorded.
        attrs = getattr(gm, "meta", {}).get("_observed_graph_module_attrs")
        if attrs is not None:
            attrs.node_name_to_scope[copy_node.name] = attrs.node_name_to_scope.get(node.name, ("", type(None)))
    if count:
        gm.recompile()
    return count


def activation_dtypes(gm: fx.GraphModule) -> list[str]:
    """The integer dtypes a converted PT2E program quantizes activations to (``["int16"]`` for A16W8):
    the dtype argument of every per-tensor quantize whose input is not a constant (weights stored
    behind a quantize, ``fold_quantize=False``, read a ``get_attr``)."""
    quantize = {torch.ops.quantized_decomposed.quantize_per_tensor.default,
                torch.ops.quantized_decomposed.quantize_per_tensor.tensor}
    dtypes = set()
    for node in gm.graph.nodes:
        if node.target in quantize and not (isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
            dtypes.add(str(_arg(node, 5, "dtype", None)).removeprefix("torch."))
    return sorted(dtypes)
