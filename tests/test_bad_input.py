"""Bad input fails early, says what was wrong and what is allowed, and spends no training step."""

import math
import lightning as L
import pytest
import torch
from torch import nn

from qlightning import QuantizationAwareTraining, QuantizationConfigError, UntraceableModelError
from qlightning.models import ImageClassifier, SmallCNN
from tests.conftest import trainer_kwargs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="jit"), r"unknown mode 'jit'; valid modes are: 'eager', 'fx', 'pt2e'"),
        (dict(backend="tpu"), r"unknown backend 'tpu'; valid backends are: 'fbgemm', 'onnxruntime', 'openvino', 'qnnpack', 'tflite', 'x86'"),
        (
            dict(observer="kl"),
            r"unknown observer 'kl'; valid observers are: 'entropy', 'histogram', 'lsq', 'minmax', 'moving_average_minmax', 'mse', 'percentile'",
        ),
        (dict(freeze_bn_epoch=-1), r"freeze_bn_epoch must be None or an epoch number >= 0, got -1"),
        (dict(freeze_observers_epoch=1.5), r"freeze_observers_epoch must be None or an epoch number >= 0, got 1.5"),
        (dict(weight_scheme="per_row"), r"unknown weight scheme 'per_row'; valid weight schemes are: "),
        (
            dict(activation_scheme="per_channel_affine"),
            r"unknown activation scheme 'per_channel_affine'; valid activation schemes are: "
            r"'per_tensor_affine', 'per_tensor_symmetric'",
        ),
        (dict(mode="fx", modules_to_fuse=[["conv1", "bn1"]]), r"modules_to_fuse applies to mode='eager' only"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=message):
        QuantizationAwareTraining(**kwargs)


class _CountingClassifier(ImageClassifier):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


class DataDependent(nn.Module):
    """Python control flow on tensor values: FX symbolic tracing and torch.export both refuse it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class ResidualAdd(nn.Module):
    """``x + y`` on quantized tensors has no eager int8 kernel (needs FloatFunctional)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc((self.conv(x) + x).flatten(1))


@pytest.mark.parametrize(
    "mode,net,message",
    [
        ("fx", DataDependent, r"mode='fx' could not capture DataDependent: the failing op is `.*if x.sum\(\) > 0.*"
         r"try mode='pt2e'"),
        ("pt2e", DataDependent, r"mode='pt2e' could not capture DataDependent: the failing op is `.*if x.sum\(\) > 0.*"
         r"try mode='fx'"),
        ("eager", ResidualAdd, r"mode='eager' could not capture ResidualAdd: the failing op is `.*self.conv\(x\) \+ x.*"
         r"try mode='fx' or mode='pt2e'"),
    ],
)
def test_untraceable_network_fails_in_setup_before_any_training_step(mode, net, message, digits):
    _CountingClassifier.steps = 0
    model = _CountingClassifier(net())
    trainer = L.Trainer(**trainer_kwargs(callbacks=[QuantizationAwareTraining(mode, "x86")]))
    with pytest.raises(UntraceableModelError, match=message):
        trainer.fit(model, digits)
    assert _CountingClassifier.steps == 0 and trainer.global_step == 0


def test_missing_example_inputs(digits):
    model = ImageClassifier(SmallCNN())
    model.example_input_array = None
    trainer = L.Trainer(**trainer_kwargs(callbacks=[QuantizationAwareTraining("fx")]))
    with pytest.raises(QuantizationConfigError, match=r"needs example inputs.*example_input_array.*example_inputs="):
        trainer.fit(model, digits)


class TwoNets(ImageClassifier):
    def __init__(self):
        super().__init__(SmallCNN())
        self.teacher = SmallCNN()

    def forward(self, x):
        return self.net(x) + self.teacher(x)


class UnusedTeacher(TwoNets):
    def forward(self, x):
        return self.net(x)


def test_network_must_be_named_when_ambiguous(digits):
    trainer = L.Trainer(**trainer_kwargs(callbacks=[QuantizationAwareTraining("fx")]))
    with pytest.raises(QuantizationConfigError, match=r"several child networks \['net', 'teacher'\].*module=<name>"):
        trainer.fit(TwoNets(), digits)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[QuantizationAwareTraining("fx", module="student")]))
    with pytest.raises(QuantizationConfigError, match=r"module='student' is not a submodule of TwoNets; its networks are"):
        trainer.fit(TwoNets(), digits)


