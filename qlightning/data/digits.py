"""scikit-learn's 8x8 handwritten digits as a LightningDataModule: a real dataset that ships inside an
installed package, so the default job runs offline."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from qlightning.data.base import SplitDataModule


class DigitsDataModule(SplitDataModule):
    """1797 grey 8x8 digit images (1 x 8 x 8, values in [0, 1]) in 10 classes.

    A seeded, stratified split keeps ``val_fraction`` of every class for validation.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0):
        super().__init__(batch_size, seed, num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        self.val_fraction = val_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = train_test_split(
            range(len(labels)), test_size=self.val_fraction, random_state=self.seed, stratify=digits.target
        )
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = self.val_set  # the digits have no separate test split
