"""``qlightning.compare_layers``: per-layer SQNR of int8 networks against their float network, in every mode.

The guide's network (conv-bn-relu, pool, conv-bn-relu, pool, flatten, linear-relu, linear) is trained
briefly on the embedded digits, then quantized by ``PostTrainingQuantization`` in a real Trainer
(``validate`` route, four calibration batches) per mode. 8-bit per-layer SQNRs of such a network are
25-45 dB; a layer whose int8 weights are wrong by a factor of four is at 2.5 dB.
"""

import copy
import dataclasses
import inspect
import json
import math
import operator

import lightning as L
import pytest
import torch
from torch import nn

from qlightning import LayerError, LayerReport, PostTrainingQuantization, compare_layers, quantized_engine
from qlightning.cpu import u8s8_saturates
from qlightning.models import GuideNet, ImageClassifier
from tests.conftest import trainer_kwargs

# (mode, backend): eager; FX on PyTorch's int8 kernels (x86, and onnxruntime's qconfig on the same kernels);
# FX through PT2E (tflite has no PyTorch int8 kernels: FX converts to a Q/DQ graph); PT2E.
CONFIGS = [("eager", "x86"), ("fx", "x86"), ("fx", "onnxruntime"), ("fx", "tflite"), ("pt2e", "x86")]
IDS = [f"{m}-{b}" for m, b in CONFIGS]
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
MEMBERS = {"conv1": ("conv1", "bn1", "relu1"), "conv2": ("conv2", "bn2", "relu2"), "fc1": ("fc1", "relu3"),
           "fc2": ("fc2",)}


@pytest.fixture(scope="module")
def trained(digits):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(GuideNet(image_size=8, hidden=32), lr=3e-3)
    # A fixture training float weights, with no callback under test: validation, bar and summary would only
    # cost time here; the tests below use a Trainer with Lightning's defaults.
    L.Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=20, limit_val_batches=0,
                               enable_progress_bar=False, enable_model_summary=False)).fit(model, digits)
    return model


@pytest.fixture(scope="module")
def batch(digits):
    return next(iter(digits.val_dataloader()))[0]


@pytest.fixture(scope="module")
def quantized(trained, digits):
    """``quantized(mode, backend)``: the int8 network PTQ makes of the trained float network (made once)."""
    made = {}

    def make(mode, backend):
        if (mode, backend) not in made:
            if backend == "tflite":
                pytest.importorskip("litert_torch")
            callback = PostTrainingQuantization(mode, backend, calibration_batches=4)
            L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=4, enable_progress_bar=False,
                                       enable_model_summary=False)).validate(
                trained, dataloaders=digits.train_dataloader(), verbose=False)
            made[mode, backend] = callback.quantized_model
        return made[mode, backend]

    return make


def _saturating(backend: str, mode: str) -> bool:
    """FX with onnxruntime's qconfig runs full-range int8 weights on PyTorch's x86 kernels, which saturate
    (``vpmaddubsw``) on CPUs without VNNI: conv2 (32 input channels) measured 17 dB there, 36 dB in PT2E."""
    return mode == "fx" and backend == "onnxruntime" and u8s8_saturates()


@pytest.mark.parametrize(("mode", "backend"), CONFIGS, ids=IDS)
def test_every_quantized_layer_in_execution_order(mode, backend, trained, batch, quantized):
    net = trained.net
    report = compare_layers(net, quantized(mode, backend), batch)
    assert isinstance(report, LayerReport) and report.names == LAYERS, str(report)
    names = dict(net.named_modules())
    floor = 12.0 if _saturating(backend, mode) else 25.0
    for layer in report:
        assert layer.name in names and layer.kind == type(names[layer.name]).__name__
        assert layer.members == MEMBERS[layer.name], str(report)
        assert math.isfinite(layer.sqnr_db) and layer.sqnr_db > floor, str(report)
        assert math.isfinite(layer.own_sqnr_db) and layer.own_sqnr_db > floor, str(report)
        assert math.isfinite(layer.input_sqnr_db) and layer.input_sqnr_db > 25, str(report)
        assert layer.numel == batch.shape[0] * {"conv1": 32 * 64, "conv2": 64 * 16, "fc1": 32, "fc2": 10}[layer.name]
    # The first layer reads the network input, quantized alike end to end and alone: nothing is inherited.
    assert report[0].own_sqnr_db == pytest.approx(report[0].sqnr_db, abs=1e-6)
    # Later layers inherit error: end to end is not better than alone (beyond chance cancellation).
    assert all(layer.sqnr_db <= layer.own_sqnr_db + 0.5 for layer in report), str(report)
    # Every quantized layer of these backends has int8 output qparams, except x86's last linear in PT2E.
    float_outputs = [layer.name for layer in report if layer.output_scale is None]
    assert float_outputs == (["fc2"] if mode == "pt2e" and backend == "x86" else [])


