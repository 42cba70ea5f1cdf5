"""LiteRT (TFLite) int8: activations int8 affine [-128, 127], weights int8 symmetric [-127, 127]
per channel, no bias quantization (the LiteRT quantization spec).

- PT2E: litert-torch's own ``PT2EQuantizer`` (the quantizer its converter expects), fed with
  qlightning's observer choice; Sigmoid / Softmax outputs get LiteRT's fixed qparams (1/256, -128).
- FX: a BackendConfig mirroring the patterns that quantizer annotates (conv(+bn)(+relu), linear,
  add(+relu), mul, cat, max/adaptive-avg pooling, fixed-qparams ops, ops sharing their input's
  qparams), so FX-trained models reach the converter through FX -> PT2E.

litert-torch is an optional extra (``pip install 'qlightning[tflite]'``): the PT2E quantizer is
imported when a network is prepared, not when this backend registers.
"""

from __future__ import annotations

from qlightning.backends.registry import Backend, WideActivation, register_backend
from qlightning.spec import SIXTEEN_BIT_EPS, TensorQuantSpec


def _patterns_as_modules() -> None:
    """litert-torch 0.10 hands plain functions to torchao's ``_get_aten_graph_module_for_pattern``,
    which passes them to ``torch.export.export``; torch >= 2.10 accepts only modules there, so its
    QAT conv-bn annotation fails with "Expected `mod` to be an instance of `torch.nn.Module`".
    Wrap the function in a module on the way in (idempotent; only litert's reference is replaced)."""
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as litert_utils

    original = litert_utils._get_aten_graph_module_for_pattern
    if getattr(original, "_qlightning_shim", False):
        return

    class Pattern(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    def as_module(pattern, example_inputs, is_cuda=False, **kwargs):
        if not isinstance(pattern, torch.nn.Module):
            pattern = Pattern(pattern)
        return original(pattern, example_inputs, is_cuda, **kwargs)

    as_module._qlightning_shim = True
    litert_utils._get_aten_graph_module_for_pattern = as_module


def _litert_pt2e_quantizer_class(sixteen_bit: bool = False):
    """litert-torch's ``PT2EQuantizer``, made to annotate ``torch.cat`` under torch >= 2.10.

    litert-torch 0.10 finds cat with ``get_source_partitions(graph, [torch.cat])``, which reads
    ``source_fn_stack``; non-strict ``torch.export`` leaves it unset (its ``torch_fn`` fallback gives the
    name ``"cat"``, not ``torch.cat``), so no cat was annotated: torch computed cat, and the max-pools
    after it, in float between dequantize and quantize, while LiteRT's converter made an int8
    CONCATENATION at its first input's scale (clipping the wider branches: googlenet's inception 3b
    cat at 5.95 while a branch reaches 7.75; ViT's class token, |v| < 0.1, rounded to the patch
    embedding's 0.066 grid) and, where it dropped the requantize after a max-pool, kept the consuming
    convs' int32 bias at the dropped scale (bias off by 1.18-1.32x). Each cat gets a source entry
    of its own, and cat is annotated before the pools that share their input's qparams (max_pool2d /
    adaptive_avg_pool2d annotate only an already annotated input), so cat -> max_pool -> conv share one
    scale and need no requantize. Only cat nodes without a ``source_fn_stack`` are touched.

    Adds likewise: litert finds them with ``get_source_partitions(graph, [operator.add, torch.add,
    operator.iadd])``, and the ``torch_fn`` fallback names them ``"add"``, so no add was annotated. The
    converter still made an int8 ADD where both inputs and the output happened to be observed by
    neighbouring ops, but an add feeding an add has no observer between them: mobilenet_v2 ran 9 of its
    10 residual adds as DEQUANTIZE -> float ADD -> QUANTIZE. Float tensor adds without a source get
    ``operator.add`` (what strict export records for ``x + y``); integer adds (BatchNorm's
    ``num_batches_tracked`` under QAT) are left alone.

    ``sixteen_bit`` (16x8): a network with ops the converter cannot make in 16x8 (``torch.cat``, padded
    max-pools) is refused when it is prepared, before any training (``_refuse_16x8_unconvertible``)."""
    import operator

    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    static_ops = [op for op in PT2EQuantizer.STATIC_OPS if op != "cat"]
    static_ops.insert(static_ops.index("adaptive_avg_pool2d"), "cat")

    _TENSOR_ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)

    def _is_float(node):
        val = node.meta.get("val")
        return isinstance(val, torch.Tensor) and val.is_floating_point()

    class LiteRtPT2EQuantizer(PT2EQuantizer):
        STATIC_OPS = static_ops

        def transform_for_annotation(self, model):
            model = super().transform_for_annotation(model)
            if sixteen_bit:
                _refuse_16x8_unconvertible(model)
            for node in model.graph.nodes:
                if node.op != "call_function" or node.meta.get("source_fn_stack"):
                    continue
                if node.target == torch.ops.aten.cat.default:
                    node.meta["source_fn_stack"] = [(node.name, torch.cat)]
                elif node.target in _TENSOR_ADDS and _is_float(node):
                    node.meta["source_fn_stack"] = [(node.name, operator.add)]
            return model

    return LiteRtPT2EQuantizer


