"""`python -m m3w.demo.screenshot REPORT.html OUT.png`: the report as a browser shows it, via headless Chromium.

To look at the page as a reader would (`make demo-screenshot`). Chromium runs with a fresh profile, without
networking features, and only reads the file it is given; trailing blank rows are cropped from the capture.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 16000, timeout: float = 120) -> Path:
    """Capture `page` at `width` CSS pixels into `png`, cropped below the last non-white row."""
    from PIL import Image, ImageChops

    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(
            f"no Chromium found (looked for {', '.join(BROWSERS)}): apt-get install chromium"
        )
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="m3w-chromium-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png}", Path(page).resolve().as_uri()]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    with Image.open(png) as shot:
        rgb = shot.convert("RGB")
    box = ImageChops.invert(rgb).getbbox()  # the bounding box of everything that is not white
    if box:
        rgb.crop((0, 0, width, min(height, box[3] + 24))).save(png)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    if not args.page.is_file():
        sys.exit(f"no such page: {args.page}")
    try:
        print(screenshot(args.page, args.png, args.width))
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
