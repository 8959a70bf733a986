"""Activation sources: files now; models and corpora next."""