def test_sqnr_is_the_formula_on_the_layer_outputs(trained, batch, quantized):
    """conv1's SQNR recomputed by hand: float relu1 output against the int8 conv1 (fused with bn1 and
    relu1) output, both taken with hooks."""
    net, int8 = trained.net.eval(), quantized("eager", "x86")
    outputs = {}
    hooks = [net.relu1.register_forward_hook(lambda m, a, out: outputs.__setitem__("float", out.clone())),
             int8.net.conv1.register_forward_hook(lambda m, a, out: outputs.__setitem__("int8", out.dequantize()))]
    with torch.no_grad():
        net(batch)
        int8(batch)
    for hook in hooks:
        hook.remove()
    f, q = outputs["float"].double(), outputs["int8"].double()
    expected = 10 * math.log10(float(f.pow(2).sum()) / float((f - q).pow(2).sum()))
    assert compare_layers(net, int8, batch)["conv1"].sqnr_db == pytest.approx(expected, rel=1e-9)


def test_modes_agree_layer_by_layer(trained, batch, quantized):
    """The same calibration in eager, FX and PT2E (x86) gives the same qparams: per-layer SQNRs agree
    where the layer's output is int8 in all three (PT2E's x86 quantizer keeps the last linear's output in
    float, which is closer to float)."""
    reports = {mode: compare_layers(trained.net, quantized(mode, "x86"), batch) for mode in ("eager", "fx", "pt2e")}
    for name in LAYERS:
        layers = {mode: report[name] for mode, report in reports.items()}
        if all(layer.output_scale is not None for layer in layers.values()):
            for metric in ("sqnr_db", "own_sqnr_db"):
                values = [getattr(layer, metric) for layer in layers.values()]
                assert max(values) - min(values) < 1.0, (name, metric, values)
        else:
            assert layers["pt2e"].own_sqnr_db >= layers["eager"].own_sqnr_db - 0.5
    # Two backends, two modes, one graph layout: FX for tflite converts through PT2E like PT2E does.
    tflite = compare_layers(trained.net, quantized("fx", "tflite"), batch)
    assert tflite.source == reports["pt2e"].source == "pt2e graph"
    assert reports["eager"].source == reports["fx"].source == "eager/fx modules"


def _weaken_weights(int8: nn.Module, layer: str, divisor: int = 4) -> nn.Module:
    """A copy of ``int8`` whose ``layer`` computes with its int8 weights divided by ``divisor`` (integer
    division; qparams unchanged): the layer's output shrinks to about a quarter, nothing else changes."""
    int8 = copy.deepcopy(int8)
    graph = getattr(int8, "graph_module", None)
    if graph is not None:
        for node in graph.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            if node.op == "call_function" and stack and list(stack.values())[-1][0] == layer and len(node.args) > 1:
                weight = node.args[1]
                if isinstance(weight, torch.fx.Node) and "dequantize_per_channel" in str(weight.target):
                    stored = operator.attrgetter(weight.args[0].target)(graph)
                    stored.copy_(torch.div(stored.to(torch.int32), divisor, rounding_mode="trunc").to(stored.dtype))
                    return int8
        raise AssertionError(f"no int8 weight of {layer} in the graph")
    module = int8.get_submodule(f"net.{layer}" if hasattr(int8, "net") else layer)
    weight = module.weight()
    weak = torch._make_per_channel_quantized_tensor(
        torch.div(weight.int_repr(), divisor, rounding_mode="trunc"), weight.q_per_channel_scales(),
        weight.q_per_channel_zero_points(), weight.q_per_channel_axis())
    with quantized_engine("x86"):  # repacked for the engine that runs it
        module.set_weight_bias(weak, module.bias())
    return int8


