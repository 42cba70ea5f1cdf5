import copy

import lightning as L
import numpy as np
import pytest
import torch

from qlightning.data import DigitsDataModule
from qlightning.models import ImageClassifier, SmallCNN, accuracy


def trainer_kwargs(**overrides):
    # Lightning's defaults stay on (sanity check, model summary, progress bar): users keep them, and
    # they run forwards the callbacks must cope with. Logger and checkpoints are off because these tests
    # read neither and Lightning would write them into the working directory; tests about them turn
    # them on with a directory of their own.
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="session", autouse=True)
def _float_baseline_cache(tmp_path_factory):
    # The jobs cache float baselines (conf/paths: cache_dir); a cache left by an older checkout must not
    # stand in for training in a test run. Subprocesses (the scripts) inherit the variable.
    import os

    os.environ["QLIGHTNING_CACHE_DIR"] = str(tmp_path_factory.mktemp("float_baseline_cache"))


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
    no_validation = dict(limit_val_batches=0)  # its accuracy is measured below, on the whole validation set
    L.Trainer(**trainer_kwargs(max_epochs=4, limit_train_batches=None, **no_validation)).fit(model, digits)
    return model, accuracy(model, digits.val_dataloader())


@pytest.fixture
def classifier():
    L.seed_everything(0, verbose=False)
    return ImageClassifier(SmallCNN(), lr=1e-3)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def qat_from_float_baseline(float_baseline, digits, mode: str, backend: str, **callback_kwargs):
    """Three QAT epochs (BN frozen from epoch 1, observers from 2) on a copy of the float baseline;
    returns the trained LightningModule and its QuantizationAwareTraining callback."""
    from qlightning import QuantizationAwareTraining

    model = copy.deepcopy(float_baseline[0])
    model.hparams.lr = 1e-3
    qat = QuantizationAwareTraining(mode, backend, freeze_bn_epoch=1, freeze_observers_epoch=2, **callback_kwargs)
    L.seed_everything(0, verbose=False)
    no_validation = dict(limit_val_batches=0)  # callers measure the int8 model on the whole validation set
    L.Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=None, callbacks=[qat], **no_validation)).fit(
        model, digits
    )
    return model, qat


def predictions(run, dataloader) -> np.ndarray:
    """Top-1 class of ``run(x)`` (a torch model or a runtime's run function) over a whole loader."""
    with torch.no_grad():
        return np.concatenate([np.asarray(run(x)).argmax(1) for x, _ in dataloader])


def labels(dataloader) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in dataloader])

