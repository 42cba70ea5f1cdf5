"""``skip=[...]``: layers kept float in every mode, for QAT and PTQ, in the int8 model and the exports."""

import copy
import json
import math
import operator

import lightning as L
import pytest
import torch
from torch import nn

from qlightning import PostTrainingQuantization, QuantizationAwareTraining, QuantizationConfigError
from qlightning.layers import trained_float_network
from qlightning.models import SmallCNN, accuracy
from qlightning.skip import check_skip, resolve_skip
from tests.conftest import trainer_kwargs

MODES = ["eager", "fx", "pt2e"]
aten = torch.ops.aten


# -- entries: form checked at construction, names at setup ------------------------------------------


@pytest.mark.parametrize(
    ("skip", "message"),
    [
        ("fc2", r"skip must be a list of entries .*got 'fc2'"),
        (["re:fc(["], r"skip entry 're:fc\(\[' is not a valid regular expression"),
        ([""], r"skip entry '' is none of: module names"),
        ([3], r"skip entry 3 is none of: module names"),
        (["class:torch.nn.NoSuchLayer"], r"does not name an importable nn.Module class"),
    ],
)
def test_malformed_skip_is_refused_at_construction(skip, message):
    for callback in (QuantizationAwareTraining, PostTrainingQuantization):
        with pytest.raises(QuantizationConfigError, match=message):
            callback("pt2e", "x86", skip=skip)


@pytest.mark.parametrize(
    ("skip", "message"),
    [
        (["fc3"], r"skip entry 'fc3' matches no module of SmallCNN \(closest names: \['fc2', 'fc1'\]\)"),
        (["re:features\\..*"], r"skip entry 're:features\\\\\.\.\*' matches no module of SmallCNN"),
        ([nn.LayerNorm], r"skip entry LayerNorm matches no module of SmallCNN \(closest classes in it: "),
        (["re:.*"], r"keeps every layer of SmallCNN float: nothing would be quantized"),
    ],
)
def test_entry_matching_nothing_names_the_closest_modules(skip, message):
    with pytest.raises(QuantizationConfigError, match=message):
        resolve_skip(SmallCNN(), skip)


def test_entries_resolve_to_module_names_with_their_fusion_groups():
    net = SmallCNN()
    # A conv kept float takes its BatchNorm and ReLU: they run as one kernel in every backend.
    assert resolve_skip(net, ["conv1"]) == ("conv1", "bn1", "relu1")
    assert resolve_skip(net, ["fc2"]) == ("fc2",)
    assert resolve_skip(net, [nn.Linear]) == ("fc1", "relu3", "fc2")
    assert resolve_skip(net, check_skip(["class:torch.nn.Linear"])) == ("fc1", "relu3", "fc2")
    assert resolve_skip(net, ["re:conv2|fc2"]) == ("conv2", "bn2", "relu2", "fc2")
    # A container covers its children; they are not listed again.
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Flatten(), nn.LazyLinear(3))
    assert resolve_skip(seq, ["0", "re:0\\..*"]) == ("0",)


# -- what users get: float layers in the int8 model, in every mode ----------------------------------


@pytest.fixture(scope="module")
def trained(digits):
    from qlightning.models import ImageClassifier

    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    L.Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=None)).fit(model, digits)
    return model, accuracy(model, digits.val_dataloader())


def _pt2e_weights(gm: torch.fx.GraphModule, module: str) -> list[torch.dtype]:
    """dtype of the stored weight of every conv / linear node that came from ``module``."""
    from qlightning.modes.pt2e_skip import module_paths

    dtypes = []
    for node in gm.graph.nodes:
        if node.target in (aten.conv2d.default, aten.linear.default) and module in module_paths(node):
            weight = node.args[1]
            stored = weight.args[0] if weight.op == "call_function" and "dequantize" in str(weight.target) else weight
            dtypes.append(operator.attrgetter(stored.target)(gm).dtype)
    return dtypes


