"""Export a checkpoint to verified int8 files (ONNX QDQ, PT2) with a report beside each.

    python scripts/export.py ckpt_path=path/to/last.ckpt format=onnx        # QAT checkpoint, PT2E
    python scripts/export.py ckpt_path=... quant=qat_fx format=[onnx,pt2]
    python scripts/export.py ckpt_path=float.ckpt quant=ptq_static           # PTQ of a float checkpoint
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qlightning.jobs import export_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export_checkpoint(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
