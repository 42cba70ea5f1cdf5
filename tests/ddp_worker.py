"""One DDP run (CPU, gloo, 2 processes) for tests/test_ddp.py; a script, because Lightning's ``ddp``
strategy re-launches the script it runs in for rank 1.

Each rank sees its data at a different scale (rank r multiplies inputs by 1 + r), so statistics
reduced over ranks are visibly not one rank's. Every rank writes ``rank<r>.pt``: the prepared
network's state, the observers' maxima, the int8 model's outputs on fixed inputs, what it exported.

    python tests/ddp_worker.py <strategy> <mode> <qat|qat_compiled|ptq> <observer> <out dir>
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlightning import PostTrainingQuantization, QParamMonitor, QuantizationAwareTraining  # noqa: E402
from qlightning.data import DigitsDataModule  # noqa: E402
from qlightning.models import ImageClassifier, SmallCNN  # noqa: E402


class RankScaled(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return x * (1 + rank), y


class RankScaledDigits(DigitsDataModule):
    def train_dataloader(self):
        return DataLoader(RankScaled(self.train_set), batch_size=self.batch_size, shuffle=False)


def observer_maxima(network) -> list[float]:
    return [float(m.max_val.max()) for m in network.modules()
            if isinstance(getattr(m, "max_val", None), torch.Tensor) and m.max_val.numel() > 0]


class Record(L.Callback):
    """Writes what this rank ended with; runs in every rank's process (``ddp_spawn`` included)."""

    def __init__(self, quant, out: str):
        self.quant, self.out = quant, out

    def on_fit_end(self, trainer, pl_module):
        quant = self.quant
        network = quant.prepared_network if isinstance(quant, QuantizationAwareTraining) else quant.finalized_network
        x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            int8_out = quant.quantized_model(x)
        torch.save(
            {
                "state": {k: v.detach().clone() for k, v in network.state_dict().items()},
                "observer_maxima": observer_maxima(network),
                "int8_out": int8_out,
                "exported": sorted(quant.exported or []),
                # The training behaviours that ran compiled (QuantizationAwareTraining(compile=True)).
                "compiled": sorted(getattr(network, "_compiled", {})),
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


def main(strategy: str, mode: str, kind: str, observer: str, out: str) -> None:
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    extra_callbacks, logger = [], False
    if kind.startswith("qat"):
        quant = QuantizationAwareTraining(mode, "x86", observer, export=["onnx"], export_dir=out,
                                          compile=kind == "qat_compiled")
        # qparam curves under DDP: written once, by rank zero
        extra_callbacks = [QParamMonitor(log_every_n_steps=5, histograms=False)]
        logger = CSVLogger(out, name="logs")
    else:
        quant = PostTrainingQuantization(mode, "x86", observer, calibration_batches=4, export=["onnx"], export_dir=out)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, limit_train_batches=12,
                        limit_val_batches=1, logger=logger, enable_checkpointing=False,
                        callbacks=[quant, *extra_callbacks, Record(quant, out)])
    trainer.fit(model, RankScaledDigits(batch_size=32))


if __name__ == "__main__":
    main(*sys.argv[1:6])
