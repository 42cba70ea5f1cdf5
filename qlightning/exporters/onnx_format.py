"""ONNX (QDQ) export of a converted PT2E program, and running it in ONNX Runtime.

The program's ``quantized_decomposed`` quantize/dequantize ops become ONNX QuantizeLinear /
DequantizeLinear around float ops, the layout ONNX Runtime fuses into integer kernels (QLinearConv,
QGemm, QLinearAdd, ...). The batch dimension is dynamic and named ``batch``. A quantizer whose integer
range is narrower than its dtype (FBGEMM's 7-bit activations) gets a ``Clip`` of its integers after
``QuantizeLinear``, which has no range of its own (:mod:`qlightning.passes.quant_range`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from qlightning.cpu import u8s8_saturates
from qlightning.spec import SIXTEEN_BIT_DTYPES

log = logging.getLogger(__name__)

# ONNX ops that only move or reshape data: neither "quantized" nor "float" compute.
_PLUMBING = {
    "QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Shape",
    "Gather", "Constant", "Identity", "Cast", "Slice", "Split", "Concat", "ConstantOfShape", "Expand",
}

# Ops whose second input is a weight.
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}

# What a reduced-range quantizer's integer clamp after QuantizeLinear is exported as.
_INTEGER_CLAMPS = {"Clip", "Min", "Max"}

# Per-node debugging text torch.onnx (2.14.1, dynamo exporter) writes: the Python stack trace (with the
# training machine's file paths) and the FX node's printout. On the zoo's ViT it was 353 KB of a 518 KB
# int8 file, so its size ratio read 0.68 with every weight in int8 (issue 17). Module names
# (``namespace``, ``pkg.torch.onnx.name_scopes``) stay: they say which layer a node belongs to.
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def write_qdq(converted: torch.nn.Module, example_inputs: tuple, path: Path) -> None:
    """The converted program as an ONNX QDQ file, weights in int8."""
    import onnx

    from qlightning.modes.base import batch_of_two, dynamic_batch

    example_inputs = batch_of_two(example_inputs)
    # The ONNX optimizer logs every initializer it deduplicates at INFO; Hydra apps show INFO.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from qlightning.passes.quant_range import clamp_to_quant_range

    # On a copy: the converted program stays the torch model the file is checked against.
    gm = copy.deepcopy(converted.graph_module)
    clamp_to_quant_range(gm)
    dynamic = dynamic_batch(example_inputs, torch.export.Dim("batch"))
    program = torch.export.export(gm, example_inputs, dynamic_shapes=dynamic)
    onnx_program = torch.onnx.export(program, example_inputs, dynamo=True, optimize=True, verbose=False,
                                     **_opset_for(converted.graph_module))
    model = onnx_program.model_proto
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"
    strip_debug_metadata(model)
    onnx.save(model, str(path))


def _sixteen_bit_activations(gm: torch.fx.GraphModule) -> bool:
    from qlightning.passes.graph import activation_dtypes

    return bool(set(activation_dtypes(gm)) & SIXTEEN_BIT_DTYPES)


def _opset_for(gm: torch.fx.GraphModule) -> dict:
    """16-bit activations need opset 21 (QuantizeLinear / DequantizeLinear took only 8-bit integers
    before); 8-bit files keep torch.onnx's default opset, the one their ORT fusions were measured on."""
    return {"opset_version": 21} if _sixteen_bit_activations(gm) else {}


def write(converted: torch.nn.Module, example_inputs: tuple, path: Path) -> None:
    """The ``onnx`` format: the QDQ file, with uint8 weights where int8 ones would saturate on this CPU
    (the file is verified here, in ONNX Runtime, before it is kept). A16W8 files keep int8 weights:
    ORT has no 16x8 integer kernel to saturate, it runs their ops in float between Q/DQ."""
    import onnx

    write_qdq(converted, example_inputs, path)
    model = onnx.load(str(path))
    changed = keep_float_layers_float(model)
    if u8s8_saturates() and not _sixteen_bit_activations(converted.graph_module):
        changed = unsigned_weights(model) or changed
    if changed:
        onnx.save(model, str(path))


