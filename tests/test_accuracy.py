"""After a short QAT on the digits split, int8 accuracy stays within 1.5 points of float."""

import pytest

from qlightning import quantized_engine
from qlightning.models import accuracy
from tests.conftest import qat_from_float_baseline


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_int8_accuracy_within_1_5_points_of_float(mode, float_baseline, digits):
    float_acc = float_baseline[1]
    assert float_acc > 95.0  # the baseline itself must be a real classifier
    _, qat = qat_from_float_baseline(float_baseline, digits, mode, "x86")
    with quantized_engine(qat.backend.engine):
        int8_acc = accuracy(qat.quantized_model, digits.val_dataloader())
    print(f"{mode}: float {float_acc:.2f}  int8 {int8_acc:.2f}")
    assert int8_acc >= float_acc - 1.5
