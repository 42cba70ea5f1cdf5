"""FashionMNIST and CIFAR-10 read from a local folder. Nothing is downloaded: when the files are
missing, the error says which files to put where."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import random_split

from qlightning.data.base import SplitDataModule

_DATASETS = {
    "fashion_mnist": {
        "class": "FashionMNIST",
        "shape": (1, 28, 28),
        "mean": (0.2860,),
        "std": (0.3530,),
        "files": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    },
    "cifar10": {
        "class": "CIFAR10",
        "shape": (3, 32, 32),
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "files": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    },
}


class DatasetNotFoundError(FileNotFoundError):
    pass


class TorchvisionDataModule(SplitDataModule):
    num_classes = 10

    def __init__(self, name: str = "fashion_mnist", root: str = "data", batch_size: int = 128,
                 val_fraction: float = 0.1, seed: int = 0, num_workers: int = 0):
        super().__init__(batch_size, seed, num_workers)
        if name not in _DATASETS:
            raise ValueError(f"unknown dataset {name!r}; valid datasets are: {', '.join(sorted(_DATASETS))}")
        self.name, self.root = name, Path(root)
        self.val_fraction = val_fraction
        self.input_shape = _DATASETS[name]["shape"]

    def _load(self, train: bool):
        import torchvision
        from torchvision import transforms

        info = _DATASETS[self.name]
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info["mean"], info["std"])])
        try:
            return getattr(torchvision.datasets, info["class"])(
                str(self.root), train=train, download=False, transform=transform
            )
        except RuntimeError as exc:
            raise DatasetNotFoundError(
                f"{info['class']} was not found under {self.root.resolve()} (qlightning never downloads at run "
                f"time). Put the original files at {self.root}/{info['files']}, or set root= to the folder "
                f"that holds them."
            ) from exc

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full_train = self._load(train=True)
        n_val = int(len(full_train) * self.val_fraction)
        self.train_set, self.val_set = random_split(
            full_train, [len(full_train) - n_val, n_val], generator=torch.Generator().manual_seed(self.seed)
        )
        self.test_set = self._load(train=False)
