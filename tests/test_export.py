"""Exports: from every mode to ONNX (run in ONNX Runtime's integer kernels) and PT2, verified, atomic."""

import copy
import json
import re

import lightning as L
import onnx
import onnxruntime as ort
import numpy as np
import pytest
import torch

from qlightning import (
    ExportVerificationError,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationConfigError,
    export,
)
from qlightning.models import ImageClassifier, SmallCNN
from tests.conftest import trainer_kwargs
from tests.test_passes import PassNet, _inputs, _trained

REPORT_KEYS = {
    "format", "mode", "backend", "size_bytes", "float_size_bytes", "num_quantized_ops", "num_float_ops",
    "max_abs_diff", "max_abs_diff_in_steps", "top1_agreement", "sqnr_db", "runtime", "runtime_version",
}


def _integer_kernels(path, tmp_path) -> set[str]:
    """The op types ONNX Runtime actually runs after its (hardware-independent) QDQ fusions."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


@pytest.mark.parametrize(
    "mode,ptq,backend", [("eager", False, "x86"), ("fx", False, "x86"), ("pt2e", False, "x86"),
                         ("fx", True, "x86"), ("pt2e", True, "onnxruntime"), ("pt2e", False, "onnxruntime")]
)
def test_every_mode_exports_onnx_that_onnxruntime_runs_in_integer_kernels(mode, ptq, backend, tmp_path, float_baseline):
    # The digits-trained SmallCNN: an untrained one has near-tied logits, whose top-1 flips on rounding noise
    # (agreement 0.97 at SQNR 38 dB with seed 0), which says nothing about the export.
    torch.manual_seed(0)
    net = copy.deepcopy(float_baseline[0].net) if mode == "eager" else PassNet()
    impl, backend_obj, prepared = _trained(mode, net, observer="minmax", ptq=ptq, backend=backend)
    x = _inputs(4)
    finalized = impl.finalize(prepared, x, fold_bn=not ptq, share_split=backend_obj.shared_split_qparams)
    path = tmp_path / "net.onnx"
    report = export(finalized, x, "onnx", path, check_inputs=[_inputs(32, seed=7)], backend=backend)

    assert REPORT_KEYS <= set(report)
    assert json.loads((tmp_path / "net.onnx.report.json").read_text()) == report
    assert report["mode"] == mode and report["runtime"] == "onnxruntime" and report["check_samples"] == 36
    assert report["sqnr_db"] == "inf" or report["sqnr_db"] >= 35
    assert report["top1_agreement"] >= 0.99 and report["num_quantized_ops"] >= 4
    assert report["size_bytes"] == path.stat().st_size < report["float_size_bytes"]
    kernels = _integer_kernels(path, tmp_path)
    assert "QLinearConv" in kernels, kernels
    # Each node says which layer it belongs to, not the training machine's stack trace (which was 68 %
    # of the zoo ViT's int8 file).
    keys = {p.key for node in onnx.load(str(path)).graph.node for p in node.metadata_props}
    assert "namespace" in keys and not keys & {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}
    # The batch dimension is dynamic.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    assert session.run(None, {session.get_inputs()[0].name: torch.randn(3, 1, 8, 8).numpy()})[0].shape == (3, 10)


def test_pt2_export_round_trips(tmp_path):
    impl, _, prepared = _trained("fx", PassNet())
    finalized = impl.finalize(prepared, _inputs())
    report = export(finalized, _inputs(4), "pt2", tmp_path / "net.pt2")
    assert report["runtime"] == "torch" and report["sqnr_db"] == "inf"
    loaded = torch.export.load(str(tmp_path / "net.pt2")).module()
    with torch.no_grad():
        assert loaded(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_a_tolerance_violation_raises_and_leaves_no_file(tmp_path):
    impl, _, prepared = _trained("eager", SmallCNN())
    finalized = impl.finalize(prepared, _inputs())
    # A runtime would have to beat float by 100 dB: impossible, so verification fails.
    with pytest.raises(ExportVerificationError, match=r"onnxruntime does not run the trained model: its error against "
                                                      r"the float network is .* dB above the fake-quant model's own.*"
                                                      r"no file written"):
        export(finalized, _inputs(4), "onnx", tmp_path / "out" / "net.onnx", max_noise_growth_db=-100)
    assert list((tmp_path / "out").iterdir()) == []  # no model, no report, no temporary file


def test_a_runtime_that_adds_noise_is_caught_by_the_float_criterion(tmp_path, monkeypatch):
    """A runtime whose outputs carry extra noise as large as quantization's own fails verification,
    while the same export without it passes, with both errors against float in the report."""
    from qlightning.exporters import onnx_format

    impl, _, prepared = _trained("pt2e", SmallCNN())
    finalized = impl.finalize(prepared, _inputs())
    report = export(finalized, _inputs(4), "onnx", tmp_path / "net.onnx", check_inputs=[_inputs(32)])
    assert report["noise_growth_db"] <= 3.0 and report["tolerances"]["max_noise_growth_db"] == 3.0
    assert isinstance(report["runtime_float_sqnr_db"], float) and isinstance(report["fake_quant_float_sqnr_db"], float)
    true_run = onnx_format.run

    def noisy_run(path, inputs):
        out = true_run(path, inputs)
        # Three times the quantization noise's power, added: error power x4, 6 dB more.
        noise_power = 3 * np.mean(out**2) / 10 ** (report["fake_quant_float_sqnr_db"] / 10)
        return out + np.random.default_rng(0).normal(0, np.sqrt(noise_power), out.shape).astype(out.dtype)

    monkeypatch.setattr(onnx_format, "run", noisy_run)
    with pytest.raises(ExportVerificationError, match=r"dB above the fake-quant model's own .*allowed growth 3 dB"):
        export(finalized, _inputs(4), "onnx", tmp_path / "noisy.onnx", check_inputs=[_inputs(32)])
    assert not (tmp_path / "noisy.onnx").exists()


def test_a_converted_model_is_held_to_the_sqnr_floor_against_torch(tmp_path, monkeypatch):
    """A model that arrives converted has no float twin: the runtime is compared with it directly."""
    from qlightning.exporters import onnx_format

    impl, backend, prepared = _trained("pt2e", SmallCNN())
    converted = impl.convert(impl.finalize(prepared, _inputs()), backend)
    report = export(converted, _inputs(4), "onnx", tmp_path / "net.onnx")
    assert "runtime_float_sqnr_db" not in report and report["tolerances"]["min_sqnr_db"] == 35.0
    true_run = onnx_format.run

    def noisy_run(path, inputs):  # noise at 20 dB below the signal: under the 35 dB floor
        out = true_run(path, inputs)
        return out + np.random.default_rng(0).normal(0, np.sqrt(np.mean(out**2) / 100), out.shape).astype(out.dtype)

    monkeypatch.setattr(onnx_format, "run", noisy_run)
    with pytest.raises(ExportVerificationError, match=r"SQNR .* dB against the torch model \(min 35\)"):
        export(converted, _inputs(4), "onnx", tmp_path / "noisy.onnx")


def test_a_model_that_quantized_nothing_is_refused(tmp_path):
    with pytest.raises(QuantizationConfigError, match=r"SmallCNN has no quantizers and no quantize/dequantize ops: "
                                                      r"nothing was quantized"):
        export(SmallCNN().eval(), _inputs(4), "onnx", tmp_path / "net.onnx")
    assert not any(tmp_path.iterdir())


def test_an_eager_int8_model_is_refused_with_what_to_export_instead(tmp_path):
    impl, backend, prepared = _trained("fx", SmallCNN())
    with pytest.raises(QuantizationConfigError, match=r"eager/FX int8 model .* export the prepared network instead"):
        export(impl.convert(prepared, backend), _inputs(4), "onnx", tmp_path / "net.onnx")


def test_unknown_format():
    with pytest.raises(QuantizationConfigError, match=r"unknown export format 'tf'; valid export formats are: "
                                                      r"'onnx', 'openvino', 'pt2', 'tflite'"):
        export(SmallCNN(), _inputs(4), "tf", "x.tf")
    with pytest.raises(QuantizationConfigError, match=r"unknown export format 'onix'"):
        QuantizationAwareTraining(export=["onix"])
    with pytest.raises(QuantizationConfigError, match=r"export must be a list of format names"):
        PostTrainingQuantization(export="onnx")
    with pytest.raises(QuantizationConfigError, match=r"dynamic PTQ cannot be exported to ONNX"):
        PostTrainingQuantization(dynamic=True, export=["onnx"])


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_callbacks_export_at_the_end(mode, digits, tmp_path):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=1e-3)
    float_copy = ImageClassifier(SmallCNN())
    float_copy.load_state_dict(model.state_dict())
    qat = QuantizationAwareTraining(mode, export=["onnx", "pt2"])
    trainer = L.Trainer(**trainer_kwargs(callbacks=[qat], default_root_dir=tmp_path, limit_train_batches=8))
    trainer.fit(model, digits)
    out = tmp_path / "quantized"  # <trainer.log_dir or default_root_dir>/quantized
    assert sorted(p.name for p in out.iterdir()) == ["layers.json", "net.onnx", "net.onnx.report.json", "net.pt2",
                                                      "net.pt2.report.json"]
    # Beside the exports, the per-layer error of the int8 model against the float network of the trained weights.
    assert [layer["name"] for layer in json.loads((out / "layers.json").read_text())["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    report = qat.exported["onnx"]
    assert report["check_samples"] == 2 + 360  # example inputs + the validation set's batches
    assert report["top1_agreement"] >= 0.99 and report["backend"] == "x86"

    ptq = PostTrainingQuantization(mode, "onnxruntime" if mode == "pt2e" else "x86", "minmax",
                                   calibration_batches=4, export=["onnx"], export_dir=str(tmp_path / "ptq"))
    L.Trainer(**trainer_kwargs(callbacks=[ptq])).validate(float_copy, digits, verbose=False)
    assert (tmp_path / "ptq" / "net.onnx").is_file() and ptq.exported["onnx"]["top1_agreement"] >= 0.99


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_networks_export_via_ptq(name, tmp_path):
    import torchvision

    from qlightning.callbacks.config import build_recipe
    from qlightning.modes.registry import get_mode

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()  # random weights, no download
    x = (torch.randn(2, 3, 64, 64),)
    backend, recipe = build_recipe("pt2e", "onnxruntime", "minmax", "per_channel_symmetric", "per_tensor_affine")
    impl = get_mode("pt2e")
    observed = impl.prepare_ptq(net, x, recipe, backend)
    with torch.no_grad():
        for _ in range(3):
            observed(torch.randn(8, 3, 64, 64))
    finalized = impl.finalize(observed, x, fold_bn=False, share_split=True)
    # Random weights amplify one-step rounding flips between torch's and ORT's float ops layer after
    # layer (~34 dB on resnet18 even with ORT's optimizations off); trained models clear 35 dB.
    report = export(finalized, x, "onnx", tmp_path / f"{name}.onnx", check_inputs=[torch.randn(8, 3, 64, 64)],
                    min_sqnr_db=30.0)
    assert report["size_bytes"] < 0.3 * report["float_size_bytes"]
    assert report["num_quantized_ops"] > 20


def test_export_script_exports_a_qat_checkpoint(tmp_path, digits):
    from hydra import compose, initialize_config_dir

    from qlightning.jobs import export_checkpoint
    from tests.test_default_job import CONF

    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN())
    qat = QuantizationAwareTraining("fx", "x86")
    trainer = L.Trainer(**trainer_kwargs(callbacks=[qat], max_epochs=2))
    trainer.fit(model, digits)
    ckpt = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(ckpt)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={ckpt}", "quant=qat_fx", "format=[onnx,pt2]"])
    summary = export_checkpoint(cfg, tmp_path / "run")
    assert set(summary["exported"]) == {"onnx", "pt2"}
    assert (tmp_path / "run" / "quantized" / "net.onnx").is_file()
    assert summary["exported"]["onnx"]["top1_agreement"] >= 0.99


def test_an_export_with_no_quantized_compute_op_fails(tmp_path):
    from qlightning.callbacks.config import build_recipe
    from qlightning.modes.registry import get_mode

    # Only a reshape gets quantize/dequantize around it: nothing runs in an integer kernel.
    backend, recipe = build_recipe("pt2e", "onnxruntime", "minmax", "per_channel_symmetric", "per_tensor_affine")
    impl = get_mode("pt2e")
    observed = impl.prepare_ptq(torch.nn.Flatten(), _inputs(4), recipe, backend)
    with torch.no_grad():
        observed(*_inputs())
    with pytest.raises(ExportVerificationError, match=r"the onnx export of ExportedNetwork has no quantized op "
                                                      r"\(\d+ float ops\): nothing was quantized; no file written"):
        export(impl.finalize(observed, _inputs(4), fold_bn=False), _inputs(4), "onnx", tmp_path / "flat.onnx")
    assert not any(tmp_path.iterdir())


def test_symmetric_weights_have_zero_point_zero_in_one_signed_channels(tmp_path):
    """torch's fused observe+fake-quantize kernel gives a one-signed channel zero point +-127 under a
    symmetric scheme; qlightning's QAT quantizers must not, in any mode."""
    from qlightning.passes.exact_qparams import current_qparams
    from qlightning.passes.graph import is_quantizer

    for mode in ("eager", "fx", "pt2e"):
        net = SmallCNN()
        with torch.no_grad():  # one all-positive and one all-negative output channel in the first conv
            net.conv1.weight[0].abs_()
            net.conv1.weight[1].copy_(-net.conv1.weight[1].abs())
        impl, _, prepared = _trained(mode, net)
        weight_quantizers = [(n, m) for n, m in prepared.named_modules()
                             if is_quantizer(m) and getattr(m, "qscheme", None) == torch.per_channel_symmetric]
        assert weight_quantizers, mode
        for name, quantizer in weight_quantizers:
            assert current_qparams(quantizer)[1].abs().max().item() == 0, (mode, name)
        export(impl.finalize(prepared, _inputs()), _inputs(4), "onnx", tmp_path / f"{mode}.onnx")


