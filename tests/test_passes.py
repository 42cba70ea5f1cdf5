"""The deployment passes: BN folding, ReLU/clamp merge, unshared clamp observers, shared split
qparams, and eager/FX -> PT2E with exactly the trained qparams."""

import copy
import logging
import math

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from torch.nn import functional as F

from qlightning import quantized_engine
from qlightning.backends import get_backend
from qlightning.callbacks.config import build_recipe
from qlightning.models import SmallCNN
from qlightning.modes.registry import get_mode
from qlightning.passes import (
    PassToleranceError,
    ao_to_pt2e,
    fold_bn,
    merge_relu_clamp,
    share_split_qparams,
    unshare_clamp_observers,
)
from qlightning.passes import fold_qat_bn as fold_bn_module
from qlightning.passes.merge_clamp import narrowed_copy
from qlightning.spec import TensorQuantSpec, qparams_from_range

aten = torch.ops.aten


class PassNet(nn.Module):
    """conv-bn-relu, split into two convs, cat, residual add, relu6, clamp, adaptive pooling, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.left = nn.Conv2d(4, 4, 3, padding=1)
        self.right = nn.Conv2d(4, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        a, b = torch.split(x, 4, dim=1)
        y = torch.cat([self.left(a), self.right(b)], dim=1) + x
        y = torch.clamp(F.relu6(self.mix(y)), 0.0, 4.0)
        return self.fc(self.pool(y).flatten(1))


def _inputs(n=16, seed=0):
    return (torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)),)


def _trained(mode, net, observer="moving_average_minmax", ptq=False, steps=8, backend="x86"):
    """A prepared network that has seen data (QAT: trained-mode passes updating observers and BN)."""
    torch.manual_seed(0)
    backend, recipe = build_recipe(mode, backend, observer, "per_channel_symmetric", "per_tensor_affine")
    impl = get_mode(mode)
    example = _inputs(4)
    prepared = (impl.prepare_ptq if ptq else impl.prepare_qat)(net, example, recipe, backend)
    with torch.no_grad():
        for step in range(steps):
            prepared(*_inputs(16, seed=step + 1))
    prepared.eval()
    impl.set_observers_enabled(prepared, False)
    return impl, backend, prepared


def _fake_quant_modules(model):
    return [m for m in model.modules() if isinstance(m, tq.FakeQuantizeBase)]


def _output_step(prepared) -> float:
    """Scale of the last quantizer the FX graph calls before returning (one output step)."""
    output = next(n for n in prepared.graph.nodes if n.op == "output")
    return float(prepared.get_submodule(output.args[0].target).scale)


# -- 1. BatchNorm folding ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "fx"])
def test_fold_bn_preserves_outputs_and_leaves_no_batchnorm(mode):
    impl, backend, prepared = _trained(mode, SmallCNN())
    x = _inputs()
    with torch.no_grad():
        fake_quant_before = prepared(*x)
        prepared.apply(tq.disable_fake_quant)
        float_before = prepared(*x)
        prepared.apply(tq.enable_fake_quant)

    assert fold_bn(prepared, x) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    with torch.no_grad():
        fake_quant_after = prepared(*x)
        prepared.apply(tq.disable_fake_quant)
        float_after = prepared(*x)
        prepared.apply(tq.enable_fake_quant)
    torch.testing.assert_close(float_after, float_before, rtol=1e-5, atol=1e-5 * float_before.abs().max().item())
    # Fake quantization: the kept weight quantizer sees the same folded weight, so outputs agree to
    # well within one step of the final activation quantizer.
    step = max(float(m.scale.max()) for m in _fake_quant_modules(prepared) if m.scale.numel() == 1)
    assert (fake_quant_after - fake_quant_before).abs().max() <= step
    # The folded model still converts to int8 (the weight quantizers were kept).
    with quantized_engine("x86"), torch.no_grad():
        assert impl.convert(prepared, backend)(*x).shape == fake_quant_before.shape


def test_fold_bn_without_weight_fake_quant_gives_float_layers():
    _, _, prepared = _trained("fx", SmallCNN())
    fold_bn(prepared, _inputs(), keep_weight_fake_quant=False)
    assert type(prepared.conv1) is torch.ao.nn.intrinsic.ConvReLU2d
    assert not hasattr(prepared.conv1[0], "weight_fake_quant")


def test_fold_bn_folds_linear_bn():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    _, _, prepared = _trained("fx", net)
    assert fold_bn(prepared, _inputs()) == 1
    assert not any(isinstance(m, nn.BatchNorm1d) for m in prepared.modules())


def test_fold_bn_with_nothing_to_do_logs_and_changes_nothing(caplog):
    _, _, prepared = _trained("fx", nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    code = prepared.code
    with caplog.at_level(logging.DEBUG, logger="qlightning.passes.fold_qat_bn"):
        assert fold_bn(prepared, _inputs()) == 0
    assert "fold_bn: no QAT conv-bn / linear-bn module to fold; model unchanged" in caplog.text
    assert prepared.code == code


def test_fold_bn_that_would_change_outputs_raises_and_restores(monkeypatch):
    _, _, prepared = _trained("fx", SmallCNN())
    original = prepared.conv1
    real_fold = fold_bn_module._fold_one

    def broken_fold(module, keep):
        folded = real_fold(module, keep)
        folded.weight.data.mul_(1.5)
        return folded

    monkeypatch.setattr(fold_bn_module, "_fold_one", broken_fold)
    with pytest.raises(PassToleranceError, match=r"fold_bn changed the outputs by up to .* the model was left unchanged"):
        fold_bn(prepared, _inputs())
    assert prepared.conv1 is original


def _conv_output_divisions(gm) -> int:
    return sum(n.target == aten.div.Tensor and getattr(n.args[0], "target", None) == aten.conv2d.default for n in gm.graph.nodes)


def test_unscale_by_reciprocal_keeps_values_and_gradients():
    """The QAT-step speed-up rewrites torchao's ``conv / s`` as ``conv * detach(reciprocal(s))``: the
    forward and the gradients of weights and BN betas stay those of torchao's graph. The BN gammas lose
    the gradient through ``1 / s``: a training-mode batch norm is invariant to scaling its input per
    channel, so that term is zero up to ``eps / (batch_var + eps)``, and what torchao's graph computes
    for it is float32 rounding of a sum that cancels (measured: 2.3e-4 and 1.0e-4 of the largest gamma
    gradient, the same with eps = 1e-10 as with 1e-5). Bound: 1e-3 of the largest gamma gradient."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from qlightning.modes.pt2e import export_network, quantization_config
    from qlightning.passes import unscale_by_reciprocal

    backend, recipe = build_recipe("pt2e", "x86", "moving_average_minmax", "per_channel_symmetric",
                                   "per_tensor_affine")
    torch.manual_seed(0)
    network, x = SmallCNN(), torch.rand(8, 1, 8, 8)
    gammas = {f"{name}.weight" for name, module in network.named_modules() if isinstance(module, nn.BatchNorm2d)}
    graphs = []
    for _ in range(2):
        quantizer = backend.pt2e_quantizer(quantization_config(recipe, qat=True))
        # Each graph from its own copy: an exported graph shares BN buffers with the network, and the
        # first forward updates running_var, which scales the second graph's weights before fake-quant.
        graphs.append(prepare_qat_pt2e(export_network(copy.deepcopy(network).train(), (x,)), quantizer))
    original, rewritten = graphs
    assert unscale_by_reciprocal(rewritten) == 2  # SmallCNN's two conv-bn pairs
    assert unscale_by_reciprocal(rewritten) == 0  # idempotent
    assert _conv_output_divisions(original) == 2 and _conv_output_divisions(rewritten) == 0
    outputs = []
    for gm in (original, rewritten):
        out = gm(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    grads = [{n: p.grad for n, p in gm.named_parameters()} for gm in graphs]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 8 and gammas <= grads[0].keys()
    for name, grad in grads[0].items():
        if name in gammas:
            assert (grads[1][name] - grad).abs().max() <= 1e-3 * grad.abs().max(), name
        else:
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pt2e_conversion_leaves_no_batchnorm():
    impl, backend, prepared = _trained("pt2e", SmallCNN())
    # QAT preparation uses the reciprocal form; conversion still folds every conv-bn pair.
    prepared_targets = [n.target for n in prepared.graph_module.graph.nodes]
    assert aten.reciprocal.default in prepared_targets and _conv_output_divisions(prepared.graph_module) == 0
    converted = impl.convert(prepared, backend)
    targets = {n.target for n in converted.graph_module.graph.nodes}
    assert not any("batch_norm" in str(t) for t in targets)


# -- 2. ReLU / clamp merge --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,observed,clamp",
    [
        (TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False), (-3.0, 5.0), (0.0, math.inf)),
        (TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False), (-3.0, 9.0), (0.0, 6.0)),
        (TensorQuantSpec("int8", -128, 127, symmetric=False, per_channel=False), (-2.0, 2.0), (-0.5, 1.0)),
        (TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=False), (-3.0, 5.0), (0.0, 6.0)),
        (TensorQuantSpec("int8", -127, 127, symmetric=True, per_channel=False), (-4.0, 1.0), (-1.0, 6.0)),
    ],
)
def test_narrowed_qparams_follow_the_guides_formulas(spec, observed, clamp):
    fq = tq.FakeQuantize(observer=tq.MinMaxObserver, quant_min=spec.quant_min, quant_max=spec.quant_max,
                         dtype=torch.quint8 if spec.dtype == "uint8" else torch.qint8, qscheme=spec.qscheme)
    fq(torch.tensor(observed))
    new_lo, new_hi = max(clamp[0], observed[0]), min(clamp[1], observed[1])
    narrowed = narrowed_copy(fq, new_lo, new_hi)
    scale, zero_point = qparams_from_range(new_lo, new_hi, spec)
    assert float(narrowed.scale) == pytest.approx(scale, rel=1e-6) and int(narrowed.zero_point) == zero_point
    if spec.symmetric:  # +-max(|new_min|, |new_max|) over the whole integer range
        assert scale == pytest.approx(2 * max(abs(new_lo), abs(new_hi)) / (spec.quant_max - spec.quant_min), rel=1e-6)
    else:
        assert scale == pytest.approx((max(new_hi, 0) - min(new_lo, 0)) / (spec.quant_max - spec.quant_min), rel=1e-6)
    assert float(narrowed.scale) <= float(fq.scale)  # never coarser than before
    assert not narrowed.observer_enabled.item()  # frozen: later calls cannot widen it again


