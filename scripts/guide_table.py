"""Fill the quantization guide's nine cells (eager / FX / PT2E x PTQ static / PTQ dynamic / QAT) on the real
Fashion-MNIST and write docs/guide_table.md (and a JSON of the cells).

    apt-get install -y dataset-fashion-mnist          # once, as root: the real files, nothing is downloaded
    python scripts/guide_table.py [--float-epochs 4] [--qat-epochs 2] [--train-size N] [--out docs/guide_table.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch

from qlightning.data import FashionMNISTDataModule
from qlightning.exporters.atomic import write_json, write_text_atomic
from qlightning.guide_table import METHODS, MODES, TableConfig, goal_misses, markdown, run_cell, train_float

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cpu_flags  # noqa: E402 - a sibling script


def main(argv=None) -> int:
    defaults = TableConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TableConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), default=getattr(defaults, f.name),
                            type=(lambda v: None if v == "None" else int(v)) if f.name == "train_size" else type(getattr(defaults, f.name)))
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="docs/guide_table.md")
    args = parser.parse_args(argv)
    config = TableConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TableConfig)})
    torch.set_num_threads(2)
    start = time.perf_counter()
    datamodule = FashionMNISTDataModule(root=args.root, batch_size=config.batch_size, train_size=config.train_size,
                                        seed=config.seed)
    datamodule.setup()
    float_model = train_float(datamodule, config)
    cells = []
    for mode in args.modes.split(","):
        for method in METHODS:
            cell = run_cell(mode, method, float_model, datamodule, config)
            print(f"{mode:5s} {method:11s} float {cell.float_acc:.2f} fake-quant {cell.fake_quant_acc} int8 {cell.int8_acc:.2f} "
                  f"ORT {cell.onnx_acc} ({cell.seconds} s)", flush=True)
            cells.append(cell)
    minutes = (time.perf_counter() - start) / 60
    flags = cpu_flags()
    machine = (f"{flags['model']}, {flags['cores_visible']} threads, avx512_vnni={flags['avx512_vnni']}, "
               f"amx={flags['amx']}; torch {torch.__version__}")
    command = "python scripts/guide_table.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    write_text_atomic(out, markdown(cells, config, command.strip(), machine, minutes))
    write_json(out.with_suffix(".json"), {"config": dataclasses.asdict(config), "minutes": round(minutes, 1),
                                          "cells": [c.as_dict() for c in cells], "goal_misses": goal_misses(cells)})
    print(f"wrote {out} ({minutes:.1f} min); goals missed: {goal_misses(cells) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
