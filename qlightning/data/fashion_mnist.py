"""The real Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey) from the idx ``.gz`` files that
Debian's ``dataset-fashion-mnist`` package installs, or from any folder holding them. Nothing is
downloaded."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from qlightning.data.base import SplitDataModule
from qlightning.data.torchvision_folder import DatasetNotFoundError

DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Mean and standard deviation of the 60,000 training images' pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: big-endian header of dims, then uint8 data), gzip-compressed."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {zero:#x}, type {dtype_code:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values")
    return array.reshape(shape)


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST as normalised 1 x 28 x 28 tensors in 10 classes.

    Train and validation come from the 60,000 training images by a seeded, stratified split
    (``val_fraction`` of every class); test is the official 10,000-image test set. ``train_size``
    keeps only that many training images (a stratified subset, for quick runs). Training batches are
    shuffled by an epoch-seeded sampler, so a resumed run sees the same batches.
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, root: str = DEBIAN_FOLDER, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, train_size: int | None = None):
        super().__init__(batch_size, seed, num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if train_size is not None and train_size < 10:
            raise ValueError(f"train_size must be None (all images) or >= 10, got {train_size}")
        self.root, self.val_fraction, self.train_size = Path(root), val_fraction, train_size

    def _files(self, split: str) -> tuple[Path, Path]:
        paths = tuple(self.root / name for name in FILES[split])
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"Fashion-MNIST files {missing} are not in {self.root} (qlightning never downloads at run time). "
                f"Install Debian's package `dataset-fashion-mnist` (as root: `apt-get install -y dataset-fashion-mnist`), "
                f"which puts them in {DEBIAN_FOLDER}, or pass root= a folder holding {', '.join(FILES['train'] + FILES['test'])}"
            )
        return paths

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images_path, labels_path = self._files(split)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"{images_path} holds {images.shape} images for {len(labels)} labels; expected N x 28 x 28")
        x = (torch.from_numpy(images.copy()).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
        return x, torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        x, y = self._load("train")
        indices = np.arange(len(y))
        train_idx, val_idx = train_test_split(indices, test_size=self.val_fraction, random_state=self.seed,
                                              stratify=y.numpy())
        if self.train_size is not None and self.train_size < len(train_idx):
            train_idx, _ = train_test_split(train_idx, train_size=self.train_size, random_state=self.seed,
                                            stratify=y.numpy()[train_idx])
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(*self._load("test"))
