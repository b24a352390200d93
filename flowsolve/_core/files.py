"""Atomic file writes. The content goes to a fresh temporary file in the target's own folder
(``tempfile.mkstemp``: a unique name, so no other file is touched), is flushed to the disk,
then renamed into place: a crash leaves the old file or the new one, never half of one.
With ``overwrite=False`` a file that appeared at the target meanwhile is left as it is.

The written file gets the permissions a plain ``open(path, "wb")`` would give it: those of
the file it replaces, else ``0o666`` less the process umask (``mkstemp`` alone makes it
``0o600``, private to the owner)."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomically", "save_atomically", "save_checked", "load_checked_file", "checksum",
           "UnreadableFileError"]


def _umask() -> int:
    """The process umask. Linux reports it in ``/proc/self/status`` (read without changing
    it); elsewhere it can only be read by setting it, ``os.umask(0)`` then back. The umask
    is process-global, so a file another thread creates in the instant between the two
    calls gets umask 0; the window is two system calls long."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` leaves ``path`` with: an existing file keeps
    its own, a new one gets ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:  # no such file (or unreadable): a new file
        return 0o666 & ~_umask()


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                     overwrite: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, ``fsync`` it, and move it to
    ``path``. With ``overwrite=False`` an existing ``path`` is never replaced: the call raises
    ``FileExistsError`` naming the temporary file, which is kept and holds the result.
    The file's permissions are those a plain ``open(path, "wb")`` would give it: an
    existing ``path``'s own, else ``0o666`` less the umask (not ``mkstemp``'s ``0o600``)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp, keep = Path(name), False
    try:
        with os.fdopen(fd, "wb") as file:
            if hasattr(os, "fchmod"):
                os.fchmod(file.fileno(), _plain_mode(path))
            else:  # pragma: no cover - platforms without fchmod
                os.chmod(tmp, _plain_mode(path))
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


# -- checked torch files: a checksum of the content, verified on load ----------------------
CHECKSUM_KEY = "checksum"


class UnreadableFileError(ValueError):
    """A saved file that cannot be used: truncated, empty, not a torch file, or changed since
    it was written (its checksum differs). The message names the file and what to do."""


def checksum(obj: object) -> str:
    """SHA-256 over a nested structure of dicts, lists, tuples, tensors and plain values, in
    a fixed order: each tensor's dtype, shape and bytes, each other value's ``repr``. One
    flipped bit anywhere in a tensor changes it."""
    import hashlib

    import torch

    digest = hashlib.sha256()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                walk(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                walk(item)
            digest.update(b"]")
        elif torch.is_tensor(value):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())

    walk(obj)
    return digest.hexdigest()


def save_checked(obj: dict, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """:func:`save_atomically` of the dict ``obj`` with its :func:`checksum` stored under
    ``"checksum"``, for :func:`load_checked_file` to verify."""
    if not isinstance(obj, dict) or CHECKSUM_KEY in obj:
        raise TypeError(f"save_checked takes a dict without a {CHECKSUM_KEY!r} key")
    return save_atomically({**obj, CHECKSUM_KEY: checksum(obj)}, path, overwrite=overwrite)


def load_checked_file(path: str | os.PathLike, what: str, *,
                      map_location: object = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of a file written by :func:`save_checked`,
    its checksum verified (files written before checksums existed load unverified).

    A missing file raises FileNotFoundError; a truncated, empty or garbled one, or one whose
    checksum differs, :class:`UnreadableFileError` naming the file, never torch's raw
    error (whose advice to load with ``weights_only=False`` would run arbitrary code)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    advice = "delete it or give another path to start afresh, or restore it from a copy"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, OSError, RuntimeError, UnicodeDecodeError, ValueError, KeyError,
            IndexError, pickle.UnpicklingError) as err:
        size = path.stat().st_size
        kind = "is empty (0 bytes)" if size == 0 else \
            f"is truncated or garbled ({size} bytes; torch.load: {type(err).__name__})"
        raise UnreadableFileError(f"{path} {kind}, not a {what} that can be loaded; "
                                  f"{advice}") from None
    if not isinstance(state, dict):
        raise UnreadableFileError(f"{path} holds a {type(state).__name__}, not a {what}; "
                                  f"{advice}")
    if CHECKSUM_KEY in state:
        stored = state.pop(CHECKSUM_KEY)
        if stored != checksum(state):
            raise UnreadableFileError(f"{path} was changed or damaged after it was written "
                                      f"(its checksum differs): not a {what} to trust; "
                                      f"{advice}")
    return state
