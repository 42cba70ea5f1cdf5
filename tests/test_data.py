import gzip
import struct
from pathlib import Path

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


def _write_fashion_files(folder, n_train=200, n_test=30):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_module_reads_idx_gz_from_a_given_folder(tmp_path):
    from qlightning.data import FashionMNISTDataModule
    from qlightning.data.fashion_mnist import MEAN, STD, read_idx

    _write_fashion_files(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=16, val_fraction=0.1, seed=3)
    x, y = next(iter(dm.train_dataloader()))  # loaders set up on first use
    assert x.shape == (16, 1, 28, 28) and len(dm.train_set) == 180 and len(dm.val_set) == 20 and len(dm.test_set) == 30
    assert torch.bincount(dm.val_set.tensors[1], minlength=10).tolist() == [2] * 10  # stratified
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    torch.testing.assert_close(dm.test_set.tensors[0][:, 0], (torch.from_numpy(raw.copy()).float() / 255 - MEAN) / STD)
    # Same seed, same split; epoch-seeded shuffling repeats an epoch's batches exactly (exact resume).
    again = FashionMNISTDataModule(root=str(tmp_path), batch_size=16, val_fraction=0.1, seed=3)
    again.setup()
    assert torch.equal(again.val_set.tensors[1], dm.val_set.tensors[1])
    loader = again.train_dataloader()
    loader.sampler.set_epoch(4)
    first = [b[1] for b in loader]
    loader.sampler.set_epoch(4)
    assert all(torch.equal(a, b[1]) for a, b in zip(first, loader))
    subset = FashionMNISTDataModule(root=str(tmp_path), train_size=50)
    subset.setup()
    assert len(subset.train_set) == 50 and torch.bincount(subset.train_set.tensors[1], minlength=10).tolist() == [5] * 10


def test_fashion_mnist_missing_files_name_the_debian_package(tmp_path):
    from qlightning.data import FashionMNISTDataModule

    message = (r"Fashion-MNIST files \['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'\] are not in .*"
               r"`dataset-fashion-mnist` \(as root: `apt-get install -y dataset-fashion-mnist`\).*/usr/share/datasets/fashion-mnist")
    with pytest.raises(DatasetNotFoundError, match=message):
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0c\x03"))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not an idx file of unsigned bytes"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist_from_the_debian_package():
    from qlightning.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule()
    dm.setup()
    assert len(dm.train_set) == 54_000 and len(dm.val_set) == 6_000 and len(dm.test_set) == 10_000
    x = dm.train_set.tensors[0]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01  # normalised with the train set's stats
    assert torch.bincount(dm.test_set.tensors[1]).tolist() == [1000] * 10
