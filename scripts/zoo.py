"""Run the zoo table: 13 torchvision / timm networks x {QAT, static PTQ} x mode / backend / format,
every cell in its own subprocess with a timeout, and write ``docs/zoo.md`` and ``docs/zoo.json``.

    python scripts/zoo.py                          # the whole table (about an hour on 2 cores)
    python scripts/zoo.py --models resnet18 --methods qat --targets pt2e/x86->onnx
    python scripts/zoo.py --resume                 # keep the cells already in the results file
    python scripts/zoo.py --update --models mnasnet0_5   # run these cells again, keep the others

Float weights are trained once per model and cached under ``--workdir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cell_main(args) -> int:
    import torch

    from qlightning.zoo import Target, ZooConfig, jsonable, run_cell

    torch.set_num_threads(args.threads)
    config = ZooConfig(**json.loads(args.config))
    mode, backend, fmt = args.cell[2:5]
    result = run_cell(args.cell[0], args.cell[1], Target(mode, backend, fmt), config,
                      Path(args.workdir) / "cells" / _cell_name(args.cell), Path(args.workdir) / "float")
    Path(args.out).write_text(json.dumps(jsonable(result)))
    return 0


def _cell_key(result: dict) -> tuple:
    return result["model"], result["method"], result["mode"], result["backend"], result["format"]


def _cell_name(key) -> str:
    """The cell's folder and result-file name: model-method-mode-backend-format."""
    return "-".join(key)