# ONNX Runtime's level-1 optimizer WeightBiasQuantization (onnxruntime >= 1.21; narrowed by PR #24537 in
# 1.22 to a Conv/Gemm whose output goes to a QuantizeLinear) quantizes the float weight of a Conv /
# ConvTranspose / Gemm fed by a per-tensor DequantizeLinear to per-tensor int8 at session load, then fuses
# it into an integer kernel. A layer kept float (skip=) sits exactly there: measured on the digits
# SmallCNN with conv1 and fc2 skipped (onnxruntime 1.32), ORT ran both in int8 and the file's SQNR against
# float fell 9 dB below the torch model's. The optimizer only takes a scalar-scale DequantizeLinear.
_WEIGHT_QUANTIZED_BY_ORT = {"Conv", "ConvTranspose", "Gemm"}


def keep_float_layers_float(model) -> int:
    """Feed every float-weight Conv / ConvTranspose / Gemm that reads a per-tensor DequantizeLinear from
    its own DequantizeLinear with that scale and zero point repeated per input channel (axis 1): the
    same numbers, which ORT's WeightBiasQuantization leaves alone, so the layer runs in float as the
    torch model does. In place; returns how many layers were rewired."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    rewired = 0
    for node in list(graph.node):
        if node.op_type not in _WEIGHT_QUANTIZED_BY_ORT or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        dq = producers.get(node.input[0])
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or dq is None or dq.op_type != "DequantizeLinear":
            continue
        scale, zero_point = (initializers.get(name) for name in (list(dq.input) + [None, None])[1:3])
        if scale is None or numpy_helper.to_array(scale).size != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dims = list(weight.dims)
        if node.op_type == "Gemm":
            if attrs.get("transA", 0):
                continue
            channels = dims[1] if attrs.get("transB", 0) else dims[0]
        elif node.op_type == "Conv":
            channels = dims[1] * attrs.get("group", 1)
        else:  # ConvTranspose: weight is (C_in, C_out / group, ...)
            channels = dims[0]
        name = f"{node.input[0]}__per_channel_{rewired}"
        scales = np.full(channels, numpy_helper.to_array(scale).reshape(()), dtype=numpy_helper.to_array(scale).dtype)
        inputs = [dq.input[0], name + "_scale"]
        graph.initializer.append(numpy_helper.from_array(scales, name + "_scale"))
        if zero_point is not None:
            zps = numpy_helper.to_array(zero_point).reshape(())
            graph.initializer.append(numpy_helper.from_array(np.full(channels, zps, dtype=zps.dtype), name + "_zp"))
            inputs.append(name + "_zp")
        graph.node.insert(list(graph.node).index(node),
                          helper.make_node("DequantizeLinear", inputs, [name], name=name, axis=1))
        node.input[0] = name
        rewired += 1
    return rewired


def weight_dtype(path: Path) -> str | None:
    """``"int8"`` or ``"uint8"``: how the file stores its quantized weights (``None``: it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    types = {t.data_type for t in model.graph.initializer if t.name in _weight_zero_points(model.graph)}
    names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
    return "/".join(sorted(names.get(t, str(t)) for t in types)) or None


def _weight_zero_points(graph) -> set[str]:
    """Zero-point initializers of the QuantizeLinear / DequantizeLinear nodes that quantize a weight
    (an initializer), following each weight's Q -> [integer clamp] -> DQ chain."""
    initializers = {t.name for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    zero_points = set()
    for node in graph.node:
        starts_at_weight = node.input and node.input[0] in initializers
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or not starts_at_weight or len(node.input) < 3:
            continue
        zero_points.add(node.input[2])
        chain = [node]
        while chain:
            current = chain.pop()
            for consumer in consumers.get(current.output[0], []):
                if consumer.op_type in _INTEGER_CLAMPS:
                    chain.append(consumer)
                elif consumer.op_type == "DequantizeLinear" and len(consumer.input) > 2:
                    zero_points.add(consumer.input[2])
    return zero_points


def unsigned_weights(model) -> int:
    """Store every int8 weight as uint8 (``q + 128`` with zero point ``zp + 128``), in place; returns
    how many weights changed.

    The same numbers: ``(q + 128) - (zp + 128) == q - zp``, so torch's symmetric int8 qparams carry over
    exactly. ONNX Runtime then runs u8 x u8 kernels, which widen to int16 before multiplying and do not
    saturate, where its u8 x s8 kernels do on x86 CPUs without VNNI (:func:`qlightning.cpu.u8s8_saturates`;
    onnxruntime 1.32 on AVX2: 15 dB against the file's own unfused graph). Measured on the default job's
    SmallCNN: the same fused QLinearConv / QGemm kernels and the same latency.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    weight_zps = _weight_zero_points(graph)
    initializers = {t.name: t for t in graph.initializer}
    signed = {n for n in weight_zps if n in initializers and initializers[n].data_type == onnx.TensorProto.INT8}
    if not signed:
        return 0
    # An int8 initializer that something else reads too (an activation's zero point, a shared clamp
    # bound) is copied rather than changed.
    readers: dict[str, set] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(id(node))

    def shifted(name: str) -> str:
        new_name = f"{name}__uint8"
        if new_name not in initializers:
            values = numpy_helper.to_array(initializers[name]).astype(np.int16) + 128
            tensor = numpy_helper.from_array(values.astype(np.uint8), new_name)
            graph.initializer.append(tensor)
            initializers[new_name] = tensor
        return new_name

    changed_outputs = set()
    weights = 0
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in signed:
            if node.op_type == "QuantizeLinear":
                weights += 1
                changed_outputs.add(node.output[0])
            elif initializers.get(node.input[0]) is not None and initializers[node.input[0]].data_type == onnx.TensorProto.INT8:
                node.input[0] = shifted(node.input[0])  # a weight stored as int8 already
                weights += 1
            node.input[2] = shifted(node.input[2])
    # The integer clamps between a weight's Q and DQ clamp uint8 integers now.
    for node in graph.node:
        if node.op_type in _INTEGER_CLAMPS and node.input[0] in changed_outputs:
            for position in range(1, len(node.input)):
                bound = node.input[position]
                if bound in initializers and initializers[bound].data_type == onnx.TensorProto.INT8:
                    node.input[position] = shifted(bound)
            changed_outputs.update(node.output)
    for value in graph.value_info:
        if value.name in changed_outputs:
            value.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used or t.name in {i.name for i in graph.input}]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return weights


def strip_debug_metadata(model) -> None:
    """Drop :data:`_DEBUG_METADATA` from every node of ``model`` (an ``onnx.ModelProto``), in place."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def run(path: Path, inputs: tuple) -> np.ndarray:

    session = _session(path)
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feeds)
    return np.concatenate([o.reshape(o.shape[0], -1) if o.ndim else o.reshape(1, 1) for o in outputs], axis=1)


_SESSIONS: dict = {}


def _session(path: Path):
    import onnxruntime as ort

    key = (str(path), path.stat().st_mtime_ns)
    if key not in _SESSIONS:
        _SESSIONS.clear()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        _SESSIONS[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def op_counts(path: Path) -> tuple[int, int]:
    """(quantized, float) compute ops: an op is quantized when an input comes from DequantizeLinear
    (ONNX Runtime fuses DQ -> op -> Q into its integer kernel), and for a conv / matmul its weight too. A clamp of QuantizeLinear's integers
    (a reduced range: ``Clip``, or ``Min`` / ``Max`` where the ONNX optimizer turned a one-sided Clip
    into them) is part of the quantization, not compute."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    quantized = floating = 0
    for node in graph.node:
        if node.op_type in _PLUMBING:
            continue
        if node.op_type in _INTEGER_CLAMPS and producers.get(node.input[0]) == "QuantizeLinear":
            producers.update({out: "QuantizeLinear" for out in node.output})  # still Q's integers
            continue
        dequantized = [producers.get(i) == "DequantizeLinear" for i in node.input]
        # A weighted op runs in integers only with its weight quantized too: a layer kept float (skip=)
        # reads a dequantized activation but a float weight.
        if any(dequantized) and (node.op_type not in _WEIGHTED or all(dequantized[:2])):
            quantized += 1
        else:
            floating += 1
    return quantized, floating


def float_size_bytes(path: Path) -> int:
    """Size of the same file with its 8-bit initializers stored as fp32 (as the float network's weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    extra = sum(3 * int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in eight_bit)
    return path.stat().st_size + extra