class ClampNet(nn.Module):
    """Standalone ReLU6 / clamp / ReLU, which the x86 BackendConfig observes with shared observers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu6(self.a(x)) + torch.clamp(self.b(x), -0.5, 0.5)
        return self.fc(F.relu(self.pool(self.c(y))).flatten(1))


def test_merge_relu_clamp_narrows_qparams_and_keeps_outputs():
    impl, backend, prepared = _trained("fx", ClampNet())
    x = _inputs()
    relu6_node = next(n for n in prepared.graph.nodes if n.target is F.relu6)
    shared = prepared.get_submodule(relu6_node.args[0].target)
    # The x86 config shares one observer across the ReLU6: its output uses the unclamped range.
    assert prepared.get_submodule(next(iter(relu6_node.users)).target) is shared
    with torch.no_grad():
        before = prepared(*x)
        relu6_out_before = F.relu6(prepared.a(prepared.activation_post_process_0(x[0])))

    assert merge_relu_clamp(prepared, x) == 3
    targets = [n.target for n in prepared.graph.nodes]
    assert F.relu6 not in targets and F.relu not in targets  # implemented by saturation now
    assert torch.clamp in targets  # [-0.5, 0.5] is not on the uint8 grid's ends: kept, before its quantizer
    merged = prepared.get_submodule(next(t for t in targets if isinstance(t, str) and "clamp_merged" in t))

    with torch.no_grad():
        after = prepared(*x)
        # Fewer wasted levels: the ReLU6 output now spans (almost) all 256 levels, not just the
        # non-negative part of the shared range.
        levels_before = torch.unique(shared(relu6_out_before)).numel()
        levels_after = torch.unique(merged(relu6_out_before)).numel()
    assert levels_after > levels_before
    step = _output_step(prepared)
    assert (after - before).abs().max() <= 4 * step
    assert 10 * torch.log10(before.pow(2).mean() / (after - before).pow(2).mean()) > 30
    with quantized_engine("x86"), torch.no_grad():  # still converts, and runs like the fake-quant model
        int8 = impl.convert(prepared, backend)(*x)
    assert (int8 - after).abs().max() <= 4 * step


class DeadClampNet(nn.Module):
    """A clamp whose input never reaches its range (always below 0): its output is exactly 0."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, 10)

    def forward(self, x):
        y = self.fc1(x.flatten(1)).sigmoid() - 2.0  # in (-2, -1)
        return self.fc2(torch.clamp(y, 0.0, 4.0))


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_merge_relu_clamp_of_a_clamp_its_input_never_reaches(mode):
    impl, backend, prepared = _trained(mode, DeadClampNet(), backend="onnxruntime")
    gm = prepared.graph_module if mode == "pt2e" else prepared
    x = _inputs()
    with torch.no_grad():
        before = prepared(*x)
    assert merge_relu_clamp(gm, x) == 1
    with torch.no_grad():
        after = prepared(*x)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_merge_relu_clamp_with_unshared_observers_drops_the_redundant_one():
    backend = get_backend("x86")
    config = unshare_clamp_observers(backend.fx_backend_config())
    _, recipe = build_recipe("fx", "x86", "moving_average_minmax", "per_channel_symmetric", "per_tensor_affine")
    from qlightning.modes.fx import qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from qlightning.modes import _ao

    mapping = qconfig_mapping(_ao.qat_qconfig(recipe), "x86", qat=True)
    prepared = prepare_qat_fx(ClampNet().train(), mapping, _inputs(4), backend_config=config)
    relu6 = next(n for n in prepared.graph.nodes if n.target is F.relu6)
    before_q = prepared.get_submodule(relu6.args[0].target)
    after_q = prepared.get_submodule(next(iter(relu6.users)).target)
    assert before_q is not after_q  # 3. the transform gave ReLU6 its own output observer
    with torch.no_grad():
        for step in range(4):
            prepared(*_inputs(16, seed=step))
    prepared.eval().apply(tq.disable_observer)
    assert float(after_q.activation_post_process.min_val) >= 0  # it only ever saw clamped values
    count = sum(isinstance(n.target, str) and n.op == "call_module" for n in prepared.graph.nodes)
    assert merge_relu_clamp(prepared, _inputs()) == 3
    assert sum(isinstance(n.target, str) and n.op == "call_module" for n in prepared.graph.nodes) < count


