"""Probe: which ITDA-based parts, alone or combined, match layers best on every row (issue 9).

Reads the matrices `quality/layer_matching_suite.py --keep-grids` kept (out/suite_grids/<row> <a> <b>
.safetensors: every measure's [L_A, L_B] matrix for one model pair) and scores candidate
combinations without recomputing anything: each combination is a sum of matrices, each
standardised over its entries (mean 0, std 1); as '<name> +csls' that sum hubness-corrected by
CSLS with k = 2 (`itda.comparison.hubness`), which is the library's itda_fused for the three parts
scaled_cka + scaled_proc + norm. Also, without CSLS, each part standardised per row for the row
decisions and per column for the column decisions ('[per line]') and each part weighted by how
decisively it picks a partner ('[peak-weighted]', label-free); and the goal baselines
hubness-corrected too ('<baseline> +csls'), to show what CSLS alone does for them, and the
library's combination with CSLS's k = 1, 3, 4 instead of 2. Parts:
  itda_recon_cka                          CKA of the unit leave-one-out reconstructions
  itda_scaled_cka, itda_scaled_procrustes CKA / Procrustes of the same scaled by ||x_t - mu||
  itda_loss_profile, norm_profile         Spearman across tokens of MP losses / activation norms
  jaccard                                 Jaccard of the two layers' atom sets (by token)
Accuracy without self-pairs per row over draws 0-2 (and the seeds / checkpoints), over draws 1-2
alone, over the fresh draws 3 (`quality/layer_matching_suite.py --first-draw 3`, taken after the z-sum
was chosen, before CSLS was), and over the held-out draws >= 4 and seeds >= 4, taken after
CSLS was chosen (`--first-draw 4`, `--seeds 7 --first-seed 4`): its held-out test. Prints
RESULTS.md's tables (markdown; the held-out one with and without self-pairs from the suite's
result files HELD_OUT_RUNS) and writes out/fusion_probe.json and out/fusion_probe_<subset>.png.
Usage: python benchmarks/research/fusion_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result
from harness.suite import BASELINES_GOAL, GRIDS, hits, mcnemar_counts, plot_table

from itda.comparison.hubness import csls
from itda.comparison.per_token import FUSED_PARTS, fused_grid

COMBOS = {
    "loss+recon_cka+norm (first itda_fused)": ("itda_recon_cka", "itda_loss_profile", "norm_profile"),
    "scaled_cka+scaled_proc+norm": ("itda_scaled_cka", "itda_scaled_procrustes", "norm_profile"),
    "recon_cka+norm": ("itda_recon_cka", "norm_profile"),
    "loss+norm": ("itda_loss_profile", "norm_profile"),
    "scaled_proc+norm": ("itda_scaled_procrustes", "norm_profile"),
    "scaled_cka+norm": ("itda_scaled_cka", "norm_profile"),
    "scaled_cka+scaled_proc": ("itda_scaled_cka", "itda_scaled_procrustes"),
    "recon_cka+scaled_proc+norm": ("itda_recon_cka", "itda_scaled_procrustes", "norm_profile"),
    "recon_cka+scaled_cka+scaled_proc+norm": (
        "itda_recon_cka",
        "itda_scaled_cka",
        "itda_scaled_procrustes",
        "norm_profile",
    ),
    "loss+recon_cka+jaccard": ("itda_recon_cka", "itda_loss_profile", "jaccard"),
    "loss+recon_cka+jaccard+norm": ("itda_recon_cka", "itda_loss_profile", "jaccard", "norm_profile"),
    "all_itda+norm": (
        "itda_recon_cka",
        "itda_scaled_cka",
        "itda_scaled_procrustes",
        "itda_loss_profile",
        "norm_profile",
    ),
}
SINGLES = (
    "jaccard",
    "itda_recon_cka",
    "itda_scaled_cka",
    "itda_scaled_procrustes",
    "itda_loss_profile",
    "norm_profile",
    "itda_fused_minibatch",
    "cka_minibatch",
)  # the last two: suite runs from 2026-11-30 on


def z(s: np.ndarray) -> np.ndarray:
    return (s - s.mean()) / max(float(s.std()), 1e-12)


FRESH, NEW = 3, 4  # noise draw 3: taken after the z-sum was chosen; noise draws >= 4 and seeds >= 4: after CSLS was


def taken(a: str, b: str) -> int:
    """The pair's data batch: its noise draw; for the seeds and checkpoints 0, or NEW when a seed
    >= NEW takes part."""
    if b.startswith("noisy"):
        return int(b[len("noisy") :])
    seed_ids = [int(n[len("seed") :].split("@")[0]) for n in (a, b)]
    return NEW if max(seed_ids) >= NEW else 0


def load_pairs() -> dict[str, list[tuple[int, dict[str, np.ndarray]]]]:
    """{row: [(batch, {measure: matrix}) per model pair]} from the kept matrices."""
    rows: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for f in sorted(GRIDS.glob("*.safetensors")):
        row, a, b = f.stem.rsplit(" ", 2)
        rows.setdefault(row, []).append((taken(a, b), load_file(str(f))))
    return rows


def z_lines(s: np.ndarray, axis: int) -> np.ndarray:
    """Each row (axis=1) or column (axis=0) standardised on its own."""
    return (s - s.mean(axis, keepdims=True)) / np.maximum(s.std(axis, keepdims=True), 1e-12)


def peak(s: np.ndarray) -> float:
    """How decisively a matrix picks one partner per layer, from the matrix alone: the mean over its
    rows and columns of (max - mean) / std."""
    return float(np.mean([((m.max(1) - m.mean(1)) / np.maximum(m.std(1), 1e-12)).mean() for m in (s, s.T)]))


def decisions(pair: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per measure or combination, its argmax hits (rows of S, then of S^T): each combination's
    z-sum plain, '+csls', '[per line]' and '[peak-weighted]' (docstring above); each goal baseline
    plain and '+csls'."""
    out = {m: hits(pair[m]) for m in (*BASELINES_GOAL, *SINGLES) if m in pair}
    out.update({f"{m} +csls": hits(csls(pair[m])) for m in BASELINES_GOAL if m in pair})
    for name, parts in COMBOS.items():
        if all(p in pair for p in parts):
            out[name] = hits(fused_grid(pair, parts, hubness_k=0))
            out[name + " +csls"] = hits(fused_grid(pair, parts))
            by_row, by_col = (sum(z_lines(pair[p], axis) for p in parts) for axis in (1, 0))
            n = min(by_row.shape)
            out[name + " [per line]"] = np.concatenate(
                [by_row[:n].argmax(1) == np.arange(n), by_col.T[:n].argmax(1) == np.arange(n)]
            )
            out[name + " [peak-weighted]"] = hits(sum(peak(pair[p]) * z(pair[p]) for p in parts))
    for k in (1, 3, 4):  # the library's CSLS neighbourhood (k = 2) against its neighbours
        out[f"scaled_cka+scaled_proc+norm +csls k={k}"] = hits(fused_grid(pair, FUSED_PARTS, hubness_k=k))
    return out


