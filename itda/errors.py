"""User-facing errors: bad input that the CLI reports in one line with exit code 2."""


class ItdaInputError(ValueError):
    """Input the user can fix: missing file, wrong shape, non-finite values, bad option."""
