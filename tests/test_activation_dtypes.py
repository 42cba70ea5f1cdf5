"""A16W8: 16-bit activations with 8-bit weights (``activation_dtype``) for the runtimes that run them:
ONNX Runtime (16-bit QDQ, opset 21) and LiteRT (16x8). Others are refused at construction."""

import copy
import json

import lightning as L
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qlightning import PostTrainingQuantization, QuantizationAwareTraining
from qlightning.errors import QuantizationConfigError
from qlightning.exporters import onnx_format, tflite_format
from qlightning.models import ImageClassifier
from tests.conftest import labels, predictions, qat_from_float_baseline, trainer_kwargs
from tests.test_passes import PassNet

# -- refused at construction -------------------------------------------------------------------------


@pytest.mark.parametrize("backend,runs", [("x86", "uint8"), ("openvino", "uint8"), ("qnnpack", "uint8")])
def test_a_backend_whose_runtime_has_no_16_bit_activations_refuses_them(backend, runs):
    with pytest.raises(QuantizationConfigError, match=(
            rf"backend '{backend}' runs activations as \['{runs}'\], not activation_dtype='int16'; backends whose "
            r"runtime executes int16 activations: \['onnxruntime', 'tflite'\]")):
        QuantizationAwareTraining("pt2e", backend, activation_dtype="int16")


def test_uint16_is_onnxruntime_only():
    with pytest.raises(QuantizationConfigError, match=(
            r"backend 'tflite' runs activations as \['int8', 'int16'\], not activation_dtype='uint16'; backends "
            r"whose runtime executes uint16 activations: \['onnxruntime'\]")):
        PostTrainingQuantization("pt2e", "tflite", activation_dtype="uint16")


@pytest.mark.parametrize("mode", ["eager", "fx"])
def test_16_bit_activations_need_pt2e(mode):
    with pytest.raises(QuantizationConfigError, match=(
            rf"activation_dtype='int16' needs mode='pt2e': torch.ao's eager and FX modes quantize activations to "
            rf"quint8/qint8 only \(torch 2.14.1\); got mode='{mode}'")):
        QuantizationAwareTraining(mode, "onnxruntime", activation_dtype="int16")


def test_an_unknown_activation_dtype_names_the_valid_ones():
    with pytest.raises(QuantizationConfigError, match=(
            r"unknown activation dtype 'int4'; valid activation dtypes are: 'int16', 'int8', 'uint16', 'uint8'")):
        QuantizationAwareTraining("pt2e", "onnxruntime", activation_dtype="int4")


def test_litert_int16_activations_are_symmetric():
    qat = QuantizationAwareTraining("pt2e", "tflite", activation_dtype="int16")
    spec = qat.recipe.activation
    assert (spec.dtype, spec.quant_min, spec.quant_max, spec.symmetric) == ("int16", -32767, 32767, True)
    assert qat.activation_scheme == "per_tensor_symmetric"
    with pytest.raises(QuantizationConfigError, match=(
            r"backend 'tflite' runs int16 activations only as \['per_tensor_symmetric'\], got "
            r"activation_scheme='per_tensor_affine' \(LiteRT's 16x8 kernels take int16 activations with zero point 0\)")):
        QuantizationAwareTraining("pt2e", "tflite", activation_dtype="int16", activation_scheme="per_tensor_affine")


def test_dynamic_ptq_refuses_16_bit_activations():
    with pytest.raises(QuantizationConfigError, match=(
            r"activation_dtype='int16' needs static quantization \(dynamic=False\): dynamic PTQ quantizes "
            r"activations at run time with 8-bit int8 kernels")):
        PostTrainingQuantization("pt2e", "onnxruntime", dynamic=True, activation_dtype="int16", export=["pt2"])


