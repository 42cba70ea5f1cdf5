"""The default network: a small CNN in the shape of the guide's examples."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu, max-pool, conv-bn-relu, max-pool, linear-relu, linear.

    Built from modules only (no functional calls), so every mode, eager included, can quantize it.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, width: int = 16,
                 hidden: int = 64, kernel_size: int = 3, conv_bias: bool = False):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {image_size}")
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size, padding=padding, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size, padding=padding, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * (image_size // 4) ** 2, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))
