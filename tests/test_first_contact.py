"""First contact (issue 15): what a new user meets in the first hour, with Lightning's defaults on.

Every Trainer here keeps Lightning's defaults (sanity check, model summary, progress bar, logger,
checkpointing); only the number of batches is limited, to keep the suite fast. A test that turns a
default off says why.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from qlightning import PostTrainingQuantization, QuantizationAwareTraining, QuantizationConfigError, quantized_engine
from qlightning.data import DigitsDataModule
from qlightning.models import ImageClassifier, SmallCNN
from qlightning.modes.registry import get_mode

MODES = ["eager", "fx", "pt2e"]


def default_trainer(tmp_path, **overrides) -> L.Trainer:
    kwargs = dict(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                  limit_test_batches=2, limit_predict_batches=2)
    return L.Trainer(**{**kwargs, **overrides})


def _quantizer_state(qat: QuantizationAwareTraining) -> dict[str, torch.Tensor]:
    """Every tensor of the prepared network: weights, BN statistics, observer min/max, scales, zero
    points and the observers' on/off flags."""
    return {k: v.detach().clone() for k, v in qat.prepared_network.state_dict().items()}


def _assert_same_state(before: dict, after: dict, stage: str) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{stage} changed {len(changed)} entries, e.g. {changed[:4]}"


def _fit(tmp_path, mode, observer="moving_average_minmax", backend="x86", **trainer_overrides):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN())
    qat = QuantizationAwareTraining(mode=mode, backend=backend, observer=observer)
    trainer = default_trainer(tmp_path, callbacks=[qat], **trainer_overrides)
    dm = DigitsDataModule(batch_size=32)
    trainer.fit(model, dm)
    return model, qat, trainer, dm


# -- 1. the sanity check runs before any quantizer has observed -----------------------------------
class _SanityOutputs(L.Callback):
    """The prepared network's outputs during the sanity check, and the float network's, on one batch."""

    def __init__(self, float_net, x):
        self.float_net, self.x, self.outputs = float_net, x, None

    def on_sanity_check_end(self, trainer, pl_module):
        with torch.no_grad():
            self.outputs = (pl_module.net.eval()(self.x), self.float_net.eval()(self.x))


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
@pytest.mark.parametrize("mode", MODES)
def test_default_trainer_sanity_check_runs_with_every_observer(tmp_path, mode, observer):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN())
    x = torch.rand(8, 1, 8, 8)
    recorder = _SanityOutputs(copy.deepcopy(model.net), x)
    qat = QuantizationAwareTraining(mode=mode, observer=observer)
    trainer = default_trainer(tmp_path, callbacks=[qat, recorder])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert trainer.num_sanity_val_steps == 2 and qat.quantized_model is not None
    # Before the first training step no quantizer has qparams: the sanity check sees the float network
    # (BN in eval; eager fuses conv-bn, which reorders float rounding only).
    prepared_out, float_out = recorder.outputs
    torch.testing.assert_close(prepared_out, float_out, atol=1e-4, rtol=1e-4)


# -- 2. validate / test / predict after fit leave the qparams alone -------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_validate_test_predict_after_fit_leave_qparams_unchanged(tmp_path, mode):
    model, qat, trainer, dm = _fit(tmp_path, mode, observer="minmax")
    before = _quantizer_state(qat)
    assert trainer.validate(model, dm)[0]["val/acc"] >= 0
    _assert_same_state(before, _quantizer_state(qat), "validate")
    assert trainer.test(model, dm)[0]["test/acc"] >= 0
    _assert_same_state(before, _quantizer_state(qat), "test")
    predictions = trainer.predict(model, dm.val_dataloader())
    assert len(predictions) == 2 and predictions[0].shape[1] == 10
    _assert_same_state(before, _quantizer_state(qat), "predict")


