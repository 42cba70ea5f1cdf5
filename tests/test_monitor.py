"""QParamMonitor: what lands in TensorBoard is the quantizers' real qparams, freezing shows, auto_freeze works."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlightning import QParamMonitor, QuantizationAwareTraining, QuantizationConfigError
from qlightning.models import GuideNet, ImageClassifier, SmallCNN
from qlightning.monitoring.names import quantizer_names
from qlightning.passes.exact_qparams import current_qparams
from tests.conftest import trainer_kwargs


class RecordScales(Callback):
    """Records the quantizers' scales right after the monitor logs (same hook, listed after it)."""

    def __init__(self, qat, every):
        self.qat, self.every, self.scales = qat, every, {}
        self.last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.last is not None and step - self.last < self.every:
            return
        self.last = step
        pairs = self.qat._impl.quantizers(self.qat.prepared_network)
        names = quantizer_names(self.qat.prepared_network, pairs)
        self.scales[step] = {names[id(m)]: current_qparams(m)[0].float().mean().item() for _, m in pairs}


def _events(logger) -> EventAccumulator:
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_logged_scales_are_the_real_scales_and_stop_changing_once_frozen(mode, digits, tmp_path):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=1e-3)
    qat = QuantizationAwareTraining(mode, freeze_observers_epoch=1, freeze_bn_epoch=1)
    monitor = QParamMonitor(log_every_n_steps=2)
    recorder = RecordScales(qat, every=2)
    logger = TensorBoardLogger(tmp_path, name=mode)
    L.Trainer(**trainer_kwargs(callbacks=[qat, monitor, recorder], logger=logger, max_epochs=2,
                               limit_train_batches=6)).fit(model, digits)
    events = _events(logger)
    tags = events.Tags()

    first_step = min(recorder.scales)
    assert first_step == 1  # logged after the first optimizer step, then every 2 steps
    names = set(recorder.scales[first_step])
    assert "input" in names and any(n.endswith("conv1.weight") for n in names) and len(names) >= 7
    for name in names:
        curve = {e.step: e.value for e in events.Scalars(f"qparams/{name}/scale")}
        assert sorted(curve) == sorted(recorder.scales) == [1, 3, 5, 7, 9, 11]
        for step, scales in recorder.scales.items():
            assert curve[step] == pytest.approx(scales[name], rel=1e-6)
        assert f"qparams/{name}/zero_point" in tags["scalars"]
        # Observers freeze when epoch 1 starts (after step 6): the curve is flat from there on ...
        frozen = [curve[s] for s in sorted(curve) if s > 6]
        assert len(set(frozen)) == 1, (name, frozen)
        # ... and the drift compares frozen logs only: none at step 7 (its change since step 5 happened
        # before the freeze), zero after.
        drift = {e.step: e.value for e in events.Scalars(f"qparams_drift/{name}/scale")}
        assert sorted(drift) == [3, 5, 9, 11] and drift[9] == drift[11] == 0

    # The freeze flags step where freezing happened (batch 7, the first of epoch 1), and close each epoch.
    for tag in ("quant/observers_frozen", "quant/bn_frozen"):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(1, 0.0), (6, 0.0), (7, 1.0), (12, 1.0)]
    # Per-channel weight scales also go in as histograms; the layout and the drift image exist.
    assert any(t.endswith("weight/scale") for t in tags["histograms"])
    assert "custom_scalars__config__" in tags["tensors"]
    assert "quant/drift_per_layer" in tags["images"]
    assert len(events.Images("quant/drift_per_layer")) == 2  # one per epoch


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_drift_image_rows_are_the_quantizers_in_network_order_and_the_frozen_epoch_is_dark(mode, digits):
    qat = QuantizationAwareTraining(mode, freeze_observers_epoch=1)
    monitor = QParamMonitor(log_every_n_steps=2)
    L.Trainer(**trainer_kwargs(callbacks=[qat, monitor], max_epochs=2, limit_train_batches=6)).fit(
        ImageClassifier(SmallCNN()), digits)
    names = list(monitor._quantizers())
    assert names[:3] == ["input", "conv1.weight", "conv1.output"] and names.index("conv2.output") < names.index("fc1.weight")
    # Drift after the freeze compares frozen logs only (the first log of epoch 1 once covered the last
    # step of epoch 0, painting the frozen epoch as drifting).
    assert all(value == 0.0 for value in monitor._drift_rows[1].values()) and monitor._drift_rows[1]
    image = monitor._drift_image()
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 26 * len(names)  # labelled rows


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_tensorboard_dashboards_show_every_quantizer_as_the_ui_reads_them(mode, digits, tmp_path):
    """Read through TensorBoard's own data provider, plugin by plugin, as its UI does (EventAccumulator keeps
    tags the UI drops): with the histogram under the scalar's tag, the Histograms and Distributions
    dashboards said "No histogram data was found" (issue 18)."""
    import re

    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata as custom_scalar_metadata

    qat = QuantizationAwareTraining(mode)
    logger = TensorBoardLogger(tmp_path, name="run")
    L.Trainer(**trainer_kwargs(callbacks=[qat, QParamMonitor(log_every_n_steps=2)], logger=logger,
                               limit_train_batches=4)).fit(ImageClassifier(SmallCNN()), digits)
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    ctx, run = context.RequestContext(), "run/version_0"
    scalars = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")[run]
    histograms = provider.list_tensors(ctx, experiment_id="", plugin_name="histograms")[run]
    images = provider.list_blob_sequences(ctx, experiment_id="", plugin_name="images")[run]

    names = {t.split("/")[1] for t in scalars if t.startswith("qparams/")}
    assert {"input", "conv1.weight", "conv2.weight", "fc1.weight"} <= names, names
    for name in names:
        assert {f"qparams/{name}/scale", f"qparams/{name}/zero_point"} <= set(scalars)
    per_channel = {t.split("/")[1] for t in histograms}
    assert {n for n in names if n.endswith(".weight")} <= per_channel  # per-channel weights, in the UI
    assert all(t.startswith("qparams_per_channel/") for t in histograms)
    assert {"quant/observers_frozen", "quant/bn_frozen"} <= set(scalars) and "quant/drift_per_layer" in images
    # Custom Scalars: every chart of the layout matches a scalar the Scalars plugin has.
    config = provider.read_tensors(ctx, experiment_id="", plugin_name=custom_scalar_metadata.PLUGIN_NAME,
                                   downsample=1, run_tag_filter=None)
    layout = layout_pb2.Layout.FromString(next(iter(config.values()))[custom_scalar_metadata.CONFIG_SUMMARY_TAG][0].numpy.item())
    charts = [chart for category in layout.category for chart in category.chart]
    assert charts and all(any(re.search(regex, tag) for regex in chart.multiline.tag for tag in scalars)
                          for chart in charts)


