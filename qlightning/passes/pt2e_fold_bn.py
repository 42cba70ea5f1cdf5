"""Fold BatchNorm into the preceding convolution of a PT2E QAT graph, before ``convert_pt2e``.

torchao's ``prepare_qat_pt2e`` rewrites conv-bn into a simulation of the folded conv:

    w_fq = fake_quant(conv_weight * (gamma / sqrt(running_var + eps)))      # per out-channel scale s
    y    = batch_norm(conv(x, w_fq, None) / s [+ conv_bias], gamma, beta, running_mean, running_var)

In eval behaviour that equals ``conv(x, w_fq, (conv_bias - running_mean) * s + beta)``. torchao's own
folding in ``convert_pt2e`` finds this by exporting and matching ~50 pattern variants, which costs tens
of seconds per conversion; the structure is known here, so we rewrite it directly. BatchNorms that do
not fit the pattern are left for torchao.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import fx, nn

log = logging.getLogger(__name__)
aten = torch.ops.aten
_CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


def _arg_through_reshape(node) -> fx.Node | None:
    if isinstance(node, fx.Node) and node.target == aten.reshape.default:
        return node.args[0]
    return None


def _get_attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = functools.reduce(getattr, node.target.split("."), gm)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _is_safe_inverse(node) -> bool:
    """``where(s == 0, 0, reciprocal(s))`` of a detached ``s``, as :func:`unscale_by_reciprocal` writes it."""
    return (
        isinstance(node, fx.Node)
        and node.target == aten.where.ScalarSelf
        and getattr(node.args[2], "target", None) == aten.reciprocal.default
    )


def _is_unscale(node) -> bool:
    """``conv_out / s`` as torchao writes it, or ``conv_out * safe_inverse(s)`` after
    :func:`unscale_by_reciprocal`."""
    if not isinstance(node, fx.Node) or not isinstance(node.args[0], fx.Node):
        return False
    if node.target == aten.div.Tensor:
        return True
    return node.target == aten.mul.Tensor and _is_safe_inverse(node.args[1])


def _match(gm: fx.GraphModule, bn: fx.Node):
    """(conv node, weight fake-quant node, conv weight, conv bias or None) of a QAT conv-bn, or None.
    The fake-quant node is None for a conv-bn kept float (``skip=``): its scaled weight feeds the conv
    directly. torchao's own fold in convert_pt2e expects a get_attr where that scaled weight is and
    failed on it with the LiteRT quantizer ("Expected get_attr node, got call_function", torchao 0.18)."""
    node, conv_bias = bn.args[0], None
    if node.target == aten.add.Tensor:
        bias_node = _arg_through_reshape(node.args[1])
        conv_bias = _get_attr(gm, bias_node)
        if conv_bias is None:
            return None
        node = node.args[0]
    if not _is_unscale(node):
        return None
    conv = node.args[0]
    if conv.target not in _CONV_OPS or len(conv.users) != 1:
        return None
    weight_fq = conv.args[1]
    if not isinstance(weight_fq, fx.Node):
        return None
    if weight_fq.op == "call_module":
        scaled_weight = weight_fq.args[0]
    elif weight_fq.target == aten.mul.Tensor:
        scaled_weight, weight_fq = weight_fq, None
    else:
        return None
    if not isinstance(scaled_weight, fx.Node) or scaled_weight.target != aten.mul.Tensor:
        return None
    conv_weight = _get_attr(gm, scaled_weight.args[0])
    if conv_weight is None:
        return None
    return conv, weight_fq, conv_weight, conv_bias


def unscale_by_reciprocal(gm: fx.GraphModule) -> int:
    """Rewrite each QAT conv-bn's ``conv_out / s`` as ``conv_out * inverse(s)``; returns how many.

    ``s = gamma / sqrt(running_var + eps)`` per output channel. Two reasons:

    - Speed on CPU: the division's backward needs ``-grad * conv_out / s**2`` over the whole activation
      (a neg, a mul and two divs); the multiplication's needs one mul per input, and the inverse is
      computed on the C-element ``s``. MobileNetV2 (batch 16, 64x64, 2 threads): QAT step 2.24x ->
      2.08x the float step, measured side by side.
    - gamma == 0 (a switched-off channel; torchvision's ``zero_init_residual``): ``0 / 0`` made the whole
      network NaN. The channel's weight scales to 0 and its conv output is 0, so ``inverse(0) = 0``
      gives the exact result, ``beta``: ``inverse(s) = where(s == 0, 0, 1 / s)`` on the detached ``s``
      (no gradient flows through it, so the unselected ``1 / 0 = inf`` never meets a backward).

    - The inverse is detached: no gradient flows through ``1 / s`` into gamma. The batch-norm that reads
      ``conv_out * inverse(s)`` is in training mode and normalises each channel by its batch statistics,
      so scaling a channel's input by ``c`` changes its output only through ``eps``: the dropped term is
      zero up to ``eps / (batch_var + eps)``, and float32 rounding of a sum that cancels (test_passes
      bounds the gamma gradients' difference; every other gradient is torchao's). Its backward was a
      full-size multiply plus a sum over N, H, W per conv-bn: 3 % of the QAT step (batch 16, 64x64,
      2 threads, side by side in one process, two runs): MobileNetV2 341 -> 330 ms and 371 -> 363 ms,
      ResNet18 540 -> 523 ms and 477 -> 469 ms. The weight
      side, ``w * s``, keeps its gradient: there it is not scale-invariant (the fake-quant rounds ``w * s``).

    Only pairs that :func:`fold_qat_conv_bn` recognises are rewritten, so folding is unchanged.
    """
    rewritten = 0
    graph = gm.graph
    for bn in [n for n in graph.nodes if n.target == aten.batch_norm.default]:
        if _match(gm, bn) is None:
            continue
        unscale = bn.args[0].args[0] if bn.args[0].target == aten.add.Tensor else bn.args[0]
        if unscale.target != aten.div.Tensor:
            continue  # already rewritten
        conv_out, scale = unscale.args[:2]
        with graph.inserting_before(unscale):
            # Detached first: the three C-element ops below then record no autograd history (per-op
            # overhead is what a small network's step is made of).
            detached = graph.call_function(aten.detach.default, (scale,))
            is_zero = graph.call_function(aten.eq.Scalar, (detached, 0.0))
            inverse = graph.call_function(aten.where.ScalarSelf,
                                          (is_zero, 0.0, graph.call_function(aten.reciprocal.default, (detached,))))
            product = graph.call_function(aten.mul.Tensor, (conv_out, inverse))
        product.meta.update(unscale.meta)
        unscale.replace_all_uses_with(product)
        graph.erase_node(unscale)
        rewritten += 1
    if rewritten:
        gm.recompile()
    log.debug("unscale_by_reciprocal: rewrote %d conv-bn pair(s)", rewritten)
    return rewritten


def fold_qat_conv_bn(gm: fx.GraphModule) -> int:
    """Fold every matching conv-bn of a PT2E QAT graph in place; returns how many were folded.

    The graph must already be in eval behaviour (``set_exported_training(gm, False, False)``):
    folding uses the running statistics.
    """
    folded = 0
    for bn in [n for n in gm.graph.nodes if n.target == aten.batch_norm.default]:
        _, gamma_n, beta_n, mean_n, var_n, training, _, eps = bn.args[:8]
        if training:
            raise ValueError("fold_qat_conv_bn needs BatchNorm in eval behaviour; call set_exported_training first")
        match = _match(gm, bn)
        params = [_get_attr(gm, n) for n in (gamma_n, beta_n, mean_n, var_n)]
        if match is None or any(p is None for p in params):
            continue
        conv, weight_fq, weight, bias = match
        gamma, beta, mean, var = (p.detach() for p in params)
        scale = gamma / torch.sqrt(var + eps)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        folded_weight = weight.detach() * scale.reshape(shape)
        folded_bias = ((bias.detach() if bias is not None else torch.zeros_like(mean)) - mean) * scale + beta

        prefix = conv.name
        gm.register_parameter(f"{prefix}_folded_weight", nn.Parameter(folded_weight))
        gm.register_parameter(f"{prefix}_folded_bias", nn.Parameter(folded_bias))
        with gm.graph.inserting_before(weight_fq if weight_fq is not None else conv):
            weight_node = gm.graph.get_attr(f"{prefix}_folded_weight")
            bias_node = gm.graph.get_attr(f"{prefix}_folded_bias")
        args = list(conv.args)
        if weight_fq is not None:
            weight_fq.args = (weight_node,)
        else:
            args[1] = weight_node
        if len(args) < 3:
            args += [None] * (3 - len(args))
        args[2] = bias_node
        conv.args = tuple(args)
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded += 1
    if folded:
        # The running-stat counters' in-place increments are side effects DCE keeps: drop them.
        for node in list(gm.graph.nodes):
            if node.target == aten.add_.Tensor and node.args[0].op == "get_attr" and "num_batches_tracked" in str(
                node.args[0].target
            ):
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    log.debug("fold_qat_conv_bn: folded %d conv-bn pair(s)", folded)
    return folded
