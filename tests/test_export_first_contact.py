"""First contact with ``qlightning.export``: what a user exports right after ``trainer.fit``.

- Item 7: ``export(callback.finalized_network, ...)`` of a PT2E run was refused as "nothing was
  quantized": finalize leaves qlightning's own ``ExactQParamsObserver`` s, which the exporter did not
  count as quantizers. Finalized and prepared networks of every mode must export and verify.
- Item 8: ``backend="fbgemm"`` (uint8 activations in [0, 127], ``reduce_range``) exported to ONNX as
  [0, 255]: ONNX Runtime disagreed with the fake-quantized model far beyond one step.

The Trainers keep Lightning's defaults (``trainer_kwargs``: sanity check, summary and progress bar on;
logger and checkpoints off, as nothing here reads them).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qlightning import QuantizationAwareTraining, export
from qlightning.data import DigitsDataModule
from qlightning.exporters import onnx_format
from qlightning.models import ImageClassifier, SmallCNN
from qlightning.passes.exact_qparams import ExactQParamsObserver
from qlightning.passes.graph import quantizer_node
from tests.conftest import trainer_kwargs
from tests.test_export import _integer_kernels

MODES = ["eager", "fx", "pt2e"]


def _fit(network: nn.Module, mode: str, backend: str, **overrides):
    """QAT with the callback's defaults (observer moving_average_minmax); returns the LightningModule,
    the callback and a few validation batches to check exports on."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(network)
    qat = QuantizationAwareTraining(mode=mode, backend=backend)
    dm = DigitsDataModule(batch_size=32)
    L.Trainer(**trainer_kwargs(callbacks=[qat], **overrides)).fit(model, dm)
    checks = [x for x, _ in list(dm.val_dataloader())[:4]]
    return model, qat, checks


def _assert_verified(report: dict, what: str) -> None:
    assert report["num_quantized_ops"] >= 4, (what, report)  # 2 convs + 2 linears at least
    assert report["sqnr_db"] == "inf" or report["sqnr_db"] >= 35, (what, report)
    assert report["top1_agreement"] >= 0.99, (what, report)
    if report["max_abs_diff_in_steps"] is not None:  # output quantized: ORT is off by rounding flips only
        assert report["max_abs_diff_in_steps"] <= 2.0 and report["within_2_steps_fraction"] == 1.0, (what, report)


class _MLP(nn.Module):
    """Linear-relu-linear: no op shares a quantizer with another, so every quantizer of the finalized
    PT2E network is an ExactQParamsObserver (SmallCNN's max-pools share theirs)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


def test_finalized_and_prepared_networks_of_every_mode_export_to_onnx(tmp_path):
    failures = {}
    for mode in MODES:
        model, qat, checks = _fit(SmallCNN(), mode, "x86")
        x = model.example_input_array
        for name, network in (("finalized", qat.finalized_network), ("prepared", model.net)):
            path = tmp_path / f"{mode}_{name}.onnx"
            try:
                report = export(network, x, "onnx", path, check_inputs=checks, backend="x86")
            except Exception as exc:  # noqa: BLE001 - collect every mode's outcome before failing
                failures[f"{mode} {name}"] = f"{type(exc).__name__}: {exc}"
                continue
            _assert_verified(report, f"{mode} {name}")
            assert report["mode"] == mode and report["check_samples"] == 2 + sum(len(c) for c in checks)
            assert "QLinearConv" in _integer_kernels(path, tmp_path), (mode, name)
    assert not failures, failures

    # A finalized PT2E network made only of ExactQParamsObservers (nothing else marks it as quantized).
    model, qat, checks = _fit(_MLP(), "pt2e", "x86")
    gm = qat.finalized_network.graph_module
    called = [gm.get_submodule(n.target) for n in gm.graph.nodes if quantizer_node(gm, n)]
    assert called and all(isinstance(m, ExactQParamsObserver) for m in called)
    report = export(qat.finalized_network, model.example_input_array, "onnx", tmp_path / "mlp.onnx",
                    check_inputs=checks, backend="x86")
    assert report["num_quantized_ops"] >= 2 and (report["sqnr_db"] == "inf" or report["sqnr_db"] >= 35)
    assert report["top1_agreement"] >= 0.99


def _last_dequantize(path) -> tuple[float, int, int]:
    """(scale, zero point, dtype max) of the DequantizeLinear producing the model's output, if any."""
    model = onnx.load(str(path))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    last = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    assert last.op_type == "DequantizeLinear", last.op_type
    zero_point = constants[last.input[2]]
    return float(constants[last.input[1]]), int(zero_point), int(np.iinfo(zero_point.dtype).max)


@pytest.mark.parametrize("mode", MODES)
def test_fbgemm_reduced_range_models_export_to_onnx_that_computes_the_fake_quantized_model(mode, tmp_path):
    # Three full epochs: the logits outgrow their 7-bit quantizer's range, where [0, 127] and [0, 255]
    # part ways (19-21 dB before the fix, on the validation digits).
    model, qat, checks = _fit(SmallCNN(), mode, "fbgemm", max_epochs=3, limit_train_batches=None)
    path = tmp_path / "net.onnx"
    report = export(qat.finalized_network, model.example_input_array, "onnx", path, check_inputs=checks,
                    backend="fbgemm")
    _assert_verified(report, mode)
    assert report["check_samples"] == 2 + sum(len(c) for c in checks)
    # The clamp to 127 keeps ORT's integer kernels: QDQ groups still fuse around it.
    assert {"QLinearConv", "QGemm"} <= _integer_kernels(path, tmp_path)
    if mode in ("eager", "fx"):  # the logits are quantized: the file's outputs stay on the 7-bit grid
        scale, zero_point, dtype_max = _last_dequantize(path)
        assert dtype_max == 255
        logits = onnx_format.run(path, (torch.cat(checks),))
        assert logits.max() <= (127 - zero_point) * scale * (1 + 1e-6)
        assert logits.min() >= (0 - zero_point) * scale * (1 + 1e-6)
