"""The network of the quantization guide's complete examples, for reproducing its nine-cell table."""

from __future__ import annotations

from qlightning.models.cnn import SmallCNN


class GuideNet(SmallCNN):
    """1x1 conv(32)-bn-relu, 2x2 max-pool, 1x1 conv(64)-bn-relu, 2x2 max-pool, flatten, linear-relu, linear.

    The guide's shape for 1 x 28 x 28 inputs, with its ``hidden``-unit bottleneck (the guide's 10) before
    the classifier. 1x1 convolutions see one pixel at a time, so the network is weak on purpose: it shows
    the quantization process, not the best accuracy.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 10):
        super().__init__(in_channels, num_classes, image_size, width=32, hidden=hidden, kernel_size=1, conv_bias=True)