def test_drift_image_greys_epochs_without_a_log_instead_of_calling_them_stable(monkeypatch):
    monitor = QParamMonitor()
    monkeypatch.setattr(monitor, "_quantizers", lambda: {"input": None, "conv1.weight": None})
    monitor._drift_rows = [{"conv1.weight": 0.01}, {"conv1.weight": 0.0, "input": 1e-3}]
    names, grid = monitor._drift_grid()
    assert names == ["input", "conv1.weight"]
    assert np.isnan(grid[0, 0]) and grid[0, 1] == pytest.approx(-3)  # no log in epoch 0: grey, not "no drift"
    assert grid[1].tolist() == [pytest.approx(-2), -6.0]  # frozen: the bottom of the scale
    image = monitor._drift_image()
    grey = (image == np.array([0xBB, 0xBB, 0xBB], dtype=np.uint8)).all(axis=2)
    assert grey.sum() > 100  # the missing cell is painted grey


@pytest.mark.parametrize("network", [SmallCNN, GuideNet])
def test_an_activation_has_one_name_in_every_mode(network):
    """A mode sweep overlays per layer: PT2E's quantizer after relu(bn(conv1(x))) was `relu1.output`
    where eager and FX (which fuse the three into conv1) said `conv1.output` (issue 18)."""
    from qlightning.callbacks.config import build_recipe
    from qlightning.modes.registry import get_mode

    x = torch.randn(2, 1, 8, 8) if network is SmallCNN else torch.randn(2, 1, 28, 28)
    per_mode = {}
    for mode in ("eager", "fx", "pt2e"):
        backend, recipe = build_recipe(mode, "x86", "minmax", "per_channel_symmetric", "per_tensor_affine")
        implementation = get_mode(mode)
        prepared = implementation.prepare_qat(network(), (x,), recipe, backend)
        pairs = implementation.quantizers(prepared)
        per_mode[mode] = set(quantizer_names(prepared, pairs).values())
    expected = {"input", "conv1.output", "conv2.output", "fc1.output"} | {f"{l}.weight" for l in ("conv1", "conv2", "fc1", "fc2")}
    for mode, names in per_mode.items():
        assert expected <= names, (mode, names)
        assert not any(n.startswith("relu") for n in names), (mode, names)


