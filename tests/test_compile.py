"""``QuantizationAwareTraining(compile=...)``: QAT through ``torch.compile`` (PT2E).

The fast tests check the branch-free quantizers against torchao's, bit for bit, and the option's
validation. The ``slow`` ones compile (about 40 s per graph on 2 cores) and train through Lightning.
"""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qlightning import QuantizationAwareTraining, QuantizationConfigError
from qlightning.callbacks.config import build_recipe
from qlightning.callbacks.exporting import pass_check_inputs
from qlightning.data import DigitsDataModule
from qlightning.models import ImageClassifier, SmallCNN
from qlightning.modes.pt2e_compile import CompilableFakeQuantize, compilable_quantizers
from qlightning.modes.registry import get_mode
from tests.conftest import trainer_kwargs


def _prepared(backend: str, observer: str, activation_dtype=None):
    backend_, recipe = build_recipe("pt2e", backend, observer, "per_channel_symmetric", None, activation_dtype)
    torch.manual_seed(0)
    return get_mode("pt2e").prepare_qat(SmallCNN(), (torch.rand(4, 1, 8, 8),), recipe, backend_).train()


@pytest.mark.parametrize("backend,observer,activation_dtype", [
    ("x86", "moving_average_minmax", None),  # affine activations: torch's fused kernel, left as is
    ("x86", "minmax", None),
    ("tflite", "moving_average_minmax", None),  # symmetric per-channel weights, int8 activations
    ("onnxruntime", "minmax", "int16"),  # 16-bit symmetric activations
])
def test_branch_free_quantizers_are_bit_identical_to_torchao(backend, observer, activation_dtype):
    reference = _prepared(backend, observer, activation_dtype)
    branch_free = copy.deepcopy(reference)
    assert compilable_quantizers(branch_free) > 0
    assert compilable_quantizers(branch_free) == 0  # idempotent
    impl = get_mode("pt2e")
    networks = {"torchao": reference, "branch_free": branch_free}
    optimizers = {side: torch.optim.SGD(net.parameters(), lr=0.5) for side, net in networks.items()}
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        if step == 3:  # observers frozen: qparams must stop moving on both sides alike
            for net in networks.values():
                impl.set_observers_enabled(net, False)
        if step == 5:  # fake quantization off: the float path
            for net in networks.values():
                for _, quantizer in impl.quantizers(net):
                    quantizer.disable_fake_quant()
        # Shifted, scaled inputs: the moving averages and running extremes change every step.
        x = torch.rand(16, 1, 8, 8, generator=generator) * (1 + step) - 0.3 * step
        y = torch.randint(0, 10, (16,), generator=generator)
        outputs = {}
        for side, net in networks.items():
            optimizers[side].zero_grad()
            outputs[side] = net(x)
            torch.nn.functional.cross_entropy(outputs[side], y).backward()
            optimizers[side].step()
        assert torch.equal(outputs["branch_free"], outputs["torchao"]), step
        for (name, a), b in zip(reference.named_parameters(), branch_free.parameters()):
            assert torch.equal(a.grad, b.grad), (step, name)
        state, branch_free_state = reference.state_dict(), branch_free.state_dict()
        assert state.keys() == branch_free_state.keys()
        for key in state:
            assert torch.equal(state[key], branch_free_state[key]), (step, key)
    assert any(isinstance(m, CompilableFakeQuantize) for m in branch_free.modules())


def test_compile_option_is_checked_at_construction():
    with pytest.raises(QuantizationConfigError, match=r"compile must be True, False or a dict of torch.compile options"):
        QuantizationAwareTraining("pt2e", "x86", compile="yes")
    with pytest.raises(QuantizationConfigError, match=r"in mode='pt2e' only, got mode='fx'"):
        QuantizationAwareTraining("fx", "x86", compile=True)
    with pytest.raises(QuantizationConfigError, match=r"cannot train observer 'lsq' through torch.compile"):
        QuantizationAwareTraining("pt2e", "x86", "lsq", compile=True)
    with pytest.raises(QuantizationConfigError, match=r"cannot train observer 'histogram' through torch.compile"):
        QuantizationAwareTraining("pt2e", "x86", "histogram", compile=True)
    assert QuantizationAwareTraining("pt2e", "x86", compile={"mode": "max-autotune"}).compile_options == {
        "mode": "max-autotune"}
    assert QuantizationAwareTraining("pt2e", "x86").compile_options is None


def _compiled_fit(tmp_path, compile, max_epochs=2, ckpt_path=None, checkpoint=False, logger=False):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    # BN frozen from epoch 1: both training behaviours (BN updating, BN frozen) run compiled.
    qat = QuantizationAwareTraining("pt2e", "x86", compile=compile, freeze_bn_epoch=1)
    callbacks = [qat]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    if logger:
        from qlightning import QParamMonitor

        callbacks.append(QParamMonitor(log_every_n_steps=1, histograms=False))
    trainer = L.Trainer(**trainer_kwargs(
        max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, enable_checkpointing=checkpoint,
        logger=logger and L.pytorch.loggers.CSVLogger(tmp_path, name="logs")))
    datamodule = DigitsDataModule(batch_size=32)
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return trainer, model, qat, datamodule


def _sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (other - reference).pow(2).sum().clamp_min(1e-30)))