def test_the_default_is_the_backends_8_bit_type_and_a_checkpoint_remembers_the_dtype():
    assert QuantizationAwareTraining("pt2e", "onnxruntime").activation_dtype == "uint8"
    assert QuantizationAwareTraining("pt2e", "tflite", activation_dtype="int8").recipe.activation.bits == 8
    state = QuantizationAwareTraining("pt2e", "onnxruntime", activation_dtype="int16").state_dict()
    assert state["activation_dtype"] == "int16"
    with pytest.raises(QuantizationConfigError, match=(
            r"the checkpoint was trained with activation_dtype='int16' but this QuantizationAwareTraining has "
            r"activation_dtype='uint8'; use the same quantization config to resume")):
        QuantizationAwareTraining("pt2e", "onnxruntime").load_state_dict(state)


# -- runs in the runtimes ----------------------------------------------------------------------------


def _activation_zero_point_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the zero points of QuantizeLinear nodes that quantize a computed tensor."""
    initializers = {t.name: t for t in model.graph.initializer}
    return {initializers[n.input[2]].data_type for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in initializers and len(n.input) > 2}


def test_a16w8_qat_runs_in_onnxruntime_as_16_bit_qdq(float_baseline, digits, tmp_path):
    model, qat = qat_from_float_baseline(float_baseline, digits, "pt2e", "onnxruntime", activation_dtype="int16",
                                         export=["onnx"], export_dir=tmp_path)
    # Every activation quantizer trained on the int16 grid (weights stay int8).
    activation_ranges = {(fq.quant_min, fq.quant_max) for _, fq in qat._impl.quantizers(qat.prepared_network)
                         if fq.dtype == torch.int16}
    assert activation_ranges == {(-32768, 32767)}

    path = tmp_path / "net.onnx"
    report = json.loads((tmp_path / "net.onnx.report.json").read_text())
    assert report["activation_dtype"] == "int16" and report["weight_dtype"] == "int8"
    file = onnx.load(str(path))
    assert [o.version for o in file.opset_import if o.domain == ""] == [21]  # 16-bit QuantizeLinear
    assert _activation_zero_point_types(file) == {onnx.TensorProto.INT16}
    # ORT runs the trained model: at most 2 steps of the 16-bit output grid apart from torch.
    assert report["max_abs_diff_in_steps"] <= 2.0 and report["noise_growth_db"] <= 3.0

    val = digits.val_dataloader()
    ort_top1 = predictions(lambda x: onnx_format.run(path, (x,)), val)
    ort_acc = 100.0 * float((ort_top1 == labels(val)).mean())
    print(f"float {float_baseline[1]:.2f}  ORT A16W8 {ort_acc:.2f}")
    assert ort_acc >= float_baseline[1] - 1.5
    assert (predictions(qat.quantized_model, val) == ort_top1).mean() >= 0.99


def test_a16w8_ptq_runs_in_litert_16x8_kernels(float_baseline, digits, tmp_path):
    model = copy.deepcopy(float_baseline[0])
    ptq = PostTrainingQuantization("pt2e", "tflite", activation_dtype="int16", calibration_batches=8,
                                   export=["tflite"], export_dir=tmp_path)
    L.Trainer(**trainer_kwargs(callbacks=[ptq], limit_val_batches=8)).validate(model, digits.train_dataloader(),
                                                                               verbose=False)
    path = tmp_path / "net.tflite"
    report = json.loads((tmp_path / "net.tflite.report.json").read_text())
    assert report["activation_dtype"] == "int16"
    assert report["num_quantized_ops"] == 4 and report["num_float_ops"] == 0  # 2 convs + 2 fully connected

    ops, tensors = tflite_format._ops(path)
    # The first conv (one input channel) becomes a DEPTHWISE_CONV_2D, whose 16x8 kernel takes only int64 biases.
    weighted = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert len(weighted) == 4
    for op in weighted:  # LiteRT's 16x8 kernels: int16 in, int8 weights, int64 bias
        activation, weight, bias = (tensors[i] for i in op["inputs"][:3])
        assert (activation["dtype"], weight["dtype"], bias["dtype"]) == (np.int16, np.int8, np.int64)
        assert activation["quantization"][1] == 0  # zero point 0

    val = digits.val_dataloader()
    litert_top1 = predictions(lambda x: tflite_format.run(path, (x,)), val)
    litert_acc = 100.0 * float((litert_top1 == labels(val)).mean())
    print(f"float {float_baseline[1]:.2f}  LiteRT 16x8 {litert_acc:.2f}")
    # Static PTQ's bound (SPEC: within 1.5 points of float).
    assert litert_acc >= float_baseline[1] - 1.5


def test_a16w8_split_cat_add_and_clamps_export_to_onnxruntime_and_verify(digits, tmp_path):
    """conv-bn-relu, split, cat, residual add, relu6 and clamp (merged into the 16-bit qparams)."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(PassNet(), lr=1e-3)
    ptq = PostTrainingQuantization("pt2e", "onnxruntime", activation_dtype="int16", calibration_batches=4,
                                   export=["onnx"], export_dir=tmp_path)
    L.Trainer(**trainer_kwargs(callbacks=[ptq], limit_val_batches=4)).validate(model, digits.train_dataloader(),
                                                                               verbose=False)
    report = ptq.exported["onnx"]
    assert report["activation_dtype"] == "int16" and report["noise_growth_db"] <= 3.0
    assert report["max_abs_diff_in_steps"] is None or report["max_abs_diff_in_steps"] <= 2.0
    assert report["num_quantized_ops"] >= 5  # conv, left, right, mix, fc (+ the add)


