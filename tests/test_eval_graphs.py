"""Every exported graph is the eval-mode graph: no dropout, no stochastic depth, BatchNorm in eval.

PT2E captures the network in training mode, so Python that branches on ``self.training``
(torchvision's stochastic depth) is traced as random ops; the exports must not carry them."""

from __future__ import annotations

import json

import lightning as L
import onnx
import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from qlightning import QuantizationAwareTraining
from qlightning.models import ImageClassifier
from qlightning.modes.registry import get_mode
from tests.conftest import trainer_kwargs

RANDOM_ONNX_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Dropout",
                   "Multinomial"}


class StochasticNet(nn.Module):
    """conv-bn-relu, a residual branch under stochastic depth (EfficientNet's), dropout, classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.depth = StochasticDepth(0.3, "row")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.depth(self.branch(x))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def test_pt2e_qat_exports_hold_no_random_ops_and_eval_is_deterministic(digits, tmp_path):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(StochasticNet(), lr=1e-3)
    qat = QuantizationAwareTraining("pt2e", "x86", export=["onnx", "openvino", "pt2"], export_dir=tmp_path)
    L.Trainer(**trainer_kwargs(max_epochs=1, callbacks=[qat])).fit(model, digits)

    x = next(iter(digits.val_dataloader()))[0]
    prepared = qat.prepared_network
    graph_targets = lambda: {str(n.target) for n in prepared.graph_module.graph.nodes}  # noqa: E731
    get_mode("pt2e").set_observers_enabled(prepared, False)  # outside the Trainer, observers would move qparams
    with torch.no_grad():
        prepared.eval()
        assert torch.equal(prepared(x), prepared(x))  # eval: no randomness left
        assert not any("bernoulli" in t for t in graph_targets())
        prepared.train()
        assert any("bernoulli" in t for t in graph_targets())  # training keeps stochastic depth
        prepared.eval()

    onnx_ops = {node.op_type for node in onnx.load(tmp_path / "net.onnx").graph.node}
    assert not onnx_ops & RANDOM_ONNX_OPS, onnx_ops & RANDOM_ONNX_OPS
    # Nor its eval form, a mask of ones (fill(p) / p) multiplying the branch: eager eval passes it unchanged.
    assert not onnx_ops & {"Expand", "Div"}, onnx_ops
    openvino_xml = (tmp_path / "net.xml").read_text()
    assert not any(f'type="{op}"' in openvino_xml for op in ("RandomUniform", "Bernoulli", "Multinomial"))
    program = torch.export.load(tmp_path / "net.pt2")
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    random = [n.format_node() for n in calls if any(k in str(n.target) for k in ("bernoulli", "rand", "native_dropout"))]
    random += [n.format_node() for n in calls if "dropout" in str(n.target) and n.args[2] is not False]
    random += [n.format_node() for n in calls if any(k in str(n.target) for k in ("fill", "div", "empty"))]
    assert not random, random
    for fmt in ("onnx", "openvino", "pt2"):
        report = json.loads((tmp_path / f"net.{'xml' if fmt == 'openvino' else fmt}.report.json").read_text())
        assert report["top1_agreement"] >= 0.99, (fmt, report["top1_agreement"])
