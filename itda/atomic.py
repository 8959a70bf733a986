"""Atomic file writes: write to a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Delete `.NAME.PID.*.tmp` files and folders beside target left by processes that no longer run."""
    import shutil

    for p in target.parent.glob(f".{target.name}.*.tmp"):
        parts = p.name[len(target.name) + 2 :].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _naming(target: Path, tmp: Path | None = None) -> Iterator[None]:
    """Re-raise an OSError about the hidden temporary (or the folder) as one about `target`."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and exc.filename is not None and (tmp is None or Path(exc.filename) == tmp):
            raise type(exc)(exc.errno, exc.strerror, str(target)) from None
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over the target.

    On any exception the temporary file is removed and the target is left untouched. The
    file gets the permissions the umask gives new files; temporary files of killed writers
    (named with their PID) are removed first.
    """
    target = Path(target)
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming(target, tmp_path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, replace_if: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside target; on success it takes target's place.

    An existing target is replaced only when it holds the file `replace_if` (an earlier output
    of the same kind); any other existing target is refused. On error nothing changes.
    """
    import shutil

    from itda.configfields import FieldError

    target = Path(target)
    if target.exists() and not (replace_if and (target / replace_if).is_file()):
        raise FieldError(
            "out", f"{target}: exists and is not an earlier output of this command; choose another {{field}}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