LIBRARY = "scaled_cka+scaled_proc+norm +csls"  # the library's itda_fused
SUBSETS = {
    "all": lambda d: d < FRESH,
    "held_out": lambda d: 0 < d < FRESH,
    "fresh": lambda d: d == FRESH,
    "new": lambda d: d >= NEW,
}


def analyse() -> tuple[dict, dict]:
    rows = load_pairs()
    table: dict[str, dict[str, dict[str, float]]] = {}
    significance: dict[str, dict] = {}
    for row, pairs in rows.items():
        for subset, keep in SUBSETS.items():
            got: dict[str, list[np.ndarray]] = {}
            for draw, pair in pairs:
                if keep(draw):
                    for m, h in decisions(pair).items():
                        got.setdefault(m, []).append(h)
            if got:
                got = {m: np.concatenate(h) for m, h in got.items()}
                table.setdefault(subset, {})[row] = {m: float(h.mean()) for m, h in got.items()}
                if subset != "held_out":
                    for against, names in (("plain", BASELINES_GOAL), ("csls", [f"{m} +csls" for m in BASELINES_GOAL])):
                        best = max(names, key=lambda m: got[m].mean())
                        significance.setdefault(subset, {}).setdefault(against, {})[row] = {
                            "baseline": best,
                            **mcnemar_counts(got[LIBRARY], got[best]),
                        }
    for subset, t in table.items():
        print(f"\n{subset}: accuracy without self-pairs; 'short' = rows below the best goal baseline")
        best = {r: max(v[m] for m in BASELINES_GOAL) for r, v in t.items()}
        for m in [m for m in next(iter(t.values())) if all(m in v for v in t.values())]:
            short = [r for r in t if t[r][m] < best[r] - 1e-9]
            print(
                f"{m:44s} mean {np.mean([t[r][m] for r in t]):.3f}  short {len(short)}: "
                + ", ".join(f"{r} {t[r][m]:.2f}<{best[r]:.2f}" for r in short)
            )
        print(f"{'best goal baseline per row':44s} mean {np.mean(list(best.values())):.3f}")
    for subset, by in significance.items():
        for against, rows_sig in by.items():
            print(
                f"\n{LIBRARY} vs the row's best goal baseline ({subset}, baselines {against}): "
                "only ours - only baseline, McNemar p"
            )
            for row, m in rows_sig.items():
                print(
                    f"  {row:16s} {m['only_ours']:3d} - {m['only_baseline']:3d} vs {m['baseline']:18s} "
                    f"p = {m['p_value']:.2g}"
                )
    return table, significance


# columns of the heatmaps and of RESULTS.md's tables
PLOTTED = {
    LIBRARY: "itda_fused",
    "scaled_cka+scaled_proc+norm": "z-sum (no csls)",
    "loss+recon_cka+norm (first itda_fused)": "first itda_fused",
    "itda_scaled_cka": "itda_scaled_cka",
    "itda_scaled_procrustes": "itda_scaled_procrustes",
    "itda_recon_cka": "itda_recon_cka",
    "norm_profile": "norm_profile",
    "jaccard": "jaccard",
    "cka": "cka",
    "cka_debiased": "cka_debiased",
    "procrustes": "procrustes",
    "svcca": "svcca",
    "cka +csls": "cka +csls",
    "procrustes +csls": "procrustes +csls",
}
ROWS = (
    "smollm2 0.05",
    "smollm2 0.1",
    "smollm2 0.2",
    "smollm2 0.3",
    "smollm2 0.4",
    "gemma3 0.1",
    "gemma3 0.2",
    "gemma3 0.3",
    "seeds",
    "checkpoints",
)