# -- 3. the observers' on/off state is put back exactly -------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_stages_restore_observer_flags_set_by_hand(tmp_path, mode):
    model, qat, trainer, dm = _fit(tmp_path, mode)
    quantizers = get_mode(mode).quantizers(qat.prepared_network)
    quantizers[0][1].disable_observer()  # the user stops one quantizer by hand
    quantizers[1][1].disable_fake_quant()
    flags = {k: v for k, v in _quantizer_state(qat).items() if k.endswith("_enabled")}
    assert any(not bool(v.all()) for v in flags.values()) and any(bool(v.all()) for v in flags.values())
    trainer.validate(model, dm)
    trainer.test(model, dm)
    trainer.predict(model, dm.val_dataloader())
    _assert_same_state(flags, {k: v for k, v in _quantizer_state(qat).items() if k in flags}, "validate/test/predict")


# -- 4. the int8 model runs as handed out -----------------------------------------------------------
@pytest.mark.parametrize("mode,backend", [("eager", "x86"), ("fx", "x86"), ("eager", "qnnpack"), ("fx", "qnnpack")])
def test_quantized_model_runs_as_returned_under_deterministic_algorithms(tmp_path, mode, backend):
    _, qat, _, dm = _fit(tmp_path, mode, backend=backend, deterministic=True)
    x = next(iter(dm.val_dataloader()))[0]
    other_engine = "fbgemm" if backend == "qnnpack" else "qnnpack"
    previous_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = other_engine
    torch.use_deterministic_algorithms(True)
    try:
        logits = qat.quantized_model(x)  # no quantized_engine block, determinism on, another engine selected
        assert torch.backends.quantized.engine == other_engine  # the model's choice does not leak out
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        # The hooks survive a copy. (Numerics of a copy are torch's: it repacks int8 weights for the engine
        # selected while copying.)
        assert copy.deepcopy(qat.quantized_model)(x).shape == logits.shape
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.quantized.engine = previous_engine
    with quantized_engine(backend):
        reference = qat.quantized_model(x)
    assert torch.equal(logits, reference)
    assert (logits.argmax(1) == qat.finalized_network(x).argmax(1)).float().mean() >= 0.95


# -- 5. README prerequisites: loaders before setup, and an already-prepared network -------------------
def test_datamodule_loaders_work_before_setup():
    images, labels = next(iter(DigitsDataModule().val_dataloader()))
    assert images.shape[1:] == (1, 8, 8) and labels.shape[0] == images.shape[0]


@pytest.mark.parametrize("callback", [
    lambda: PostTrainingQuantization(mode="fx", calibration_batches=2),
    lambda: QuantizationAwareTraining(mode="fx"),
])
def test_already_prepared_network_is_named_as_such(tmp_path, callback):
    model, _, _, dm = _fit(tmp_path, "pt2e")  # `model.net` is now a QAT-prepared network
    with pytest.raises(QuantizationConfigError, match=r"`net` is already prepared for quantization: it holds \d+ quantizers"):
        default_trainer(tmp_path, callbacks=[callback()]).fit(model, dm)


# -- 6. incompatible choices and missing extras fail at construction ----------------------------------
@pytest.mark.parametrize("backend", ["x86", "fbgemm", "qnnpack", "onnxruntime", "openvino"])
def test_tflite_export_of_a_backend_litert_cannot_run_is_refused_at_construction(backend):
    message = rf"export format 'tflite' cannot run models quantized for backend '{backend}'.*\['tflite'\]"
    with pytest.raises(QuantizationConfigError, match=message):
        QuantizationAwareTraining(mode="pt2e", backend=backend, export=["tflite"])
    with pytest.raises(QuantizationConfigError, match=message):
        PostTrainingQuantization(mode="fx", backend=backend, export=["tflite"])


def _without_module(monkeypatch, missing: str):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))


def test_missing_backend_extra_is_named_at_construction(monkeypatch):
    _without_module(monkeypatch, "litert_torch")
    with pytest.raises(ImportError, match=r"backend='tflite' needs litert_torch.*pip install 'qlightning\[tflite\]'"):
        QuantizationAwareTraining(mode="pt2e", backend="tflite")


