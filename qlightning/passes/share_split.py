"""Give every child of a split / chunk / unbind the quantizer of the split's input.

ONNX Runtime's quantized Split (and TFLite's) requires the input and all outputs to share one scale
and zero point; a split moves no values, so that is also exact. FX BackendConfigs can only share
qparams for single-tensor outputs, so after training or calibration this pass points each child's
quantizer at the parent's:

    q_parent -> split -> getitem_i -> q_i        becomes        ... -> getitem_i -> q_parent

Works on FX and PT2E prepared graphs. A split whose input is not quantized is left alone (logged).
"""

from __future__ import annotations

import logging

from torch import fx

from qlightning.passes.graph import is_split, quantizer_node

log = logging.getLogger(__name__)


def _child_quantizers(gm: fx.GraphModule, split: fx.Node) -> list[fx.Node]:
    children = []
    for getitem in split.users:
        for user in getitem.users:
            if quantizer_node(gm, user):
                children.append(user)
    return children


def share_split_qparams(gm: fx.GraphModule) -> int:
    """Make split children use their parent's quantizer, in place; returns how many were changed."""
    changed = 0
    for split in [n for n in gm.graph.nodes if is_split(n)]:
        parent = split.args[0]
        children = _child_quantizers(gm, split)
        if not children:
            continue
        if not quantizer_node(gm, parent):
            log.debug("share_split_qparams: %s has no quantized input; its children keep their own qparams", split)
            continue
        for child in children:
            if child.target != parent.target:
                child.target = parent.target
                changed += 1
    if not changed:
        log.debug("share_split_qparams: every split already shares its input's qparams (or none exist)")
        return 0
    gm.delete_all_unused_submodules()
    gm.recompile()
    log.debug("share_split_qparams: %d split outputs now share their input's quantizer", changed)
    return changed
