"""Export a checkpoint to verified int8 files (ONNX QDQ, PT2) with a report beside each.

    python scripts/export.py ckpt_path=<run dir>/checkpoints/qat/last.ckpt   # its own quant config, ONNX
    python scripts/export.py ckpt_path=... format=[onnx,pt2]
    python scripts/export.py ckpt_path=float.ckpt quant=ptq_static           # PTQ of a float checkpoint
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qlightning.jobs import export_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    # The command line's overrides: quant keys it names win over what the checkpoint recorded.
    export_checkpoint(cfg, hydra_config.runtime.output_dir, overrides=tuple(hydra_config.overrides.task))


if __name__ == "__main__":
    main()
