"""A16W8 vs A8W8 vs float on the real Fashion-MNIST (the guide's network and a zoo CNN, static PTQ and QAT,
in ONNX Runtime and LiteRT); writes docs/activation_dtypes.md and docs/activation_dtypes.json.

    apt-get install -y dataset-fashion-mnist          # once, as root: the real files, nothing is downloaded
    python scripts/activation_dtypes.py [--models guide_net,resnet18,mobilenet_v2] [--train-images 8000] [--out docs/activation_dtypes.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

from qlightning.activation_table import markdown, run_cells
from qlightning.cpu import machine_description
from qlightning.exporters.atomic import write_json, write_text_atomic
from qlightning.zoo import ZooConfig, jsonable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="guide_net,resnet18,mobilenet_v2")
    parser.add_argument("--methods", default="ptq,qat")
    parser.add_argument("--workdir", default=".cache/qlightning/activation_dtypes")
    parser.add_argument("--out", default="docs/activation_dtypes.md")
    for f in dataclasses.fields(ZooConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, type=type(f.default))
    args = parser.parse_args(argv)
    config = ZooConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ZooConfig)})
    torch.set_num_threads(2)
    start = time.perf_counter()
    cells = run_cells(args.models.split(","), config, Path(args.workdir), methods=tuple(args.methods.split(",")))
    meta = {
        "command": "python scripts/activation_dtypes.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(torch.get_num_threads()),
        "date": datetime.date.today().isoformat(),
        "minutes": (time.perf_counter() - start) / 60,
        "config": dataclasses.asdict(config),
    }
    out = Path(args.out)
    write_text_atomic(out, markdown(cells, meta))
    write_json(out.with_suffix(".json"), {"meta": meta, "cells": [jsonable(c) for c in cells]})
    print(out.read_text())
    failed = [c for c in cells if c["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
