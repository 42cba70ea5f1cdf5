"""Keep a quantizer's integer range through formats whose quantize op only knows its dtype's range.

A PT2E ``quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)`` clamps to
``[quant_min, quant_max]``, which may be narrower than ``dtype``: FBGEMM's 7-bit activations
(``reduce_range``: uint8 in [0, 127]), or any TensorQuantSpec with a reduced range. ONNX
``QuantizeLinear`` has no such bounds and saturates to the whole dtype, and torch.onnx (torch 2.14.1,
dynamo) lowers the op with onnxscript 0.7.2's ``torch_lib`` translation, which drops ``quant_min`` /
``quant_max``. So a [0, 127] quantizer ran as [0, 255] in ONNX Runtime: everything above the trained
range passed through where the fake-quantized model (and training) clipped it. On a SmallCNN trained 3
epochs with ``backend="fbgemm"`` the logits' quantizer (zero point 78, range [-3.69, 2.32]) let ORT
output up to 5.97, 77 steps off, SQNR 19 dB on the validation digits; with ``quant_max`` set to 255 the
torch program matched ORT to one step (54 dB).

:func:`clamp_to_quant_range` makes the range explicit: an integer clamp right after each quantize
whose range is narrower than its dtype's. In ONNX that is ``QuantizeLinear -> Clip(uint8) ->
DequantizeLinear``; ORT still fuses the ``DequantizeLinear -> op -> QuantizeLinear`` groups around it
into its integer kernels (QLinearConv, QGemm), and the clamp runs on the 8-bit tensor between them.
"""

from __future__ import annotations

import torch
from torch import fx

_QUANTIZE_TARGETS = ("quantize_per_tensor", "quantize_per_channel")


def _is_quantize(node: fx.Node) -> bool:
    target = node.target
    return (
        node.op == "call_function"
        and getattr(target, "namespace", None) == "quantized_decomposed"
        and getattr(target, "_schema", None) is not None
        and target._schema.name.split("::")[-1] in _QUANTIZE_TARGETS
    )


def _argument(node: fx.Node, name: str):
    for position, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            return node.args[position] if position < len(node.args) else node.kwargs.get(name)
    return None


def narrow_range(node: fx.Node) -> tuple[int | None, int | None] | None:
    """``(low, high)`` bounds a quantize node clamps to beyond its dtype's saturation (``None`` for a
    side its dtype already enforces), or ``None`` when the node is no quantize or uses its whole dtype."""
    if not _is_quantize(node):
        return None
    quant_min, quant_max, dtype = (_argument(node, n) for n in ("quant_min", "quant_max", "dtype"))
    if not (isinstance(quant_min, int) and isinstance(quant_max, int) and isinstance(dtype, torch.dtype)):
        return None
    info = torch.iinfo(dtype)
    low = quant_min if quant_min > info.min else None
    high = quant_max if quant_max < info.max else None
    return None if low is None and high is None else (low, high)


def clamp_to_quant_range(gm: fx.GraphModule) -> int:
    """After every quantize op of a converted program whose ``[quant_min, quant_max]`` is narrower
    than its dtype, insert ``aten.clamp`` of the integers to that range (a no-op in torch, where the
    quantize op clamps already); returns how many. In place."""
    count = 0
    for node in list(gm.graph.nodes):
        bounds = narrow_range(node)
        if bounds is None:
            continue
        with gm.graph.inserting_after(node):
            clamped = gm.graph.call_function(torch.ops.aten.clamp.default, (node, *bounds))
        node.replace_all_uses_with(clamped, delete_user_cb=lambda user, c=clamped: user is not c)
        clamped.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
        count += 1
    if count:
        gm.recompile()
    return count
