"""Evaluation: reconstruction metrics (metrics, report), on a model (on_model), CE-loss score (ce_score)."""

from itda.evaluation.report import EvalReport, Evaluator, evaluate  # noqa: F401
