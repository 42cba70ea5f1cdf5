"""A LightningModule for image classification around any network."""

from __future__ import annotations

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier. The network sits in ``self.net`` (the attribute the quantization
    callbacks find by default); ``example_input_array`` is a small batch of the input shape."""

    def __init__(self, net: nn.Module, num_classes: int = 10, input_shape=(1, 8, 8), lr: float = 3e-3,
                 weight_decay: float = 0.0):
        super().__init__()
        # A plain tuple, not an OmegaConf ListConfig: checkpoints must load with weights_only=True.
        input_shape = tuple(int(d) for d in input_shape)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.example_input_array = torch.rand(2, *input_shape)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test/loss", F.cross_entropy(logits, y))
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        # Loaders yield (images, labels); a loader of bare images works too.
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, dataloader) -> float:
    """Top-1 accuracy in percent of any callable model (float, fake-quant or int8) on a loader."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = total = 0
    for x, y in dataloader:
        correct += (model(x).argmax(dim=1) == y).sum().item()
        total += y.numel()
    return 100.0 * correct / total