@pytest.mark.parametrize(("mode", "backend"), CONFIGS, ids=IDS)
def test_a_broken_layer_is_named_worst(mode, backend, trained, batch, quantized):
    healthy = compare_layers(trained.net, quantized(mode, backend), batch)
    broken = compare_layers(trained.net, _weaken_weights(quantized(mode, backend), "conv2"), batch)
    assert broken.names == healthy.names
    worst = broken.worst(1)[0]
    assert worst.name == "conv2" and worst.own_sqnr_db < 10, str(broken)
    assert [layer.name for layer in broken.worst(4)][0] == "conv2" and len(broken.worst(10)) == 4
    # The layers after it inherit the damage end to end, but alone (fed float inputs) they are as before:
    # that separates a layer's own error from what it inherits.
    for name in ("fc1", "fc2"):
        assert broken[name].own_sqnr_db == pytest.approx(healthy[name].own_sqnr_db, abs=0.01), str(broken)
        assert broken[name].sqnr_db < 15 < healthy[name].sqnr_db, str(broken)
    unchanged = dataclasses.replace(broken["conv1"], skip_gain_db=healthy["conv1"].skip_gain_db)
    assert unchanged == healthy["conv1"]
    # Kept float, the broken conv2 gives back what its weights lost: the broken network's logits are at
    # about 2.4 dB SQNR, and float conv2 lifts them by 26-34 dB (measured), to about the healthy level;
    # keeping any other layer float changes them by hundredths of a dB.
    assert broken["conv2"].skip_gain_db > 15 and broken["conv2"].skip_gain_db > 5 * max(
        broken[name].skip_gain_db for name in ("conv1", "fc1", "fc2")), str(broken)


@pytest.mark.parametrize(("mode", "backend"), [("eager", "x86"), ("fx", "x86"), ("pt2e", "onnxruntime")])
def test_skip_gain_is_what_skip_buys(mode, backend, trained, batch, digits, quantized):
    """``skip_gain_db`` predicts the logits' SQNR gain of quantizing again with ``skip=[layer]``. What
    differs between the two: a skipped layer's output grid is calibrated on its float output instead of
    its int8 output, and its bias is no longer rounded; both move the logits by hundredths of a dB here
    (measured: every layer within 0.01 dB in all three modes, digits). 0.25 dB is far below the spread of
    the gains (-0.1 to +3.9 dB), so the ranking the report gives is the ranking skip produces."""
    net = trained.net.eval()
    report = compare_layers(net, quantized(mode, backend), batch)
    with torch.no_grad():
        reference = net(batch)

    def logits_sqnr(int8):
        with torch.no_grad():
            return float(10 * torch.log10(reference.pow(2).sum() / (reference - int8(batch)).pow(2).sum()))

    before = logits_sqnr(quantized(mode, backend))
    actual = {}
    for layer in report:
        callback = PostTrainingQuantization(mode, backend, calibration_batches=4, skip=[layer.name], layer_report=False)
        L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=4)).validate(
            trained, dataloaders=digits.train_dataloader(), verbose=False)
        actual[layer.name] = logits_sqnr(callback.quantized_model) - before
    for layer in report:
        assert layer.skip_gain_db == pytest.approx(actual[layer.name], abs=0.25), (layer.name, actual, str(report))
    assert report.worst(1)[0].name == max(actual, key=actual.get), (actual, str(report))


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_layers_kept_float_are_not_listed(mode, trained, batch, digits):
    """A skipped conv stays float between quantize nodes (its output is still quantized for the layer
    after it): it is no int8 layer. Module path (FX) and graph path (PT2E)."""
    if "skip" not in inspect.signature(PostTrainingQuantization).parameters:
        pytest.skip("PostTrainingQuantization has no skip= yet")
    callback = PostTrainingQuantization(mode, "x86", calibration_batches=4, skip=["conv2"])
    L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=4, enable_progress_bar=False,
                               enable_model_summary=False)).validate(
        trained, dataloaders=digits.train_dataloader(), verbose=False)
    report = compare_layers(trained.net, callback.quantized_model, batch)
    assert report.names == ["conv1", "fc1", "fc2"], str(report)
    assert all(layer.own_sqnr_db > 25 for layer in report), str(report)


