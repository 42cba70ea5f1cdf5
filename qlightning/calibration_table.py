"""Static PTQ calibration methods, and the per-layer report against ``skip=[...]``, on the real
Fashion-MNIST: the guide's network and the zoo's resnet18 and mobilenet_v2 (issue 19's measurement).

Each network is trained once in float (the zoo's cached float training, :func:`qlightning.zoo.float_weights`);
every row quantizes a fresh copy of the same float weights with :class:`~qlightning.PostTrainingQuantization`
in PT2E, calibrated through ``trainer.validate(model, dataloaders=<train loader>)`` on the same first
``calibration_batches`` training batches, and measures the int8 network (``callback.quantized_model``, run
in torch) on the test images: top-1 accuracy, and the SQNR of its logits against the float network's.

The skip experiment: :func:`qlightning.compare_layers` on a batch of validation images ranks the layers of
the min/max int8 network by the logits SQNR each would gain kept float (``skip_gain_db``, ``report.worst``);
the report's worst and best layers, and those with the lowest own SQNR (the error a layer adds by itself),
are then kept float (``skip=[name]``, which takes its fusion group along) and the network quantized again.
Whether the report names the layers whose skip helps most is the Spearman rank correlation between the
predicted and the measured gain (positive: the report is right), and the largest difference between them;
the own SQNR's correlation with the measured gain is kept as the contrast.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from pathlib import Path

import torch

from qlightning.activation_table import model as table_model
from qlightning.models import accuracy
from qlightning.passes.verify import sqnr_db
from qlightning.zoo import ZooConfig, ZooDataModule, ZooModel, _classifier, _network, _one_line, _trainer, float_weights

MODELS = ("guide_net", "resnet18", "mobilenet_v2")


@dataclasses.dataclass(frozen=True)
class Method:
    """A calibration method: ``PostTrainingQuantization(observer=..., percentile=...)``."""

    observer: str
    percentile: float | None = None

    @property
    def label(self) -> str:
        return f"{self.observer} {self.percentile:g}" if self.percentile is not None else self.observer


METHODS = (Method("minmax"), Method("histogram"), Method("percentile", 99.99), Method("percentile", 99.9),
           Method("entropy"), Method("mse"))


def parse_method(text: str) -> Method:
    """``"minmax"``, ``"percentile:99.9"``."""
    observer, _, percentile = text.partition(":")
    return Method(observer, float(percentile) if percentile else None)


@dataclasses.dataclass
class Bench:
    """One network's fixed material: the float weights, the data, the test images and the float logits."""

    zoo_model: ZooModel
    config: ZooConfig
    weights: Path
    float_acc: float
    data: ZooDataModule
    images: torch.Tensor
    labels: torch.Tensor
    float_logits: torch.Tensor
    report_batch: torch.Tensor
    workdir: Path
    report_float_logits: torch.Tensor

    def float_network(self) -> torch.nn.Module:
        return _network(self.zoo_model, "pt2e", self.weights).eval()