def _run_in_subprocess(cell: tuple, args, config_json: str) -> dict:
    model, method, target = cell
    out = Path(args.workdir) / "results" / f"{_cell_name((model, method, target.mode, target.backend, target.format))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    command = [sys.executable, __file__, "--cell", model, method, target.mode, target.backend, target.format,
               "--out", str(out), "--workdir", args.workdir, "--config", config_json, "--threads", str(args.threads)]
    start = time.perf_counter()
    out.unlink(missing_ok=True)
    with log.open("w") as log_file:
        try:
            subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=ROOT,
                           env=os.environ | {"PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            pass
    base = {"model": model, "method": method, "mode": target.mode, "backend": target.backend, "format": target.format}
    if out.is_file():
        result = json.loads(out.read_text())
    elif time.perf_counter() - start >= args.timeout:
        result = base | {"status": "failed", "reason": f"timed out after {args.timeout} s"}
    else:
        tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
        result = base | {"status": "failed", "reason": f"the cell's process died: {' '.join(tail)[:300]}"}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="zoo model names (default: all)")
    parser.add_argument("--methods", nargs="*", default=["qat", "ptq"])
    parser.add_argument("--targets", nargs="*", help="e.g. pt2e/x86->onnx (default: all)")
    parser.add_argument("--workdir", default=str(ROOT / ".zoo"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "zoo"), help="writes <output>.md and <output>.json")
    parser.add_argument("--jobs", type=int, default=2, help="cells run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch / runtime threads per cell")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--resume", action="store_true", help="keep results already in <output>.json")
    parser.add_argument("--update", action="store_true",
                        help="run the selected cells again and keep every other cell of <output>.json")
    parser.add_argument("--config", default="{}", help="JSON overrides of ZooConfig")
    parser.add_argument("--float-only", action="store_true", help="only train (and cache) the float networks")
    parser.add_argument("--remeasure-latency", action="store_true",
                        help="measure ORT latency again, one cell at a time, from the cells' files in <output>.json "
                             "(the cells --models / --methods / --targets select)")
    parser.add_argument("--remeasure-size", action="store_true",
                        help="size ratios of the ONNX cells in <output>.json again, from their files as the current "
                             "exporter writes them")
    parser.add_argument("--cell", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        return _cell_main(args)

    import torch
    import torchao

    from qlightning.exporters.atomic import write_json, write_text_atomic as write_text
    from qlightning.zoo import METHODS, MODELS, TARGETS, ZooConfig, float_weights, goal_misses, markdown

    config = ZooConfig(**json.loads(args.config))
    output = Path(args.output)
    models = args.models or MODELS.names()
    targets = [t for t in TARGETS if not args.targets or t.name in args.targets]
    methods = [m for m in METHODS if m in args.methods]
    selected = {(m, method, t.mode, t.backend, t.format) for m in models for method in methods for t in targets}
    if args.remeasure_size:
        from qlightning.zoo import remeasure_onnx_size

        data = json.loads(output.with_suffix(".json").read_text())
        results = [remeasure_onnx_size(r, Path(args.workdir) / "cells" / _cell_name(_cell_key(r))) for r in data["results"]]
        _write(results, config, output, write_json, write_text, markdown, torch, torchao)
        return 0
    if args.remeasure_latency:
        from qlightning.zoo import remeasure_latency

        torch.set_num_threads(2)
        data = json.loads(output.with_suffix(".json").read_text())
        results = []
        for r in data["results"]:
            if _cell_key(r) in selected and r["status"] == "ok" and r["format"] == "onnx" and "latency_ms" in r:
                cell = _cell_name(_cell_key(r))
                r = remeasure_latency(r, Path(args.workdir) / "cells" / cell)
                print(f"{cell}: int8/quantize_static {r['int8_over_quantize_static']:.2f}", flush=True)
            results.append(r)
        _write(results, config, output, write_json, write_text, markdown, torch, torchao)
        misses = goal_misses(results)
        print("\n".join(["goals missed:"] + misses) if misses else "all goals met")
        return 0
    previous = {}
    if (args.resume or args.update) and output.with_suffix(".json").is_file():
        for r in json.loads(output.with_suffix(".json").read_text())["results"]:
            if not (args.update and _cell_key(r) in selected):
                previous[_cell_key(r)] = r

    torch.set_num_threads(2)
    for name in models:  # float training first, in this process, so cells only load weights
        _, info = float_weights(name, config, Path(args.workdir) / "float")
        print(f"float {name}: {info['float_acc']:.1f} % ({info['train_s']:.0f} s)", flush=True)
    if args.float_only:
        return 0

    cells = [(m, method, t) for m in models for method in methods for t in targets
             if (m, method, t.mode, t.backend, t.format) not in previous]
    config_json = json.dumps(asdict(config))
    results = list(previous.values())
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(lambda c: _run_in_subprocess(c, args, config_json), cells):
            results.append(result)
            print(f"{result['model']:28s} {result['method']:4s} {result['mode']}/{result['backend']}->"
                  f"{result['format']:9s} {result['status']:8s} {result.get('int8_acc', '')} "
                  f"{result.get('reason', '')[:150]}", flush=True)
            # Written after every cell, so a killed run keeps what it measured (--resume).
            _write(results, config, output, write_json, write_text, markdown, torch, torchao)
    _write(results, config, output, write_json, write_text, markdown, torch, torchao)
    misses = goal_misses(results)
    print("\n".join(["goals missed:"] + misses) if misses else "all goals met")
    return 0


def _write(results, config, output, write_json, write_text, markdown, torch, torchao) -> None:
    from qlightning.zoo import METHODS, MODELS, TARGETS

    order = {name: i for i, name in enumerate(MODELS.names())}
    targets = {(t.mode, t.backend, t.format): i for i, t in enumerate(TARGETS)}
    results.sort(key=lambda r: (order.get(r["model"], 99), METHODS.index(r["method"]),
                                targets.get((r["mode"], r["backend"], r["format"]), 99)))
    meta = {
        "command": " ".join(["python scripts/zoo.py"] + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "torchao": torchao.__version__,
        "setup": (f"Each network is trained in float for {config.float_epochs} epochs (Adam, lr {config.float_lr}) "
                  f"on {config.train_images} Fashion-MNIST training images resized to the model's input "
                  f"(32x32, the ViT 64x64) as 3 channels. QAT fine-tunes it for {config.qat_steps} steps at lr "
                  f"{config.qat_lr}; static PTQ calibrates on {config.calibration_batches} batches of "
                  f"{config.batch_size}. Test accuracy is on {config.test_images} test images. BatchNorm momentum is "
                  "0.1 everywhere (mnasnet's 0.0003 left it at chance after this little training) and squeezenet "
                  "trains at a quarter of the learning rate (its final ReLU died at the full rate); mnasnet's QAT runs 3x "
                  "the steps (at the common 40 it ended 1.1-1.6 points below float). Cells ran one or two at a "
                  "time, one thread each; ORT latencies are then measured again one cell at a time "
                  "(`--remeasure-latency`)."),
        "config": asdict(config),
    }
    write_json(output.with_suffix(".json"), {"meta": meta, "results": results})
    write_text(output.with_suffix(".md"), markdown(results, meta))


if __name__ == "__main__":
    sys.exit(main())
