"""Real-Trainer QAT in every mode x backend: prepare, train, freeze on schedule, convert."""


import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from qlightning import QuantizationAwareTraining, quantized_engine
from tests.conftest import trainer_kwargs

MODES = ["eager", "fx", "pt2e"]
BACKENDS = ["x86", "fbgemm", "qnnpack"]


def _quantizer_state(cb):
    """Every quantizer's qparam-bearing tensors (observer min/max, scale, zero point)."""
    state = {}
    for name, fq in cb._impl.quantizers(cb.prepared_network):
        for key, value in fq.state_dict().items():
            if any(part in key for part in ("min_val", "max_val", "scale", "zero_point")):
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def _bn_stats(cb):
    net = cb.prepared_network
    return {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k or "running_var" in k}


class _Recorder(Callback):
    """Snapshots quantizer and BN state at the start and end of every training epoch."""

    def __init__(self, qat):
        self.qat, self.snapshots = qat, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.snapshots.append(("start", trainer.current_epoch, _quantizer_state(self.qat), _bn_stats(self.qat)))

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots.append(("end", trainer.current_epoch, _quantizer_state(self.qat), _bn_stats(self.qat)))


def _changed(a, b):
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


class _ValidationRecorder(Callback):
    def __init__(self, qat):
        self.qat, self.pairs = qat, []

    def on_validation_start(self, trainer, pl_module):
        self.before = _quantizer_state(self.qat)

    def on_validation_end(self, trainer, pl_module):
        self.pairs.append((self.before, _quantizer_state(self.qat)))