def test_unshare_leaves_the_original_config_alone():
    from torch.ao.quantization.backend_config import ObservationType

    original = get_backend("x86").fx_backend_config()
    unshared = unshare_clamp_observers(original)
    kinds = {c.pattern: c.observation_type for c in unshared.configs}
    assert kinds[F.relu6] == ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
    assert {c.pattern: c.observation_type for c in original.configs}[F.relu6] == (
        ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT
    )
    assert kinds[torch.cat] == {c.pattern: c.observation_type for c in original.configs}[torch.cat]


def test_merge_relu_clamp_with_nothing_to_do_logs(caplog):
    _, _, prepared = _trained("pt2e", SmallCNN(), observer="minmax", ptq=True)
    with caplog.at_level(logging.DEBUG, logger="qlightning.passes.merge_clamp"):
        assert merge_relu_clamp(prepared.graph_module, _inputs()) == 0
    assert "no clamp followed by a quantizer to merge; model unchanged" in caplog.text


def test_merge_relu_clamp_beyond_tolerance_raises_and_restores():
    _, _, prepared = _trained("fx", ClampNet())
    code = prepared.code
    # Allowed growth -100 dB: the merge would have to beat float by 100 dB, so it is refused.
    with pytest.raises(PassToleranceError, match=r"merge_relu_clamp made the model's error against the float network "
                                                 r".* dB larger \(SQNR against float .* dB before, .* dB after; allowed "
                                                 r"growth -100 dB\); the model was left unchanged"):
        merge_relu_clamp(prepared, _inputs(), max_noise_growth_db=-100.0)
    assert prepared.code == code
    with torch.no_grad():
        prepared(*_inputs())  # and still runs


