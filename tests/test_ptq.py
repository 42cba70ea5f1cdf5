"""Post-training quantization: static (calibrated) and dynamic, in every mode, through a real Trainer."""

import collections
import copy
import operator
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from qlightning import PostTrainingQuantization, QuantizationConfigError, UntraceableModelError, quantized_engine
from qlightning.models import ImageClassifier, RowLSTM, SmallCNN, accuracy
from tests.conftest import trainer_kwargs
from tests.test_bad_input import DataDependent

MODES = ["eager", "fx", "pt2e"]
aten = torch.ops.aten


def _train(net, digits, epochs, lr):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(net, lr=lr)
    L.Trainer(**trainer_kwargs(max_epochs=epochs, limit_train_batches=None)).fit(model, digits)
    return model


@pytest.fixture(scope="module")
def trained_cnn(digits):
    model = _train(SmallCNN(), digits, epochs=4, lr=3e-3)
    return model, accuracy(model, digits.val_dataloader())


@pytest.fixture(scope="module")
def trained_lstm(digits):
    model = _train(RowLSTM(), digits, epochs=8, lr=1e-2)
    return model, accuracy(model, digits.val_dataloader())


def _validate(callback, model, dataloader):
    """The 'quantize a trained model without training' route: calibrate on validate's batches."""
    L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=1.0)).validate(
        model, dataloaders=dataloader, verbose=False
    )


def _int8_accuracy(callback, digits):
    with quantized_engine(callback.backend.engine):
        return accuracy(callback.quantized_model, digits.val_dataloader())


def _int8_weights_in_graph(gm: torch.fx.GraphModule, targets) -> list[torch.dtype]:
    """dtype of the stored tensor behind every 2-D weight input of the given ops in a PT2E graph."""
    dtypes = []
    for node in gm.graph.nodes:
        if node.target not in targets:
            continue
        weights = node.args[2] if node.target in (aten.lstm.input, aten.gru.input) else node.args[1]
        for w in weights if isinstance(weights, (list, tuple)) else [weights]:
            stored = w.args[0] if w.op == "call_function" and "dequantize" in str(w.target) else w
            tensor = operator.attrgetter(stored.target)(gm) if stored.op == "get_attr" else None
            if tensor is not None and tensor.dim() >= 2:
                dtypes.append(tensor.dtype)
    return dtypes


# -- static ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
@pytest.mark.parametrize("mode", MODES)
def test_static_ptq_of_a_trained_model_is_within_1_5_points_of_float(mode, observer, trained_cnn, digits):
    model, float_acc = trained_cnn
    callback = PostTrainingQuantization(mode, "x86", observer, calibration_batches=8)
    # Calibrate on training data through validate(): no training step, nothing learned from val.
    _validate(callback, model, digits.train_dataloader())
    assert callback.calibrated_batches == 8
    int8_acc = _int8_accuracy(callback, digits)
    assert int8_acc >= float_acc - 1.5, (mode, observer, float_acc, int8_acc)
    # The LightningModule keeps its float network.
    assert not any("observer" in type(m).__name__.lower() for m in model.net.modules())

    x = next(iter(digits.val_dataloader()))[0]
    with torch.no_grad(), quantized_engine("x86"):
        reference, int8 = model.net.eval()(x), callback.quantized_model(x)
    cosine = nn.functional.cosine_similarity(reference.flatten(), int8.flatten(), dim=0)
    assert cosine > 0.99


def test_static_ptq_converts_to_real_int8_weights(trained_cnn, digits):
    model, _ = trained_cnn
    for mode in MODES:
        callback = PostTrainingQuantization(mode, "x86", "minmax", calibration_batches=2)
        _validate(callback, model, digits.train_dataloader())
        int8 = callback.quantized_model
        if mode == "pt2e":
            dtypes = _int8_weights_in_graph(int8.graph_module, {aten.conv2d.default, aten.linear.default})
            assert dtypes == [torch.int8] * 4, dtypes
        else:
            weights = [m.weight() for m in int8.modules() if type(m).__name__ in ("Conv2d", "ConvReLU2d",
                                                                                    "Linear", "LinearReLU")
                       and callable(getattr(m, "weight", None))]
            assert len(weights) == 4 and all(w.dtype == torch.qint8 for w in weights), mode
            # BatchNorm was folded into the convolutions before conversion.
            assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.modules())


@pytest.mark.parametrize("mode", MODES)
def test_static_ptq_at_fit_end_calibrates_on_the_train_loader(mode, digits):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    network = model.net
    callback = PostTrainingQuantization(mode, "x86", "minmax", calibration_batches=3)
    L.Trainer(**trainer_kwargs(callbacks=[callback], max_epochs=2, limit_train_batches=6)).fit(model, digits)
    assert callback.calibrated_batches == 3
    assert model.net is network  # trainable float network untouched; fit can go on
    x = next(iter(digits.val_dataloader()))[0]
    with torch.no_grad(), quantized_engine("x86"):
        agreement = (model.net.eval()(x).argmax(1) == callback.quantized_model(x).argmax(1)).float().mean()
    assert agreement >= 0.95


