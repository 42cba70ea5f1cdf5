"""Shuffling that a resumed run reproduces exactly."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSeededRandomSampler(Sampler[int]):
    """A fresh permutation each epoch drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees the same
    batches as the uninterrupted run; a DataLoader ``generator`` would restart from its seed instead.
    """

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