def test_merge_relu_clamp_keeps_clamps_in_front_of_calibration_observers():
    impl, backend, observed = _trained("fx", ClampNet(), observer="minmax", ptq=True)
    x = _inputs()
    with torch.no_grad():
        before = observed(*x)
    assert merge_relu_clamp(observed, x) >= 1
    assert F.relu6 in [n.target for n in observed.graph.nodes]
    with torch.no_grad():  # observers are identity until conversion: same float function
        torch.testing.assert_close(observed(*x), before)


# -- 4. shared qparams for split children -------------------------------------------------------------


def test_split_children_share_the_parents_qparams():
    impl, backend, prepared = _trained("fx", PassNet())
    split = next(n for n in prepared.graph.nodes if n.target is torch.split)
    parent = prepared.get_submodule(split.args[0].target)
    children = [u for g in split.users for u in g.users if u.op == "call_module"]
    assert len(children) == 2
    assert any(prepared.get_submodule(c.target) is not parent for c in children)

    assert share_split_qparams(prepared) == 2
    for child in children:
        quantizer = prepared.get_submodule(child.target)
        assert quantizer is parent
        assert float(quantizer.scale) == float(parent.scale) and int(quantizer.zero_point) == int(parent.zero_point)
    with quantized_engine("x86"), torch.no_grad():
        impl.convert(prepared, backend)(*_inputs())
    assert share_split_qparams(prepared) == 0  # idempotent: nothing left to do