class _CountingPTQ(PostTrainingQuantization):
    """Counts the forward calls of every observer the mode inserted, keeping the observed network."""

    def _prepare(self, network):
        observed = super()._prepare(network)
        self.observed, self.observer_calls, self.counting = observed, collections.Counter(), True
        for name, obs in self._impl.observers(observed):
            obs.register_forward_pre_hook(lambda m, args, name=name: self._count(name))
        return observed

    def _count(self, name) -> None:  # a pre-hook returning a value would replace the observer's input
        if self.counting:
            self.observer_calls.update([name])

    def _convert(self):
        # Calibration ends here; the fit-end passes verify themselves on deep copies, whose observers
        # carry these hooks along: those forwards are not calibration.
        self.counting = False
        super()._convert()

    def calls_per_forward(self, x) -> collections.Counter:
        # An observer shared by several ops (e.g. a pool's input and output) runs once per op.
        before = collections.Counter(self.observer_calls)
        self.counting = True
        with torch.no_grad():
            self.observed(x)
        self.counting = False
        return self.observer_calls - before


@pytest.mark.parametrize("mode", MODES)
def test_calibration_batches_is_honoured(mode, trained_cnn, digits):
    model, _ = trained_cnn
    x = next(iter(digits.val_dataloader()))[0]
    callback = _CountingPTQ(mode, "x86", "minmax", calibration_batches=5)
    _validate(callback, model, digits.train_dataloader())  # 36 batches available
    assert callback.calibrated_batches == 5
    calls = collections.Counter(callback.observer_calls)
    per_forward = callback.calls_per_forward(x)
    assert len(per_forward) >= 5 and min(per_forward.values()) >= 1
    assert calls == {name: 5 * n for name, n in per_forward.items()}

    fit_model = ImageClassifier(SmallCNN(), lr=1e-3)
    callback = _CountingPTQ(mode, "x86", "histogram", calibration_batches=2)
    L.Trainer(**trainer_kwargs(callbacks=[callback])).fit(fit_model, digits)
    calls = collections.Counter(callback.observer_calls)
    assert calls == {name: 2 * n for name, n in callback.calls_per_forward(x).items()}


def test_a_short_loader_warns_and_an_empty_one_raises(trained_cnn, digits):
    model, _ = trained_cnn
    callback = PostTrainingQuantization("fx", "x86", "minmax", calibration_batches=100)
    with pytest.warns(UserWarning, match=r"calibrated on 2 batches, fewer than calibration_batches=100"):
        _validate(callback, model, digits.val_dataloader())
    assert callback.quantized_model is not None

    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)))
    callback = PostTrainingQuantization("fx", "x86", "minmax")
    with pytest.raises(QuantizationConfigError, match=r"PostTrainingQuantization quantized nothing: trainer.validate "
                                                      r"ran no batch \(empty dataloader or limit_val_batches=0\), "
                                                      r"so there was no calibration data"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning: "Total length of DataLoader is 0"
            _validate(callback, model, empty)


# -- dynamic --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_dynamic_ptq_of_lstm_is_within_2_points_with_int8_weights(mode, trained_lstm, digits):
    model, float_acc = trained_lstm
    callback = PostTrainingQuantization(mode, "x86", "minmax", dynamic=True)
    _validate(callback, model, digits.val_dataloader())
    assert callback.calibrated_batches == 0
    int8 = callback.quantized_model
    int8_acc = _int8_accuracy(callback, digits)
    assert int8_acc >= float_acc - 2.0, (mode, float_acc, int8_acc)

    if mode == "pt2e":
        dtypes = _int8_weights_in_graph(int8.graph_module, {aten.lstm.input, aten.linear.default})
        assert dtypes == [torch.int8] * 3, dtypes  # weight_ih, weight_hh, fc.weight
        ops = {n.target for n in int8.graph_module.graph.nodes}
        # Activations are quantized at run time, from qparams chosen per call.
        assert torch.ops.quantized_decomposed.choose_qparams.tensor in ops
        float_weights = [n for n, p in int8.named_parameters() if p.dim() >= 2]
        assert not float_weights, f"float weights left behind: {float_weights}"
    else:
        from torch.ao.nn.quantized import dynamic as nnqd

        lstm, fc = int8.get_submodule("lstm"), int8.get_submodule("fc")
        assert isinstance(lstm, nnqd.LSTM) and isinstance(fc, nnqd.Linear)
        assert {w.dtype for w in lstm._weight_bias()["weight"].values()} == {torch.qint8}
        assert fc.weight().dtype == torch.qint8

    x = next(iter(digits.val_dataloader()))[0]
    with torch.no_grad(), quantized_engine("x86"):
        assert torch.allclose(int8(x), model.net.eval()(x), atol=0.5)


def test_dynamic_ptq_at_fit_end(digits):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(RowLSTM(), lr=1e-2)
    callback = PostTrainingQuantization("pt2e", "x86", "minmax", dynamic=True)
    L.Trainer(**trainer_kwargs(callbacks=[callback])).fit(model, digits)
    assert callback.quantized_model is not None and isinstance(model.net.lstm, nn.LSTM)


# -- the guide's advice on choosing static or dynamic -----------------------------------------------


def test_dynamic_for_a_conv_net_warns_but_runs(trained_cnn, digits):
    model, _ = trained_cnn
    callback = PostTrainingQuantization("eager", "x86", "minmax", dynamic=True)
    with pytest.warns(UserWarning, match=r"SmallCNN has convolutions, which dynamic quantization leaves in float"):
        _validate(callback, model, digits.val_dataloader())
    assert callback.quantized_model is not None


def test_static_for_an_lstm_warns_but_runs(trained_lstm, digits):
    model, _ = trained_lstm
    callback = PostTrainingQuantization("fx", "x86", "minmax", calibration_batches=2)
    with pytest.warns(UserWarning, match=r"RowLSTM has recurrent layers .* dynamic quantization \(dynamic=True\) "
                                         r"is recommended"):
        _validate(callback, model, digits.train_dataloader())
    assert callback.quantized_model is not None


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(observer="lsq"), r"observer 'lsq' learns its qparams by gradient descent, which needs training: use "
                               r"QuantizationAwareTraining, or one of the calibrating observers \['histogram', "
                               r"'minmax', 'moving_average_minmax'\]"),
        (dict(calibration_batches=0), r"calibration_batches must be an integer >= 1, got 0"),
        (dict(calibration_batches=True), r"calibration_batches must be an integer >= 1, got True"),
        (dict(dynamic="yes"), r"dynamic must be True or False, got 'yes'"),
        (dict(mode="graph"), r"unknown mode 'graph'; valid modes are: 'eager', 'fx', 'pt2e'"),
        (dict(mode="pt2e", modules_to_fuse=[["a", "b"]]), r"modules_to_fuse applies to mode='eager' only"),
        (dict(batch_to_inputs="x"), r"batch_to_inputs must be callable, got str"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=message):
        PostTrainingQuantization(**kwargs)