def _ort_kernels(path) -> dict[str, int]:
    """The conv / gemm kernels ONNX Runtime runs for the file, after its own graph optimizations."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # the default's, portable
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kernels = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {k: v for k, v in kernels.items() if k in ("QLinearConv", "QGemm", "Conv", "Gemm", "FusedConv", "FusedGemm")}


def _float_layer(callback, name: str) -> nn.Module | None:
    """The float module the int8 model runs for ``name`` (eager/FX), or None (PT2E: a graph)."""
    model = callback.quantized_model
    if callback.mode == "eager":
        region = model.net.get_submodule(name)
        assert type(region).__name__ == "FloatRegion", type(region)
        return region.module
    if callback.mode == "fx":
        return model.get_submodule(name)
    return None


@pytest.mark.parametrize("mode", MODES)
def test_static_ptq_keeps_skipped_layers_float(mode, trained, digits, tmp_path):
    model, float_acc = trained
    callback = PostTrainingQuantization(mode, "x86", "histogram", calibration_batches=8, skip=["conv1", "fc2"],
                                        export=["onnx"], export_dir=str(tmp_path))
    L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=1.0)).validate(
        model, dataloaders=digits.train_dataloader(), verbose=False
    )
    assert callback.skipped_layers == ("conv1", "bn1", "relu1", "fc2")
    net = model.net
    if mode == "pt2e":
        gm = callback.quantized_model.graph_module
        assert _pt2e_weights(gm, "conv1") == [torch.float32] and _pt2e_weights(gm, "fc2") == [torch.float32]
        assert _pt2e_weights(gm, "conv2") == [torch.int8] and _pt2e_weights(gm, "fc1") == [torch.int8]
    else:
        # The very float weights (BatchNorm folded into conv1, as PTQ does before it observes).
        fc2 = _float_layer(callback, "fc2")
        assert type(fc2) is nn.Linear and torch.equal(fc2.weight, net.fc2.weight)
        conv1 = _float_layer(callback, "conv1")
        assert not any(p.is_quantized for p in conv1.parameters()) and "quantized" not in type(conv1).__module__
        assert "quantized" in type(callback.quantized_model.get_submodule(
            "net.conv2" if mode == "eager" else "conv2")).__module__
    # ONNX Runtime itself runs the two skipped layers in float and the others in its integer kernels
    # (its optimizer would quantize a float layer's weight if the file let it: onnx_format.keep_float_layers_float).
    assert _ort_kernels(tmp_path / "net.onnx") == {"QLinearConv": 1, "QGemm": 1, "Conv": 1, "Gemm": 1}
    report = json.loads((tmp_path / "net.onnx.report.json").read_text())
    assert report["num_float_ops"] >= 2 and report["num_quantized_ops"] >= 2, report
    # Keeping layers float costs no accuracy: within PTQ's 1.5 points of float.
    int8_acc = accuracy(callback.quantized_model, digits.val_dataloader())
    assert int8_acc >= float_acc - 1.5, (float_acc, int8_acc)


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_dynamic_ptq_keeps_skipped_linear_float(mode, trained, digits):
    model, _ = trained
    callback = PostTrainingQuantization(mode, "x86", dynamic=True, skip=["fc2"])
    L.Trainer(**trainer_kwargs(callbacks=[callback])).validate(model, digits, verbose=False)
    if mode == "pt2e":
        gm = callback.quantized_model.graph_module
        assert _pt2e_weights(gm, "fc2") == [torch.float32] and _pt2e_weights(gm, "fc1") == [torch.int8]
    else:
        assert type(callback.quantized_model.fc2) is nn.Linear
        assert "dynamic" in type(callback.quantized_model.fc1).__module__


@pytest.mark.parametrize("mode", MODES)
def test_qat_trains_skipped_layers_without_quantizers(mode, classifier, digits):
    float_copy = copy.deepcopy(classifier.net)
    qat = QuantizationAwareTraining(mode, "x86", skip=["fc2"])
    trainer = L.Trainer(**trainer_kwargs(callbacks=[qat], max_epochs=1))
    trainer.fit(classifier, digits)
    trainer.validate(classifier, digits, verbose=False)
    prepared = qat.prepared_network
    quantizer_names = [name for name, _ in qat._impl.quantizers(prepared)]
    if mode == "pt2e":
        gm = prepared.graph_module
        linears = [n for n in gm.graph.nodes if n.target == aten.linear.default]
        fc2 = next(n for n in linears if "fc2" in str(n.args[1].target))
        assert fc2.args[1].op == "get_attr", "fc2's weight must reach the linear unquantized"
        assert _pt2e_weights(qat.quantized_model.graph_module, "fc2") == [torch.float32]
    else:
        assert not any(name.startswith(("fc2", "net.fc2.module")) and "weight" in name for name in quantizer_names)
        fc2 = _float_layer(qat, "fc2")
        assert type(fc2) is nn.Linear
        # The float layer of the int8 model is the trained one.
        trained_fc2 = prepared.net.fc2.module if mode == "eager" else prepared.fc2
        assert torch.equal(fc2.weight, trained_fc2.weight)
    # The per-layer report compares the int8 model with the float network of the trained weights; the
    # skipped layer is not in it, and every int8 layer keeps its 8-bit error above 20 dB (a step of 1/256
    # of a range spread over its values; a wrong twin of the trained weights measured 0-5 dB).
    assert qat.layers.names == ["conv1", "conv2", "fc1"]
    # The reference holds the trained tensors (a twin of the initial weights would not).
    twin = trained_float_network(float_copy, prepared)
    trained_conv2 = prepared.get_submodule({"eager": "net.conv2", "fx": "conv2", "pt2e": "graph_module.conv2"}[mode]).weight
    assert torch.equal(twin.conv2.weight, trained_conv2) and not torch.equal(twin.conv2.weight, float_copy.conv2.weight)
    # Finite, and each layer's own error no larger than what its output carries end to end (0.5 dB slack
    # for the rounding of the float input onto the layer's input grid, which only the own run adds).
    assert all(math.isfinite(l.sqnr_db) and l.own_sqnr_db >= l.sqnr_db - 0.5 for l in qat.layers), qat.layers.format()
    # The checkpointed config carries the entries: resuming with other skipped layers is refused.
    state = qat.state_dict()
    assert state["skip"] == ["fc2"]
    other = QuantizationAwareTraining(mode, "x86", skip=["fc1"])
    with pytest.raises(QuantizationConfigError, match=r"trained with skip=\['fc2'\] but .* skip=\['fc1'\]"):
        other.load_state_dict(state)


def test_skipped_layer_keeps_quantization_out_of_its_output(trained, digits):
    """A layer kept float computes in float: with the last layer skipped, the logits carry no output
    rounding, so their error against float is the error the int8 layers before it made, and the
    skipped layer's float output equals the float layer applied to what arrives (exactly)."""
    model, _ = trained
    callback = PostTrainingQuantization("pt2e", "x86", "minmax", calibration_batches=4, skip=["fc2"])
    L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=1.0)).validate(
        model, dataloaders=digits.train_dataloader(), verbose=False
    )
    x = next(iter(digits.val_dataloader()))[0][:16]
    arrived = {}
    gm = copy.deepcopy(callback.quantized_model.graph_module)
    fc2 = next(n for n in gm.graph.nodes if n.target == aten.linear.default and "fc2" in str(n.args[1].target))

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is fc2:
                arrived["input"], arrived["output"] = self.env[n.args[0]], out
            return out

    with torch.no_grad():
        Record(gm).run(x)
        expected = model.net.fc2(arrived["input"])
    assert torch.equal(arrived["output"], expected)


