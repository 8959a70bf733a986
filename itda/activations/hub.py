"""Models by Hugging Face hub ID: the local hub cache first, a download when the network is allowed.

The cache is the one huggingface_hub and transformers use (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), read when a model is resolved, not at import. Offline when the caller says so or
the user has set HF_HUB_OFFLINE; the user's token is whatever huggingface_hub finds (HF_TOKEN, `hf auth login`).
Only what loading needs is fetched: configs, tokenizer files and safetensors weights (never pickled .bin files).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from itda.errors import ItdaInputError

# what a transformers model folder needs: config/tokenizer/index JSON, weights, tokenizer models and vocabularies
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(spec: str) -> bool:
    """Whether `spec` has the shape of a hub repository ID ('org/name')."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec


def hub_cache() -> Path:
    """The hub cache folder huggingface_hub uses, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def env_offline() -> bool:
    """Whether the user has asked huggingface_hub to stay offline (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_snapshot(repo_id: str, revision: str | None = None, offline: bool = False) -> Path:
    """The local snapshot folder of model `repo_id` at `revision` (default: main), downloaded when it is not
    cached and the network is allowed; refused in one line naming the ID and the cache otherwise."""
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    offline = offline or env_offline()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises its own (LocalEntryNotFoundError) and OS errors
        missing = exc
    if offline:
        rev = f" at revision {revision}" if revision else ""
        raise ItdaInputError(
            f"model '{repo_id}'{rev} is not in the Hugging Face cache {cache} (offline: {first_line(missing)})"
        )
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_FILES)
    except Exception as exc:  # not found, gated, no network: one line naming what was asked for
        raise ItdaInputError(
            f"model '{repo_id}'{f' at revision {revision}' if revision else ''}: not in the Hugging Face cache "
            f"{cache} and not downloadable ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    return Path(folder)


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
