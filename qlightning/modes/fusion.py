"""Which submodules of a float network form a fusion group (conv-bn-relu, linear-relu, ...): eager mode
fuses them, and ``skip=`` keeps a whole group float. torch.fx and torch.nn only, no ``torch.ao``."""

from __future__ import annotations

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Sequences ``fuse_modules_qat`` accepts, longest first so conv-bn-relu wins over conv-bn.
_FUSABLE = [
    (_CONV, _BN, (nn.ReLU,)),
    (_CONV, _BN),
    (_CONV, (nn.ReLU,)),
    ((nn.Linear,), (nn.BatchNorm1d,)),
    ((nn.Linear,), (nn.ReLU,)),
    (_BN, (nn.ReLU,)),
]


def module_chains(net: nn.Module) -> list[list[str]]:
    """Chains of submodule calls in execution order where each output feeds only the next call.

    Found from an FX trace when the network is traceable; otherwise from ``nn.Sequential``
    containers, whose order is their execution order.
    """
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception:
        chains = []
        for prefix, module in net.named_modules():
            if isinstance(module, nn.Sequential):
                names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_children()]
                chains.append(names)
        return chains
    chains, current = [], []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        if current and not (len(node.args) == 1 and node.args[0] is current[-1] and len(current[-1].users) == 1):
            chains.append([n.target for n in current])
            current = []
        current.append(node)
    if current:
        chains.append([n.target for n in current])
    return chains


def find_modules_to_fuse(net: nn.Module, chains: list[list[str]] | None = None) -> list[list[str]]:
    """conv-bn(-relu), conv-relu, linear-bn, linear-relu and bn-relu groups, found automatically
    (``chains``: :func:`module_chains` of ``net``, when the caller has traced it already)."""
    groups = []
    for chain in module_chains(net) if chains is None else chains:
        i = 0
        while i < len(chain):
            for pattern in _FUSABLE:
                names = chain[i : i + len(pattern)]
                if len(names) == len(pattern) and all(
                    isinstance(net.get_submodule(n), types) for n, types in zip(names, pattern)
                ):
                    groups.append(names)
                    i += len(pattern)
                    break
            else:
                i += 1
    return groups


def input_modules(net: nn.Module) -> list[str]:
    """Submodules called directly on an input of ``net`` (from an FX trace; empty when untraceable)."""
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception:
        return []
    return [n.target for n in graph.nodes
            if n.op == "call_module" and any(a.op == "placeholder" for a in n.all_input_nodes)]
