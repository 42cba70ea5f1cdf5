"""Train float, then quantization-aware, then int8; print and save a summary.

    python scripts/train.py                      # default job (PT2E QAT on digits, CPU)
    python scripts/train.py quant=qat_fx quant.observer=histogram
    python scripts/train.py -m quant.mode=eager,fx,pt2e quant.observer=minmax,histogram   # + report
    python scripts/train.py -m hparams_search=optuna                                     # Optuna search
    python scripts/train.py -m hydra/launcher=joblib quant.mode=fx,pt2e                  # in parallel
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qlightning.jobs import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg, HydraConfig.get().runtime.output_dir)
    # Hyperparameter sweepers (hparams_search=optuna) optimize the value returned here.
    return summary.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
