"""Write the explorer: a static page (no network) with its data as JSON beside it, atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from itda.atomic import atomic_dir
from itda.version import __version__

ASSET = Path(__file__).with_name("assets") / "index.html"
MARKER = "data.json"  # an earlier explorer output, which --out may replace
CHUNK = 1000  # cards per script the page loads when it first shows one of them
INDEX_FIELDS = ("id", "token", "uses", "mean_coef")  # what the page sorts, filters and labels by


def explorer_data(views: list[dict], shared: list[list[int]] | None = None) -> dict:
    if len(views) not in (1, 2):
        raise ValueError("the explorer shows one dictionary or compares two")
    return {"itda_version": __version__, "views": views, "shared": shared or []}


def write_explorer(out: str | Path, data: dict) -> Path:
    """out/index.html, out/data.json (everything, for other tools), out/data.js (the index the page
    loads first: per card only INDEX_FIELDS), out/cards/V-C.js (the full cards of view V, CHUNK
    at a time in the page's default order, most used first, so the first page needs one script;
    loaded when the page first shows one) and out/text/V-C.js (the same cards' search_text only,
    what the first text search loads). Scripts, because a page opened from disk may
    load scripts where browsers refuse to fetch a file. Replaces only an earlier explorer output;
    on error nothing changes."""
    dump = lambda obj: json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))  # noqa: E731
    index = {**data, "chunk": CHUNK, "views": [_index_view(v) for v in data["views"]]}
    with atomic_dir(out, replace_if=MARKER) as tmp:
        shutil.copyfile(ASSET, tmp / "index.html")
        (tmp / "data.js").write_text("window.ITDA_EXPLORER = " + dump(index) + ";\n", encoding="ascii")
        (tmp / "cards").mkdir()
        (tmp / "text").mkdir()
        for v, view in enumerate(data["views"]):
            atoms = view["atoms"]
            order = sorted(range(len(atoms)), key=lambda i: (-atoms[i]["uses"], i))  # the page's default order
            for c in range(0, len(atoms), CHUNK):
                chunk = [atoms[i] for i in order[c : c + CHUNK]]
                script = f"window.ITDA_CARDS({v}, {c // CHUNK}, {dump(chunk)});\n"
                (tmp / "cards" / f"{v}-{c // CHUNK}.js").write_text(script, encoding="ascii")
                script = f"window.ITDA_TEXT({v}, {c // CHUNK}, {dump([search_text(card) for card in chunk])});\n"
                (tmp / "text" / f"{v}-{c // CHUNK}.js").write_text(script, encoding="ascii")
        (tmp / MARKER).write_text(dump(data) + "\n", encoding="ascii")
    return Path(out) / "index.html"


def search_text(card: dict) -> str:
    """What a text search looks in, lowercased: the source context, then the held-out contexts, \\x01 between."""
    source = (card.get("source") or {}).get("text", "")
    return "\x01".join([source, *(c["text"] for c in card["contexts"])]).lower()


def _index_view(view: dict) -> dict:
    return {**view, "atoms": [{k: card[k] for k in INDEX_FIELDS} for card in view["atoms"]]}
