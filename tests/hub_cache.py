"""A Hugging Face hub cache laid out as huggingface_hub lays out a download (blobs, symlinked snapshots, refs)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

REV = "0123456789abcdef0123456789abcdef01234567"


def place_in_hub_cache(folder: Path, hub: Path, repo_id: str, rev: str = REV, ref: str = "main") -> Path:
    """Copy a model folder into hub/models--org--name as huggingface_hub stores a download; returns the snapshot."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(rev)
    return snapshot
