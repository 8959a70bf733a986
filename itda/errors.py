"""User-facing errors: bad input that the CLI reports in one line with exit code 2."""

import contextlib
import logging


@contextlib.contextmanager
def quiet_logger(name: str):
    """A library's logger held at ERROR inside the block (its warnings would add lines to a one-line error)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class ItdaInputError(ValueError):
    """Input the user can fix: missing file, wrong shape, non-finite values, bad option."""
