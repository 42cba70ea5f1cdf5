"""After a short QAT on the digits split, int8 accuracy stays within 1.5 points of float."""

import pytest
import torch

from qlightning.models import accuracy
from tests.conftest import qat_from_float_baseline


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_int8_accuracy_within_1_5_points_of_float(mode, float_baseline, digits):
    float_acc = float_baseline[1]
    assert float_acc > 95.0  # the baseline itself must be a real classifier
    _, qat = qat_from_float_baseline(float_baseline, digits, mode, "x86")
    int8_acc = accuracy(qat.quantized_model, digits.val_dataloader())
    print(f"{mode}: float {float_acc:.2f}  int8 {int8_acc:.2f}")
    assert int8_acc >= float_acc - 1.5

    # The int8 model is the trained model: built from the qparams each fake-quantizer applied (not its
    # observer's estimate), it rounds like the fake-quantized network up to the kernels' requantization,
    # at most one output step apart, and predicts the same class for every validation image.
    finalized = qat.finalized_network.eval()
    with torch.no_grad():
        x = torch.cat([x for x, _ in digits.val_dataloader()])
        fake_quant, int8 = finalized(x), qat.quantized_model(x)
    assert torch.equal(fake_quant.argmax(1), int8.argmax(1))
    if mode != "pt2e":  # the int8 classifier layer's output scale is one step of the logits' grid
        last = qat.quantized_model.net.fc2 if mode == "eager" else qat.quantized_model.fc2
        assert float((fake_quant - int8).abs().max()) <= float(last.scale) * 1.001
