"""The guide's table on the real Fashion-MNIST (issue 16): for each mode, the QAT cell and the static PTQ
cell it must beat, from one float training, measured on the full 10,000-image test set. Slow: CI runs it
where Debian's dataset-fashion-mnist is installed (.ci/run installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlightning.data.fashion_mnist import DEBIAN_FOLDER

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(DEBIAN_FOLDER) / "t10k-images-idx3-ubyte.gz").is_file(),
                       reason="Debian's dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)"),
]

# The table's own configuration (docs/guide_table.md), on a stratified subset of the training images so the
# three modes fit CI's budget; test accuracy is still measured on all 10,000 test images.
CONFIG = dict(train_size=20_000)


@pytest.fixture(scope="module")
def table():
    import torch

    from qlightning.data import FashionMNISTDataModule
    from qlightning.guide_table import TableConfig, train_float

    torch.set_num_threads(2)
    config = TableConfig(**CONFIG)
    datamodule = FashionMNISTDataModule(batch_size=config.batch_size, train_size=config.train_size, seed=config.seed)
    datamodule.setup()
    return config, datamodule, train_float(datamodule, config)


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_qat_cell_meets_the_goals(table, mode):
    from qlightning.guide_table import goal_misses, run_cell

    config, datamodule, float_model = table
    static = run_cell(mode, "ptq_static", float_model, datamodule, config)
    qat = run_cell(mode, "qat", float_model, datamodule, config)
    assert qat.float_acc > 70  # the guide's bottleneck network trains (float accuracy in points)
    assert qat.onnx_acc is not None and static.onnx_acc is not None
    assert goal_misses([static, qat]) == []
