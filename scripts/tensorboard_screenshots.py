"""Screenshots of TensorBoard's dashboards on a QParamMonitor run, taken with headless Chromium.

    python scripts/tensorboard_screenshots.py                      # trains README journey 3 first (temp dir)
    python scripts/tensorboard_screenshots.py runs                 # an existing logdir
    python scripts/tensorboard_screenshots.py --out-run-dir runs   # train journey 3 into ./runs, keep it

Starts ``tensorboard --logdir <dir> --host 127.0.0.1 --port 0`` (loopback only), waits until it serves the
qparams, and writes ``docs/img/tensorboard_<tab>.png`` for the Time Series, Scalars, Custom Scalars,
Histograms, Distributions and Images tabs. Needs Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 60
MAX_BYTES = 300_000
URL_LINE = re.compile(r"(http://127\.0\.0\.1:\d+/)")

# tab -> (URL after the server's root, window size). Hash routes of TensorBoard 2.x's frontend: the
# legacy dashboards read `#<plugin>&tagFilter=...`, Time Series reads query parameters.
TABS = {
    # forceSVG: Time Series' WebGL lines do not reliably reach a headless screenshot; its SVG renderer does.
    "timeseries": ("?forceSVG=true&tagFilter=qparams%2F&smoothing=0#timeseries", "1400,1000"),
    "scalars": ("#scalars&tagFilter=qparams", "1400,1000"),
    "custom_scalars": ("#custom_scalars", "1400,1000"),
    "histograms": ("#histograms", "1400,1000"),
    "distributions": ("#distributions", "1400,1000"),
    "images": ("#images", "1000,1400"),  # the drift heat map is drawn stretched to the card's width: tall
}


def find_chromium(explicit: str | None = None) -> str:
    for candidate in ([explicit] if explicit else ["chromium", "/usr/bin/chromium"]):
        path = shutil.which(candidate)
        if path:
            return path
    raise SystemExit(f"chromium not found{f' at {explicit}' if explicit else ''}: "
                     "install Debian's chromium: apt-get install -y chromium")


def train_journey3(run_dir: Path, max_epochs: int = 3) -> Path:
    """README journey 3 (with journey 1's QAT callback) into ``run_dir``; returns ``run_dir``."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from qlightning import QParamMonitor, QuantizationAwareTraining
    from qlightning.data import DigitsDataModule
    from qlightning.models import ImageClassifier, SmallCNN

    L.seed_everything(0, verbose=False)
    qat = QuantizationAwareTraining(mode="pt2e", backend="onnxruntime", observer="moving_average_minmax",
                                    freeze_bn_epoch=2, freeze_observers_epoch=2)
    trainer = L.Trainer(max_epochs=max_epochs, logger=TensorBoardLogger(str(run_dir)), enable_checkpointing=False,
                        callbacks=[qat, QParamMonitor()])
    trainer.fit(ImageClassifier(SmallCNN()), DigitsDataModule())
    return run_dir


class TensorBoard:
    """The ``tensorboard`` next to this interpreter, on 127.0.0.1 and a port the OS picks."""

    def __init__(self, logdir: Path, workdir: Path):
        script = Path(sys.executable).with_name("tensorboard")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "tensorboard.main"]
        self.log = workdir / "tensorboard.log"
        self._stderr = open(self.log, "w")
        self.process = subprocess.Popen(command + ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0"],
                                        stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            self.url = self._wait_for_url()
            self.version = self._get("data/environment").get("version", "?")
            self._wait_for_qparams()
        except BaseException:
            self.stop()
            raise

    def _get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            match = URL_LINE.search(self.log.read_text())
            if match:
                return match.group(1)
            time.sleep(0.2)
        raise SystemExit(f"tensorboard did not start within {WAIT_S} s:\n{self.log.read_text()[-2000:]}")

    def _wait_for_qparams(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                tags = self._get("data/plugin/scalars/tags")
                if any(tag.startswith("qparams/") for run in tags.values() for tag in run):
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        raise SystemExit(f"tensorboard serves no qparams/ scalar after {WAIT_S} s: is this a QParamMonitor logdir?")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._stderr.close()


def _drawn_fraction(png: Path) -> float | None:
    """Share of dark pixels in the dashboard area (right of the sidebar, below the header): an empty page,
    a spinner or cards still loading give ~0. ``None`` without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return None
    with Image.open(png) as image:
        gray = image.convert("L")
        width, height = gray.size
        area = gray.crop((int(width * 0.25), int(height * 0.2), int(width * 0.8), height))
        histogram = area.histogram()
        return sum(histogram[:200]) / max(sum(histogram), 1)


def _shrink(png: Path) -> None:
    """Keep the PNG under MAX_BYTES: palette-quantize, then downscale, if Pillow is there."""
    if png.stat().st_size <= MAX_BYTES:
        return
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as original:
        image = original.convert("RGB")
    while True:
        image.quantize(colors=128).save(png, optimize=True)
        if png.stat().st_size <= MAX_BYTES or image.width < 600:
            return
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)


def screenshot(chromium: str, url: str, window: str, target: Path, budget_ms: int, workdir: Path,
               attempts: int = 4) -> tuple[float | None, int]:
    """Screenshot ``url`` into ``target`` (written under a temporary name, then renamed); retries with a
    longer budget while the dashboard area is still empty. Returns the drawn fraction and the attempts."""
    partial = target.with_name(f".{target.name}.partial.png")
    drawn, attempt = None, 0
    for attempt in range(1, attempts + 1):
        profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir)
        command = [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            # Time Series draws its lines with WebGL: software WebGL must be allowed explicitly.
            "--enable-unsafe-swiftshader", "--run-all-compositor-stages-before-draw",
            f"--window-size={window}", f"--virtual-time-budget={budget_ms * attempt}",
            f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", "--no-pings",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # nothing but the local server
            f"--screenshot={partial}", url,
        ]
        partial.unlink(missing_ok=True)
        try:
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180, check=False)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(profile, ignore_errors=True)
        if not partial.exists():
            continue
        drawn = _drawn_fraction(partial)
        if drawn is None or drawn > 0.005:
            break
    if not partial.exists():
        raise SystemExit(f"chromium wrote no screenshot of {url}")
    if drawn is not None and drawn <= 0.005:
        print(f"warning: {url} still looks empty after {attempts} attempts (kept anyway)", file=sys.stderr)
    _shrink(partial)
    os.replace(partial, target)
    return drawn, attempt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", nargs="?", help="a TensorBoard logdir with QParamMonitor runs "
                                                  "(default: train README journey 3 first)")
    parser.add_argument("--out-run-dir", help="where to train journey 3 when no logdir is given (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the journey-3 run (README: 3)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder of tensorboard_<tab>.png")
    parser.add_argument("--tabs", default=",".join(TABS), help=f"comma-separated, of {','.join(TABS)}")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual time budget per page")
    parser.add_argument("--chromium", help="path of the chromium binary (default: chromium on PATH)")
    args = parser.parse_args(argv)

    tabs = [tab.strip() for tab in args.tabs.split(",") if tab.strip()]
    unknown = sorted(set(tabs) - set(TABS))
    if unknown:
        parser.error(f"unknown tabs {unknown}; valid: {', '.join(TABS)}")
    chromium = find_chromium(args.chromium)  # before training: a missing browser fails at once
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="tb-screenshots-") as scratch:
        workdir = Path(scratch)
        if args.logdir:
            logdir = Path(args.logdir)
            if not logdir.is_dir():
                raise SystemExit(f"logdir {logdir} is not a directory")
        else:
            logdir = Path(args.out_run_dir) if args.out_run_dir else workdir / "runs"
            train_journey3(logdir, max_epochs=args.epochs)
        server = TensorBoard(logdir.resolve(), workdir)
        try:
            print(f"TensorBoard {server.version} at {server.url} on {logdir}")
            for tab in tabs:
                route, window = TABS[tab]
                target = out / f"tensorboard_{tab}.png"
                drawn, attempts = screenshot(chromium, server.url + route, window, target, args.budget_ms, workdir)
                print(f"{target}  ({target.stat().st_size // 1024} KB, {server.url + route}, attempts {attempts}"
                      + (f", drawn {drawn:.1%})" if drawn is not None else ")"))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
