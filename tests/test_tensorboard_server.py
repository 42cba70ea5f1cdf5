"""A real ``tensorboard`` server on a README journey-3 run, read through the HTTP endpoints its frontend
calls: every tag SPEC.md ("TensorBoard tags") names reaches the Scalars, Histograms, Distributions,
Custom Scalars and Images dashboards (issue 18).

Both data paths users get: ``--load_fast=auto`` (TensorBoard's default, the Rust data server where it is
installed) and ``--load_fast=false`` (the Python multiplexer)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from qlightning import QParamMonitor, QuantizationAwareTraining
from qlightning.data import DigitsDataModule
from qlightning.models import ImageClassifier, SmallCNN
from qlightning.monitoring.names import quantizer_names
from qlightning.passes.exact_qparams import current_qparams
from tests.conftest import trainer_kwargs

WAIT_S = 60
URL_LINE = re.compile(r"(http://127\.0\.0\.1:\d+/)")


def _tensorboard_command() -> list[str]:
    script = Path(sys.executable).with_name("tensorboard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tensorboard.main"]


@pytest.fixture(scope="module")
def journey3_run(tmp_path_factory):
    """README journey 3, small: pt2e QAT with observers frozen from epoch 1, QParamMonitor every 2 steps,
    a TensorBoardLogger, Lightning's defaults (sanity check, model summary, progress bar) on. Returns the
    logdir, the run name TensorBoard lists, and the quantizers' names with whether each is per-channel."""
    logdir = tmp_path_factory.mktemp("runs")
    L.seed_everything(0, verbose=False)
    qat = QuantizationAwareTraining(mode="pt2e", freeze_observers_epoch=1)
    logger = TensorBoardLogger(logdir, name="journey3")
    L.Trainer(**trainer_kwargs(max_epochs=2, limit_train_batches=6, logger=logger,
                               callbacks=[qat, QParamMonitor(log_every_n_steps=2)])).fit(
        ImageClassifier(SmallCNN()), DigitsDataModule())
    pairs = qat._impl.quantizers(qat.prepared_network)
    names = quantizer_names(qat.prepared_network, pairs)
    quantizers = {names[id(module)]: current_qparams(module)[0].numel() > 1 for _, module in pairs}
    run = Path(logger.log_dir).relative_to(logdir).as_posix()
    return logdir, run, quantizers


