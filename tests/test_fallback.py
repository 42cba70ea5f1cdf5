"""Accuracy-aware fallback (max_accuracy_drop / monitor): layers move to float, most harmful first,
until the int8 model's validated metric is within budget."""

import lightning as L
import pytest
import torch

from qlightning import PostTrainingQuantization, QuantizationConfigError
from qlightning.models import ImageClassifier, SmallCNN, accuracy
from tests.conftest import trainer_kwargs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(monitor="val/acc"), r"monitor='val/acc' is read by the accuracy-aware fallback only: set max_accuracy_drop"),
        (dict(max_accuracy_drop=0.01), r"max_accuracy_drop needs monitor=<name of a metric"),
        (dict(max_accuracy_drop=-0.1, monitor="val/acc"), r"max_accuracy_drop must be a number >= 0 .*got -0.1"),
        (dict(max_accuracy_drop=True, monitor="val/acc"), r"max_accuracy_drop must be a number >= 0"),
        (dict(max_accuracy_drop=0.01, monitor="val/acc", max_float_layers=0), r"max_float_layers must be an integer >= 1, got 0"),
    ],
)
def test_fallback_options_are_checked_at_construction(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=message):
        PostTrainingQuantization("pt2e", "x86", **kwargs)


class _NoValidationStep(ImageClassifier):
    validation_step = L.LightningModule.validation_step


def test_fallback_without_validation_step_or_loader_or_metric_fails_before_training(digits):
    callback = PostTrainingQuantization("pt2e", "x86", max_accuracy_drop=0.01, monitor="val/acc")
    with pytest.raises(QuantizationConfigError, match=r"validates the int8 model with _NoValidationStep.validation_step"):
        L.Trainer(**trainer_kwargs(callbacks=[callback])).fit(_NoValidationStep(SmallCNN()), digits)
    model = ImageClassifier(SmallCNN())
    with pytest.raises(QuantizationConfigError, match=r"this fit has none: pass val_dataloaders"):
        L.Trainer(**trainer_kwargs(callbacks=[callback])).fit(model, train_dataloaders=digits.train_dataloader())
    typo = PostTrainingQuantization("pt2e", "x86", max_accuracy_drop=0.01, monitor="val_acc")
    trainer = L.Trainer(**trainer_kwargs(callbacks=[typo]))
    # The sanity check's validation reveals the typo, before the first training step.
    with pytest.raises(QuantizationConfigError, match=r"monitor='val_acc' is not logged in validation_step; logged metrics: \['val/acc', 'val/loss'\]"):
        trainer.fit(model, digits)
    assert trainer.global_step == 0


@pytest.fixture(scope="module")
def trained(digits):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    L.Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=None)).fit(model, digits)
    return model


def test_fallback_moves_the_worst_layers_to_float_until_within_budget(trained, digits):
    model = trained
    # Calibrated on images at a third of their contrast, the activation ranges clip real images: the
    # int8 model falls well below float, and the search moves layers, each the one the current model's
    # report ranks worst, until the drop is within 2 points or two layers are float.
    callback = PostTrainingQuantization("pt2e", "x86", "minmax", calibration_batches=4,
                                        batch_to_inputs=lambda batch: (batch[0] / 3,),
                                        max_accuracy_drop=0.02, monitor="val/acc", max_float_layers=2)
    L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=1.0)).validate(model, digits, verbose=False)
    result = callback.fallback
    float_acc = accuracy(model, digits.val_dataloader()) / 100
    assert result.float_metric == pytest.approx(float_acc, abs=1e-6)
    steps = result.steps
    assert steps[0].float_layers == () and steps[0].added is None
    assert all(s.added in s.float_layers for s in steps[1:])
    # Each step keeps the previous float layers and adds one group.
    assert all(set(a.float_layers) < set(b.float_layers) for a, b in zip(steps, steps[1:]))
    assert float_acc - steps[0].metric > 0.02, "the clipped calibration must cost accuracy"
    assert len(steps) >= 2 and (len(steps) == 1 + 2 or result.within_budget)
    assert steps[-1].metric > steps[0].metric, "falling back must win accuracy back"
    assert callback.skipped_layers == steps[-1].float_layers
    # What the search measured is what the kept int8 model scores on the validation set.
    assert steps[-1].metric == pytest.approx(accuracy(callback.quantized_model, digits.val_dataloader()) / 100, abs=1e-6)


def test_fallback_within_budget_at_once_keeps_every_layer_quantized(trained, digits):
    callback = PostTrainingQuantization("pt2e", "x86", "histogram", calibration_batches=4,
                                        max_accuracy_drop=0.05, monitor="val/acc")
    L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=1.0)).validate(trained, digits, verbose=False)
    assert len(callback.fallback.steps) == 1 and callback.fallback.within_budget
    assert callback.skipped_layers == ()
