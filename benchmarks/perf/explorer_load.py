"""How fast the atom explorer's page loads and filters in headless Chromium, by dictionary size.

Pages are written with itda.explorer.page from synthetic views whose cards have the shape of real
ones (a 320-character source context, 5 held-out contexts of 25 tokens with coefficients, 5
co-occurring atoms, a 12-bin coefficient histogram, 8 promoted and 8 suppressed tokens): the
page's cost depends on that shape, not on where the numbers came from.
Optionally (--page DIR) an existing explorer output is timed too.

    python benchmarks/perf/explorer_load.py [--atoms 1000 10000 50000] [--page out/explorer_smollm2]

Load = from navigation start until the first page of cards is on screen (body[data-ready]);
search = typing a word until the filtered cards are shown. Needs playwright and Chromium.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import write_result

from itda.explorer.page import explorer_data, write_explorer

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which not but have model layer "
    "token value function return list string number error file path class method object type name default"
).split()


def synthetic_view(n_atoms: int, seed: int = 0) -> dict:
    rng = random.Random(seed)

    def text(n_words):
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    atoms = []
    for a in range(n_atoms):
        src = text(60)
        s = rng.randrange(0, len(src) - 10)
        s = src.rfind(" ", 0, s) + 1
        e = src.find(" ", s)
        ctxs = []
        for _ in range(5):
            words = [rng.choice(WORDS) for _ in range(25)]
            spans, pos = [], 0
            for w in words:
                spans.append([pos, pos + len(w), round(rng.random() if rng.random() < 0.3 else 0.0, 4)])
                pos += len(w) + 1
            at = rng.randrange(25)
            spans[at][2] = 1.0
            ctxs.append({"text": " ".join(words), "spans": [v for t in spans for v in t], "at": at})
        uses = int(rng.paretovariate(1.2))
        atoms.append(
            {
                "id": a,
                "doc": rng.randrange(10_000),
                "pos": rng.randrange(500),
                "token_id": rng.randrange(50_000),
                "uses": uses,
                "freq": uses / 1e5,
                "mean_coef": round(rng.random() * 5, 4),
                "token": src[s:e],
                "source": {"text": src, "hl": [s, e], "cut": [True, True]},
                "contexts": ctxs,
                "cooc": [[rng.randrange(n_atoms), round(rng.random(), 4)] for _ in range(5)],
                "hist": {"lo": 0.0, "hi": 1.0, "counts": [rng.randrange(100) for _ in range(12)]},
                "logits": {
                    key: [[rng.choice(WORDS), round(sign * rng.random() * 3, 3)] for _ in range(8)]
                    for key, sign in (("up", 1), ("down", -1))
                },
            }
        )
    hist = {"edges": [0.0, 1.0, 2.0], "counts": [1, 1]}
    summary = {
        "tokens": 100_000,
        "atoms": n_atoms,
        "dead": 0,
        "mean_l0": 30.0,
        "mean_cosine": 0.9,
        "usage_hist": {**hist, "zeros": 0},
        "l0_hist": hist,
        "cos_hist": hist,
    }
    return {
        "label": f"synthetic-{n_atoms}",
        "model": "synthetic",
        "hookpoint": "resid_post.0",
        "k": 40,
        "d": 576,
        "summary": summary,
        "atoms": atoms,
    }


def time_page(browser, folder: Path, repeats: int = 3) -> dict:
    loads, searches = [], []
    for _ in range(repeats):
        tab = browser.new_page(viewport={"width": 1300, "height": 1000})
        errors = []
        tab.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        tab.goto((folder.resolve() / "index.html").as_uri(), wait_until="commit")
        tab.wait_for_selector("body[data-ready='1']", timeout=60_000)
        loads.append(tab.evaluate("performance.now()") / 1000)
        t0 = time.perf_counter()
        tab.fill("#search", "model layer")
        tab.wait_for_function("document.body.dataset.query.startsWith('model layer|')", timeout=60_000)
        searches.append(time.perf_counter() - t0 - 0.12)  # minus the page's 120 ms typing debounce
        assert not errors, errors
        tab.close()
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name in ("data.js", "index.html"))
    folder_bytes = lambda name: sum(p.stat().st_size for p in (folder / name).glob("*.js"))  # noqa: E731
    return {
        "load_s_best": min(loads),
        "load_s_median": sorted(loads)[len(loads) // 2],
        "search_s_best": min(searches),
        "page_bytes": size,
        "cards_bytes": folder_bytes("cards"),
        "text_bytes": folder_bytes("text"),  # what the first text search loads (since 2026-12-03)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atoms", type=int, nargs="+", default=[1000, 10_000, 50_000])
    ap.add_argument(
        "--page", type=Path, action="append", default=[], help="an existing explorer output to time as well"
    )
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        version = browser.version
        for n in args.atoms:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "page"
                t0 = time.perf_counter()
                write_explorer(folder, explorer_data([synthetic_view(n)]))
                res = {
                    "atoms": n,
                    "source": "synthetic",
                    "write_s": time.perf_counter() - t0,
                    **time_page(browser, folder),
                }
            rows.append(res)
            print(
                f"{n:>6} atoms: {res['page_bytes'] / 2**20:.1f} MiB, load {res['load_s_best']:.2f} s "
                f"(median {res['load_s_median']:.2f}), search {res['search_s_best']:.3f} s; cards "
                f"{res['cards_bytes'] / 2**20:.0f} MiB, text {res['text_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
        for folder in args.page:
            import json

            n = len(json.loads((folder / "data.json").read_text())["views"][0]["atoms"])
            res = {"atoms": n, "source": str(folder), **time_page(browser, folder)}
            rows.append(res)
            print(f"{folder}: {n} atoms, load {res['load_s_best']:.2f} s, search {res['search_s_best']:.3f} s")
        browser.close()
    path = write_result("explorer_load", {"chromium": version, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