def test_the_default_interval_gives_a_readable_curve():
    from qlightning.monitoring.qparam_monitor import auto_interval

    assert auto_interval(69) == 1  # the default job's QAT phase: one point per step
    assert auto_interval(1000) == 10 and auto_interval(10**6) == 50  # about 100 points, at least every 50 steps
    assert auto_interval(float("inf")) == 50


def test_scalars_reach_any_logger(digits, tmp_path):
    qat = QuantizationAwareTraining("fx")
    logger = CSVLogger(tmp_path)
    L.Trainer(**trainer_kwargs(callbacks=[qat, QParamMonitor(log_every_n_steps=1)], logger=logger)).fit(
        ImageClassifier(SmallCNN()), digits
    )
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "qparams/conv1.weight/scale" in header and "quant/observers_frozen" in header


def _auto_freeze_run(digits, lr, observer, **schedule):
    L.seed_everything(0, verbose=False)
    qat = QuantizationAwareTraining("fx", observer=observer, **schedule)
    monitor = QParamMonitor(log_every_n_steps=1, auto_freeze=True, drift_threshold=1e-3, patience=3)
    L.Trainer(**trainer_kwargs(callbacks=[qat, monitor], max_epochs=2, limit_train_batches=12)).fit(
        ImageClassifier(SmallCNN(), lr=lr), digits
    )
    return qat, monitor


def test_auto_freeze_fires_on_a_stable_run(digits):
    # No weight updates, BatchNorm frozen and running min/max observers: once the data's range has
    # been seen, nothing moves.
    qat, monitor = _auto_freeze_run(digits, lr=0.0, observer="minmax", freeze_bn_epoch=0)
    assert qat.observers_frozen and monitor.auto_frozen_at_step is not None
    assert monitor.auto_frozen_at_step <= 12


def test_auto_freeze_does_not_fire_while_scales_move(digits):
    # Large learning rate and per-batch moving averages: the scales keep moving.
    qat, monitor = _auto_freeze_run(digits, lr=0.3, observer="moving_average_minmax")
    assert not qat.observers_frozen and monitor.auto_frozen_at_step is None


def test_monitor_needs_a_qat_callback(digits):
    with pytest.raises(QuantizationConfigError, match=r"QParamMonitor logs the quantizers a QuantizationAwareTraining "
                                                      r"callback prepares: add one to the same Trainer"):
        L.Trainer(**trainer_kwargs(callbacks=[QParamMonitor()])).fit(ImageClassifier(SmallCNN()), digits)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"log_every_n_steps": 0}, r"log_every_n_steps must be an integer >= 1, got 0"),
        ({"patience": 1.5}, r"patience must be an integer >= 1, got 1.5"),
        ({"drift_threshold": -1}, r"drift_threshold must be a positive number, got -1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=message):
        QParamMonitor(**kwargs)


def test_logging_costs_little(digits):
    # Not a timing assertion (those live in scripts/bench.py): logging must not touch the graph or
    # the gradients, so a monitored run trains exactly like an unmonitored one.
    def run(callbacks):
        L.seed_everything(0, verbose=False)
        model = ImageClassifier(SmallCNN(), lr=1e-3)
        L.Trainer(**trainer_kwargs(callbacks=callbacks)).fit(model, digits)
        return model

    plain = run([QuantizationAwareTraining("fx")])
    monitored = run([QuantizationAwareTraining("fx"), QParamMonitor(log_every_n_steps=1)])
    for a, b in zip(plain.state_dict().values(), monitored.state_dict().values()):
        assert torch.equal(a, b)
