"""The layer-matching suite's building blocks, shared by quality/layer_matching_suite.py,
quality/jaccard_scale.py and the research probes: the benchmarks' models and noise copies, their
samples, every measure's [L_A, L_B] grid, argmax hits and McNemar counts, kept grids, the plot."""

from __future__ import annotations

import numpy as np
import torch

from harness.results import OUT
from itda.activations.corpus import load_contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import LoadedModel
from itda.activations.stream import iterate_batches
from itda.comparison.itda_measures import ITDA_MEASURES, PER_TOKEN, layer_sample, pair_similarities
from itda.comparison.measures import relative_pair, relative_prepare, similarity_grid, svcca_pair, svcca_prepare
from itda.comparison.minibatch import MinibatchCKAGrid
from itda.comparison.per_token import FUSED_PARTS_MINIBATCH, fused_grid, scaled_recon, spearman_grid
from itda.comparison.streaming import StreamingCKAGrid

BASELINES = ("cka", "cka_debiased", "procrustes", "svcca", "relative")
BASELINES_GOAL = ("cka", "cka_debiased", "procrustes", "svcca")  # the bar for the default ITDA measure
NOISE_SMOLLM2 = (0.05, 0.1, 0.2, 0.3, 0.4)
NOISE_GEMMA3 = (0.1, 0.2, 0.3)
CHECKPOINTS = (100, 300)  # steps at which seed 0 is also saved
SEED_LAYERS = 8
SEEDS = 4  # seeds 0..3: the GPT-2s of the default suite run (layer_matching_suite.py --seeds)
STRIDE = {"smollm2": 2, "gemma3": 2}  # every second layer: adjacent layers of a residual stream must be told apart


def noisy_copy(lm: LoadedModel, level: float, seed: int = 0, norms: bool = False) -> LoadedModel:
    """The model with N(0, (level * std(W))^2) added to every weight matrix of every block
    (norms=True: to every block tensor, the earlier runs' protocol that research/layer_matching_probe.py keeps).

    Norm gains (1-D tensors) are left alone: Gemma's (1 + w) gains have std up to 6.6 around
    means near 0, so noise on them flips signs and leaves no working model (gemma3-270m's
    next-token loss 2.85 -> 21 nats at level 0.1, worse than uniform; `copy_loss`).
    """
    import copy

    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (".layers." in name or ".h." in name) and (p.dim() >= 2 or norms):
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                p.add_(torch.randn(p.shape, generator=gen) * (level * std))
    return LoadedModel(f"{lm.name}+noise{level}", model, lm.tokenizer, lm.source)


def copy_loss(lm: LoadedModel, ctx, contexts: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of the model on the first `contexts` contexts."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(min(contexts, len(ctx))):
            ids, mask = ctx.input_ids[i : i + 1], ctx.attention_mask[i : i + 1]
            loss = lm.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            n = int(mask.sum()) - 1
            total, count = total + float(loss) * n, count + n
    return total / count


def samples(lm: LoadedModel, layers: list[int], ctx, rows: int) -> list[torch.Tensor]:
    hps = [Hookpoint("resid_post", L) for L in layers]
    parts = {hp: [] for hp in hps}
    got = 0
    for batch in iterate_batches(lm.model, hps, ctx, batch_contexts=16, dtype=torch.float32):
        for hp in hps:
            parts[hp].append(batch[hp].dense())
        got += batch[hps[0]].unit.shape[0]
        if got >= rows:
            break
    return [torch.cat(parts[hp])[:rows] for hp in hps]


def baseline_grids(xs, ys) -> dict[str, np.ndarray]:
    """CKA, debiased CKA and Procrustes (exact sums), SVCCA and relative representations."""
    grid = StreamingCKAGrid("float64")
    grid.update(torch.stack(xs), torch.stack(ys))
    mats = grid.matrices(procrustes=True)
    out = {m: mats[m] for m in ("cka", "cka_debiased", "procrustes")}
    for m in ("svcca", "relative"):
        out[m] = similarity_grid(xs, ys, m, max_rows=xs[0].shape[0])
    return out


class Prepared:
    """One model's layers, prepared once for every pair they take part in."""

    def __init__(self, xs: list[torch.Tensor], itda_k: int, itda_cos: float):
        self.xs = xs
        n = xs[0].shape[0]
        self.svcca = [svcca_prepare(x.double()) for x in xs]
        anchor_idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:300]
        self.relative = [relative_prepare(x.double(), anchor_idx) for x in xs]
        self.itda = [layer_sample(x, itda_k, itda_cos, 0.5) for x in xs]
        self.recon = torch.stack([s.recon for s in self.itda])
        self.loss = torch.stack([s.loss for s in self.itda])
        self.norm = torch.stack([s.norm for s in self.itda])
        self.scaled = scaled_recon(self.recon, torch.stack([s.centred_norm for s in self.itda]))
        atoms = torch.zeros(len(xs), self.itda[0].n_fit, dtype=torch.float64)
        for i, s in enumerate(self.itda):
            atoms[i, s.anchors] = 1.0
        self.atoms = atoms