def test_named_network_is_the_one_quantized(digits):
    model = TwoNets()
    qat = QuantizationAwareTraining("fx", module="teacher")
    L.Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=1, callbacks=[qat])).fit(model, digits)
    assert model.teacher is qat.prepared_network and isinstance(model.net, SmallCNN)


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_quantizing_a_network_that_never_ran_names_the_silent_quantizers(mode, digits):
    qat = QuantizationAwareTraining(mode, module="teacher")
    with pytest.raises(QuantizationConfigError, match=r"quantizers saw no data before conversion \(.*\): the network "
                                                      r"never ran during training or calibration. Check that `module=`"):
        L.Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=1, callbacks=[qat])).fit(UnusedTeacher(), digits)


def test_eager_fusion_found_automatically_and_overridable():
    from qlightning.modes.eager import find_modules_to_fuse

    assert find_modules_to_fuse(SmallCNN()) == [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["fc1", "relu3"]]
    # Untraceable networks fall back to nn.Sequential order.
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2), nn.ReLU())
    assert find_modules_to_fuse(seq) == [["0", "1", "2"], ["4", "5"]]

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = seq

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else self.body(-x)

    assert find_modules_to_fuse(Untraceable()) == [["body.0", "body.1", "body.2"], ["body.4", "body.5"]]
    from qlightning.backends import get_backend
    from qlightning.modes.eager import EagerMode

    qat = QuantizationAwareTraining("eager", modules_to_fuse=[["conv1", "bn1"]])
    prepared = EagerMode().prepare_qat(SmallCNN(), (torch.rand(2, 1, 8, 8),), qat.recipe, get_backend("x86"),
                                       modules_to_fuse=[["conv1", "bn1"]])
    assert type(prepared.net.conv1).__name__ == "ConvBn2d" and type(prepared.net.conv2).__name__ == "Conv2d"


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
@pytest.mark.parametrize("poison", [3e38, math.nan], ids=["overflow", "nan"])
def test_quantizers_that_saw_nan_or_overflowing_values_are_named_before_conversion(mode, poison):
    from qlightning.callbacks.config import build_recipe
    from qlightning.modes.registry import get_mode

    backend, recipe = build_recipe(mode, "x86", "minmax", "per_channel_symmetric", "per_tensor_affine")
    impl = get_mode(mode)
    example = (torch.rand(2, 1, 8, 8),)
    prepared = impl.prepare_ptq(SmallCNN(), example, recipe, backend)
    with torch.no_grad():
        prepared(torch.rand(4, 1, 8, 8))
        prepared(torch.full((4, 1, 8, 8), poison))  # 3e38: max - min overflows; the convs give NaN
        prepared(torch.full((4, 1, 8, 8), -poison))
    with pytest.raises(QuantizationConfigError, match=r"quantizers observed NaN/inf values or a range too wide for "
                                                      r"float32 \(.*\): their scale would be NaN or inf"):
        impl.finalize(prepared, example)


def test_an_unsupported_mode_backend_pair_is_refused_at_construction():
    """TFLite's int8 activations have no PyTorch eager kernels: eager x tflite is refused by name, with the
    modes the backend supports, before any training."""
    from qlightning import PostTrainingQuantization

    with pytest.raises(QuantizationConfigError, match=r"backend 'tflite' does not support mode 'eager'; it supports "
                                                      r"\['fx', 'pt2e'\]"):
        QuantizationAwareTraining("eager", "tflite")
    with pytest.raises(QuantizationConfigError, match=r"backend 'tflite' does not support mode 'eager'"):
        PostTrainingQuantization("eager", "tflite")
    QuantizationAwareTraining("fx", "tflite"), QuantizationAwareTraining("pt2e", "tflite")  # supported pairs


def test_an_export_format_whose_extra_is_missing_fails_before_training(monkeypatch, tmp_path):
    """A format whose converter/runtime is an optional extra names the extra to install, at callback
    construction (no training spent) and in ``export()``. A stand-in format exercises the mechanism on
    every route; tests/test_tflite.py and tests/test_openvino.py check the real formats' messages."""
    from qlightning import PostTrainingQuantization, export
    from qlightning.exporters import registry

    stand_in = registry.ExportFormat("stand_in", ".bin", "qlightning.exporters.onnx_format", "nothing",
                                     extra="tflite", required_modules=("qlightning_not_installed_runtime",))
    monkeypatch.setitem(registry._FORMATS._entries, "stand_in", stand_in)
    message = (r"format='stand_in' needs qlightning_not_installed_runtime, which is not installed: "
               r"pip install 'qlightning\[tflite\]'")
    with pytest.raises(ImportError, match=message):
        QuantizationAwareTraining("pt2e", export=["onnx", "stand_in"])
    with pytest.raises(ImportError, match=message):
        PostTrainingQuantization("pt2e", export=["stand_in"])
    with pytest.raises(ImportError, match=message):
        export(SmallCNN(), (torch.rand(2, 1, 8, 8),), "stand_in", tmp_path / "net.bin")
    assert list(tmp_path.iterdir()) == []