# Ops litert-converter 0.5.0 cannot make in 16x8, by the MLIR op whose verifier refuses int16 operands:
# torch.cat -> tfl.concatenation; a padded max-pool (resnet's stem) -> tfl.padv2 before the pool.
_NO_16X8 = {"torch.cat (tfl.concatenation)": lambda n: str(n.target) == "aten.cat.default",
            "a padded max-pool (tfl.padv2)": lambda n: str(n.target) == "aten.max_pool2d.default" and _padded(n)}


def _padded(node) -> bool:
    padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
    return any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))


def _refuse_16x8_unconvertible(model) -> None:
    """Raise, when the network is prepared (before any data is seen), for ops LiteRT's converter cannot
    convert with int16 activations; their verifiers refuse int16 operands ("must be ... QI8 type ...
    values, but got 'tensor<...!quant.uniform<i16...>>'"), and leaving the op unannotated does not help:
    the converter folds its inputs' DEQUANTIZE into it anyway (measured on split -> conv -> cat). LiteRT's
    int16 kernels exist (CONCATENATION, PAD); the converter's op definitions are what lack them."""
    from qlightning.errors import QuantizationConfigError

    found = {}
    for node in model.graph.nodes:
        for what, matches in _NO_16X8.items():
            if node.op == "call_function" and matches(node):
                found.setdefault(what, []).append(node.name)
    if found:
        listed = "; ".join(f"{what}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                           for what, names in found.items())
        raise QuantizationConfigError(
            f"backend 'tflite' with activation_dtype='int16' cannot convert this network: {listed}. LiteRT's "
            "converter (litert-converter 0.5.0) has no int16 form of these ops; use activation_dtype='int8' for "
            "LiteRT, or backend 'onnxruntime' for A16W8"
        )


def litert_quantizer(config):
    """litert-torch's PT2E quantizer with qlightning's specs (a torchao ``QuantizationConfig``)."""
    import torch
    from litert_torch.quantize.pt2e_quantizer_utils import QuantizationConfig
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec

    _patterns_as_modules()
    sixteen_bit = config.input_activation.dtype == torch.int16
    # Sigmoid / softmax outputs: the qparams LiteRT's LOGISTIC / SOFTMAX kernels require (int8: scale
    # 1/256, zero point -128; int16: scale 1/32768, zero point 0).
    if sixteen_bit:
        fixed = FixedQParamsQuantizationSpec(dtype=torch.int16, scale=1 / 32768, zero_point=0, quant_min=-32768,
                                             quant_max=32767, qscheme=torch.per_tensor_affine)
    else:
        fixed = FixedQParamsQuantizationSpec(dtype=torch.int8, scale=1 / 256, zero_point=-128, quant_min=-128,
                                             quant_max=127, qscheme=torch.per_tensor_affine)
    litert_config = QuantizationConfig(config.input_activation, config.output_activation, config.weight, None,
                                       fixed, config.is_qat, False)
    return _litert_pt2e_quantizer_class(sixteen_bit)().set_global(litert_config)


def tflite_fx_backend_config():
    import importlib

    import torch
    from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, DTypeConfig, ObservationType
    from torch.ao.quantization.backend_config import DTypeWithConstraints

    importlib.import_module("torch.ao.quantization.backend_config.utils")  # needed by set_backend_pattern_config
    from torch.ao.quantization.backend_config._common_operator_config_utils import (
        _get_binary_op_configs,
        _get_cat_config,
        _get_conv_configs,
        _get_fixed_qparams_op_configs,
        _get_linear_configs,
        _get_share_qparams_op_configs,
    )

    activation = DTypeWithConstraints(dtype=torch.qint8, quant_min_lower_bound=-128, quant_max_upper_bound=127,
                                      scale_min_lower_bound=2**-12)
    weight = DTypeWithConstraints(dtype=torch.qint8, quant_min_lower_bound=-127, quant_max_upper_bound=127,
                                  scale_min_lower_bound=2**-12)
    weighted = DTypeConfig(input_dtype=activation, output_dtype=activation, weight_dtype=weight, bias_dtype=torch.float)
    non_weighted = DTypeConfig(input_dtype=activation, output_dtype=activation)
    pooling = [
        BackendPatternConfig(op)
        .set_observation_type(ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
        .set_dtype_configs([non_weighted])
        for op in (torch.nn.MaxPool2d, torch.nn.functional.max_pool2d, torch.nn.AdaptiveAvgPool2d,
                   torch.nn.functional.adaptive_avg_pool2d)
    ]
    return (
        BackendConfig("tflite")
        .set_backend_pattern_configs(_get_conv_configs([weighted]))
        .set_backend_pattern_configs(_get_linear_configs([weighted]))
        .set_backend_pattern_configs(_get_binary_op_configs([non_weighted]))
        .set_backend_pattern_config(_get_cat_config([non_weighted]))
        .set_backend_pattern_configs(_get_fixed_qparams_op_configs([non_weighted]))
        .set_backend_pattern_configs(_get_share_qparams_op_configs([non_weighted]))
        .set_backend_pattern_configs(pooling)
    )


register_backend(
    Backend(
        name="tflite",
        # PyTorch's int8 kernels take only uint8 activations: no eager mode, and FX's int8 model is
        # the PT2E Q/DQ program (``torch_int8_kernels=False``). The engine only names the FX qconfig defaults.
        engine="qnnpack",
        modes=frozenset({"fx", "pt2e"}),
        torch_int8_kernels=False,
        activation=TensorQuantSpec("int8", -128, 127, symmetric=False, per_channel=False),
        weight=TensorQuantSpec("int8", -127, 127, symmetric=True, per_channel=True),
        fx_backend_config=tflite_fx_backend_config,
        pt2e_quantizer=litert_quantizer,
        shared_split_qparams=True,
        same_scale_concat=True,
        # LiteRT's 16x8 mode: int16 activations with zero point 0, int8 weights, int64 biases.
        wide_activations=(
            ("int16", WideActivation(
                TensorQuantSpec("int16", -32767, 32767, symmetric=True, per_channel=False, eps=SIXTEEN_BIT_EPS),
                schemes=("per_tensor_symmetric",),
                note="LiteRT's 16x8 kernels take int16 activations with zero point 0")),
        ),
        description="LiteRT (TFLite) int8 through litert-torch's PT2E quantizer and converter",
        extra="tflite",
        # The FX BackendConfig needs only torch.ao; the PT2E quantizer is litert-torch's own.
        required_modules=("litert_torch",),
    )
)
