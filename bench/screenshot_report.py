"""Open reports/index.html in headless Chromium and take a screenshot (the acceptance check).

    python bench/screenshot_report.py [--html reports/index.html] [--out reports/screenshot.png]
                                      [--size 1400,2400] [--synthetic N] [--pages]

Without an existing --html (or with --synthetic N) it first builds a report from synthetic
Fashion-MNIST-shaped inputs (bench/report_speed.py). Chromium (Debian: `apt-get install -y
chromium`) runs headless, sandbox off (root), with networking features off and a fresh
profile, so the page must render from disk alone. Look at the PNG it writes.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=10000"]  # let the page finish decoding its images before the shot


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    sys.exit("chromium not found; install it with `apt-get install -y chromium` (Debian)")


def screenshot(html: Path, out: Path, size: str = "1400,2400", timeout: int = 120) -> Path:
    """Render `html` (a local file) with headless Chromium into the PNG `out` (window `size` W,H px)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium_profile_") as prof:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={prof}", f"--screenshot={out}", f"--window-size={size}",
               html.resolve().as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not out.exists():
        sys.exit(f"chromium failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return out


def pages(html: Path, out: Path, w: int, h: int) -> list[Path]:
    """Shoot the whole page in one tall window, trim the blank end, cut into h-px pages."""
    import numpy as np
    from PIL import Image

    tall = out.with_name(out.stem + "_full.png")
    screenshot(html, tall, f"{w},20000")
    im = Image.open(tall).convert("RGB")
    ink = np.flatnonzero((np.asarray(im.convert("L")) < 245).any(axis=1))
    end = int(ink.max()) + 20 if ink.size else h
    paths = []
    for i, top in enumerate(range(0, end, h), start=1):
        p = out.with_name(f"{out.stem}_p{i}.png")
        im.crop((0, top, w, min(top + h, end))).save(p)
        paths.append(p)
    tall.unlink()
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--html", type=Path, default=Path("reports/index.html"))
    ap.add_argument("--out", type=Path, default=None, help="PNG to write [default: next to the HTML]")
    ap.add_argument("--size", default="1400,2400", help="window W,H in px")
    ap.add_argument("--synthetic", type=int, default=None, metavar="N",
                    help="build a report from N synthetic samples first (into a temp folder)")
    ap.add_argument("--pages", action="store_true",
                    help="also shoot the whole page (20000 px tall) and cut it into window-sized pages OUT_p<i>.png")
    a = ap.parse_args()

    html = a.html
    if a.synthetic or not html.exists():
        from bench.report_speed import make_inputs
        from pipeline.stages.report import report as build_report

        root = Path(tempfile.mkdtemp(prefix="report_shot_"))
        n = a.synthetic or 60_000
        print(f"{a.html} not used; building a report from {n} synthetic samples in {root}")
        r = build_report(root / "reports", **make_inputs(root, n))
        html = Path(r["path"])
    out = a.out or html.with_name("screenshot.png")
    screenshot(html, out, a.size)
    if a.pages:
        w, h = (int(v) for v in a.size.split(","))
        for p in pages(html, out, w, h):
            print(f"page: {p}")
    print(f"screenshot: {out} ({out.stat().st_size / 1e3:.0f} kB) of {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
