"""Dictionary building: the greedy builder (builder), its candidate helpers, builds from a model."""

from itda.builder import reference  # noqa: F401,E402  (registers the reference mode)
from itda.builder.builder import (  # noqa: F401
    MODES,
    Batch,
    BatchStats,
    BuildConfig,
    DictionaryBuilder,
    build_dictionary,
    builder_class,
)