def test_ptq_writes_and_logs_the_per_layer_report_and_skipping_the_worst_layer_helps(trained, digits, tmp_path):
    """layers.json beside the exports, TensorBoard scalars and chart, and the report's worst layer is one
    whose float fallback reduces the logits' error against float."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qlightning import compare_layers

    model, _ = trained
    x = torch.cat([b[0] for b, _ in zip(digits.val_dataloader(), range(4))])

    def quantize(skip, directory):
        callback = PostTrainingQuantization("pt2e", "x86", "minmax", calibration_batches=4, skip=skip,
                                            export=["onnx"], export_dir=str(directory / "quantized"))
        logger = TensorBoardLogger(str(directory), name="tb", version=0)
        L.Trainer(**trainer_kwargs(callbacks=[callback], logger=logger, limit_val_batches=1.0)).validate(
            model, dataloaders=digits.train_dataloader(), verbose=False)
        return callback

    callback = quantize(None, tmp_path / "all")
    written = json.loads((tmp_path / "all" / "quantized" / "layers.json").read_text())
    names = [layer["name"] for layer in written["layers"]]
    assert names == [layer.name for layer in callback.layers] and names[0] == "conv1"
    assert written["layers"][0]["members"] == ["conv1", "bn1", "relu1"]
    events = EventAccumulator(str(tmp_path / "all" / "tb" / "version_0"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {f"quant/layer_sqnr/{n}" for n in names} <= set(events.Tags()["scalars"])
    assert {f"quant/layer_skip_gain/{n}" for n in names} <= set(events.Tags()["scalars"])
    logged = {n: events.Scalars(f"quant/layer_skip_gain/{n}")[-1].value for n in names}
    assert logged == pytest.approx({layer.name: layer.skip_gain_db for layer in callback.layers}, abs=1e-4)
    assert "quant/layer_sqnr" in events.Tags()["images"]

    def logits_sqnr(quantized):
        with torch.no_grad():
            reference, out = model.net.eval()(x), quantized(x)
        return float(10 * torch.log10(reference.pow(2).sum() / (reference - out).pow(2).sum()))

    worst = callback.layers.worst(1)[0].name
    baseline = logits_sqnr(callback.quantized_model)
    fallback = logits_sqnr(quantize([worst], tmp_path / "worst").quantized_model)
    # The float fallback of the layer the report names worst must cut the logits' error measurably: at
    # least 0.5 dB (12 % less noise power), well beyond run-to-run noise, which is 0 here (deterministic).
    assert fallback >= baseline + 0.5, (worst, baseline, fallback)
    # And the report of the fallback model no longer lists it.
    assert worst not in compare_layers(model.net, quantize([worst], tmp_path / "again").quantized_model, x).names
