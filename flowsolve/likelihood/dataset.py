"""Evaluate a per-sample function over a whole data set: batched, resumable, with a progress
line, and sharded across torch.distributed ranks (each rank a contiguous slice, results
gathered in data-set order on every rank).

The function receives a batch and the data-set index of the batch's first sample (seed
randomness from it: a resumed run then repeats the same draws; with randomness, results are
reproducible for a fixed batch size and number of ranks) and returns a dict of per-sample
``(b,)`` tensors.

A checkpoint records what its numbers depend on, and a resume refuses any difference rather
than merge two evaluations into one result: the data (a SHA-256 chained over the batches
already evaluated, re-read and compared on resume), the number of samples, the batch size,
the slice of the rank, and the caller's ``fingerprint`` (the model's weights and every
setting, see :func:`flowsolve.likelihood.dataset_likelihood.dataset_log_likelihood`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .._core.distributed import ensure_process_group
from .._core.files import checksum, load_checked_file, save_checked
from .._core.progress import progress_bar

__all__ = ["evaluate_dataset", "shard_bounds"]

BatchFn = Callable[[Tensor, int], dict[str, Tensor]]  # (batch, offset) -> {name: (b,)}


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of rank's contiguous slice of ``n`` items (sizes differ by <= 1)."""
    if not (0 <= rank < world_size):
        raise ValueError(f"rank must lie in [0, world_size={world_size}); got {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _get_item(data: Tensor | Sequence, i: int) -> Tensor:
    item = data[i]
    return item[0] if isinstance(item, (tuple, list)) else item


def _batch(data: Tensor | Sequence, start: int, end: int) -> Tensor:
    if torch.is_tensor(data):
        return data[start:end]
    return torch.stack([_get_item(data, i) for i in range(start, end)])


def _merge(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-rank results in rank order; a rank with an empty slice (more ranks
    than samples) contributes ``{}`` and is skipped."""
    parts = [p for p in parts if p]
    return {k: torch.cat([p[k] for p in parts]) for k in (parts[0] if parts else {})}


def evaluate_dataset(
    fn: BatchFn,
    data: Tensor | Sequence,
    *,
    batch_size: int = 256,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    label: str = "evaluating",
    fingerprint: Mapping[str, object] | None = None,
) -> dict[str, Tensor]:
    """Apply ``fn(batch, offset)`` over ``data`` and concatenate its per-sample outputs.

    Args:
        fn: returns a dict of ``(b,)`` tensors for a batch of ``b`` samples whose first
            sample has data-set index ``offset``.
        data: a tensor ``(N, ...)`` or an indexable data set whose items are tensors or
            ``(tensor, label, ...)`` tuples (the first element is used).
        batch_size: samples per call of ``fn``.
        checkpoint: a file path; partial results are saved there atomically after every
            batch (one file per rank, suffixed ``.rankR`` when distributed) and a later call
            with the same arguments resumes from it. The file is removed when done. It
            records the number of samples, the batch size, the rank's slice, the
            ``fingerprint`` and a SHA-256 of the data evaluated so far (chained batch by
            batch; a resume re-reads those samples, without evaluating them, to compare);
            a resume that differs in any of them raises ValueError naming every difference
            (remove the file, or pass another path, to start afresh). A file written before
            these were recorded (only the number of samples and the batch size) still
            resumes, with a warning that the rest is unchecked.
        progress: print a progress line to stderr (rank 0 only).
        label: the progress line's name of the evaluation.
        fingerprint: what the results depend on besides the data, ``{name: value}`` with
            values str, int, float, bool, None or tuples of those (e.g. the model's weights'
            hash and the solver's settings); recorded in the checkpoint and compared on
            resume. None records ``{}``.

    Returns:
        ``{name: (N,) tensor}`` in data-set order. When torch.distributed is initialised
        each rank evaluates its slice and every rank returns the gathered whole. Under
        torchrun (``WORLD_SIZE > 1``) with no process group running, one is initialised
        first (see :func:`flowsolve._core.distributed.ensure_process_group`): N processes
        never evaluate the whole data set N times.
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if len(data) == 0:
        raise ValueError(f"data is empty (len 0): there is nothing to evaluate ({label}); pass "
                         "a tensor (N, ...) or a data set of at least one sample")
    fingerprint = _check_fingerprint(fingerprint)
    # torchrun without a process group: one is initialised here (never N whole evaluations)
    rank, world = ensure_process_group(data.device if torch.is_tensor(data) else "cpu")
    distributed = dist.is_available() and dist.is_initialized()
    n = len(data)
    start, end = shard_bounds(n, rank, world)
    ckpt = _rank_checkpoint(checkpoint, distributed, rank)
    state = {"next": start, "results": {}, "n": n, "batch_size": batch_size,
             "start": start, "end": end, "world_size": world, "fingerprint": fingerprint,
             "data_hash": ""}
    if ckpt is not None and ckpt.exists():
        state = _resume(ckpt, state, rank, data)
    with progress_bar(end - start, label, enabled=progress and rank == 0, unit="sample",
                      initial=state["next"] - start) as bar:
        while state["next"] < end:
            before = state["next"]
            _run_batch(fn, data, state, batch_size, end, hashed=ckpt is not None)
            if ckpt is not None:
                save_checked(state, ckpt)
            bar.update(state["next"] - before)
    local = {k: torch.cat(v) for k, v in state["results"].items()}
    if distributed:
        gathered: list[dict[str, Tensor] | None] = [None] * world
        dist.all_gather_object(gathered, local)
        local = _merge(gathered)
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return local


def _rank_checkpoint(checkpoint: str | os.PathLike | None, distributed: bool,
                     rank: int) -> Path | None:
    """This rank's checkpoint file: ``checkpoint``, suffixed ``.rankR`` when distributed."""
    if checkpoint is None:
        return None
    ckpt = Path(checkpoint)
    return ckpt.with_name(f"{ckpt.name}.rank{rank}") if distributed else ckpt


_SLICE_KEYS = ("start", "end", "world_size")


def _resume(ckpt: Path, fresh: dict, rank: int, data: Tensor | Sequence) -> dict:
    """The state saved in ``ckpt``, once it is known to continue the run that ``fresh`` (this
    call's starting state) begins: the same data size and batch size, for a rank the same
    slice of as many ranks (older files without the slice hold one slice, ``[0, n)``), the
    same fingerprint and the same data in the samples already evaluated. Every difference
    is named in one ValueError. A file written before the fingerprint and the data hash
    were recorded resumes with a warning, and from then on records this call's."""
    saved = load_checked_file(ckpt, "flowsolve data-set evaluation checkpoint")
    n, batch_size = fresh["n"], fresh["batch_size"]
    differ = []
    if saved["n"] != n or saved["batch_size"] != batch_size:
        differ.append(f"for {saved['n']} samples in batches of {saved['batch_size']} (this "
                      f"call: {n} samples in batches of {batch_size})")
    mine = tuple(fresh[k] for k in _SLICE_KEYS)
    theirs = tuple(saved.get(k) for k in _SLICE_KEYS)
    start, end, world = mine
    legacy_slice = theirs == (None, None, None) and world == 1  # older file: one slice, [0, n)
    if theirs != mine and not legacy_slice:
        differ.append(
            f"for rank {rank}'s slice [{theirs[0]}, {theirs[1]}) of {theirs[2]} ranks (None: not "
            f"recorded; this call's slice is [{start}, {end}) of {world} ranks, and resuming "
            "would duplicate or drop samples: resume with the same number of ranks)")
    legacy = "fingerprint" not in saved
    if not legacy:
        same_batches = not differ  # the saved batches are this call's: their data compares
        differ += _fingerprint_differences(saved["fingerprint"], fresh["fingerprint"])
        if same_batches and _data_hash(data, start, saved["next"], batch_size) != \
                saved["data_hash"]:
            differ.append(f"for other data: the {saved['next'] - start} samples already evaluated "
                          f"([{start}, {saved['next']})) differ from this call's (values, "
                          "order, dtype or shape)")
    if differ:
        raise ValueError(
            f"checkpoint {ckpt} was written {'; '.join(differ)}. A resumed evaluation "
            "appends to the saved results, so everything that changes the numbers must be the "
            "same: resume with the same data and settings (only progress and, for the "
            f"likelihoods, {', '.join(MAY_CHANGE)} may change), or remove {ckpt} (or pass "
            "another checkpoint path) to start afresh")
    if legacy:
        warnings.warn(
            f"checkpoint {ckpt} was written before flowsolve recorded the model, the settings "
            "and the data of an evaluation: only the number of samples and the batch size "
            f"were checked, and the {saved['next'] - start} samples already evaluated are "
            "assumed to come from this call's model, settings and data", UserWarning,
            stacklevel=4)
        saved = {**saved, "fingerprint": fresh["fingerprint"],
                 "data_hash": _data_hash(data, start, saved["next"], batch_size)}
    return saved


# Arguments of the likelihood functions that a resume may change: they do not change the
# numbers (memory, gradients, the progress line), so the fingerprint leaves them out.
MAY_CHANGE = ("chunk_size", "create_graph", "adjoint")


def _check_fingerprint(fingerprint: Mapping[str, object] | None) -> dict:
    """``fingerprint`` as a plain dict whose values a checked file stores and loads
    (``weights_only``); TypeError naming the first key whose value is anything else."""
    if fingerprint is None:
        return {}
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"fingerprint must be a mapping {{name: value}} or None; got "
                        f"{type(fingerprint).__name__}")

    def plain(value: object) -> bool:
        if isinstance(value, tuple):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    for key, value in fingerprint.items():
        if not (isinstance(key, str) and plain(value)):
            raise TypeError(f"fingerprint[{key!r}] must be a str, int, float, bool, None or a "
                            f"tuple of those under a str key; got {type(value).__name__}")
    return dict(fingerprint)


def _fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """``name=saved (this call: now)`` for every name whose value differs (or that only one
    of the two records)."""
    def shown(record: dict, key: str) -> str:
        return repr(record[key]) if key in record else "(not recorded)"

    return [f"with {key}={shown(saved, key)} (this call: {shown(now, key)})"
            for key in sorted({*saved, *now}, key=str)
            if key not in saved or key not in now or saved[key] != now[key]]


def _data_hash(data: Tensor | Sequence, start: int, stop: int, batch_size: int) -> str:
    """SHA-256 chained over the batches of ``data[start:stop]`` as they are evaluated
    (``batch_size`` at a time): each link hashes the previous link and the batch's
    :func:`~flowsolve._core.files.checksum` (dtype, shape and bytes)."""
    digest = ""
    for lo in range(start, stop, batch_size):
        digest = _chain(digest, _batch(data, lo, min(lo + batch_size, stop)))
    return digest


def _chain(digest: str, batch: Tensor) -> str:
    return hashlib.sha256((digest + checksum(batch)).encode()).hexdigest()


def _run_batch(fn: BatchFn, data: Tensor | Sequence, state: dict, batch_size: int,
               end: int, hashed: bool = False) -> None:
    """Evaluate the batch starting at ``state["next"]`` (at most ``batch_size`` samples, none
    past ``end``), append its per-sample outputs to ``state["results"]`` on the CPU and
    advance ``state["next"]``; with ``hashed``, chain the batch into ``state["data_hash"]``
    (for a checkpoint)."""
    lo = state["next"]
    hi = min(lo + batch_size, end)
    batch = _batch(data, lo, hi)
    out = fn(batch, lo)
    for key, value in out.items():
        if value.shape[:1] != (hi - lo,):
            raise ValueError(f"fn returned {key!r} of shape {tuple(value.shape)}; "
                             f"expected ({hi - lo},) for a batch of {hi - lo}")
        state["results"].setdefault(key, []).append(value.detach().cpu())
    if hashed:
        state["data_hash"] = _chain(state["data_hash"], batch)
    state["next"] = hi
