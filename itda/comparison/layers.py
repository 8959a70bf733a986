"""Layer matching from similarity matrices S [L_A, L_B]: argmax accuracy and monotone correspondence."""

from __future__ import annotations

import networkx as nx
import numpy as np


def argmax_accuracy(s: np.ndarray) -> float:
    """Fraction of layers i of A whose most similar layer of B is i (Kornblith's specificity test)."""
    s = np.asarray(s, dtype=np.float64)
    n = min(s.shape)
    return float(np.mean(np.nanargmax(s[:n], axis=1) == np.arange(n)))


def pooled_accuracy(pairs: dict[tuple[str, str], np.ndarray], *, self_pairs: bool) -> float:
    """Mean argmax accuracy over model pairs; self_pairs=False drops the (m, m) entries."""
    vals = [argmax_accuracy(s) for (a, b), s in pairs.items() if self_pairs or a != b]
    return float(np.mean(vals)) if vals else float("nan")


def monotone_correspondence(s: np.ndarray) -> list[int]:
    """For each layer i of A a layer j_i of B, with j non-decreasing, maximising sum_i S[i, j_i].

    Solved as the best-weight path through the grid of layer pairs (a DAG: (i, j) -> (i+1, j')
    for j' >= j), so layer order is kept and models of different depth match many-to-one.
    """
    s = np.asarray(s, dtype=np.float64)
    la, lb = s.shape
    g = nx.DiGraph()
    for j in range(lb):
        g.add_edge("source", (0, j), weight=float(s[0, j]))
        g.add_edge((la - 1, j), "sink", weight=0.0)
    for i in range(la - 1):
        for j in range(lb):
            for jj in range(j, lb):
                g.add_edge((i, j), (i + 1, jj), weight=float(s[i + 1, jj]))
    # shift weights so that every path (all have la nodes) compares fairly and none is negative
    shift = -min(0.0, float(np.nanmin(s)))
    for _u, _v, data in g.edges(data=True):
        data["weight"] += shift
    path = nx.dag_longest_path(g, weight="weight")
    return [j for node in path if isinstance(node, tuple) for (_i, j) in [node]]
