"""The network of the quantization guide's complete examples, for reproducing its nine-cell table."""

from __future__ import annotations

from torch import nn


class GuideNet(nn.Module):
    """1x1 conv-bn-relu, 2x2 max-pool, 1x1 conv-bn-relu, 2x2 max-pool, flatten, linear-relu, linear.

    The guide's shape for 1 x 28 x 28 inputs: 32 and 64 channels, then a ``hidden``-unit bottleneck
    (the guide's 10) before the classifier. 1x1 convolutions see one pixel at a time, so the network
    is weak on purpose: it shows the quantization process, not the best accuracy.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 10):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 32, 1)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 1)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))