def markdown(t: dict[str, dict[str, float]]) -> str:
    """RESULTS.md's table: the PLOTTED columns per row (bold = best of them), and their means."""
    rows = [r for r in ROWS if r in t]
    lines = [
        "| benchmark | " + " | ".join(f"**{v}**" if m == LIBRARY else v for m, v in PLOTTED.items()) + " |",
        "|---" * (len(PLOTTED) + 1) + "|",
    ]
    for r in rows:
        best = max(t[r][m] for m in PLOTTED)
        lines.append(
            f"| {r} | "
            + " | ".join(f"**{t[r][m]:.2f}**" if t[r][m] >= best - 1e-9 else f"{t[r][m]:.2f}" for m in PLOTTED)
            + " |"
        )
    lines.append("| mean | " + " | ".join(f"{np.mean([t[r][m] for r in rows]):.2f}" for m in PLOTTED) + " |")
    return "\n".join(lines)


def why_seeds(rows: dict) -> str | None:
    """RESULTS.md's account of the seeds row (seeds 0-3): how flat each part's matrices are, which
    layers the first pair's uncorrected sum and itda_fused pick, and the decisions CSLS changes."""
    pairs = [p for d, p in rows.get("seeds", []) if d == 0]
    if not pairs:
        return None
    lines = [
        f"  {m:24s} entries {min(p[m].min() for p in pairs):.2f}-{max(p[m].max() for p in pairs):.2f}, "
        f"std per pair {np.mean([p[m].std() for p in pairs]):.3f}"
        for m in (*FUSED_PARTS, "procrustes")
    ]
    plain, fused = fused_grid(pairs[0], FUSED_PARTS, hubness_k=0), fused_grid(pairs[0], FUSED_PARTS)
    lines.append(f"  first pair, rows -> {plain.argmax(1).tolist()} uncorrected, {fused.argmax(1).tolist()} itda_fused")
    lines.append(
        f"  first pair, columns -> {plain.argmax(0).tolist()} uncorrected, {fused.argmax(0).tolist()} itda_fused"
    )
    h_plain = np.concatenate([hits(fused_grid(p, FUSED_PARTS, hubness_k=0)) for p in pairs])
    h_fused = np.concatenate([hits(fused_grid(p, FUSED_PARTS)) for p in pairs])
    c = mcnemar_counts(h_fused, h_plain)
    lines.append(
        f"  CSLS turns {c['only_ours']} wrong decisions right and {c['only_baseline']} right ones wrong "
        f"(of {len(h_fused)})"
    )
    return "\n".join(lines)


HELD_OUT_RUNS = (
    "layer_matching_suite_heldout_self",
    "layer_matching_suite_seeds_heldout",
)  # suite runs with self-pairs


def self_table() -> str | None:
    """RESULTS.md's held-out table with and without self-pairs, from the suite's own result files."""
    import json

    files = [OUT / f"{name}.json" for name in HELD_OUT_RUNS]
    if not all(f.exists() for f in files):
        return None
    res = {r: v for f in files for r, v in json.loads(f.read_text())["results"].items()}
    rows, names = [r for r in ROWS if r in res], ("itda_fused", *BASELINES_GOAL)
    lines = [
        "| benchmark | " + " | ".join(f"{m} with / without self" for m in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    lines += [
        f"| {r} | "
        + " | ".join(f"{res[r][m]['with_self']:.2f} / {res[r][m]['without_self']:.2f}" for m in names)
        + " |"
        for r in rows
    ]
    lines.append(
        "| mean | "
        + " | ".join(
            f"{np.mean([res[r][m]['with_self'] for r in rows]):.2f} / "
            f"{np.mean([res[r][m]['without_self'] for r in rows]):.2f}"
            for m in names
        )
        + " |"
    )
    return "\n".join(lines)


def main() -> None:
    table, significance = analyse()
    why = why_seeds(load_pairs())
    if why:
        print(f"\nseeds 0-3, the row CSLS was chosen for:\n{why}")
    held = self_table()
    if held:
        print(f"\nheld out, with and without self-pairs (suite results):\n{held}")
    for subset, t in table.items():
        print(f"\n{subset}:\n{markdown(t)}")
    for subset, t in table.items():  # heatmap: benchmarks x the library's measures
        named = {r: {short: t[r][m] for m, short in PLOTTED.items()} for r in ROWS if r in t}
        plot_table(named, list(PLOTTED.values()), OUT / f"fusion_probe_{subset}.png")
    write_result(
        "fusion_probe",
        {"combos": {k: list(v) for k, v in COMBOS.items()}, "accuracy": table, "mcnemar_itda_fused": significance},
    )


if __name__ == "__main__":
    main()
