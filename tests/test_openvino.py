"""OpenVINO: the `openvino` backend (the guide's FX BackendConfig on today's API; PT2E through the
ONNX QDQ layout) and `format="openvino"` (IR .xml + .bin, verified in the OpenVINO runtime on CPU)."""

import json

import pytest

from qlightning import ExportVerificationError, QuantizationAwareTraining, export
from qlightning.exporters import openvino_format
from tests.conftest import labels, predictions, qat_from_float_baseline
from tests.test_passes import SmallCNN, _inputs, _trained


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_qat_digits_cnn_runs_in_openvino_within_2_points_of_float(mode, float_baseline, digits, tmp_path):
    model, qat = qat_from_float_baseline(float_baseline, digits, mode, "openvino", export=["openvino"],
                                         export_dir=tmp_path)
    xml, weights = tmp_path / "net.xml", tmp_path / "net.bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.json", "net.bin", "net.xml", "net.xml.report.json"]
    report = json.loads((tmp_path / "net.xml.report.json").read_text())
    assert report["runtime"] == "openvino" and report["files"] == ["net.xml", "net.bin"]
    assert report["num_quantized_ops"] == 4 and report["num_float_ops"] == 0  # 2 convs + 2 linears in u8/i8
    assert report["top1_agreement"] >= 0.99
    assert report["size_bytes"] == xml.stat().st_size + weights.stat().st_size < report["float_size_bytes"]

    val = digits.val_dataloader()
    openvino_top1 = predictions(lambda x: openvino_format.run(xml, (x,)), val)
    openvino_acc = 100.0 * float((openvino_top1 == labels(val)).mean())
    print(f"{mode}: float {float_baseline[1]:.2f}  OpenVINO int8 {openvino_acc:.2f}")
    assert openvino_acc >= float_baseline[1] - 2.0
    # Against the torch fake-quantized model on the whole validation set, not just the report's batches.
    model.eval()
    assert (predictions(model, val) == openvino_top1).mean() >= 0.99


def test_an_openvino_export_that_fails_verification_writes_neither_file(tmp_path):
    _, _, prepared = _trained("pt2e", SmallCNN(), ptq=True, backend="openvino")
    with pytest.raises(ExportVerificationError, match=r"openvino does not run the trained model"):
        export(prepared, _inputs(4), "openvino", tmp_path / "net.xml", max_noise_growth_db=-100.0)
    assert list(tmp_path.iterdir()) == []


def test_openvino_export_without_its_extra_names_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"format='openvino' needs openvino, which is not installed: "
                                          r"pip install 'qlightning\[openvino\]'"):
        QuantizationAwareTraining("pt2e", "openvino", export=["openvino"])
