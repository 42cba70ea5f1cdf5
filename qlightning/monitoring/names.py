"""Readable, stable names for quantizers: what they guard, not where the mode happened to put them.

- a weight quantizer is named after the parameter: ``conv1.weight``;
- an activation quantizer after the layer whose output it quantizes: ``conv1.output`` (the network's
  own input: ``input``), taken from the graph node it follows (FX module targets, PT2E
  ``nn_module_stack``), or from the eager module that owns it.
"""

from __future__ import annotations

import torch
from torch import fx, nn


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self___", "") or None
    return None


def _parameter_source(node: fx.Node) -> str | None:
    """If ``node`` is computed from parameters only (PT2E QAT scales the conv weight by the BatchNorm
    factor before fake-quantizing it), the weight it comes from; else ``None``."""
    seen, stack, weights = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return None
        if current.op == "get_attr":
            value = current.meta.get("val")
            weights.append((-(value.dim() if isinstance(value, torch.Tensor) else 0), str(current.target)))
        stack.extend(current.all_input_nodes)
    # The highest-rank tensor is the layer's weight (a conv's 4-D kernel, not BatchNorm's gamma).
    return min(weights)[1] if weights else None


# What eager and FX fuse into a conv / linear (conv-bn-relu, linear-relu): a quantizer after these
# guards the output of the layer they follow, and is named after that layer in every mode.
_FUSED_TAIL = ("relu", "relu_", "hardtanh", "hardtanh_", "clamp", "batch_norm", "_native_batch_norm_legit")
# How PT2E QAT simulates conv-bn: the conv output divided by the BN scale, the bias added back.
_PARAMETER_ARITHMETIC = ("div", "mul", "add", "sub")
_ANCHORS = ("conv1d", "conv2d", "conv3d", "convolution", "linear", "addmm")


def _aten_name(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def _fused_anchor(node: fx.Node) -> fx.Node | None:
    """The conv / linear node whose fused pattern ``node`` ends (``relu(bn(conv(x)))``), else ``None``."""
    if _aten_name(node) not in _FUSED_TAIL:
        return None
    current = node
    for _ in range(8):
        data = [a for a in current.all_input_nodes if _parameter_source(a) is None]
        if len(data) != 1:  # a residual add joins two activations: no single layer to name
            return None
        current = data[0]
        name = _aten_name(current)
        if name in _ANCHORS:
            return current
        if name not in _FUSED_TAIL + _PARAMETER_ARITHMETIC:
            return None
    return None


def _guarded(node: fx.Node) -> str:
    source = _parameter_source(node)
    if source is not None:
        return source
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        return f"{node.target}.output"
    # PT2E keeps conv, bn and relu as separate nodes; eager and FX fuse them into the conv's module. The
    # quantizer after the relu is named after the conv, so a mode sweep overlays the same curve (issue 18).
    anchor = _fused_anchor(node)
    path = _module_path(anchor if anchor is not None and _module_path(anchor) else node)
    return f"{path}.output" if path else f"{node.name}.output"


def quantizer_names(network: nn.Module, quantizers: list[tuple[str, nn.Module]]) -> dict[int, str]:
    """id(quantizer module) -> readable name, unique within the network."""
    graph_module = getattr(network, "graph_module", network)
    names: dict[int, str] = {}
    if isinstance(graph_module, fx.GraphModule):
        modules = dict(graph_module.named_modules(remove_duplicate=False))
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
                module = modules.get(node.target)
                if module is not None and id(module) not in names:
                    names[id(module)] = _guarded(node.args[0])
    for path, module in quantizers:
        if id(module) in names:
            continue
        # Eager, and FX QAT modules: ``<layer>.weight_fake_quant`` / ``<layer>.activation_post_process``.
        parent, _, attr = path.removeprefix("graph_module.").rpartition(".")
        parent = parent.removeprefix("net.") if parent.startswith("net.") else parent
        if attr == "weight_fake_quant":
            names[id(module)] = f"{parent}.weight" if parent else "weight"
        elif parent == "quant":
            names[id(module)] = "input"
        else:
            names[id(module)] = f"{parent}.output" if parent else path
    # Disambiguate the rare collisions (two quantizers after the same layer).
    seen: dict[str, int] = {}
    for key, name in list(names.items()):
        count = seen.get(name, 0)
        seen[name] = count + 1
        if count:
            names[key] = f"{name}_{count}"
    return names


def network_order(network: nn.Module, names: list[str]) -> list[str]:
    """``names`` (as :func:`quantizer_names` gives them) sorted as the network runs: ``input`` first,
    then by where the layer they name first appears (graph order, then module order); a layer's weight
    before its output."""
    paths: list[str] = []
    graph_module = getattr(network, "graph_module", network)
    if isinstance(graph_module, fx.GraphModule):
        for node in graph_module.graph.nodes:
            path = node.target if node.op == "call_module" else _module_path(node)
            if isinstance(path, str):
                paths.append(path)
    paths += [name.removeprefix("net.") for name, _ in network.named_modules()]
    position: dict[str, int] = {}
    for path in paths:
        position.setdefault(path, len(position))

    def key(name: str):
        layer, _, kind = name.rpartition(".")
        return (name != "input", position.get(layer, len(position)), kind != "weight", name)

    return sorted(names, key=key)


def per_channel(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1