# -- 5 and 6. eager / FX -> PT2E ----------------------------------------------------------------------


def _check_pt2e_equals(prepared, backend, example, step):
    with torch.no_grad():
        reference = prepared(*example)
    program = ao_to_pt2e(prepared, example)
    converted = get_mode("pt2e").convert(program, backend)
    graph = converted.graph_module
    ops = [n.target for n in graph.graph.nodes]
    assert torch.ops.quantized_decomposed.quantize_per_tensor.default in ops
    assert not any("batch_norm" in str(t) for t in ops)
    int8_weights = [v for k, v in graph.named_buffers() if v.dtype == torch.int8]
    assert int8_weights, "weights should be stored as int8 constants"
    with torch.no_grad():
        out = converted(*example)
        assert converted(torch.randn(3, 1, 8, 8)).shape[0] == 3  # dynamic batch
    assert (out - reference).abs().max() <= step + 1e-6
    return converted


@pytest.mark.parametrize(
    "observer,backend", [("moving_average_minmax", "x86"), ("lsq", "x86"), ("minmax", "fbgemm"), ("minmax", "qnnpack")]
)
def test_fx_qat_to_pt2e_keeps_the_trained_qparams(observer, backend):
    impl, backend, prepared = _trained("fx", PassNet(), observer=observer, backend=backend)
    _check_pt2e_equals(prepared, backend, _inputs(), _output_step(prepared))


def _observer_qparams(model) -> set[tuple[float, int]]:
    """(scale, zero point) of every calibration observer of an eager/FX model."""
    return {
        (round(float(s), 9), int(z))
        for s, z in (m.calculate_qparams() for m in model.modules() if isinstance(m, tq.MinMaxObserver))
    }


def _quantize_op_qparams(converted) -> set[tuple[float, int]]:
    """(scale, zero point) of every per-tensor quantize op of a converted PT2E program."""
    return {
        (round(float(n.args[1]), 9), int(n.args[2]))
        for n in converted.graph_module.graph.nodes
        if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default
    }


def test_fx_ptq_and_post_processed_fx_to_pt2e():
    impl, backend, observed = _trained("fx", PassNet(), observer="minmax", ptq=True)
    x = _inputs()
    program = ao_to_pt2e(observed, x)
    converted = get_mode("pt2e").convert(program, backend)
    # Every activation is quantized with exactly the calibration observers' qparams ...
    assert _quantize_op_qparams(converted) == _observer_qparams(observed)
    # ... the weights, which torch.ao only quantizes at conversion, are int8 too ...
    assert sum(v.dtype == torch.int8 for v in converted.graph_module.buffers()) == 5
    # ... and the converted program computes what the carried-over fake-quantized program does.
    with torch.no_grad():
        assert torch.equal(converted(*x), program(*x))

    # After the deployment passes the FX model still carries over exactly.
    impl, backend, prepared = _trained("fx", PassNet())
    finalized = impl.finalize(prepared, x)
    share_split_qparams(finalized)
    _check_pt2e_equals(finalized, backend, x, _output_step(finalized))


