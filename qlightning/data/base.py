"""Loaders shared by the DataModules: reproducible shuffling for training, fixed order otherwise."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from qlightning.data.sampling import EpochSeededRandomSampler

EVAL_BATCH_SIZE = 256


class SplitDataModule(L.LightningDataModule):
    """Subclasses set ``train_set``, ``val_set`` and ``test_set`` in ``setup`` (idempotent: it returns
    at once when ``train_set`` is set)."""

    def __init__(self, batch_size: int, seed: int, num_workers: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.train_set = self.val_set = self.test_set = None

    def _ensure_setup(self) -> None:
        # Lightning calls setup() before asking for loaders; a user reading a batch by hand
        # (`next(iter(dm.val_dataloader()))`) should not have to know that.
        if self.train_set is None:
            self.setup()

    def train_dataloader(self):
        self._ensure_setup()
        sampler = EpochSeededRandomSampler(len(self.train_set), self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self):
        self._ensure_setup()
        return DataLoader(self.val_set, batch_size=EVAL_BATCH_SIZE, num_workers=self.num_workers)

    def test_dataloader(self):
        self._ensure_setup()
        return DataLoader(self.test_set, batch_size=EVAL_BATCH_SIZE, num_workers=self.num_workers)
