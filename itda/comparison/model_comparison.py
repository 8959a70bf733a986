"""What a comparison of two models returns (`itda.comparison.compare_models`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from itda.comparison.per_token import CentredDictionaries
from itda.comparison.plan import ComparePlan
from itda.dictionary import Dictionary


@dataclass
class ModelComparison:
    """Similarity matrices [L_A, L_B] of two models, and what produced them."""

    name_a: str
    name_b: str
    layers_a: int
    layers_b: int
    matrices: dict[str, np.ndarray]  # measure -> [L_A, L_B]
    paired_tokens: int
    identity: str  # 'token' or 'char'
    seconds: float
    model_level: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # which estimators ran, and why
    dictionaries_a: list[Dictionary] = field(default_factory=list)  # the Jaccard dictionaries
    dictionaries_b: list[Dictionary] = field(default_factory=list)
    per_token_basis_a: CentredDictionaries | None = None  # what the per-token ITDA measures encoded over
    per_token_basis_b: CentredDictionaries | None = None
    plan: ComparePlan | None = None  # the estimators chosen up front (itda.comparison.plan)

    def summary(self, measure: str) -> dict:
        """{'correspondence': a B layer per A layer (monotone), 'argmax_accuracy' when square} of one measure."""
        from itda.comparison.report import matrix_summary

        return matrix_summary(self.matrices[measure])

    def save(self, out_dir) -> dict:
        """Write each matrix as JSON, CSV and PNG heatmap, and summary.json, under out_dir; returns the summary."""
        from pathlib import Path

        from itda.comparison.report import save_comparison

        return save_comparison(Path(out_dir), self.matrices, self.name_a, self.name_b, self.model_level)

    def plot(self, measure: str | None = None):
        """A matplotlib Figure of one measure's matrix (default: the first) with its correspondence."""
        from itda.comparison.report import heatmap_figure

        name = measure or next(iter(self.matrices))
        return heatmap_figure(self.matrices[name], name, self.name_a, self.name_b, self.summary(name)["correspondence"])
