"""Write the explorer: a static page (no network) with its data as JSON beside it, atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from itda.atomic import atomic_dir
from itda.version import __version__

ASSET = Path(__file__).with_name("assets") / "index.html"
MARKER = "data.json"  # an earlier explorer output, which --out may replace


def explorer_data(views: list[dict], shared: list[list[int]] | None = None) -> dict:
    if len(views) not in (1, 2):
        raise ValueError("the explorer shows one dictionary or compares two")
    return {"itda_version": __version__, "views": views, "shared": shared or []}


def write_explorer(out: str | Path, data: dict) -> Path:
    """out/index.html, out/data.json and out/data.js (the same JSON as a script, which a page
    opened from disk can load where browsers refuse to fetch a file). Replaces only an earlier
    explorer output; on error nothing changes."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    with atomic_dir(out, replace_if=MARKER) as tmp:
        shutil.copyfile(ASSET, tmp / "index.html")
        (tmp / "data.js").write_text("window.ITDA_EXPLORER = " + text + ";\n", encoding="ascii")
        (tmp / MARKER).write_text(text + "\n", encoding="ascii")
    return Path(out) / "index.html"