def test_a_symmetric_quantizer_with_a_nonzero_zero_point_is_refused_before_export(tmp_path):
    from qlightning.passes.graph import is_quantizer

    impl, _, prepared = _trained("pt2e", SmallCNN())
    finalized = impl.finalize(prepared, _inputs())
    name, quantizer = next((n, m) for n, m in finalized.named_modules()
                           if is_quantizer(m) and getattr(m, "qscheme", None) == torch.per_channel_symmetric)
    quantizer.zero_point[3] = -127
    with pytest.raises(ExportVerificationError, match=rf"quantizer {re.escape(name)} is torch.per_channel_symmetric "
                                                      r"but holds zero point -127 in channel 3 .*symmetric means 0"):
        export(finalized, _inputs(4), "onnx", tmp_path / "net.onnx")
    assert not any(tmp_path.iterdir())


def test_the_float_twin_keeps_the_saturation_that_replaced_a_merged_relu(tmp_path):
    """After merge_relu_clamp drops a ReLU whose quantizer saturates at 0, the float reference must
    still clamp there: the fake-quant model is then within quantization noise of it."""
    from qlightning.passes.graph import float_twin
    from qlightning.passes.verify import sqnr_db

    impl, _, prepared = _trained("pt2e", SmallCNN(), steps=16)
    finalized = impl.finalize(prepared, _inputs())
    graph = finalized.graph_module.graph
    assert not any("relu" in str(n.target) for n in graph.nodes if n.op == "call_function")  # merged away
    x = _inputs(64, seed=7)[0]
    with torch.no_grad():
        assert sqnr_db(float_twin(finalized)(x), finalized(x)) > 25  # 8-bit rounding noise only
    report = export(finalized, _inputs(4), "onnx", tmp_path / "net.onnx", check_inputs=[(x,)])
    assert report["fake_quant_float_sqnr_db"] > 25 and abs(report["noise_growth_db"]) < 1
