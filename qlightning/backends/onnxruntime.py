"""ONNX Runtime: QDQ models whose layout ORT fuses into integer kernels.

ORT fuses ``DQ -> op -> Q`` groups into QLinearConv / QGemm / QLinearMatMul / QLinearAdd /
QLinearConcat / QLinearGlobalAveragePool, drops Q/DQ pairs around data-movement ops whose input and
output share qparams (MaxPool, Reshape, Flatten, Transpose), and removes a Relu/Clip between an op
and its Q when the Q's range already clamps (uint8 with zero point 0 for Relu). So the annotations:

- uint8 per-tensor affine activations, int8 per-channel symmetric weights (ORT's defaults on VNNI);
- conv / linear (with a following BatchNorm and ReLU/ReLU6/hardtanh/clamp as one group) and add
  (+ReLU) quantize their inputs *and their output*, so ORT finds the closing Q and fuses;
- pooling and reshaping ops share their input's qparams (ORT drops their Q/DQ pair);
- cat quantizes its inputs and output (QLinearConcat); split children share the parent's qparams;
- sigmoid and the product of two tensors quantize inputs and output (QLinearSigmoid, QLinearMul),
  and SiLU is annotated as ``x * sigmoid(x)`` (ONNX has no SiLU op: it is exported as those two). Left
  float, EfficientNet's 49 SiLUs and 16 squeeze-excitation gates made ORT 1.8-2.1x slower than its
  own quantize_static (issue 17).

torchao's X86InductorQuantizer leaves conv outputs unquantized (ORT then runs a float Conv after
DQ), and raises "Input partition has more than one output node" on torchvision's resnet18.
"""

from __future__ import annotations

import operator

import torch

from qlightning.backends.registry import Backend, WideActivation, register_backend
from qlightning.spec import SIXTEEN_BIT_EPS, TensorQuantSpec

aten = torch.ops.aten

_WEIGHTED = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
_BATCHNORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
                aten.clamp.default, aten.relu6.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_SHARE_INPUT = {aten.max_pool2d.default, aten.max_pool1d.default, aten.flatten.using_ints, aten.reshape.default,
                aten.view.default, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
                aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.permute.default,
                aten.transpose.int, aten.mean.dim, aten.contiguous.default, aten.clone.default}
_SILU = {aten.silu.default, aten.silu_.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}


