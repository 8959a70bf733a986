"""Data selection by atom coverage: per-document supports (supports), strategies (coverage),
the `itda select` pipeline and report (run)."""