def minibatch_cka(xs: torch.Tensor, ys: torch.Tensor, m: int = 1024) -> np.ndarray:
    """[L_A, L_B] minibatch CKA (unbiased HSIC over minibatches of m rows), as `itda compare` past --cka-memory."""
    grid = MinibatchCKAGrid(m)
    grid.update(list(xs), list(ys))
    return grid.matrix()


def cka_grid(xs: torch.Tensor, ys: torch.Tensor, procrustes: bool = False) -> dict[str, np.ndarray]:
    grid = StreamingCKAGrid("float64")
    grid.update(xs, ys)
    return grid.matrices(procrustes=procrustes)


def grids(a: Prepared, b: Prepared, full_layers: list[int] | None, itda_k: int) -> dict[str, np.ndarray]:
    """Every measure's [L_A, L_B] matrix (--full measures on the layers full_layers only)."""
    mats = cka_grid(torch.stack(a.xs), torch.stack(b.xs), procrustes=True)
    out = {m: mats[m] for m in ("cka", "cka_debiased", "procrustes")}
    out["svcca"] = np.array([[svcca_pair(p, q) for q in b.svcca] for p in a.svcca])
    out["relative"] = np.array([[relative_pair(p, q) for q in b.relative] for p in a.relative])
    out["itda_recon_cka"] = cka_grid(a.recon, b.recon)["cka"]
    out["itda_loss_profile"] = spearman_grid(a.loss, b.loss)
    scaled = cka_grid(a.scaled, b.scaled, procrustes=True)
    out["itda_scaled_cka"], out["itda_scaled_procrustes"] = scaled["cka"], scaled["procrustes"]
    out["norm_profile"] = spearman_grid(a.norm, b.norm)
    out["itda_fused"] = fused_grid(out)
    # what `itda compare` computes past --cka-memory: minibatch CKA (itda_fused from scaled CKA + norm profile)
    out["cka_minibatch"] = minibatch_cka(torch.stack(a.xs), torch.stack(b.xs))
    out["itda_fused_minibatch"] = fused_grid(
        {"itda_scaled_cka": minibatch_cka(a.scaled, b.scaled), "norm_profile": out["norm_profile"]},
        FUSED_PARTS_MINIBATCH,
    )
    inter = a.atoms @ b.atoms.T
    out["jaccard"] = (inter / (a.atoms.sum(1)[:, None] + b.atoms.sum(1)[None, :] - inter)).numpy()
    if full_layers:
        extra = [m for m in ITDA_MEASURES if m not in out and m not in PER_TOKEN]
        for m in extra:
            out[m] = np.full((len(full_layers), len(full_layers)), np.nan)
        for i, li in enumerate(full_layers):
            for j, lj in enumerate(full_layers):
                for m, v in pair_similarities(a.itda[li], b.itda[lj], itda_k, extra).items():
                    out[m][i, j] = v
    return out


def margin(s: np.ndarray) -> float:
    s = np.asarray(s)
    n = min(s.shape)
    return float(np.mean([s[i, i] - np.delete(s[i], i).max() for i in range(n)]))


def hits(s: np.ndarray) -> np.ndarray:
    """Per argmax decision (rows of S, then rows of S^T): is the corresponding layer the best?"""
    n = min(s.shape)
    return np.concatenate([np.nanargmax(s[:n], 1) == np.arange(n), np.nanargmax(s.T[:n], 1) == np.arange(n)])


def mcnemar_counts(h_ours: np.ndarray, h_base: np.ndarray) -> dict:
    """Decisions only ours / only the baseline gets right, with the exact two-sided McNemar p-value."""
    from scipy.stats import binomtest

    only_o, only_b = int((h_ours & ~h_base).sum()), int((h_base & ~h_ours).sum())
    return {
        "only_ours": only_o,
        "only_baseline": only_b,
        "p_value": float(binomtest(only_o, only_o + only_b).pvalue) if only_o + only_b else 1.0,
    }


GRIDS = OUT / "suite_grids"


def keep_grids(name: str, mats: dict[str, np.ndarray]) -> None:
    """One model pair's [L_A, L_B] matrices, every measure, for later analysis (research/fusion_probe.py)."""
    from safetensors.numpy import save_file

    GRIDS.mkdir(parents=True, exist_ok=True)
    save_file(
        {m: np.ascontiguousarray(g, dtype=np.float64) for m, g in mats.items()}, str(GRIDS / f"{name}.safetensors")
    )


def held_contexts(lm: LoadedModel, rows: int):
    return load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout", tokens=rows + 512)[
        1
    ]


def plot_table(table: dict[str, dict[str, float]], measures: list[str], path) -> None:
    """Heatmap of accuracy without self-pairs, benchmarks x measures, values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = np.array([[table[b].get(m, np.nan) for m in measures] for b in table])
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(measures), 0.9 + 0.38 * len(table)))
    ax.imshow(vals, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(vals):
        ax.text(
            j,
            i,
            "" if np.isnan(v) else f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if v < 0.6 else "black",
        )
    ax.set_xticks(range(len(measures)), measures, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), list(table), fontsize=8)
    ax.set_title("layer matching: argmax accuracy without self-pairs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
