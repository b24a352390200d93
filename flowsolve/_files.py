"""Atomic file writes. The content goes to a fresh temporary file in the target's own folder
(``tempfile.mkstemp``: a unique name, so no other file is touched), is flushed to the disk,
then renamed into place: a crash leaves the old file or the new one, never half of one.
With ``overwrite=False`` a file that appeared at the target meanwhile is left as it is."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomically", "save_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                     overwrite: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, ``fsync`` it, and move it to
    ``path``. With ``overwrite=False`` an existing ``path`` is never replaced: the call raises
    ``FileExistsError`` naming the temporary file, which is kept and holds the result."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp, keep = Path(name), False
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
            return path
        try:  # a hard link creates `path` only if it does not exist: no check-then-write race
            os.link(tmp, path)
        except OSError as err:  # it exists, or the file system has no hard links
            if isinstance(err, FileExistsError) or path.exists():
                keep = True
                raise FileExistsError(f"{path} appeared while the result was being computed; "
                                      f"it was left as it is, and the result is in {tmp}") \
                    from None
            os.replace(tmp, path)
            return path
        tmp.unlink()
        return path
    finally:
        if not keep and tmp.exists():
            tmp.unlink()


def save_atomically(obj: object, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomically`."""
    import torch

    return write_atomically(path, lambda file: torch.save(obj, file), overwrite=overwrite)