class TensorBoardServer:
    """``tensorboard --logdir <dir> --host 127.0.0.1 --port 0`` as a user starts it; the URL is the one it prints."""

    def __init__(self, logdir: Path, log: Path, load_fast: str):
        self.log = log
        self.stderr = open(log, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            _tensorboard_command() + ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0",
                                      f"--load_fast={load_fast}"],
            stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            match = URL_LINE.search(self.log.read_text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"tensorboard printed no URL within {WAIT_S} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str, **query):
        url = self.url + path.lstrip("/") + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200, url
            return json.loads(response.read())

    def wait_until_loaded(self, run: str, tag: str) -> None:
        """The server answers before it has read the event file: wait until the Scalars plugin lists ``tag``."""
        deadline, last = time.monotonic() + WAIT_S, None
        while time.monotonic() < deadline:
            try:
                last = self.get("data/plugin/scalars/tags")
                if tag in last.get(run, {}):
                    return
            except (urllib.error.URLError, ConnectionError) as error:
                last = error
            time.sleep(0.5)
        raise AssertionError(f"{tag} of {run} not served within {WAIT_S} s (last answer: {str(last)[:500]});\n"
                             f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self.stderr.close()


@pytest.mark.parametrize("load_fast", ["auto", "false"])
def test_real_tensorboard_server_shows_every_spec_tag_in_its_dashboards(journey3_run, load_fast, tmp_path):
    logdir, run, quantizers = journey3_run
    per_channel = sorted(name for name, is_per_channel in quantizers.items() if is_per_channel)
    # pt2e on x86: weights per-channel, activations and the input per-tensor.
    assert {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"} <= set(per_channel), quantizers
    assert {"input", "conv1.output"} <= set(quantizers) - set(per_channel), quantizers

    server = TensorBoardServer(logdir, tmp_path / "tensorboard.log", load_fast)
    try:
        server.wait_until_loaded(run, "quant/bn_frozen")
        assert server.get("data/runs") == [run]
        plugins = server.get("data/plugins_listing")
        for plugin in ("scalars", "histograms", "distributions", "custom_scalars", "images"):
            assert plugins[plugin]["enabled"], (plugin, plugins[plugin])

        # Scalars: qparams/<name>/scale|zero_point for every quantizer (per-channel ones as their mean), drift
        # for every quantizer, both freeze flags.
        scalars = set(server.get("data/plugin/scalars/tags")[run])
        expected = {f"qparams/{name}/{field}" for name in quantizers for field in ("scale", "zero_point")}
        expected |= {f"qparams_drift/{name}/scale" for name in quantizers}
        expected |= {"quant/observers_frozen", "quant/bn_frozen"}
        assert expected <= scalars, sorted(expected - scalars)

        # Values are served, not only tag names: logged at steps 1, 3, ..., 11 (every 2 steps over 12), the
        # scale is a positive mean; the observers read frozen after epoch 1 only.
        series = server.get("data/plugin/scalars/scalars", run=run, tag="qparams/conv1.weight/scale")
        assert [step for _, step, _ in series] == [1, 3, 5, 7, 9, 11] and all(value > 0 for *_, value in series)
        frozen = server.get("data/plugin/scalars/scalars", run=run, tag="quant/observers_frozen")
        # 0/1 at each epoch end (steps 6, 12) and a step where freezing happened (0 at 6, 1 at 7).
        assert [(step, value) for _, step, value in frozen] == [(1, 0.0), (6, 0.0), (7, 1.0), (12, 1.0)]

        # Histograms and Distributions: per-channel scale and zero point of every per-channel quantizer, and
        # nothing the Scalars plugin shows (TensorBoard keeps one plugin per tag).
        per_channel_tags = {f"qparams_per_channel/{name}/{field}" for name in per_channel
                            for field in ("scale", "zero_point")}
        for plugin in ("histograms", "distributions"):
            tags = set(server.get(f"data/plugin/{plugin}/tags")[run])
            assert tags == per_channel_tags, (plugin, sorted(tags ^ per_channel_tags))
        buckets = server.get("data/plugin/histograms/histograms", run=run, tag="qparams_per_channel/conv1.weight/scale")
        assert len(buckets) == 6 and all(histogram for _, _, histogram in buckets)
        spread = server.get("data/plugin/distributions/distributions", run=run,
                            tag="qparams_per_channel/conv1.weight/scale")
        assert len(spread) == 6

        # Images: the drift heat map, one sample per epoch.
        images = server.get("data/plugin/images/tags")[run]
        assert "quant/drift_per_layer" in images, images
        samples = server.get("data/plugin/images/images", run=run, tag="quant/drift_per_layer")
        assert [sample["step"] for sample in samples] == [0, 1]

        # Custom Scalars: one category per layer plus "freezing"; every chart's tag regexes match a scalar tag.
        layout = server.get("data/plugin/custom_scalars/layout")
        categories = {category["title"]: category["chart"] for category in layout["category"]}
        layers = {name.rsplit(".", 1)[0] for name in quantizers}
        assert set(categories) == layers | {"freezing"}, sorted(categories)
        charts = [chart for chart_list in categories.values() for chart in chart_list]
        unmatched = [chart["title"] for chart in charts
                     if not all(any(re.search(regex, tag) for tag in scalars) for regex in chart["multiline"]["tag"])]
        assert not unmatched, unmatched
        charted = {tag for chart in charts for tag in chart["multiline"]["tag"]}
        assert expected <= charted, sorted(expected - charted)
    finally:
        server.stop()
    assert server.process.returncode is not None