def test_litert_16x8_refuses_a_padded_max_pool_at_setup():
    """resnet's stem pool: the converter pads it with tfl.padv2, which takes no int16 (found on the zoo's resnet18)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, padding=1),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    model = ImageClassifier(net)
    qat = QuantizationAwareTraining("pt2e", "tflite", activation_dtype="int16", module="net")
    with pytest.raises(QuantizationConfigError, match=r"cannot convert this network: a padded max-pool \(tfl.padv2\): 1 "
                                                      r"\(max_pool2d\)\. LiteRT's converter"):
        L.Trainer(**trainer_kwargs(callbacks=[qat])).fit(model, torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4))
    assert qat.prepared_network is None


def test_litert_16x8_refuses_a_concatenation_before_any_data_is_seen(digits):
    model = ImageClassifier(PassNet(), lr=1e-3)
    ptq = PostTrainingQuantization("pt2e", "tflite", activation_dtype="int16", export=["tflite"])
    with pytest.raises(QuantizationConfigError, match=(
            r"backend 'tflite' with activation_dtype='int16' cannot convert this network: torch.cat "
            r"\(tfl.concatenation\): 1 \(cat\). LiteRT's converter \(litert-converter 0.5.0\) has no int16 form of "
            r"these ops; use activation_dtype='int8' for LiteRT, or backend 'onnxruntime' for A16W8")):
        L.Trainer(**trainer_kwargs(callbacks=[ptq])).validate(model, digits.train_dataloader(), verbose=False)
    assert ptq.calibrated_batches == 0


def test_the_job_summary_names_what_the_quantized_rows_hold():
    from qlightning.jobs import format_summary

    summary = {"method": "qat", "mode": "pt2e", "backend": "tflite", "observer": "moving_average_minmax",
               "activation_dtype": "int16", "float_acc": 98.0, "fake_quant_acc": 97.9, "int8_acc": 97.9,
               "onnx_int8_acc": 97.9, "top1_agreement": 1.0, "val_samples": 360}
    text = format_summary(summary)
    assert "int16 activations" in text.splitlines()[0]
    assert [line.split()[0] for line in text.splitlines()[3:6]] == ["float", "fake-quant", "A16W8"]
    assert "A16W8 ONNX" in text and "int8" not in text
    assert "A16W8" not in format_summary(summary | {"activation_dtype": "int8"})
