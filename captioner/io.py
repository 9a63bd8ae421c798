"""The one atomic write: a file is either its old self or wholly the new one, never torn.

Checkpoints, the feature cache, joined batch outputs and evaluation reports all go through
``atomic_write``, so a kill, a full disk or a power cut mid-write leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from captioner.errors import CaptionerError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing; on success it becomes ``path``.

    The temporary file (``.NAME.<random>.tmp`` in the same folder, so the rename stays on one file
    system) is flushed and fsynced, renamed onto ``path`` with ``os.replace``, and the folder is
    fsynced so that the rename itself survives a power cut. On any exception the temporary file
    is removed, ``path`` is left as it was, and the exception goes on.

    Args:
        path: the file to write.
        mode: ``"wb"`` (bytes) or ``"w"`` (text).
        encoding: for text mode; UTF-8 unless given.

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # os.open with 0o666 lets the umask decide the permissions, as open() would for path itself.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:  # name the file the caller asked for, not our temporary one
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    try:
        with open(fd, mode, encoding=encoding or ("utf-8" if mode == "w" else None)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` that refuses NaN and infinity, which are not JSON (Python writes ``NaN``,
    which other readers reject), with a one-line error rather than a broken file."""
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:
        raise CaptionerError(
            "a result is not a number (NaN or infinity), which JSON cannot hold: is the model file damaged?"
        ) from None


# What atomic_write names its temporary files; a kill -9 mid-write can leave one behind.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def remove_temporaries(folder: str | Path, older_than: float = 0.0, of: str | None = None) -> list[Path]:
    """Removes the temporary files that killed ``atomic_write`` calls left in ``folder``.

    Args:
        folder: where to look (not recursively).
        older_than: seconds since a file was last written; a younger one may be another live
            process's write in progress (a feature cache shared by several runs).
        of: only the temporary files of the file of this name (in a folder that is the user's).

    Returns:
        The files removed.
    """
    removed = []
    now = time.time()
    for path in Path(folder).glob(f".{glob.escape(of)}.*.tmp" if of else ".*.tmp"):
        try:
            if _TEMPORARY.fullmatch(path.name) and now - path.stat().st_mtime >= older_than:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer finished or another process removed it
            pass
    return removed


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename has happened anyway
        pass
    finally:
        os.close(fd)
