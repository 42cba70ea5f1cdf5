"""Causes found by running torchvision / timm networks through qlightning (the zoo, issue 17), each
pinned by a test on the real architecture or the smallest network that has the same structure."""

import math

import lightning as L
import pytest
import torch
from torch import nn

from qlightning import PostTrainingQuantization, QuantizationAwareTraining
from qlightning.callbacks.config import build_recipe
from qlightning.cpu import u8s8_saturates
from qlightning.errors import QuantizationConfigError, UntraceableModelError
from qlightning.models import ImageClassifier
from qlightning.modes.registry import get_mode
from qlightning.passes.verify import sqnr_db


def _recipe(mode, backend="x86", observer="moving_average_minmax"):
    return build_recipe(mode, backend, observer, "per_channel_symmetric", "per_tensor_affine")


def _prepared_torchvision(name, mode):
    """A random-weight torchvision classifier prepared for QAT on x86: (impl, backend, prepared, x)."""
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    backend, recipe = _recipe(mode)
    impl = get_mode(mode)
    return impl, backend, impl.prepare_qat(net, (x,), recipe, backend), x


class TransformerClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_eager_dynamic_ptq_of_a_transformer_encoder_runs_and_matches_float():
    """torch 2.14.1's encoder fast-path check read `.weight.device` of the dynamic int8 Linear (a
    method): "'function' object has no attribute 'device'"."""
    torch.manual_seed(0)
    net, x = TransformerClassifier().eval(), torch.randn(8, 6, 32)
    backend, recipe = _recipe("eager", observer="minmax")
    quantized = get_mode("eager").quantize_dynamic(net, (x,), recipe, backend)
    with torch.no_grad():
        reference, out = net(x), quantized(x)
    # 8-bit weights and per-batch activations: quantization noise ~40 dB per Linear; 5 in series.
    assert sqnr_db(reference, out) > 25
    assert torch.backends.mha.get_fastpath_enabled()  # the int8 model's scope restored the setting


@pytest.mark.parametrize("ptq", [False, True])
def test_eager_refuses_multihead_attention_with_the_way_out(ptq):
    backend, recipe = _recipe("eager", observer="minmax")
    impl = get_mode("eager")
    prepare = impl.prepare_ptq if ptq else impl.prepare_qat
    with pytest.raises(QuantizationConfigError, match=r"mode='eager' cannot quantize nn.MultiheadAttention "
                                                      r"\(encoder.layers.0.self_attn, encoder.layers.1.self_attn in "
                                                      r"TransformerClassifier\).*Use mode='fx' or mode='pt2e'"):
        prepare(TransformerClassifier(), (torch.randn(2, 6, 32),), recipe, backend)


def test_eager_refuses_a_torchvision_resnet_before_training_and_names_its_quantizable_variant():
    import torchvision

    module = ImageClassifier(torchvision.models.resnet18(weights=None, num_classes=10), input_shape=(3, 32, 32))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        callbacks=[QuantizationAwareTraining("eager", "x86")])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32),
                                                                      torch.randint(0, 10, (8,))), batch_size=4)
    with pytest.raises(UntraceableModelError, match=r"mode='eager' could not capture ResNet.*"
                                                    r"torchvision.models.quantization \(resnet, mobilenet_v2/v3"):
        trainer.fit(module, data, data)
    assert trainer.global_step == 0