@pytest.mark.slow
def test_compiled_qat_trains_like_uncompiled_qat_and_converts_resumes_and_logs(tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    trainer, model, qat, datamodule = _compiled_fit(tmp_path / "compiled", True, checkpoint=True, logger=True)
    prepared = qat.prepared_network
    trained_state = {k: v.clone() for k, v in prepared.state_dict().items()}
    # One compiled graph per training behaviour and not one graph break: the quantizers traced whole.
    assert sorted(prepared._compiled) == [(False, True), (True, True)]
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The int8 model is the conversion of the trained state: an uncompiled, torchao-classed network loaded
    # with that state goes through the fit-end passes and conversion to the same int8 model. (Before
    # validate/test/predict: the passes verify themselves on the trainer's current validation batches.)
    x = next(iter(datamodule.val_dataloader()))[0]
    impl = get_mode("pt2e")
    reference = impl.prepare_qat(SmallCNN(), qat._example, qat.recipe, qat.backend).train()
    reference.load_state_dict(prepared.state_dict())
    assert not any(isinstance(m, CompilableFakeQuantize) for m in reference.modules())
    finalized = impl.finalize(reference, qat._example, share_split=qat.backend.shared_split_qparams,
                              keep_shared_quantizers=qat.backend.same_scale_concat,
                              check_inputs=pass_check_inputs(trainer))
    with torch.no_grad():
        assert torch.equal(impl.convert(finalized, qat.backend)(x), qat.quantized_model(x))

    # Lightning's stages after fit run the (uncompiled) evaluation graph and leave the qparams alone.
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    trainer.validate(model, datamodule)
    trainer.test(model, datamodule)
    assert trainer.predict(model, datamodule.val_dataloader())[0].shape[1] == 10
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())

    # Training numerics: the same run uncompiled. Compiled and uncompiled steps differ at float tolerance
    # (test_one_compiled_step_differs_from_uncompiled_as_a_one_ulp_input_change_does), and 8 steps of
    # Adam carry that into the weights; the two runs' logits must still agree 10 dB better than fake
    # quantization agrees with the float network, i.e. compile moves the model by a tenth of the
    # quantization noise power.
    _, eager_model, eager_qat, _ = _compiled_fit(tmp_path / "eager", False)
    x = next(iter(datamodule.val_dataloader()))[0]
    model.eval(), eager_model.eval()
    float_twin = copy.deepcopy(eager_qat.prepared_network)
    for _, quantizer in get_mode("pt2e").quantizers(float_twin):
        quantizer.disable_fake_quant()
    with torch.no_grad():
        compiled_logits, eager_logits, float_logits = model(x), eager_model(x), float_twin.eval()(x)
    agreement, quantization = _sqnr_db(eager_logits, compiled_logits), _sqnr_db(float_logits, eager_logits)
    assert agreement >= quantization + 10.0, (agreement, quantization)

    # Resume from the epoch-0 checkpoint, compiled: ends where the uninterrupted compiled run ended.
    _, resumed_model, resumed_qat, _ = _compiled_fit(
        tmp_path / "resumed", True, ckpt_path=tmp_path / "compiled" / "epoch=0.ckpt")
    resumed_state = resumed_qat.prepared_network.state_dict()
    for key, value in trained_state.items():  # (the forwards above observed: compare with the state fit ended in)
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=1e-6, msg=key)

    # QParamMonitor logged every step's qparams, and the compiled steps moved them.
    import csv

    rows = list(csv.DictReader(next((tmp_path / "compiled" / "logs").glob("**/metrics.csv")).open()))
    columns = [c for c in rows[0] if c.startswith("qparams/") and c.endswith("/scale")]
    curves = {c: [float(r[c]) for r in rows if r.get(c)] for c in columns}
    assert len(columns) >= 7 and all(len(curve) == 8 for curve in curves.values()), curves  # one per step
    assert any(len(set(curve[:4])) == 4 for curve in curves.values()), curves  # epoch 0's steps moved them


@pytest.mark.slow
def test_one_compiled_step_differs_from_uncompiled_as_a_one_ulp_input_change_does(digits):
    """Float tolerance, made physical: how far one uncompiled QAT step moves when its input changes by one
    ulp (x * (1 + 2**-23)). Rounding in a quantizer amplifies last-bit differences into whole steps, and
    train-mode BatchNorm's backward amplifies them again (measured on SmallCNN: 21-32 dB gradient SQNR for
    one ulp; aot_eager, which runs ATen's own kernels through AOTAutograd, 32-33 dB). A compiled step must
    stay within that: its logits and gradients at least as close to the uncompiled step's as the worst
    one-ulp change is, on the same batches."""
    batches = list(iter(digits.train_dataloader()))[:14]
    backend, recipe = build_recipe("pt2e", "x86", "moving_average_minmax", "per_channel_symmetric", None, None)
    torch.manual_seed(0)
    network = get_mode("pt2e").prepare_qat(SmallCNN(), (batches[0][0],), recipe, backend).train()
    compilable_quantizers(network)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    for x, y in batches[:10]:  # a trained state, not an initial one: qparams and BN statistics have moved
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(x), y).backward()
        optimizer.step()

    def step(net, x, y):
        net.zero_grad()
        logits = net(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    compiled = copy.deepcopy(network)
    compiled.compile_training()
    one_ulp, through_compile = [], []
    for x, y in batches[10:]:
        reference = step(copy.deepcopy(network), x, y)
        perturbed = step(copy.deepcopy(network), x * (1 + 2**-23), y)
        compiled.load_state_dict(network.state_dict())  # the same state for every batch
        result = step(compiled, x, y)
        assert compiled._compiled, "the step did not run compiled"
        one_ulp.append([_sqnr_db(r, p) for r, p in zip(reference, perturbed)])
        through_compile.append([_sqnr_db(r, c) for r, c in zip(reference, result)])
    worst_ulp = [min(values) for values in zip(*one_ulp)]
    worst_compile = [min(values) for values in zip(*through_compile)]
    assert worst_compile[0] >= worst_ulp[0], (through_compile, one_ulp)  # logits
    assert worst_compile[1] >= worst_ulp[1], (through_compile, one_ulp)  # gradients