def logits(network, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    if isinstance(network, torch.nn.Module):
        network.eval()
    with torch.no_grad():
        return torch.cat([network(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def bench(name: str, config: ZooConfig, workdir: Path, cache: Path) -> Bench:
    zoo_model = table_model(name)
    weights, info = float_weights(zoo_model, config, cache)
    data = ZooDataModule(zoo_model.image_size, config)
    data.setup()
    test = list(data.test_dataloader())
    images, labels = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
    net = _network(zoo_model, "pt2e", weights).eval()
    report_batch = next(iter(data.val_dataloader()))[0]
    return Bench(zoo_model, config, weights, info["float_acc"], data, images, labels, logits(net, images),
                 report_batch, workdir / name, logits(net, report_batch))


def quantize(b: Bench, backend: str, method: Method, skip: list[str] | None = None, loader=None, **options):
    """The callback after PTQ of a fresh copy of the float weights (``callback.quantized_model``), through
    ``trainer.validate`` on ``loader`` (default: the first ``calibration_batches`` training batches);
    ``options``: further ``PostTrainingQuantization`` arguments."""
    from qlightning.callbacks import PostTrainingQuantization

    import lightning as L

    L.seed_everything(b.config.seed, verbose=False)
    callback = PostTrainingQuantization("pt2e", backend, observer=method.observer, percentile=method.percentile,
                                        calibration_batches=b.config.calibration_batches, skip=skip,
                                        layer_report=False,  # run_one reports on validation images itself
                                        **options)
    module = _classifier(b.zoo_model, _network(b.zoo_model, "pt2e", b.weights), b.config.qat_lr)
    limit = {} if loader is not None else {"limit_val_batches": b.config.calibration_batches}
    trainer = _trainer(b.workdir, [callback], enable_model_summary=False, **limit)
    trainer.validate(module, dataloaders=loader if loader is not None else b.data.train_dataloader(), verbose=False)
    return callback


def measure(b: Bench, quantized) -> dict:
    """Accuracy on the test images, and the logits' SQNR and top-1 agreement against float."""
    q = logits(quantized, b.images)
    return {
        "int8_acc": accuracy(torch.nn.Identity(), [(q, b.labels)]),
        "logits_sqnr_db": sqnr_db(b.float_logits, q),
        # On the images the per-layer report reads: where its predicted skip gains are checked like for like.
        "report_logits_sqnr_db": sqnr_db(b.report_float_logits, logits(quantized, b.report_batch)),
        "top1_agreement": 100.0 * (q.argmax(1) == b.float_logits.argmax(1)).float().mean().item(),
    }


def run_one(b: Bench, backend: str, method: Method, skip: list[str] | None = None, keep: bool = False,
            report: bool = False) -> dict:
    """One PTQ row: ``ok`` with the measures, or ``failed`` with the reason (the table records failures).
    ``report``: also the per-layer report on ``b.report_batch`` (its worst layer and its last layer; the
    report itself under ``"_report"``); ``keep``: the callback under ``"_callback"``."""
    from qlightning.layers import compare_layers

    row = {"model": b.zoo_model.name, "backend": backend, "method": method.label, "observer": method.observer,
           "percentile": method.percentile, "float_acc": b.float_acc, "status": "failed"}
    if skip:
        row["skip"] = list(skip)
    start = time.perf_counter()
    try:
        callback = quantize(b, backend, method, skip)
        row["skipped_layers"] = list(callback.skipped_layers)
        row.update(measure(b, callback.quantized_model), status="ok")
        if report:
            started = time.perf_counter()
            layers = compare_layers(b.float_network(), callback.quantized_model, b.report_batch)
            row["report_s"] = time.perf_counter() - started
            worst, last = layers.worst(1)[0], layers[-1]
            row["worst_layer"] = {"name": worst.name, "own_sqnr_db": worst.own_sqnr_db,
                                  "skip_gain_db": worst.skip_gain_db}
            row["last_layer"] = {"name": last.name, "own_sqnr_db": last.own_sqnr_db, "sqnr_db": last.sqnr_db,
                                 "output_scale": last.output_scale}
            row["_report"] = layers
        if keep:
            row["_callback"] = callback
    except Exception as exc:  # noqa: BLE001 - the table records every failure
        row.update(reason=_one_line(exc), traceback=traceback.format_exc()[-3000:])
    row["seconds"] = time.perf_counter() - start
    return row


def spearman(xs, ys) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN for fewer than 3 pairs or a constant side."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return result

    if len(xs) != len(ys) or len(xs) < 3:
        return math.nan
    rx, ry = ranks(list(xs)), ranks(list(ys))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def layers_to_skip(report, n: int) -> list:
    """The layers to quantize again with ``skip=[layer]``: the report's ``n`` worst (highest predicted skip
    gain, ``report.worst``) and ``n`` best, and the ``n`` with the lowest own SQNR (the ranking the report
    used before, kept as the contrast); every layer when there are at most ``2 n``. Worst first."""
    ranked = [layer for layer in report.worst(len(report)) if not math.isnan(layer.skip_gain_db)]
    if len(ranked) <= 2 * n:
        return ranked
    by_own = sorted((layer for layer in report if not math.isnan(layer.own_sqnr_db)), key=lambda l: l.own_sqnr_db)
    chosen = ranked[:n] + ranked[-n:] + by_own[:n]
    return list({layer.name: layer for layer in chosen}.values())


def skip_experiment(b: Bench, backend: str, method: Method, baseline: dict, n: int = 3) -> dict:
    """The per-layer report of ``baseline``'s int8 network, then PTQ again with each chosen layer skipped."""
    from qlightning.layers import compare_layers

    report = baseline.get("_report")
    if report is None:
        start = time.perf_counter()
        report = compare_layers(b.float_network(), baseline["_callback"].quantized_model, b.report_batch)
        baseline["report_s"] = time.perf_counter() - start
    report_s = baseline["report_s"]
    order = [layer.name for layer in report.worst(len(report))]
    by_own = [layer.name for layer in sorted(report, key=lambda layer: (math.isnan(layer.own_sqnr_db),
                                                                         layer.own_sqnr_db))]
    rows = []
    for layer in layers_to_skip(report, n):
        row = run_one(b, backend, method, skip=[layer.name])
        row.update(layer=layer.name, kind=layer.kind, own_sqnr_db=layer.own_sqnr_db, sqnr_db=layer.sqnr_db,
                   input_sqnr_db=layer.input_sqnr_db, predicted_gain_db=layer.skip_gain_db,
                   rank=order.index(layer.name) + 1, own_rank=by_own.index(layer.name) + 1)
        if row["status"] == "ok":
            row["acc_gain"] = row["int8_acc"] - baseline["int8_acc"]
            row["logits_sqnr_gain_db"] = row["logits_sqnr_db"] - baseline["logits_sqnr_db"]
            row["report_gain_db"] = row["report_logits_sqnr_db"] - baseline["report_logits_sqnr_db"]
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    gains = [r["logits_sqnr_gain_db"] for r in ok]
    by_gain = sorted(ok, key=lambda r: -r["logits_sqnr_gain_db"])
    correlation = {
        "pairs": len(ok),
        "predicted_vs_logits_gain": spearman([r["predicted_gain_db"] for r in ok], gains),
        "predicted_vs_report_gain": spearman([r["predicted_gain_db"] for r in ok], [r["report_gain_db"] for r in ok]),
        "predicted_max_abs_error_db": max((abs(r["predicted_gain_db"] - r["report_gain_db"]) for r in ok),
                                          default=math.nan),
        "own_sqnr_vs_logits_gain": spearman([r["own_sqnr_db"] for r in ok], gains),
        "predicted_vs_acc_gain": spearman([r["predicted_gain_db"] for r in ok], [r["acc_gain"] for r in ok]),
        "largest_gain_layers": [r["layer"] for r in by_gain[:n]],
        "largest_gains_among_report_worst": sum(r["layer"] in set(order[:n]) for r in by_gain[:n]),
        "largest_gains_among_own_worst": sum(r["layer"] in set(by_own[:n]) for r in by_gain[:n]),
    }
    return {"model": b.zoo_model.name, "backend": backend, "method": method.label, "report_s": report_s,
            "report": report.to_dict(), "layers": len(report), "baseline": _public(baseline), "skips": rows,
            "correlation": correlation}


def fallback_experiment(b: Bench, backend: str, method: Method, baseline: dict, budget: float = 0.003,
                        max_float_layers: int = 5) -> dict:
    """PTQ with ``max_accuracy_drop=budget`` (``val/acc`` is a fraction: 0.003 is 0.3 points): calibrated on,
    and validated with the LightningModule's ``validation_step`` on, the validation images (one loader for
    both, as ``trainer.validate(model, val_loader)`` gives it); the kept model measured on the test images."""
    row = {"model": b.zoo_model.name, "backend": backend, "method": method.label, "budget": budget,
           "max_float_layers": max_float_layers, "status": "failed"}
    start = time.perf_counter()
    try:
        callback = quantize(b, backend, method, loader=b.data.val_dataloader(), max_accuracy_drop=budget,
                            monitor="val/acc", max_float_layers=max_float_layers)
        row.update(fallback=callback.fallback.to_dict(), skipped_layers=list(callback.skipped_layers),
                   val_images=sum(len(y) for _, y in b.data.val_dataloader()), status="ok")
        row.update(measure(b, callback.quantized_model))
        row["test_acc_gain"] = row["int8_acc"] - baseline["int8_acc"]
        row["logits_sqnr_gain_db"] = row["logits_sqnr_db"] - baseline["logits_sqnr_db"]
    except Exception as exc:  # noqa: BLE001 - the table records every failure
        row.update(reason=_one_line(exc), traceback=traceback.format_exc()[-3000:])
    row["seconds"] = time.perf_counter() - start
    return row


# minmax: the library default; entropy: the method that moves the logits furthest from float (see the table).
FALLBACK_METHODS = (Method("minmax"), Method("entropy"))


def run_fallbacks(b: Bench, rows: list[dict], backend: str, methods, budget: float | None, log=print) -> list[dict]:
    """:func:`fallback_experiment` for each method whose row (``backend``) quantized."""
    out = []
    for method in methods if budget is not None else ():
        baseline = next((r for r in rows if r["backend"] == backend and r["method"] == method.label
                         and r["status"] == "ok"), None)
        if baseline is None:
            continue
        row = fallback_experiment(b, backend, method, baseline, budget)
        log(f"{b.zoo_model.name} fallback {method.label}: {row['status']} {row.get('fallback', row.get('reason'))} "
            f"({row['seconds']:.0f} s)")
        out.append(row)
    return out


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


# x86 rows cost 1.5-2x onnxruntime's (its torch int8 graph), so only the two library observers by default.
X86_METHODS = (Method("minmax"), Method("histogram"))


def run_network(name: str, config: ZooConfig, workdir: Path, cache: Path, methods=METHODS,
                x86_methods=X86_METHODS, skip_method: Method = Method("minmax"), skip_backend: str = "onnxruntime",
                n_skip: int = 3, fallback_budget: float | None = 0.003, fallback_methods=FALLBACK_METHODS,
                log=print) -> dict:
    """Every calibration method in onnxruntime (and ``x86_methods`` in x86), then the skip experiment on
    ``skip_method``'s int8 network."""
    start = time.perf_counter()
    b = bench(name, config, workdir, cache)
    float_measured = accuracy(torch.nn.Identity(), [(b.float_logits, b.labels)])
    rows, baseline = [], None
    for backend, backend_methods in (("onnxruntime", methods), ("x86", x86_methods)):
        for method in backend_methods:
            keep = backend == skip_backend and method == skip_method
            row = run_one(b, backend, method, keep=keep, report=True)
            log(f"{name} {backend} {method.label}: {row['status']} {row.get('int8_acc', row.get('reason'))} "
                f"{row.get('logits_sqnr_db', '')} ({row['seconds']:.0f} s)")
            if keep:
                baseline = row
            rows.append(row)
    skips = None
    if baseline is None:
        baseline = run_one(b, skip_backend, skip_method, keep=True)
    if baseline["status"] == "ok" and n_skip > 0:
        skips = skip_experiment(b, skip_backend, skip_method, baseline, n_skip)
        for r in skips["skips"]:
            log(f"{name} skip {r['layer']} (predicted {r['predicted_gain_db']:+.2f} dB, rank {r['rank']}): {r['status']} "
                f"{r.get('int8_acc', r.get('reason'))} {r.get('logits_sqnr_gain_db', '')} ({r['seconds']:.0f} s)")
    fallback = run_fallbacks(b, rows, skip_backend, fallback_methods, fallback_budget, log)
    return {"model": name, "float_acc": b.float_acc, "float_acc_measured": float_measured,
            "image_size": b.zoo_model.image_size, "test_images": len(b.labels),
            "report_batch": len(b.report_batch), "methods": [_public(r) for r in rows], "skip": skips,
            "fallbacks": fallback,
            "seconds": time.perf_counter() - start}


# -- markdown ---------------------------------------------------------------------------------------


def _f(value, digits: int = 1, sign: bool = False) -> str:
    if isinstance(value, str):  # a non-finite value read back from JSON
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown(networks: list[dict], meta: dict) -> str:
    c = meta["config"]
    lines = [
        "# Calibration methods and the per-layer report against skip, on Fashion-MNIST",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}. Date: {meta['date']}. "
        f"torch {meta['torch']}, torchao {meta['torchao']}, qlightning at commit {meta.get('commit', 'unknown')}. "
        f"Took {meta['minutes']:.1f} min."
        + (f" The fallback runs again with `{meta['fallback_command']}` at commit {meta.get('fallback_commit')}, "
           f"{meta['fallback_minutes']:.1f} min." if meta.get("fallback_command") else ""),
        "",
        f"Data: the real Fashion-MNIST (Debian's dataset-fashion-mnist) as the zoo loads it (3 identical channels; "
        f"guide_net at 28 x 28, resnet18 and mobilenet_v2 resized to 32 x 32). Float: the zoo's float training, "
        f"{c['float_epochs']} epochs on {c['train_images']} training images (lr {c['float_lr']:g}, batch "
        f"{c['batch_size']}), one set of weights per network shared by every row. Static PTQ: PT2E, "
        f"`PostTrainingQuantization(mode=\"pt2e\", backend=..., observer=..., calibration_batches="
        f"{c['calibration_batches']})` calibrated through `trainer.validate(model, dataloaders=train_loader)` on "
        f"the same first {c['calibration_batches']} training batches ({c['calibration_batches'] * c['batch_size']} "
        f"images) for every row. Measured: the int8 network (`callback.quantized_model`) run in torch on "
        f"{c['test_images']} test images (1 image = {100 / c['test_images']:g} point): top-1 accuracy, and the SQNR "
        "of its logits against the float network's, `10*log10(sum f^2 / sum (f-q)^2)` over all test logits.",
        "",
        "## Accuracy and logits SQNR per calibration method",
        "",
    ]
    backends = list(dict.fromkeys(r["backend"] for n in networks for r in n["methods"]))
    methods = list(dict.fromkeys(r["method"] for n in networks for r in n["methods"]))
    header = [f"{n['model']} {b}" for n in networks for b in backends]
    for title, cell in (
        ("Top-1 accuracy % (difference to float in brackets)",
         lambda r: f"{r['int8_acc']:.1f} ({r['int8_acc'] - r['float_acc']:+.1f})"),
        ("Logits SQNR against float, dB (top-1 agreement with float %)",
         lambda r: f"{r['logits_sqnr_db']:.1f} ({r['top1_agreement']:.1f})"),
    ):
        lines += [f"{title}:", "", "| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        lines.append("| float | " + " | ".join(f"{n['float_acc']:.1f}" if "accuracy" in title else "-"
                                             for n in networks for _ in backends) + " |")
        for m in methods:
            cells = []
            for n in networks:
                for b in backends:
                    row = next((r for r in n["methods"] if r["backend"] == b and r["method"] == m), None)
                    cells.append("" if row is None else cell(row) if row["status"] == "ok"
                                 else f"{row['status']}: {row.get('reason', '')[:80]}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"The per-layer report of each row (`compare_layers` on {networks[0]['report_batch']} validation "
              "images): the layer whose float fallback gains the logits most (`report.worst(1)`, its predicted gain in "
              "dB), and the last layer's own SQNR (the logits) and output scale:", "",
              "| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for m in methods:
        cells = []
        for n in networks:
            for b in backends:
                row = next((r for r in n["methods"] if r["backend"] == b and r["method"] == m), None)
                if row is None or "worst_layer" not in row:
                    cells.append("")
                    continue
                w, last = row["worst_layer"], row["last_layer"]
                scale = "float" if last["output_scale"] is None else f"{last['output_scale']:.3g}"
                cells.append(f"{w['name']} {_f(w.get('skip_gain_db'), 2, True)}; last {_f(last['own_sqnr_db'])} @ {scale}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Seconds per row (prepare, calibrate, convert, 1000 test images, report): "
              + "; ".join(f"{n['model']} {sum(r['seconds'] for r in n['methods']) / len(n['methods']):.0f} s"
                          for n in networks) + ".", ""]

    lines += ["## The per-layer report against skip=[layer]", ""]
    for n in networks:
        s = n["skip"]
        if s is None:
            continue
        base = s["baseline"]
        cor = s["correlation"]
        lines += [
            f"### {n['model']} ({s['backend']}, {s['method']}; {s['layers']} quantized layers in the report)",
            "",
            f"`compare_layers` on {n['report_batch']} validation images took {s['report_s']:.1f} s. No skip: "
            f"{base['int8_acc']:.1f} % (float {base['float_acc']:.1f} %), logits SQNR {base['logits_sqnr_db']:.1f} dB.",
            "",
            "| layer | kind | predicted gain dB | measured gain on those images dB | rank | own SQNR dB | own rank | "
            "kept float | accuracy % | Δ accuracy | logits SQNR dB | Δ logits SQNR dB (test images) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["skips"]:
            kept = ", ".join(r.get("skipped_layers", []))
            head = (f"| {r['layer']} | {r['kind']} | {_f(r['predicted_gain_db'], 2, True)} | "
                    f"{_f(r.get('report_gain_db'), 2, True)} | {r['rank']} / {s['layers']} | "
                    f"{_f(r['own_sqnr_db'])} | {r['own_rank']} | {kept} | ")
            if r["status"] != "ok":
                lines.append(head + f"failed: {r.get('reason', '')[:100]} | | | |")
                continue
            lines.append(head + f"{r['int8_acc']:.1f} | {_f(r['acc_gain'], sign=True)} | {r['logits_sqnr_db']:.1f} | "
                         f"{_f(r['logits_sqnr_gain_db'], 2, True)} |")
        lines += [
            "",
            f"Over the {cor['pairs']} skipped layers, on the report's {n['report_batch']} images: Spearman(predicted "
            f"gain, measured gain) {_f(cor.get('predicted_vs_report_gain'), 2)}, largest |predicted - measured| "
            f"{_f(cor['predicted_max_abs_error_db'], 2)} dB. On the {n['test_images']} test images: Spearman(predicted "
            f"gain, measured gain) {_f(cor['predicted_vs_logits_gain'], 2)}; Spearman(own SQNR, measured gain) "
            f"{_f(cor['own_sqnr_vs_logits_gain'], 2)} (negative would mean the own-SQNR ranking is right); "
            f"Spearman(predicted gain, accuracy gain) {_f(cor['predicted_vs_acc_gain'], 2)}. Largest measured gains: "
            f"{', '.join(cor['largest_gain_layers'])}: {cor['largest_gains_among_report_worst']} of them among the "
            f"report's worst 3 (`report.worst(3)`), {cor['largest_gains_among_own_worst']} among the 3 lowest own "
            "SQNRs.",
            "",
        ]
    lines += fallback_markdown(networks)
    lines += ["## Summary of this run", ""] + [f"- {line}" for line in summary(networks)]
    lines += ["", "## How to read it", ""] + [f"- {note}" for note in READING_NOTES]
    return "\n".join(lines) + "\n"


def fallback_markdown(networks: list[dict]) -> list[str]:
    rows = [(n, r) for n in networks for r in n.get("fallbacks") or []]
    if not rows:
        return []
    first = rows[0][1]
    lines = [f"## Accuracy-aware fallback: max_accuracy_drop={first['budget']:g}", "",
             f"`PostTrainingQuantization(mode=\"pt2e\", backend=\"{first['backend']}\", observer=..., "
             f"max_accuracy_drop={first['budget']:g}, monitor=\"val/acc\", max_float_layers={first['max_float_layers']})` "
             "through `trainer.validate(model, val_loader)`: calibrated on the validation images, and each int8 model "
             "validated on them with the LightningModule's own `validation_step` (`val/acc` is a fraction: the budget "
             f"is {100 * first['budget']:g} points). The kept model measured on the test images; Δ against the same "
             "method's row above (no budget, calibrated on training batches instead).", "",
             "| network | method | val images | float val acc % | steps: layer moved to float -> int8 val acc % | "
             "within budget | layers moved (modules kept float) | test acc % (Δ) | logits SQNR dB (Δ) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows:
        if r["status"] != "ok":
            lines.append(f"| {n['model']} | {r['method']} | | | failed: {r.get('reason', '')[:120]} | | | | | "
                         f"{r['seconds']:.0f} |")
            continue
        f = r["fallback"]
        steps = "; ".join(f"{s['added'] or 'none'} -> {100 * s['metric']:.1f}" for s in f["steps"])
        lines.append(f"| {n['model']} | {r['method']} | {r['val_images']} | {100 * f['float_metric']:.1f} | {steps} | "
                     f"{'yes' if f['within_budget'] else 'no'} | {len(f['steps']) - 1}"
                     f"{' (' + ', '.join(f['float_layers']) + ')' if f['float_layers'] else ''} | {r['int8_acc']:.1f} "
                     f"({_f(r['test_acc_gain'], sign=True)}) | {r['logits_sqnr_db']:.1f} "
                     f"({_f(r['logits_sqnr_gain_db'], 2, True)}) | {r['seconds']:.0f} |")
    return lines + [""]


def summary(networks: list[dict]) -> list[str]:
    """Plain statements computed from the rows: what the accuracy differences resolve, which method keeps the
    logits closest to float, and whether the report's worst layers are the ones worth skipping."""
    out = []
    for n in networks:
        ok = [r for r in n["methods"] if r["status"] == "ok"]
        failed = [f"{r['backend']} {r['method']}" for r in n["methods"] if r["status"] != "ok"]
        if ok:
            accs = [r["int8_acc"] for r in ok]
            best = max(ok, key=lambda r: r["logits_sqnr_db"])
            worst = min(ok, key=lambda r: r["logits_sqnr_db"])
            p = n["float_acc"] / 100
            se = 100 * math.sqrt(p * (1 - p) / n["test_images"])
            out.append(
                f"{n['model']}: int8 accuracy {min(accs):.1f}-{max(accs):.1f} % over {len(ok)} rows (float "
                f"{n['float_acc']:.1f} %): a spread of {round((max(accs) - min(accs)) * n['test_images'] / 100)} test "
                f"images, against a standard error of {se:.1f} points for one accuracy on {n['test_images']} images. "
                f"Logits SQNR {worst['logits_sqnr_db']:.1f} dB ({worst['backend']} {worst['method']}) to "
                f"{best['logits_sqnr_db']:.1f} dB ({best['backend']} {best['method']})."
                + (f" Failed: {', '.join(failed)}." if failed else ""))
        s = n["skip"]
        if s:
            cor = s["correlation"]
            ok_skips = [r for r in s["skips"] if r["status"] == "ok"]
            if ok_skips:
                top = max(ok_skips, key=lambda r: r["logits_sqnr_gain_db"])
                out.append(
                    f"{n['model']} skip: the largest logits gain, {top['logits_sqnr_gain_db']:+.2f} dB, from keeping "
                    f"{top['layer']} float (report rank {top['rank']} of {s['layers']}, predicted "
                    f"{top['predicted_gain_db']:+.2f} dB; own-SQNR rank {top['own_rank']}); accuracy changes "
                    f"{min(r['acc_gain'] for r in ok_skips):+.1f} to "
                    f"{max(r['acc_gain'] for r in ok_skips):+.1f} points. Over {cor['pairs']} skipped layers: on the report's "
                    f"images, Spearman(predicted, measured gain) = {_f(cor.get('predicted_vs_report_gain'), 2)} with a "
                    f"largest error of {_f(cor['predicted_max_abs_error_db'], 2)} dB; on the test images "
                    f"Spearman(predicted, measured gain) = {_f(cor['predicted_vs_logits_gain'], 2)} and Spearman(own "
                    f"SQNR, measured gain) = {_f(cor['own_sqnr_vs_logits_gain'], 2)}.")
    for n in networks:
        for r in n.get("fallbacks") or []:
            if r["status"] != "ok":
                continue
            f = r["fallback"]
            first, last = f["steps"][0]["metric"], f["steps"][-1]["metric"]
            moved = [s["added"] for s in f["steps"][1:]]
            out.append(
                f"{n['model']} {r['method']} with max_accuracy_drop={r['budget']:g}: int8 {100 * first:.1f} % against "
                f"float {100 * f['float_metric']:.1f} % on validation; "
                + (f"within budget at once, no layer moved." if not moved else
                   f"moved {len(moved)} layer(s) to float ({', '.join(moved)}), ending at {100 * last:.1f} % "
                   f"({'within' if f['within_budget'] else 'outside'} budget); test images "
                   f"{_f(r['test_acc_gain'], sign=True)} points, logits {_f(r['logits_sqnr_gain_db'], 2, True)} dB."))
    return out


READING_NOTES = (
    "Accuracy is measured on a fixed set of test images, the same for every row, so two rows differ only on the "
    "images where their int8 networks disagree; still, with every row within about a point of float, differences "
    "of a few tenths are a handful of images. The logits SQNR is the finer measure of how close an int8 network "
    "stays to float, and the one the skip experiment is judged on.",
    "The logits SQNR counts every error the same, including a clipped range that changes few top-1 answers: "
    "compare it with the top-1 agreement, and with the per-layer report's worst layer, which says where it comes from.",
    "predicted gain: `compare_layers`' `skip_gain_db`, the logits SQNR gain of the int8 network run once more "
    "with only that layer computing in float; rank 1 is the layer the report names worst (`report.worst(1)`). "
    "own SQNR: the error of the int8 layer alone, fed the float input (own rank 1: the lowest). Kept float: the "
    "modules `skip=[layer]` resolved to (the fusion group).",
    "What a skip removes: in PT2E a layer kept float still reads a quantized input and its output is still "
    "quantized for the layer that reads it; only the last layer's output (the logits) becomes float, and a first "
    "layer's input. The own SQNR counts the input and output rounding too, so it ranks layers partly by error their "
    "skip cannot remove: resnet18's fc (own rank 17 of 22) is the only single layer worth keeping float (+4.67 dB on "
    "the test images; every other layer tried moved the logits by -0.01 to +0.15 dB), and guide_net's fc2 (own rank "
    "2 of 4) gains 2.72 dB. The predicted gain ranks both first.",
    "Predicted against measured: on the report's own images the prediction is what skip does, to 0.10 dB at most "
    "(the skipped layer's output grid is calibrated on its float output instead of its int8 output; the bias stays "
    "float). On the 1000 test images the large gains mostly hold (guide_net fc2: +5.44 predicted on the 64 "
    "report images, +2.72 measured; resnet18 fc +4.33, +4.67; mobilenet_v2 features.1.conv.0.0 +1.32, +1.41 and "
    "features.0.0 +1.12, +1.28), but not all: mobilenet_v2's first-ranked features.1.conv.1 predicted +1.83 and "
    "measured +0.07. Of the 8 mobilenet_v2 layers tried, the report's first three are the three largest measured. "
    "Gains of a few tenths of a dB on 64 images are sampling noise (resnet18's -0.5 dB predictions measured +0.03 "
    "to +0.13 on 1000 images): rank by the report, and measure the gains on more images when they are small "
    "(`compare_layers(float_net, int8_net, more_images)`).",
    "Entropy (KL) calibration on these inputs: the normalised images put 52 % of the input values on the background "
    "level (-0.81, range -0.81 to 2.02), and the KL threshold clips the network input: the first layer's input SQNR "
    "fell to 9.1 dB (guide_net; 62.0 dB with minmax), which is the worst layer of every entropy row and where its "
    "logits SQNR goes. Percentile clips the signed outputs of resnet18's downsample branches (conv-bn without "
    "ReLU), its worst layers (own SQNR 26.3 dB at 99.99 %, 22.0 dB at 99.9 %, against 33.7 dB with minmax); "
    "histogram's lower logits SQNR on resnet18 (34.8 against 39.7 dB) shows neither in its worst layer nor in its "
    "last one.",
    "Both backends' int8 networks run in torch (the converted PT2E graph: quantize / dequantize around float "
    "ops), not in ONNX Runtime: no export, and no CPU-specific integer kernels (this CPU has no VNNI). x86's "
    "quantizer leaves the last linear's output float (\"last ... @ float\").",
)