@pytest.mark.parametrize("qat", [
    pytest.param(True, marks=pytest.mark.xfail(
        u8s8_saturates(), strict=False,
        reason="open (session 2026-12-02): on x86 without VNNI the x86 backend trains 7-bit weights, and after 2 QAT "
               "steps of this random-weight resnet18 on random images ONNX Runtime adds 3.7 dB of noise against float "
               "beyond fake quantization's own (limit 3 dB; max diff 2 output steps; the file carries the 7-bit "
               "ranges exactly). Judge it on briefly trained real data before changing anything.")),
    False,
])
def test_eager_takes_torchvision_quantizable_resnet18_as_it_is(qat, tmp_path):
    """Its own QuantStub / FloatFunctional adds / fuse_model: no second pair of stubs, no auto-fusion."""
    from torchvision.models.quantization import resnet18

    torch.manual_seed(0)
    module = ImageClassifier(resnet18(weights=None, quantize=False, num_classes=10), input_shape=(3, 32, 32))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32),
                                                                      torch.randint(0, 10, (16,))), batch_size=8)
    trainer_args = dict(logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    if qat:
        callback = QuantizationAwareTraining("eager", "x86", export=["onnx"], export_dir=tmp_path)
        L.Trainer(max_steps=2, callbacks=[callback], **trainer_args).fit(module, data, data)
    else:
        callback = PostTrainingQuantization("eager", "x86", calibration_batches=2, export=["onnx"], export_dir=tmp_path)
        L.Trainer(callbacks=[callback], **trainer_args).validate(module, data)
    stubs = [n for n, m in callback.finalized_network.named_modules() if isinstance(m, torch.ao.quantization.QuantStub)]
    assert stubs == ["quant"]  # torchvision's own, not wrapped in another
    report = callback.exported["onnx"]
    assert report["num_quantized_ops"] >= 20 and report["noise_growth_db"] <= 3.0


def test_pt2e_x86_quantizes_each_call_of_a_reused_activation_module():
    """torchvision's BasicBlock calls one `self.relu` twice; torchao 0.18's x86 quantizer raised
    "Input partition has more than one output node" on resnet18."""
    impl, backend, prepared, x = _prepared_torchvision("resnet18", "pt2e")
    graph = prepared.graph_module.graph
    relus = [n for n in graph.nodes if n.op == "call_function" and "relu" in str(n.target)]
    # Every ReLU call's output is observed: after bn1 (conv-bn-relu) and after the add (add-relu), 17 in all.
    assert len(relus) == 17
    assert all(any(u.op == "call_module" and "activation_post_process" in u.target for u in r.users) for r in relus)
    with torch.no_grad():
        prepared(torch.randn(4, 3, 32, 32))
    finalized = impl.finalize(prepared, (x,))
    converted = impl.convert(finalized, backend)
    with torch.no_grad():
        assert sqnr_db(finalized.eval()(x), converted(x)) > 30  # the int8 graph computes the fake-quant model


def test_fx_converts_timm_mobilenetv3_after_the_relu_merge_removed_nodes(monkeypatch):
    """merge_relu_clamp's dead-code pass erases nodes that the prepare-time qconfig map names (the rank
    checks of timm's norm-act layers, traced through); torch 2.14.1's convert_fx raised "Expected key
    getattr_2 in convert node_name_to_qconfig". timm's BatchNormAct2d is now split before tracing, so the
    split is turned off here to keep tracing through such a layer, as FX does for a user's own."""
    import timm

    import qlightning.modes.fx_rewrites

    monkeypatch.setattr(qlightning.modes.fx_rewrites, "split_timm_batchnorm_act", lambda network: 0)
    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    backend, recipe = _recipe("fx")
    impl = get_mode("fx")
    prepared = impl.prepare_qat(net, (x,), recipe, backend)
    with torch.no_grad():
        for _ in range(3):
            prepared(torch.randn(8, 3, 32, 32))
    finalized = impl.finalize(prepared, (x,), merge_relu=True)
    graph_nodes = {n.name for n in finalized.graph.nodes}
    prepared_map = finalized.meta["_observed_graph_module_attrs"].node_name_to_qconfig
    assert set(prepared_map) - graph_nodes  # the merge did remove nodes the prepare map names
    converted = impl.convert(finalized, backend)
    with torch.no_grad():
        assert converted(x).shape == (2, 10)


def test_eager_takes_torchvision_quantizable_mobilenet_v2_whose_unused_skip_adds_never_observe(tmp_path):
    """Every QuantizableInvertedResidual holds a skip_add; blocks without a residual never call it."""
    from torchvision.models.quantization import mobilenet_v2

    torch.manual_seed(0)
    module = ImageClassifier(mobilenet_v2(weights=None, quantize=False, num_classes=10), input_shape=(3, 32, 32))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32),
                                                                      torch.randint(0, 10, (16,))), batch_size=8)
    callback = PostTrainingQuantization("eager", "x86", calibration_batches=2)
    L.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False, default_root_dir=tmp_path).validate(
        module, data)
    with torch.no_grad():
        assert callback.quantized_model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_eager_still_refuses_a_network_that_never_ran():
    from torchvision.models.quantization import mobilenet_v2

    backend, recipe = _recipe("eager", observer="minmax")
    impl = get_mode("eager")
    observed = impl.prepare_ptq(mobilenet_v2(weights=None, quantize=False, num_classes=10),
                                (torch.randn(2, 3, 32, 32),), recipe, backend)
    with pytest.raises(QuantizationConfigError, match=r"quantizers saw no data before conversion .*never ran"):
        impl.finalize(observed, (torch.randn(2, 3, 32, 32),))


def test_fx_keeps_stochastic_depth_a_module_so_eval_is_deterministic():
    """Traced in train mode, torchvision's StochasticDepth stayed random in eval (efficientnet_b0's
    FX fold_bn saw outputs move by 0.77 between two eval passes)."""
    impl, _, prepared, x = _prepared_torchvision("efficientnet_b0", "fx")
    with torch.no_grad():
        prepared(torch.randn(8, 3, 32, 32))
        prepared.eval()
        impl.set_observers_enabled(prepared, False)  # eval passes must not move the qparams either
        torch.testing.assert_close(prepared(x), prepared(x), rtol=0, atol=0)
    assert any(type(m).__name__ == "StochasticDepth" for m in prepared.modules())
    impl.finalize(prepared, (x,))  # fold_bn verifies itself against eval outputs


