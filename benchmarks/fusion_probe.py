"""Probe: which ITDA-based parts, alone or combined, match layers best on every row (issue 9).

Reads the matrices `layer_matching_suite.py --keep-grids` kept (out/suite_grids/<row> <a> <b>
.safetensors: every measure's [L_A, L_B] matrix for one model pair) and scores candidate
combinations without recomputing anything: each combination is a sum of matrices, each
standardised over its entries (mean 0, std 1), as itda_fused is, and again with each part
standardised per row for the row decisions and per column for the column decisions. Parts:
  itda_recon_cka                          CKA of the unit leave-one-out reconstructions
  itda_scaled_cka, itda_scaled_procrustes CKA / Procrustes of the same scaled by ||x_t - mu||
  itda_loss_profile, norm_profile         Spearman across tokens of MP losses / activation norms
  jaccard                                 Jaccard of the two layers' atom sets (by token)
Accuracy without self-pairs per row, over all draws, and over the draws > 0 alone (a combination
chosen by looking at draw 0 is tested on draws 1 and 2). Writes out/fusion_probe.json.
Usage: python fusion_probe.py
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file

from common import OUT, write_result
from layer_matching_suite import BASELINES_GOAL, GRIDS, hits

COMBOS = {
    "loss+recon_cka+norm (first itda_fused)": ("itda_recon_cka", "itda_loss_profile", "norm_profile"),
    "scaled_cka+scaled_proc+norm (itda_fused)": ("itda_scaled_cka", "itda_scaled_procrustes", "norm_profile"),
    "recon_cka+norm": ("itda_recon_cka", "norm_profile"),
    "loss+norm": ("itda_loss_profile", "norm_profile"),
    "scaled_proc+norm": ("itda_scaled_procrustes", "norm_profile"),
    "scaled_cka+norm": ("itda_scaled_cka", "norm_profile"),
    "scaled_cka+scaled_proc": ("itda_scaled_cka", "itda_scaled_procrustes"),
    "recon_cka+scaled_proc+norm": ("itda_recon_cka", "itda_scaled_procrustes", "norm_profile"),
    "recon_cka+scaled_cka+scaled_proc+norm": ("itda_recon_cka", "itda_scaled_cka", "itda_scaled_procrustes", "norm_profile"),
    "loss+recon_cka+jaccard": ("itda_recon_cka", "itda_loss_profile", "jaccard"),
    "loss+recon_cka+jaccard+norm": ("itda_recon_cka", "itda_loss_profile", "jaccard", "norm_profile"),
    "all_itda+norm": ("itda_recon_cka", "itda_scaled_cka", "itda_scaled_procrustes", "itda_loss_profile", "norm_profile"),
}
SINGLES = ("jaccard", "itda_recon_cka", "itda_scaled_cka", "itda_scaled_procrustes", "itda_loss_profile",
           "norm_profile")


def z(s: np.ndarray) -> np.ndarray:
    return (s - s.mean()) / max(float(s.std()), 1e-12)


def load_pairs() -> dict[str, list[tuple[int, dict[str, np.ndarray]]]]:
    """{row: [(draw, {measure: matrix}) per model pair]} from the kept matrices."""
    rows: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for f in sorted(GRIDS.glob("*.safetensors")):
        row, _, b = f.stem.rsplit(" ", 2)
        draw = int(b[len("noisy"):]) if b.startswith("noisy") else 0
        rows.setdefault(row, []).append((draw, load_file(str(f))))
    return rows


def z_lines(s: np.ndarray, axis: int) -> np.ndarray:
    """Each row (axis=1) or column (axis=0) standardised on its own."""
    return (s - s.mean(axis, keepdims=True)) / np.maximum(s.std(axis, keepdims=True), 1e-12)


def decisions(pair: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per measure or combination, its argmax hits (rows of S, then of S^T). A combination sums its
    parts standardised over all entries (as itda_fused) and, as '<name> [per line]', standardised
    per row for the row decisions and per column for the column decisions."""
    out = {m: hits(pair[m]) for m in (*BASELINES_GOAL, *SINGLES) if m in pair}
    for name, parts in COMBOS.items():
        if all(p in pair for p in parts):
            out[name] = hits(sum(z(pair[p]) for p in parts))
            by_row, by_col = (sum(z_lines(pair[p], axis) for p in parts) for axis in (1, 0))
            n = min(by_row.shape)
            out[name + " [per line]"] = np.concatenate([by_row[:n].argmax(1) == np.arange(n),
                                                        by_col.T[:n].argmax(1) == np.arange(n)])
    return out


LIBRARY = "scaled_cka+scaled_proc+norm (itda_fused)"  # the library's itda_fused


def mcnemar(ours: np.ndarray, base: np.ndarray) -> dict:
    """Decisions only ours / only the baseline gets right, exact two-sided binomial p-value."""
    from scipy.stats import binomtest

    only_o, only_b = int((ours & ~base).sum()), int((base & ~ours).sum())
    return {"only_ours": only_o, "only_baseline": only_b,
            "p_value": float(binomtest(only_o, only_o + only_b).pvalue) if only_o + only_b else 1.0}


def analyse() -> tuple[dict, dict]:
    rows = load_pairs()
    table: dict[str, dict[str, dict[str, float]]] = {}
    significance: dict[str, dict] = {}
    for row, pairs in rows.items():
        for subset, keep in (("all", lambda d: True), ("held_out", lambda d: d > 0)):
            got: dict[str, list[np.ndarray]] = {}
            for draw, pair in pairs:
                if keep(draw):
                    for m, h in decisions(pair).items():
                        got.setdefault(m, []).append(h)
            if got:
                got = {m: np.concatenate(h) for m, h in got.items()}
                table.setdefault(subset, {})[row] = {m: float(h.mean()) for m, h in got.items()}
                if subset == "all":
                    best = max(BASELINES_GOAL, key=lambda m: got[m].mean())
                    significance[row] = {"baseline": best, **mcnemar(got[LIBRARY], got[best])}
    for subset, t in table.items():
        print(f"\n{subset}: accuracy without self-pairs; 'short' = rows below the best goal baseline")
        best = {r: max(v[m] for m in BASELINES_GOAL) for r, v in t.items()}
        for m in next(iter(t.values())):
            short = [r for r in t if t[r][m] < best[r] - 1e-9]
            print(f"{m:44s} mean {np.mean([t[r][m] for r in t]):.3f}  short {len(short)}: "
                  + ", ".join(f"{r} {t[r][m]:.2f}<{best[r]:.2f}" for r in short))
        print(f"{'best goal baseline per row':44s} mean {np.mean(list(best.values())):.3f}")
    print(f"\n{LIBRARY} vs the row's best goal baseline (all draws): only ours - only baseline, McNemar p")
    for row, m in significance.items():
        print(f"  {row:16s} {m['only_ours']:3d} - {m['only_baseline']:3d} vs {m['baseline']:13s} p = {m['p_value']:.2g}")
    return table, significance


def main() -> None:
    table, significance = analyse()
    write_result("fusion_probe", {"combos": {k: list(v) for k, v in COMBOS.items()}, "accuracy": table,
                                  "mcnemar_itda_fused": significance})


if __name__ == "__main__":
    main()
