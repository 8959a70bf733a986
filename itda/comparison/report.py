"""Write comparison results: JSON and CSV per matrix, a PNG heatmap when matplotlib is installed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from itda.atomic import atomic_path, write_text_atomic
from itda.comparison.layers import argmax_accuracy, monotone_correspondence


def matrix_summary(m: np.ndarray) -> dict:
    out: dict[str, object] = {"correspondence": monotone_correspondence(np.nan_to_num(m, nan=-1.0))}
    if m.shape[0] == m.shape[1]:
        out["argmax_accuracy"] = argmax_accuracy(m)
    return out


def write_matrix(
    out_dir: Path, name: str, m: np.ndarray, label_a: str, label_b: str, summary: dict | None = None
) -> list[Path]:
    """out_dir/<name>.json (+ .csv, + .png if matplotlib is available); summary = matrix_summary(m)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = matrix_summary(m) if summary is None else summary
    payload = {
        "measure": name,
        "rows": label_a,
        "columns": label_b,
        "convention": "similarity",
        "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in m],
        **summary,
    }
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv"]
    write_text_atomic(paths[0], json.dumps(payload, indent=2))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([f"{label_a} \\ {label_b}"] + list(range(m.shape[1])))
    for i, row in enumerate(m):
        w.writerow([i] + [f"{v:.6f}" for v in row])
    write_text_atomic(paths[1], buf.getvalue())
    png = heatmap(out_dir / f"{name}.png", m, name, label_a, label_b, summary["correspondence"])
    return paths + ([png] if png else [])


def heatmap_figure(m: np.ndarray, title: str, label_a: str, label_b: str, corr: list[int]):
    """A matplotlib Figure of m with the correspondence corr (a B layer per A layer) drawn over it.

    Built without pyplot, so it neither changes a notebook's backend nor needs a display.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.28 * m.shape[1], 1.0 + 0.28 * m.shape[0]), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", origin="upper", aspect="auto")
    ax.plot(corr, range(len(corr)), color="white", lw=1, ls="--", marker="o", ms=2)
    ax.set_xlabel(f"{label_b} layer")
    ax.set_ylabel(f"{label_a} layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def heatmap(path: Path, m: np.ndarray, title: str, label_a: str, label_b: str, corr: list[int]) -> Path | None:
    """PNG heatmap (heatmap_figure) at path; None when matplotlib is missing."""
    if not has_matplotlib():
        return None
    fig = heatmap_figure(m, title, label_a, label_b, corr)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def save_comparison(
    out_dir: Path, mats: dict[str, np.ndarray], label_a: str, label_b: str, model_level: dict[str, float]
) -> dict:
    """Every matrix (write_matrix) and out_dir/summary.json; returns the summary written."""
    summary = {"model_level": model_level, "measures": {name: matrix_summary(m) for name, m in mats.items()}}
    for name, m in mats.items():
        write_matrix(out_dir, name, m, label_a, label_b, summary["measures"][name])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def has_matplotlib() -> bool:
    """Whether matplotlib imports; its first import (and font setup) runs with its warnings held
    back, such as the temporary cache folder it makes where HOME is not writable."""
    from itda.errors import quiet_logger

    try:
        with quiet_logger("matplotlib"):
            import matplotlib.font_manager  # noqa: F401
    except ImportError:
        return False
    return True
