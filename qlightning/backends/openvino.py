"""OpenVINO on CPU: u8 activations, symmetric per-channel i8 weights (OpenVINO's low-precision
transformations run Convolution / MatMul in integer precision from that QDQ layout).

- FX: the guide's OpenVINO BackendConfig (after mmrazor's, written for torch < 2.0) on today's
  ``BackendPatternConfig`` API: linear, conv (with their BN/ReLU fusions), addmm, binary ops, ops that
  share their input's qparams, and ``cat`` sharing one observer with its inputs.
- PT2E: the same ONNX QDQ layout qlightning builds for ONNX Runtime; ``format="openvino"`` converts
  that ONNX model with OpenVINO's own converter (``openvino.convert_model``).
"""

from __future__ import annotations

from qlightning.backends.onnxruntime import onnxruntime_quantizer
from qlightning.backends.registry import Backend, register_backend
from qlightning.cpu import u8s8_saturates
from qlightning.spec import TensorQuantSpec


def openvino_fx_backend_config():
    import importlib

    import torch
    from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, DTypeConfig, ObservationType

    importlib.import_module("torch.ao.quantization.backend_config.utils")  # needed by set_backend_pattern_config
    from torch.ao.quantization.backend_config._common_operator_config_utils import (
        _get_binary_op_configs,
        _get_conv_configs,
        _get_linear_configs,
        _get_share_qparams_op_configs,
    )

    weighted = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8, weight_dtype=torch.qint8,
                           bias_dtype=torch.float)
    non_weighted = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)
    addmm = (
        BackendPatternConfig(torch.addmm)
        .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
        .set_dtype_configs([weighted])
        ._set_input_type_to_index({"bias": 0, "input": 1, "weight": 2})
    )
    cat = (
        BackendPatternConfig(torch.cat)
        .set_observation_type(ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
        .set_dtype_configs([non_weighted])
    )
    return (
        BackendConfig("openvino")
        .set_backend_pattern_configs(_get_linear_configs([weighted]))
        .set_backend_pattern_configs(_get_conv_configs([weighted]))
        .set_backend_pattern_config(addmm)
        .set_backend_pattern_configs(_get_binary_op_configs([weighted]))
        .set_backend_pattern_configs(_get_share_qparams_op_configs([non_weighted]))
        .set_backend_pattern_config(cat)
    )


register_backend(
    Backend(
        name="openvino",
        engine="x86",  # eager/FX int8 models of this config run on PyTorch's x86 kernels
        activation=TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
        # Without VNNI, OpenVINO's CPU plugin multiplies u8 x i8 into int16 pairs and saturates (openvino
        # 2026.4 on AVX2: 25 dB against the QDQ graph). 7-bit weights fit (255 * 64 * 2 < 2**15), NNCF's
        # "overflow fix"; with uint8 weights (the ONNX Runtime fix) OpenVINO ran its convolutions in f32.
        weight=TensorQuantSpec("int8", -64 if u8s8_saturates() else -128, 63 if u8s8_saturates() else 127,
                               symmetric=True, per_channel=True),
        fx_backend_config=openvino_fx_backend_config,
        pt2e_quantizer=onnxruntime_quantizer,
        shared_split_qparams=True,
        description="OpenVINO CPU: u8 activations, per-channel i8 weights; IR through ONNX QDQ",
    )
)
