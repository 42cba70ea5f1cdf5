"""Static PTQ calibration methods, and the per-layer report against ``skip=[...]``, on the real
Fashion-MNIST: the guide's network and the zoo's resnet18 and mobilenet_v2 (issue 19's measurement).

Each network is trained once in float (the zoo's cached float training, :func:`qlightning.zoo.float_weights`);
every row quantizes a fresh copy of the same float weights with :class:`~qlightning.PostTrainingQuantization`
in PT2E, calibrated through ``trainer.validate(model, dataloaders=<train loader>)`` on the same first
``calibration_batches`` training batches, and measures the int8 network (``callback.quantized_model``, run
in torch) on the test images: top-1 accuracy, and the SQNR of its logits against the float network's.

The skip experiment: :func:`qlightning.compare_layers` on a batch of validation images ranks the layers of
the min/max int8 network by the error each adds by itself (``own_sqnr_db``); each of the worst and best
ones is then kept float (``skip=[name]``, which takes its fusion group along) and the network quantized
again. Whether the report names the layers whose skip helps most is the Spearman rank correlation between
a layer's own SQNR and the gain in logits SQNR its skip buys (negative: the report is right).
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
    return Bench(zoo_model, config, weights, info["float_acc"], data, images, labels, logits(net, images),
                 next(iter(data.val_dataloader()))[0], workdir / name)


def quantize(b: Bench, backend: str, method: Method, skip: list[str] | None = None):
    """The callback after PTQ of a fresh copy of the float weights (``callback.quantized_model``)."""
    from qlightning.callbacks import PostTrainingQuantization

    import lightning as L

    L.seed_everything(b.config.seed, verbose=False)
    callback = PostTrainingQuantization("pt2e", backend, observer=method.observer, percentile=method.percentile,
                                        calibration_batches=b.config.calibration_batches, skip=skip,
                                        layer_report=False)  # run_one reports on validation images itself
    module = _classifier(b.zoo_model, _network(b.zoo_model, "pt2e", b.weights), b.config.qat_lr)
    trainer = _trainer(b.workdir, [callback], limit_val_batches=b.config.calibration_batches,
                       enable_model_summary=False)
    trainer.validate(module, dataloaders=b.data.train_dataloader(), verbose=False)
    return callback


def measure(b: Bench, quantized) -> dict:
    """Accuracy on the test images, and the logits' SQNR and top-1 agreement against float."""
    q = logits(quantized, b.images)
    return {
        "int8_acc": accuracy(torch.nn.Identity(), [(q, b.labels)]),
        "logits_sqnr_db": sqnr_db(b.float_logits, q),
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
            row["worst_layer"] = {"name": worst.name, "own_sqnr_db": worst.own_sqnr_db}
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
    """The ``n`` layers with the lowest own SQNR and the ``n`` with the highest (every measured layer when
    there are at most ``2 n``), worst first."""
    ranked = [layer for layer in report.worst(len(report)) if not math.isnan(layer.own_sqnr_db)]
    return ranked if len(ranked) <= 2 * n else ranked[:n] + ranked[-n:]


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
    end_to_end = [layer.name for layer in sorted(report, key=lambda layer: (math.isnan(layer.sqnr_db), layer.sqnr_db))]
    rows = []
    for layer in layers_to_skip(report, n):
        row = run_one(b, backend, method, skip=[layer.name])
        row.update(layer=layer.name, kind=layer.kind, own_sqnr_db=layer.own_sqnr_db, sqnr_db=layer.sqnr_db,
                   input_sqnr_db=layer.input_sqnr_db, own_rank=order.index(layer.name) + 1,
                   end_to_end_rank=end_to_end.index(layer.name) + 1)
        if row["status"] == "ok":
            row["acc_gain"] = row["int8_acc"] - baseline["int8_acc"]
            row["logits_sqnr_gain_db"] = row["logits_sqnr_db"] - baseline["logits_sqnr_db"]
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    by_gain = sorted(ok, key=lambda r: -r["logits_sqnr_gain_db"])
    worst_named = set(order[:n])
    correlation = {
        "pairs": len(ok),
        "own_sqnr_vs_logits_gain": spearman([r["own_sqnr_db"] for r in ok], [r["logits_sqnr_gain_db"] for r in ok]),
        "end_to_end_sqnr_vs_logits_gain": spearman([r["sqnr_db"] for r in ok], [r["logits_sqnr_gain_db"] for r in ok]),
        "own_sqnr_vs_acc_gain": spearman([r["own_sqnr_db"] for r in ok], [r["acc_gain"] for r in ok]),
        "largest_gain_layers": [r["layer"] for r in by_gain[:n]],
        "largest_gains_among_report_worst": sum(r["layer"] in worst_named for r in by_gain[:n]),
    }
    return {"model": b.zoo_model.name, "backend": backend, "method": method.label, "report_s": report_s,
            "report": report.to_dict(), "layers": len(report), "baseline": _public(baseline), "skips": rows,
            "correlation": correlation}


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


# x86 rows cost 1.5-2x onnxruntime's (its torch int8 graph), so only the two library observers by default.
X86_METHODS = (Method("minmax"), Method("histogram"))


def run_network(name: str, config: ZooConfig, workdir: Path, cache: Path, methods=METHODS,
                x86_methods=X86_METHODS, skip_method: Method = Method("minmax"), skip_backend: str = "onnxruntime",
                n_skip: int = 3, log=print) -> dict:
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
            log(f"{name} skip {r['layer']} (own {r['own_sqnr_db']:.1f} dB, rank {r['own_rank']}): {r['status']} "
                f"{r.get('int8_acc', r.get('reason'))} {r.get('logits_sqnr_gain_db', '')} ({r['seconds']:.0f} s)")
    return {"model": name, "float_acc": b.float_acc, "float_acc_measured": float_measured,
            "image_size": b.zoo_model.image_size, "test_images": len(b.labels),
            "report_batch": len(b.report_batch), "methods": [_public(r) for r in rows], "skip": skips,
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
        f"Took {meta['minutes']:.1f} min.",
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
              "images): the layer with the most error of its own (`report.worst(1)`, its own SQNR in dB), and the "
              "last layer's own SQNR (the logits) and output scale:", "",
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
                cells.append(f"{w['name']} {_f(w['own_sqnr_db'])}; last {_f(last['own_sqnr_db'])} @ {scale}")
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
            "| layer | kind | own SQNR dB | own rank | end-to-end SQNR dB | e2e rank | kept float | accuracy % | "
            "Δ accuracy | logits SQNR dB | Δ logits SQNR dB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["skips"]:
            kept = ", ".join(r.get("skipped_layers", []))
            if r["status"] != "ok":
                lines.append(f"| {r['layer']} | {r['kind']} | {_f(r['own_sqnr_db'])} | {r['own_rank']} | "
                             f"{_f(r['sqnr_db'])} | {r['end_to_end_rank']} | {kept} | failed: "
                             f"{r.get('reason', '')[:100]} | | | |")
                continue
            lines.append(
                f"| {r['layer']} | {r['kind']} | {_f(r['own_sqnr_db'])} | {r['own_rank']} / {s['layers']} | "
                f"{_f(r['sqnr_db'])} | {r['end_to_end_rank']} | {kept} | {r['int8_acc']:.1f} | "
                f"{_f(r['acc_gain'], sign=True)} | {r['logits_sqnr_db']:.1f} | "
                f"{_f(r['logits_sqnr_gain_db'], 2, True)} |")
        lines += [
            "",
            f"Spearman over the {cor['pairs']} skipped layers (negative: the lower a layer's SQNR, the more its "
            f"skip gains): own SQNR vs logits-SQNR gain {_f(cor['own_sqnr_vs_logits_gain'], 2)}; end-to-end SQNR "
            f"vs logits-SQNR gain {_f(cor['end_to_end_sqnr_vs_logits_gain'], 2)}; own SQNR vs accuracy gain "
            f"{_f(cor['own_sqnr_vs_acc_gain'], 2)}. Largest logits gains: {', '.join(cor['largest_gain_layers'])} "
            f"({cor['largest_gains_among_report_worst']} of them among the report's worst 3).",
            "",
        ]
    lines += ["## Summary of this run", ""] + [f"- {line}" for line in summary(networks)]
    lines += ["", "## How to read it", ""] + [f"- {note}" for note in READING_NOTES]
    return "\n".join(lines) + "\n"


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
                    f"{top['layer']} float (own-SQNR rank {top['own_rank']} of {s['layers']}); accuracy changes "
                    f"{min(r['acc_gain'] for r in ok_skips):+.1f} to "
                    f"{max(r['acc_gain'] for r in ok_skips):+.1f} points; "
                    f"Spearman(own SQNR, logits gain) = {_f(cor['own_sqnr_vs_logits_gain'], 2)} over {cor['pairs']} "
                    f"layers.")
    return out


READING_NOTES = (
    "Accuracy is measured on a fixed set of test images, the same for every row, so two rows differ only on the "
    "images where their int8 networks disagree; still, with every row within about a point of float, differences "
    "of a few tenths are a handful of images. The logits SQNR is the finer measure of how close an int8 network "
    "stays to float, and the one the skip experiment is judged on.",
    "The logits SQNR counts every error the same, including a clipped range that changes few top-1 answers: "
    "compare it with the top-1 agreement, and with the per-layer report's worst layer, which says where it comes from.",
    "own SQNR: `compare_layers`' error of the int8 layer alone, fed the float input; rank 1 is the layer the "
    "report names worst (`report.worst(1)`). Kept float: the modules `skip=[layer]` resolved to (the fusion group).",
    "What a skip removes: in PT2E a layer kept float still reads a quantized input and its output is still "
    "quantized for the layer that reads it; only the last layer's output (the logits) becomes float. The own SQNR "
    "counts the output rounding too, so it ranks layers partly by an error their skip cannot remove: guide_net's "
    "conv1 (measured with minmax: own 36.7 dB, input 62.0 dB, so the loss is its weights and output grid) gains "
    "nothing when skipped, while fc2, the last layer, gains 2.7 dB. In resnet18 and mobilenet_v2 the error is spread "
    "over 22 and 54 layers; keeping one layer float moved the logits SQNR by -0.31 to +0.15 dB.",
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
