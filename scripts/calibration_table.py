"""Static PTQ calibration methods (minmax, histogram, percentile, entropy, mse) and the per-layer report
against skip=[layer], on the real Fashion-MNIST (the guide's network, resnet18, mobilenet_v2); writes
docs/calibration.md and docs/calibration.json.

    apt-get install -y dataset-fashion-mnist          # once, as root: the real files, nothing is downloaded
    python scripts/calibration_table.py [--models guide_net,resnet18,mobilenet_v2] [--out docs/calibration.md]

The float weights are the zoo's cached float training (``--float-cache``, shared with
scripts/activation_dtypes.py: the same ZooConfig trains the same weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from qlightning.calibration_table import METHODS, MODELS, X86_METHODS, markdown, parse_method, run_network
from qlightning.cpu import machine_description
from qlightning.exporters.atomic import write_json, write_text_atomic
from qlightning.zoo import ZooConfig, jsonable


def _commit() -> str:
    """The repository's HEAD, and whether the package imported differs from it."""
    import subprocess

    import qlightning

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    package = Path(qlightning.__file__).resolve().parent
    if package == Path("qlightning").resolve():
        return head
    return f"{head} (qlightning imported from a copy outside the checkout)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(m.observer + (f":{m.percentile:g}" if m.percentile else "")
                                                      for m in METHODS),
                        help="calibration methods in onnxruntime; percentile:99.9 sets the percentile")
    parser.add_argument("--x86-methods", default=",".join(m.observer for m in X86_METHODS),
                        help="calibration methods in x86 ('' for none)")
    parser.add_argument("--skip-method", default="minmax", help="the onnxruntime method whose layers are skipped")
    parser.add_argument("--skip-layers", type=int, default=3, help="worst and best layers to skip, each (0: none)")
    parser.add_argument("--fallback-budget", type=float, default=0.003,
                        help="max_accuracy_drop of the fallback run on the skip method (val/acc fraction; -1: none)")
    parser.add_argument("--fallback-methods", default="minmax,entropy",
                        help="onnxruntime methods run again with the fallback budget")
    parser.add_argument("--fallback-only", action="store_true",
                        help="run only the fallback runs, into the JSON beside --out (the other rows are kept)")
    parser.add_argument("--workdir", default=".cache/qlightning/calibration")
    parser.add_argument("--float-cache", default=".cache/qlightning/activation_dtypes/float")
    parser.add_argument("--out", default="docs/calibration.md")
    for f in dataclasses.fields(ZooConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, type=type(f.default))
    parser.add_argument("--from-json", action="store_true",
                        help="only write the markdown again from the JSON beside --out (no measurement)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        data = json.loads(out.with_suffix(".json").read_text())
        write_text_atomic(out, markdown(data["networks"], data["meta"]))
        print(out.read_text())
        return 0
    config = ZooConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ZooConfig)})
    torch.set_num_threads(2)
    commit = _commit()  # before the run: a commit made meanwhile is not the code measured
    start = time.perf_counter()
    methods = [parse_method(m) for m in args.methods.split(",") if m]
    fallback_methods = [parse_method(m) for m in args.fallback_methods.split(",") if m]
    fallback_budget = None if args.fallback_budget < 0 else args.fallback_budget
    command = "python scripts/calibration_table.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.fallback_only:
        return _fallback_only(args, config, fallback_methods, fallback_budget, command, commit, start)
    x86_methods = [parse_method(m) for m in args.x86_methods.split(",") if m]
    networks = [run_network(name, config, Path(args.workdir), Path(args.float_cache), methods, x86_methods,
                            parse_method(args.skip_method), n_skip=args.skip_layers,
                            fallback_budget=fallback_budget, fallback_methods=fallback_methods)
                for name in args.models.split(",")]
    import torchao

    meta = {
        "command": command,
        "machine": machine_description(torch.get_num_threads()),
        "date": datetime.date.today().isoformat(),
        "minutes": (time.perf_counter() - start) / 60,
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "config": dataclasses.asdict(config),
        "commit": commit,
    }
    write_text_atomic(out, markdown(networks, meta))
    write_json(out.with_suffix(".json"), jsonable({"meta": meta, "networks": networks}))
    print(out.read_text())
    failed = [r for n in networks for r in n["methods"] + ((n["skip"] or {}).get("skips") or []) + n["fallbacks"]
              if r["status"] != "ok"]
    return 1 if failed else 0


def _fallback_only(args, config: ZooConfig, fallback_methods, fallback_budget, command: str, commit: str,
                   start: float) -> int:
    """The fallback runs again on the networks of the JSON beside ``--out``; the markdown rewritten from both."""
    from qlightning.calibration_table import bench, run_fallbacks

    out = Path(args.out)
    data = json.loads(out.with_suffix(".json").read_text())
    for network in data["networks"]:
        b = bench(network["model"], config, Path(args.workdir), Path(args.float_cache))
        network["fallbacks"] = run_fallbacks(b, network["methods"], "onnxruntime", fallback_methods, fallback_budget)
    data["meta"].update(fallback_command=command, fallback_minutes=(time.perf_counter() - start) / 60,
                        fallback_commit=commit)
    write_text_atomic(out, markdown(data["networks"], data["meta"]))
    write_json(out.with_suffix(".json"), jsonable(data))
    print(out.read_text())
    return 1 if any(r["status"] != "ok" for n in data["networks"] for r in n["fallbacks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
