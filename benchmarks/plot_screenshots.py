"""Screenshots of the comparison and scaling plots as a browser renders them, by headless Chromium.

    python benchmarks/plot_screenshots.py OUT_DIR PLOT [PLOT ...]

Each plot (the compare rule's loss_curves.svg and metrics_vs_params.svg, the scaling stage's
loss_vs_compute.png) is opened in Chromium at its own size and saved as OUT_DIR/<parent>_<name>.png, so
that a person checks what a reader of the report or the MLflow artifact sees: axes, units, legends, lines.
Used for benchmarks/results/plots/ (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-background-networking",  # this machine's network is closed: no update or sync probes
    "--disable-component-update",
    "--disable-sync",
)


def size(plot: Path) -> tuple[int, int]:
    """The plot's size in CSS pixels: an SVG's width and height (matplotlib writes points), a PNG's header."""
    if plot.suffix == ".png":
        return struct.unpack(">II", plot.read_bytes()[16:24])
    head = plot.read_text()[:2000]
    width, height = (float(re.search(rf'{side}="([\d.]+)pt"', head).group(1)) for side in ("width", "height"))
    return round(width * 4 / 3), round(height * 4 / 3)


def shoot(plot: Path, out: Path) -> None:
    width, height = size(plot)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [
                shutil.which("chromium") or "chromium",
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                plot.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"{out}: {plot} at {width}x{height}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("plots", type=Path, nargs="+")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in args.plots:
        shoot(plot, args.out / f"{plot.parent.name}_{plot.stem}.png")


if __name__ == "__main__":
    main()