class _ConvOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 8)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_dynamic_with_nothing_to_quantize_raises_before_validation(digits):
    model = ImageClassifier(_ConvOnly())
    with pytest.raises(QuantizationConfigError, match=r"dynamic quantization has nothing to quantize in _ConvOnly: "
                                                      r"it applies to Linear, LSTM, GRU and RNN layers only"):
        _validate(PostTrainingQuantization("fx", dynamic=True), model, digits.val_dataloader())


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_untraceable_network_fails_in_setup_before_training(mode, digits):
    class Counting(ImageClassifier):
        steps = 0

        def training_step(self, batch, batch_idx):
            type(self).steps += 1
            return super().training_step(batch, batch_idx)

    model = Counting(DataDependent())
    with pytest.raises(UntraceableModelError, match=rf"mode='{mode}' could not capture DataDependent"):
        L.Trainer(**trainer_kwargs(callbacks=[PostTrainingQuantization(mode)])).fit(model, digits)
    assert Counting.steps == 0


def test_batches_without_a_leading_tensor_need_batch_to_inputs(trained_cnn, digits):
    model, _ = trained_cnn

    class DictBatches(ImageClassifier):
        def validation_step(self, batch, batch_idx):
            return super().validation_step((batch["image"], batch["label"]), batch_idx)

    dict_model = DictBatches(copy.deepcopy(model.net))
    loader = torch.utils.data.DataLoader([{"image": x, "label": y} for x, y in digits.val_dataloader()],
                                         batch_size=None)
    with pytest.raises(QuantizationConfigError, match=r"cannot tell the model inputs in a batch of type dict; pass "
                                                      r"batch_to_inputs="):
        _validate(PostTrainingQuantization("fx", "x86", "minmax"), dict_model, loader)

    callback = PostTrainingQuantization("fx", "x86", "minmax", batch_to_inputs=lambda b: (b["image"],))
    _validate(callback, dict_model, loader)
    assert callback.calibrated_batches == 2


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
@pytest.mark.parametrize("mode", MODES)
def test_other_backends_quantize_static_and_dynamic(mode, backend, trained_cnn, trained_lstm, digits):
    for (model, float_acc), dynamic, tolerance in ((trained_cnn, False, 1.5), (trained_lstm, True, 2.0)):
        callback = PostTrainingQuantization(mode, backend, "minmax", dynamic=dynamic, calibration_batches=8)
        _validate(callback, model, digits.train_dataloader())
        assert _int8_accuracy(callback, digits) >= float_acc - tolerance, (mode, backend, dynamic)
