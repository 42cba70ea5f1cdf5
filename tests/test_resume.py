"""A run resumed mid-QAT from ``ckpt_path`` ends where an uninterrupted run ends."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qlightning import QuantizationAwareTraining, QuantizationConfigError
from qlightning.models import ImageClassifier, SmallCNN
from tests.conftest import trainer_kwargs

SCHEDULE = dict(freeze_bn_epoch=1, freeze_observers_epoch=2)


def _fresh_model():
    L.seed_everything(0, verbose=False)
    return ImageClassifier(SmallCNN(), lr=1e-3)


def _fit(tmp_path, mode, max_epochs, ckpt_path=None, every_epoch=False, observer="moving_average_minmax"):
    model = _fresh_model()
    qat = QuantizationAwareTraining(mode, "x86", observer, **SCHEDULE)
    callbacks = [qat]
    if every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    L.seed_everything(1, verbose=False)
    trainer = L.Trainer(
        **trainer_kwargs(
            max_epochs=max_epochs,
            callbacks=callbacks,
            deterministic=True,
            enable_checkpointing=every_epoch,
            default_root_dir=tmp_path,
        )
    )
    from qlightning.data import DigitsDataModule

    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return model, qat


@pytest.mark.parametrize(
    "mode,observer", [("eager", "moving_average_minmax"), ("fx", "minmax"), ("pt2e", "moving_average_minmax"), ("fx", "lsq")]
)
def test_resume_mid_qat_matches_uninterrupted_run(tmp_path, mode, observer):
    full_model, full_qat = _fit(tmp_path / "full", mode, 3, every_epoch=True, observer=observer)
    # Resume from the end of epoch 1 (BN already frozen, observers not yet).
    resumed_model, resumed_qat = _fit(
        tmp_path / "resumed", mode, 3, ckpt_path=tmp_path / "full" / "epoch=1.ckpt", observer=observer
    )
    x = torch.rand(16, 1, 8, 8)
    full_model.eval(), resumed_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed_model(x), full_model(x), rtol=0, atol=1e-5)
    full_state, resumed_state = full_qat.prepared_network.state_dict(), resumed_qat.prepared_network.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        torch.testing.assert_close(resumed_state[key], full_state[key], rtol=0, atol=1e-5, msg=key)
    assert resumed_qat.observers_frozen and resumed_qat.bn_frozen


def test_checkpoint_from_another_quant_config_is_rejected_before_training(tmp_path):
    _fit(tmp_path / "fx", "fx", 1, every_epoch=True)
    model = _fresh_model()
    qat = QuantizationAwareTraining("eager", "x86")
    trainer = L.Trainer(**trainer_kwargs(callbacks=[qat], default_root_dir=tmp_path))
    from qlightning.data import DigitsDataModule

    with pytest.raises(QuantizationConfigError, match=r"was trained with mode='fx' but this QuantizationAwareTraining has mode='eager'"):
        trainer.fit(model, DigitsDataModule(), ckpt_path=tmp_path / "fx" / "epoch=0.ckpt")
    assert trainer.global_step == 0


def test_callback_state_roundtrip_and_old_checkpoints_load():
    qat = QuantizationAwareTraining("fx", "x86")
    state = qat.state_dict()
    assert state == {
        "version": 1,
        "mode": "fx",
        "backend": "x86",
        "observer": "moving_average_minmax",
        "weight_scheme": "per_channel_symmetric",
        "activation_scheme": "per_tensor_affine",
        "activation_dtype": "uint8",  # added with A16W8; states without it (older checkpoints) still load
        "skip": [],  # added with skip=; likewise optional in older states
        "observers_frozen": False,
        "bn_frozen": False,
    }
    assert all(isinstance(v, (int, str, bool, list)) for v in state.values())
    qat.load_state_dict({"mode": "fx"})  # an older, smaller state still loads
    with pytest.raises(QuantizationConfigError, match="trained with backend='qnnpack'"):
        qat.load_state_dict({"mode": "fx", "backend": "qnnpack"})