def onnxruntime_quantizer(config):
    """A PT2E Quantizer annotating for ORT's QDQ fusions (imports torchao only when called)."""
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        Quantizer,
        SharedQuantizationSpec,
    )

    activation, weight = config.input_activation, config.weight

    def annotated(node) -> bool:
        return "quantization_annotation" in node.meta and node.meta["quantization_annotation"]._annotated

    def mark(node, inputs=None, output=None):
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map=inputs or {}, output_qspec=output, _annotated=True
        )

    def is_tensor(arg) -> bool:
        return isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)

    def sole_user(node, targets):
        users = list(node.users)
        return users[0] if len(users) == 1 and users[0].target in targets and not annotated(users[0]) else None

    def tail_of(node, with_batchnorm: bool):
        """The last node of node [-> batch_norm] [-> activation], and the nodes it passed."""
        passed = []
        if with_batchnorm and (bn := sole_user(node, _BATCHNORM)) is not None:
            passed.append(bn)
            node = bn
        if (act := sole_user(node, _ACTIVATIONS)) is not None:
            passed.append(act)
            node = act
        return node, passed

    class OnnxRuntimeQuantizer(Quantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            """SiLU as ``x * sigmoid(x)``, the two ops ORT has integer kernels for."""
            changed = False
            for node in list(model.graph.nodes):
                if node.op != "call_function" or node.target not in _SILU:
                    continue
                x = node.args[0]
                with model.graph.inserting_after(node):
                    gate = model.graph.call_function(aten.sigmoid.default, (x,))
                with model.graph.inserting_after(gate):
                    product = model.graph.call_function(aten.mul.Tensor, (x, gate))
                for new in (gate, product):
                    new.meta = {k: v for k, v in node.meta.items() if k != "quantization_annotation"}
                node.replace_all_uses_with(product)
                model.graph.erase_node(node)
                changed = True
            if changed:
                model.graph.lint()
                model.recompile()
            return model

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            nodes = list(model.graph.nodes)
            for node in nodes:  # weighted ops and adds first: they own their activation tails
                if annotated(node) or node.op != "call_function":
                    continue
                if node.target in _WEIGHTED:
                    inputs = {node.args[0]: activation, node.args[1]: weight}
                    tail, passed = tail_of(node, with_batchnorm=node.target != aten.linear.default)
                    mark(node, inputs, output=activation if tail is node else None)
                    for i, extra in enumerate(passed):
                        mark(extra, output=activation if extra is tail else None)
                elif node.target in _ADD and all(is_tensor(a) for a in node.args[:2]):
                    tail, passed = tail_of(node, with_batchnorm=False)
                    mark(node, {node.args[0]: activation, node.args[1]: activation},
                         output=activation if tail is node else None)
                    for extra in passed:
                        mark(extra, output=activation)
            for node in nodes:
                if annotated(node) or node.op != "call_function":
                    continue
                source = node.args[0] if node.args else None
                if node.target == aten.cat.default:
                    tensors = [t for t in node.args[0] if is_tensor(t)]
                    mark(node, {t: activation for t in tensors}, output=activation)
                elif node.target in _SHARE_INPUT and is_tensor(source):
                    mark(node, {source: activation}, output=SharedQuantizationSpec((source, node)))
                elif node.target in _ACTIVATIONS and is_tensor(source):
                    mark(node, {source: activation}, output=activation)
                elif node.target == aten.sigmoid.default and is_tensor(source):
                    mark(node, {source: activation}, output=activation)
                elif node.target == aten.mul.Tensor and all(is_tensor(a) for a in node.args[:2]):
                    mark(node, {node.args[0]: activation, node.args[1]: activation}, output=activation)
                elif node.target in _SPLITS and is_tensor(source):
                    mark(node, {source: activation})
                    for getitem in node.users:
                        if getitem.target is operator.getitem:
                            mark(getitem, output=SharedQuantizationSpec((source, node)))
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return OnnxRuntimeQuantizer()


def _fx_backend_config():
    """PyTorch's x86 BackendConfig, except that clamps observe their output separately (ORT merges
    Relu/Clip into the following Q; a shared observer would keep the unclamped range)."""
    from qlightning.backends.registry import fx_backend_config
    from qlightning.passes.unshare_observers import unshare_clamp_observers

    return unshare_clamp_observers(
        fx_backend_config("torch.ao.quantization.backend_config.x86", "get_x86_backend_config")()
    )


register_backend(
    Backend(
        name="onnxruntime",
        engine="x86",
        activation=TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
        weight=TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=True),
        fx_backend_config=_fx_backend_config,
        pt2e_quantizer=onnxruntime_quantizer,
        shared_split_qparams=True,
        fx_silu_as_sigmoid_mul=True,
        # 16-bit QDQ (opset 21). ORT's CPU provider runs it as float ops between 16-bit Q/DQ (no int16
        # kernels: QLinearConv is 8-bit only); NPU providers (QNN's HTP) run it in integers.
        wide_activations=tuple(
            (dtype, WideActivation(
                TensorQuantSpec(dtype, lo, hi, symmetric=False, per_channel=False, eps=SIXTEEN_BIT_EPS),
                schemes=("per_tensor_affine", "per_tensor_symmetric"),
                note="ONNX Runtime takes 16-bit QDQ at opset 21"))
            for dtype, lo, hi in (("int16", -32768, 32767), ("uint16", 0, 65535))
        ),
        description="ONNX Runtime QDQ: outputs of conv/linear/add quantized so ORT fuses integer kernels",
    )
)