def test_fx_splits_timm_batchnorm_act_so_eval_uses_running_statistics_and_bn_folds():
    """timm's BatchNormAct2d calls F.batch_norm with ``training`` read at trace time: traced for QAT, the
    converted model normalized with batch statistics in eval and BN never folded into the conv (timm
    mobilenetv3 FX QAT: ORT 7 dB further from float than fake quant)."""
    import timm
    from torch.ao.nn.intrinsic.qat import ConvBn2d, ConvBnReLU2d

    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10)
    bn_weight = net.bn1.weight
    x = torch.randn(4, 3, 32, 32)
    backend, recipe = _recipe("fx")
    prepared = get_mode("fx").prepare_qat(net, (x,), recipe, backend)
    assert not [n for n in prepared.graph.nodes if n.target is torch.nn.functional.batch_norm]
    fused = [m for m in prepared.modules() if isinstance(m, (ConvBn2d, ConvBnReLU2d))]
    assert len(fused) == sum(isinstance(m, nn.BatchNorm2d) for m in timm.create_model(
        "mobilenetv3_small_100", pretrained=False, num_classes=10).modules())
    assert any(m.bn.weight is bn_weight for m in fused)  # the optimizer's Parameter still trains
    with torch.no_grad():
        prepared(torch.randn(8, 3, 32, 32))
        prepared.eval()
        get_mode("fx").set_observers_enabled(prepared, False)
        # In eval each image's output is its own, whatever else is in the batch.
        torch.testing.assert_close(prepared(x)[:1], prepared(x[:1]), rtol=1e-4, atol=1e-5)


class SiluSqueezeExcite(nn.Module):
    """EfficientNet's pieces: conv-bn-SiLU, then a squeeze-excitation gate x * sigmoid(conv(mean(x)))."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.head((x * gate).mean((2, 3)))


@pytest.mark.parametrize("mode", ["pt2e", "fx"])
def test_onnxruntime_backend_runs_silu_and_gates_in_integer_kernels(mode, tmp_path):
    """Left float, EfficientNet's SiLU / squeeze-excitation made ORT 1.8-2.1x slower than quantize_static
    (PT2E: the quantizer annotates them; FX: nn.SiLU is traced as x * sigmoid(x))."""
    import collections

    import onnx
    import onnxruntime as ort

    from qlightning import export

    torch.manual_seed(0)
    net, x = SiluSqueezeExcite().eval(), torch.randn(4, 3, 16, 16)
    backend, recipe = _recipe(mode, backend="onnxruntime", observer="minmax")
    impl = get_mode(mode)
    observed = impl.prepare_ptq(net, (x,), recipe, backend)
    with torch.no_grad():
        observed(torch.randn(32, 3, 16, 16))
    report = export(impl.finalize(observed, (x,)), (x,), "onnx", tmp_path / "net.onnx",
                    check_inputs=[(torch.randn(32, 3, 16, 16),)], backend="onnxruntime")
    assert report.get("noise_growth_db", 0.0) <= 3.0 and report["sqnr_db"] >= 35
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "net.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearSigmoid"] == 2 and ops["QLinearMul"] == 2  # SiLU's and the gate's
    assert ops["Sigmoid"] == 0 and ops["Mul"] == 0


@pytest.mark.parametrize("mode,backend", [("pt2e", "onnxruntime"), ("fx", "x86")])
def test_vit_qat_with_the_default_model_summary(mode, backend, tmp_path):
    """The class token, expanded to the batch, feeds a quantizer; Lightning's model summary counts
    FLOPs under no_grad, and torch 2.14.1's ModuleTracker asserted "Expected gradient function to be
    set" on that view of a parameter: a default Trainer crashed at fit start."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    module = ImageClassifier(net, input_shape=(3, 32, 32))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32),
                                                                      torch.randint(0, 10, (16,))), batch_size=8)
    # FX's ViT export is left out: ONNX Runtime adds 3.4 dB over fake-quant's error there (an open
    # mismatch in the transformer ops, see docs/zoo.md); this test is about fit starting at all.
    export = ["onnx"] if mode == "pt2e" else None
    callback = QuantizationAwareTraining(mode, backend, export=export, export_dir=tmp_path)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    assert any(isinstance(c, L.pytorch.callbacks.ModelSummary) for c in trainer.callbacks)
    trainer.fit(module, data, data)
    assert callback.quantized_model is not None
    if export:
        assert callback.exported["onnx"]["noise_growth_db"] <= 3.0


class ChannelShuffle(nn.Module):
    """shufflenet's channel shuffle: view, transpose, ``.contiguous()``, view."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(x.mean((2, 3)))


def test_onnxruntime_backend_keeps_one_scale_through_contiguous():
    """A copy moves no values: with its own quantizer, QAT gave the copy a scale of its own (fake-quantized
    input, other min/max), and ORT ran shufflenet's 16 channel shuffles as DQ -> Transpose -> Q."""
    backend, recipe = _recipe("pt2e", backend="onnxruntime")
    impl = get_mode("pt2e")
    prepared = impl.prepare_qat(ChannelShuffle(), (torch.randn(2, 3, 8, 8),), recipe, backend)
    gm = prepared.graph_module
    copy_node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.contiguous.default)
    before, after = copy_node.args[0], next(iter(copy_node.users))
    assert before.op == after.op == "call_module"
    assert gm.get_submodule(before.target) is gm.get_submodule(after.target)