@pytest.mark.parametrize("mode", MODES)
def test_validation_does_not_move_qparams(mode, classifier, digits):
    """Quantizers observe in eval mode too; during fit's validation the callback stops them, so
    validation data never shifts the qparams (and DDP ranks, validating different data, stay equal)."""
    qat = QuantizationAwareTraining(mode, "x86", "moving_average_minmax")
    recorder = _ValidationRecorder(qat)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=2, num_sanity_val_steps=1, limit_val_batches=3,
                                         callbacks=[qat, recorder]))
    trainer.fit(classifier, digits)
    assert len(recorder.pairs) == 3  # the sanity check and two epochs
    for before, after in recorder.pairs[1:]:
        assert before and not _changed(before, after), "validation changed quantizer statistics"
    assert not qat.observers_frozen  # and training observes again afterwards (the schedule test checks it moves)


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_keeps_training_after_validation(mode, classifier, digits):
    """Lightning restores the train mode after validation by assigning ``module.training``; the
    prepared network must still train its BatchNorm afterwards (PT2E graphs once stayed in eval)."""
    qat = QuantizationAwareTraining(mode, "x86")
    recorder = _Recorder(qat)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=2, num_sanity_val_steps=1, callbacks=[qat, recorder]))
    trainer.fit(classifier, digits)
    for phase, epoch, _, bn_start in recorder.snapshots[::2]:
        bn_end = next(bn for p, e, _, bn in recorder.snapshots if p == "end" and e == epoch)
        assert bn_start and _changed(bn_start, bn_end), f"BatchNorm statistics did not update in epoch {epoch}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_qat_trains_freezes_on_schedule_and_converts(mode, backend, classifier, digits):
    qat = QuantizationAwareTraining(mode, backend, "minmax", freeze_bn_epoch=1, freeze_observers_epoch=2)
    recorder = _Recorder(qat)  # runs after qat in each hook: sees the schedule already applied
    trainer = L.Trainer(**trainer_kwargs(max_epochs=3, callbacks=[qat, recorder]))
    trainer.fit(classifier, digits)

    (_, _, q0s, bn0s), (_, _, q0e, bn0e), (_, _, q1s, bn1s), (_, _, q1e, bn1e), (_, _, q2s, bn2s), (_, _, q2e, bn2e) = (
        recorder.snapshots
    )
    # Epoch 0: everything learns. Epoch 1: BN frozen, observers still moving. Epoch 2: both frozen.
    assert _changed(bn0s, bn0e) and _changed(q0s, q0e)
    assert bn1s and not _changed(bn1s, bn1e), "BatchNorm statistics changed after freeze_bn_epoch"
    assert _changed(q1s, q1e), "observers stopped before freeze_observers_epoch"
    assert not _changed(q2s, q2e), "qparams changed after freeze_observers_epoch"
    assert not _changed(bn2s, bn2e)
    assert qat.observers_frozen and qat.bn_frozen

    # int8 model: real integer weights, and it agrees with the fake-quant model.
    int8 = qat.quantized_model
    assert int8 is not None and int8 is not qat.prepared_network
    x = next(iter(digits.val_dataloader()))[0][:64]
    classifier.eval()
    with torch.no_grad(), quantized_engine(qat.backend.engine):
        fake = classifier(x)
        real = int8(x)
    int8_tensors = [t for t in int8.state_dict().values() if isinstance(t, torch.Tensor) and t.dtype in (torch.qint8, torch.int8)]
    packed = [m for m in int8.modules() if "quantized" in type(m).__module__]
    assert int8_tensors or packed, "converted model holds no int8 weights"
    assert (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.95
    assert torch.nn.functional.cosine_similarity(fake.flatten(), real.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("mode", MODES)
def test_optimizer_trains_the_prepared_weights(mode, classifier, digits):
    """The classic silent failure: an optimizer holding the float weights the prepared model no longer uses."""
    qat = QuantizationAwareTraining(mode, "x86")

    class Check(Callback):
        def on_train_start(self, trainer, pl_module):
            self.before = {k: v.detach().clone() for k, v in qat.prepared_network.named_parameters()}
            optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            self.missing = [k for k, p in qat.prepared_network.named_parameters() if id(p) not in optimizer_params]

    check = Check()
    L.Trainer(**trainer_kwargs(callbacks=[qat, check])).fit(classifier, digits)
    assert check.missing == []
    after = dict(qat.prepared_network.named_parameters())
    weights = [k for k in check.before if k.endswith("weight")]
    assert weights and all(not torch.equal(check.before[k], after[k]) for k in weights)


@pytest.mark.parametrize("mode", MODES)
def test_lightning_module_stays_trainable_and_fit_runs_again(mode, classifier, digits):
    qat = QuantizationAwareTraining(mode, "x86")
    L.Trainer(**trainer_kwargs(callbacks=[qat])).fit(classifier, digits)
    first_int8, prepared = qat.quantized_model, qat.prepared_network
    assert classifier.net is prepared  # the module keeps the fake-quant network, not the int8 copy
    before = {k: v.detach().clone() for k, v in prepared.named_parameters()}
    L.Trainer(**trainer_kwargs(callbacks=[qat])).fit(classifier, digits)
    assert classifier.net is prepared, "second fit re-prepared the network"
    assert any(not torch.equal(before[k], v) for k, v in prepared.named_parameters())
    assert qat.quantized_model is not first_int8


@pytest.mark.parametrize("mode", MODES)
def test_lsq_learns_scales_with_gradients(mode, classifier, digits):
    qat = QuantizationAwareTraining(mode, "x86", "lsq")
    trainer = L.Trainer(**trainer_kwargs(callbacks=[qat]))
    trainer.fit(classifier, digits)
    scales = [(n, p) for n, p in qat.prepared_network.named_parameters() if n.endswith("scale")]
    assert scales, "LSQ scales are not parameters of the prepared network"
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in optimizer_params for _, p in scales)
    # Per-channel weight scales were sized from the weights on first use.
    assert any(p.numel() > 1 for _, p in scales)
    assert qat.quantized_model is not None


def test_pt2e_train_eval_switch_batchnorm_and_dropout():
    from qlightning.modes.pt2e import ExportedNetwork, export_network

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    wrapped = ExportedNetwork(export_network(net.train(), (torch.randn(8, 4),)))
    nodes = {n.target: n for n in wrapped.graph_module.graph.nodes if n.op == "call_function"}
    bn, dropout = nodes[torch.ops.aten.batch_norm.default], nodes[torch.ops.aten.dropout.default]
    assert bn.args[5] is True and dropout.args[2] is True
    wrapped.eval()
    assert bn.args[5] is False and dropout.args[2] is False and not wrapped.training
    x = torch.randn(8, 4)
    assert torch.equal(wrapped(x), wrapped(x))  # eval: deterministic
    wrapped.bn_frozen = True
    wrapped.train()
    assert bn.args[5] is False and dropout.args[2] is True
