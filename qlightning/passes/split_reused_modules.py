"""Give every call of a module that a network calls more than once its own source partition.

PT2E quantizers find patterns (conv-bn-add-relu, linear-relu, ...) through
``get_source_partitions``. For graphs from non-strict ``torch.export`` (no ``source_fn_stack``),
torch 2.14 groups a leaf module's nodes by the module's qualified name from ``nn_module_stack``,
so a module called twice - torchvision's ``BasicBlock`` runs one ``self.relu`` after ``bn1`` and
again after the residual add - makes one partition of two unconnected calls, and torchao 0.18's
``X86InductorQuantizer`` raises "Input partition has more than one output node" on resnet18 and
any network reusing an activation module. ``nn_module_stack`` already tells the calls apart (its
keys end in ``@1``, ``@2`` for repeated calls); this pass gives each repeated call a
``source_fn_stack`` entry under that key, which the source matcher prefers, so every quantizer
matches per call. Module names (``nn_module_stack`` values) are left as they are. Remove when torch's
source matcher splits partitions per call.
"""

from __future__ import annotations

import pydoc

import torch


def _module_type(cls):
    return cls if isinstance(cls, type) else pydoc.locate(cls) if isinstance(cls, str) else None


def split_reused_module_partitions(gm: torch.fx.GraphModule) -> int:
    """Give the second and later calls of a reused leaf module their own source; returns how many
    nodes were re-sourced."""
    renamed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("source_fn_stack") or not node.meta.get("nn_module_stack"):
            continue
        key, (_, cls) = list(node.meta["nn_module_stack"].items())[-1]
        module_type = _module_type(cls)
        if "@" not in key or module_type is None:
            continue
        node.meta["source_fn_stack"] = [(key, module_type)]
        renamed += 1
    return renamed