def test_nothing_is_modified(trained, batch, quantized):
    net = copy.deepcopy(trained.net).train()  # a network left in training mode stays so; BN stats do not move
    int8 = quantized("pt2e", "x86")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    int8_state = {k: v.clone() for k, v in int8.state_dict().items()}
    inputs = batch.clone()
    nodes = [(n.name, n.target, n.args) for n in int8.graph_module.graph.nodes]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()]
    eager = quantized("eager", "x86")
    eager_hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in eager.modules()]
    for quantized_network in (int8, eager):
        compare_layers(net, quantized_network, inputs)
    assert torch.equal(inputs, batch)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(int8_state[k], v) for k, v in int8.state_dict().items())
    assert [(n.name, n.target, n.args) for n in int8.graph_module.graph.nodes] == nodes
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()] == hooks
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in eager.modules()] == eager_hooks
    # A tuple of positional inputs is the same as the tensor.
    assert compare_layers(net, int8, (batch,)) == compare_layers(net, int8, batch)


def test_report_json_and_ranking(trained, batch, quantized, tmp_path):
    report = compare_layers(trained.net, quantized("fx", "x86"), batch)
    path = tmp_path / "layers.json"
    text = report.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text) and [row["name"] for row in data["layers"]] == LAYERS
    assert set(data["layers"][0]) == {"name", "kind", "sqnr_db", "own_sqnr_db", "input_sqnr_db", "output_scale",
                                      "members", "numel", "skip_gain_db"}
    assert data["layers"][0]["members"] == ["conv1", "bn1", "relu1"]
    assert "conv2" in report.format() and report["fc1"] is report[2] and report[1:3].names == ["conv2", "fc1"]
    with pytest.raises(KeyError, match="no quantized layer named 'bn1'"):
        report["bn1"]
    # Ranked by the gain of keeping the layer float (highest first); layers whose gain was not measured
    # after, by own error (lowest own SQNR first); infinite / NaN values are JSON strings.
    made = LayerReport([LayerError("a", "Conv2d", 20.0, math.inf, output_scale=0.1, skip_gain_db=0.5),
                        LayerError("b", "Linear", 30.0, 31.0), LayerError("c", "Linear", 10.0, 35.0),
                        LayerError("d", "Linear", 5.0, math.nan, skip_gain_db=2.0),
                        LayerError("e", "Linear", 5.0, 40.0, skip_gain_db=-0.1)], "test")
    assert [layer.name for layer in made.worst(5)] == ["d", "a", "e", "b", "c"]
    rows = json.loads(made.to_json())["layers"]
    assert rows[0]["own_sqnr_db"] == "inf" and rows[3]["own_sqnr_db"] == "nan" and rows[1]["output_scale"] is None
    assert made[0].inherited_db == math.inf and made[1].inherited_db == pytest.approx(1.0)


def test_refuses_networks_it_cannot_read(trained, batch, quantized):
    net = trained.net
    with pytest.raises(ValueError, match="no int8 layers to compare"):
        compare_layers(net, copy.deepcopy(net), batch)
    with pytest.raises(ValueError, match="float_network .* holds quantizers or int8 layers"):
        compare_layers(quantized("eager", "x86"), quantized("eager", "x86"), batch)
    renamed = nn.Sequential(*net.children())  # the same computation, modules named 0, 1, ...
    with pytest.raises(ValueError, match="matches a module of Sequential"):
        compare_layers(renamed, quantized("fx", "x86"), batch)


def test_trained_float_network_maps_top_level_tensors():
    """A tensor owned by the network itself (ViT's ``class_token``) is mapped back too; it was missed
    ("no trained tensor for ['class_token']") and the zoo's ViT cells lost their QAT layer report."""
    from qlightning.callbacks.config import build_recipe
    from qlightning.layers import trained_float_network
    from qlightning.modes.registry import get_mode

    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.class_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)[:, 0])

    torch.manual_seed(0)
    template, x = WithToken(), torch.randn(2, 3, 8)
    backend, recipe = build_recipe("pt2e", "x86", "moving_average_minmax", "per_channel_symmetric", "per_tensor_affine")
    prepared = get_mode("pt2e").prepare_qat(copy.deepcopy(template), (x,), recipe, backend)
    with torch.no_grad():  # "training": the prepared network's tensors move away from the template's
        prepared.graph_module.class_token.add_(1.0)
        prepared.graph_module.fc.weight.mul_(2.0)
    twin = trained_float_network(template, prepared)
    assert torch.equal(twin.class_token, prepared.graph_module.class_token)
    assert torch.equal(twin.fc.weight, prepared.graph_module.fc.weight)
    assert not torch.equal(twin.class_token, template.class_token)
