"""After a short QAT on the digits split, int8 accuracy stays within 1.5 points of float."""

import copy

import lightning as L
import pytest

from qlightning import QuantizationAwareTraining, quantized_engine
from qlightning.models import accuracy
from tests.conftest import trainer_kwargs


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_int8_accuracy_within_1_5_points_of_float(mode, float_baseline, digits):
    float_model, float_acc = float_baseline
    assert float_acc > 95.0  # the baseline itself must be a real classifier
    model = copy.deepcopy(float_model)
    model.hparams.lr = 1e-3
    qat = QuantizationAwareTraining(mode, "x86", freeze_bn_epoch=1, freeze_observers_epoch=2)
    L.seed_everything(0, verbose=False)
    L.Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=None, limit_val_batches=0, callbacks=[qat])).fit(
        model, digits
    )
    with quantized_engine(qat.backend.engine):
        int8_acc = accuracy(qat.quantized_model, digits.val_dataloader())
    print(f"{mode}: float {float_acc:.2f}  int8 {int8_acc:.2f}")
    assert int8_acc >= float_acc - 1.5
