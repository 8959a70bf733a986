"""The `itda` command line (typer)."""