@pytest.mark.parametrize("ptq", [False, True])
def test_eager_to_pt2e_keeps_the_trained_qparams(ptq):
    impl, backend, prepared = _trained("eager", SmallCNN(), observer="minmax", ptq=ptq)
    from qlightning.passes.exact_qparams import exact_observer

    x = _inputs()
    output_quantizer = prepared.net.fc2.activation_post_process
    step = float(exact_observer(output_quantizer).scale)
    if ptq:
        # Calibration observers do not fake-quantize: check that the PT2E program quantizes every
        # activation with exactly the eager observers' qparams, and runs like the eager int8 model.
        converted = get_mode("pt2e").convert(ao_to_pt2e(prepared, x), backend)
        assert _quantize_op_qparams(converted) == _observer_qparams(prepared)
        with quantized_engine("x86"), torch.no_grad():
            reference = impl.convert(prepared, backend)(*x)
            # Different int8 kernels round the requantization differently: a few output steps.
            assert (converted(*x) - reference).abs().max() <= 4 * step
    else:
        _check_pt2e_equals(prepared, backend, x, step)


# -- the callbacks run the passes at fit end ----------------------------------------------------------


def test_qat_callback_folds_bn_and_merges_clamps_at_fit_end(digits):
    import lightning as L

    from qlightning import PostTrainingQuantization, QuantizationAwareTraining
    from qlightning.models import ImageClassifier
    from tests.conftest import trainer_kwargs

    class ConvBnClampNet(ClampNet):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = F.relu6(self.bn(self.a(x))) + torch.clamp(self.b(x), -0.5, 0.5)
            return self.fc(F.relu(self.pool(self.c(y))).flatten(1))

    L.seed_everything(0, verbose=False)
    model = ImageClassifier(ConvBnClampNet(), lr=1e-3)
    qat = QuantizationAwareTraining("fx", "x86")
    L.Trainer(**trainer_kwargs(callbacks=[qat])).fit(model, digits)
    finalized = qat.finalized_network
    assert not any(isinstance(m, nn.BatchNorm2d) for m in finalized.modules())
    assert F.relu6 not in [n.target for n in finalized.graph.nodes]
    assert F.relu6 in [n.target for n in model.net.graph.nodes]  # the trainable network is untouched
    x = next(iter(digits.val_dataloader()))[0]
    with quantized_engine("x86"), torch.no_grad():
        agreement = (finalized(x).argmax(1) == qat.quantized_model(x).argmax(1)).float().mean()
    assert agreement >= 0.95

    L.seed_everything(0, verbose=False)
    model = ImageClassifier(ConvBnClampNet(), lr=1e-3)
    qat = QuantizationAwareTraining("fx", "x86", fold_bn=False, merge_relu=False)
    L.Trainer(**trainer_kwargs(callbacks=[qat])).fit(model, digits)
    assert F.relu6 in [n.target for n in qat.finalized_network.graph.nodes]
    assert any(isinstance(m, nn.BatchNorm2d) for m in qat.finalized_network.modules())

    # PTQ quantizes a float network (a QAT-prepared one is refused as already prepared).
    ptq = PostTrainingQuantization("fx", "x86", "minmax", calibration_batches=2)
    float_model = ImageClassifier(ConvBnClampNet(), lr=1e-3)
    L.Trainer(**trainer_kwargs(callbacks=[ptq])).validate(float_model, dataloaders=digits.train_dataloader(), verbose=False)
    merged = [n for n in ptq.finalized_network.graph.nodes if "clamp_merged" in str(n.target)]
    assert merged and F.relu6 in [n.target for n in ptq.finalized_network.graph.nodes]


@pytest.mark.parametrize("flag", ["fold_bn", "merge_relu"])
def test_pass_switches_must_be_booleans(flag):
    from qlightning import QuantizationAwareTraining, QuantizationConfigError

    with pytest.raises(QuantizationConfigError, match=rf"{flag} must be True or False, got 'yes'"):
        QuantizationAwareTraining(**{flag: "yes"})
