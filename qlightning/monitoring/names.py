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


def _guarded(node: fx.Node) -> str:
    source = _parameter_source(node)
    if source is not None:
        return source
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        return f"{node.target}.output"
    path = _module_path(node)
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


def per_channel(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1
