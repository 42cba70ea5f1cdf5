"""OpenVINO: the `openvino` backend (the guide's FX BackendConfig on today's API; PT2E through the
ONNX QDQ layout) and `format="openvino"` (IR .xml + .bin, verified in the OpenVINO runtime on CPU)."""

import copy
import json

import lightning as L
import numpy as np
import pytest
import torch

from qlightning import ExportVerificationError, QuantizationAwareTraining, export
from qlightning.exporters import openvino_format
from tests.conftest import trainer_kwargs
from tests.test_passes import SmallCNN, _inputs, _trained


def _openvino_accuracy(path, dataloader) -> float:
    correct = total = 0
    for x, y in dataloader:
        correct += int((openvino_format.run(path, (x,)).argmax(1) == y.numpy()).sum())
        total += y.numel()
    return 100.0 * correct / total


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_qat_digits_cnn_runs_in_openvino_within_2_points_of_float(mode, float_baseline, digits, tmp_path):
    float_model, float_acc = float_baseline
    model = copy.deepcopy(float_model)
    model.hparams.lr = 1e-3
    qat = QuantizationAwareTraining(mode, "openvino", freeze_bn_epoch=1, freeze_observers_epoch=2,
                                    export=["openvino"], export_dir=tmp_path)
    L.seed_everything(0, verbose=False)
    L.Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=None, limit_val_batches=0, callbacks=[qat])).fit(
        model, digits
    )
    xml, weights = tmp_path / "net.xml", tmp_path / "net.bin"
    assert xml.is_file() and weights.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.bin", "net.xml", "net.xml.report.json"]
    report = json.loads((tmp_path / "net.xml.report.json").read_text())
    assert report["runtime"] == "openvino" and report["files"] == ["net.xml", "net.bin"]
    assert report["num_quantized_ops"] == 4 and report["num_float_ops"] == 0  # 2 convs + 2 linears in u8/i8
    assert report["top1_agreement"] >= 0.99
    assert report["size_bytes"] == xml.stat().st_size + weights.stat().st_size < report["float_size_bytes"]

    openvino_acc = _openvino_accuracy(xml, digits.val_dataloader())
    print(f"{mode}: float {float_acc:.2f}  OpenVINO int8 {openvino_acc:.2f}")
    assert openvino_acc >= float_acc - 2.0
    # Against the torch fake-quantized model on the whole validation set, not just the report's batches.
    with torch.no_grad():
        model.eval()
        torch_top1 = np.concatenate([model(x).argmax(1).numpy() for x, _ in digits.val_dataloader()])
    ov_top1 = np.concatenate([openvino_format.run(xml, (x,)).argmax(1) for x, _ in digits.val_dataloader()])
    assert (torch_top1 == ov_top1).mean() >= 0.99


def test_an_openvino_export_that_fails_verification_writes_neither_file(tmp_path):
    _, _, prepared = _trained("pt2e", SmallCNN(), ptq=True, backend="openvino")
    with pytest.raises(ExportVerificationError, match=r"openvino disagrees with the torch model beyond tolerance"):
        export(prepared, _inputs(4), "openvino", tmp_path / "net.xml", min_sqnr_db=1000.0)
    assert list(tmp_path.iterdir()) == []


def test_openvino_export_without_its_extra_names_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"format='openvino' needs openvino, which is not installed: "
                                          r"pip install 'qlightning\[openvino\]'"):
        QuantizationAwareTraining("pt2e", "openvino", export=["openvino"])
