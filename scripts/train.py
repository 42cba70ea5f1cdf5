"""Train float, then quantization-aware, then int8; print and save a summary.

    python scripts/train.py                      # default job (PT2E QAT on digits, CPU)
    python scripts/train.py quant=qat_fx quant.observer=histogram
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qlightning.jobs import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
