"""Post-training quantization of a trained checkpoint; prints and saves a summary.

    python scripts/quantize.py ckpt_path=path/to/model.ckpt
    python scripts/quantize.py ckpt_path=... quant=ptq_static quant.mode=fx quant.observer=minmax
    python scripts/quantize.py ckpt_path=... quant=ptq_dynamic model=row_lstm
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qlightning.jobs import quantize


@hydra.main(version_base="1.3", config_path="../conf", config_name="quantize")
def main(cfg: DictConfig) -> None:
    quantize(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
