import lightning as L
import pytest
import torch

from qlightning.data import DigitsDataModule
from qlightning.models import ImageClassifier, SmallCNN, accuracy


def trainer_kwargs(**overrides):
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="session")
def digits():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def float_baseline(digits):
    """A float SmallCNN trained on the digits split (4 epochs) and its validation accuracy; copy it
    before training it further."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    L.Trainer(**trainer_kwargs(max_epochs=4, limit_train_batches=None, limit_val_batches=0)).fit(model, digits)
    return model, accuracy(model, digits.val_dataloader())


@pytest.fixture
def classifier():
    L.seed_everything(0, verbose=False)
    return ImageClassifier(SmallCNN(), lr=1e-3)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
