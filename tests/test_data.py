import gzip
import struct

import numpy as np
import pytest
import torch

from qlightning.data import DatasetNotFoundError, DigitsDataModule, TorchvisionDataModule
from qlightning.data.sampling import EpochSeededRandomSampler


def test_digits_is_real_and_split_stratified(digits):
    x, y = digits.train_set.tensors
    vx, vy = digits.val_set.tensors
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(vx) == 1797
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(vy, minlength=10).min() >= 30  # every class present in validation


def test_digits_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"val_fraction must be between 0 and 1 \(exclusive\), got 1.5"):
        DigitsDataModule(val_fraction=1.5)


def test_sampler_reproduces_epochs():
    sampler = EpochSeededRandomSampler(50, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(2)
    assert list(sampler) == first and sorted(first) == list(range(50))


def test_torchvision_missing_files_say_where_to_put_them(tmp_path):
    dm = TorchvisionDataModule("fashion_mnist", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"FashionMNIST was not found under .*never downloads.*FashionMNIST/raw"):
        dm.setup()
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist2'; valid datasets are: cifar10, fashion_mnist"):
        TorchvisionDataModule("mnist2")


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_local_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    # torchvision checks the unpacked files; unpack as its downloader would.
    for gz in raw.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.open(gz).read())
    dm = TorchvisionDataModule("fashion_mnist", root=str(tmp_path), batch_size=8, val_fraction=0.25)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and len(dm.val_set) == 10 and len(dm.test_set) == 10