def test_jobs_refuse_incompatible_choices_before_training(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.test_default_job import CONF
    from qlightning.jobs import export_checkpoint, train

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        export_cfg = compose("export", overrides=[f"ckpt_path={tmp_path / 'x86.ckpt'}", "format=tflite"])
        train_cfg = compose("train", overrides=["quant.backend=tflite"])
    # A checkpoint's quant config (all export.py reads of it before the callback refuses the format).
    torch.save({"callbacks": {"QuantizationAwareTraining{'mode': 'pt2e', 'backend': 'x86'}": {
        "mode": "pt2e", "backend": "x86", "observer": "moving_average_minmax"}}}, tmp_path / "x86.ckpt")
    with pytest.raises(QuantizationConfigError, match=r"export format 'tflite' cannot run models quantized for backend 'x86'"):
        export_checkpoint(export_cfg, tmp_path / "export")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(QuantizationConfigError, match=r"ckpt_path='.*junk.ckpt' is not a readable checkpoint"):
        export_checkpoint(OmegaConf.merge(export_cfg, {"ckpt_path": str(tmp_path / "junk.ckpt")}), tmp_path / "export")
    _without_module(monkeypatch, "litert_torch")
    with pytest.raises(ImportError, match=r"pip install 'qlightning\[tflite\]'"):
        train(train_cfg, tmp_path / "train")
    assert not list((tmp_path / "train").rglob("*.ckpt")) and not (tmp_path / "train" / "summary.json").exists()


# -- 9. wrong types get QuantizationConfigError naming the argument -------------------------------------
@pytest.mark.parametrize("argument", ["mode", "backend", "observer"])
def test_choice_of_wrong_type_is_a_config_error(argument):
    with pytest.raises(QuantizationConfigError, match=rf"{argument} must be one name \(a string\), got \['abc'\] \(list\); valid {argument}s are: "):
        QuantizationAwareTraining(**{argument: ["abc"]})


def test_modules_to_fuse_naming_missing_modules_is_a_config_error(tmp_path):
    L.seed_everything(0, verbose=False)
    qat = QuantizationAwareTraining(mode="eager", modules_to_fuse=[["layers.0", "layers.1"]])
    with pytest.raises(QuantizationConfigError, match=r"modules_to_fuse=\[\['layers.0', 'layers.1'\]\]: \['layers.0', 'layers.1'\] not found in SmallCNN"):
        default_trainer(tmp_path, callbacks=[qat]).fit(ImageClassifier(SmallCNN()), DigitsDataModule())
    qat = QuantizationAwareTraining(mode="eager", modules_to_fuse=[["conv1", "fc1"]])
    with pytest.raises(QuantizationConfigError, match=r"modules_to_fuse group \['conv1', 'fc1'\] is Conv2d-Linear, which torch.ao cannot fuse"):
        default_trainer(tmp_path, callbacks=[qat]).fit(ImageClassifier(SmallCNN()), DigitsDataModule())
    with pytest.raises(QuantizationConfigError, match=r"modules_to_fuse must be a list of groups of submodule names"):
        QuantizationAwareTraining(mode="eager", modules_to_fuse=["conv1", "bn1"])


# -- 10. Lightning's model summary forward is not observed ----------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_model_summary_forward_does_not_move_qparams(tmp_path, mode):
    def run(summary: bool):
        L.seed_everything(0, verbose=False)
        model = ImageClassifier(SmallCNN())
        model.example_input_array = torch.full((2, 1, 8, 8), 1000.0)  # far outside the data's [0, 1]
        qat = QuantizationAwareTraining(mode=mode, observer="minmax")
        # This test is about the summary: one run with Lightning's default (on), one with it off.
        trainer = default_trainer(tmp_path / str(summary), callbacks=[qat], enable_model_summary=summary)
        trainer.fit(model, DigitsDataModule(batch_size=32))
        return _quantizer_state(qat)

    with_summary = run(True)
    _assert_same_state(run(False), with_summary, "the model summary")
    observed_max = [v for k, v in with_summary.items() if k.endswith("max_val") and v.numel()]
    assert observed_max and max(float(v.max()) for v in observed_max) < 1000.0
