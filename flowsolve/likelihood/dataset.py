"""Evaluate a per-sample function over a whole data set: batched, resumable, with a progress
line, and sharded across torch.distributed ranks (each rank a contiguous slice, results
gathered in data-set order on every rank).

The function receives a batch and the data-set index of the batch's first sample (seed
randomness from it: a resumed run then repeats the same draws; with randomness, results are
reproducible for a fixed batch size and number of ranks) and returns a dict of per-sample
``(b,)`` tensors.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .._core.files import load_checked_file, save_checked

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


class _Progress:
    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.enabled, self.label = total, enabled, label
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        end = "\n" if done >= self.total else ""
        sys.stderr.write(f"\r{self.label}: {done}/{self.total} samples, "
                         f"{rate:.1f}/s, eta {eta:.0f}s   {end}")
        sys.stderr.flush()


def evaluate_dataset(
    fn: BatchFn,
    data: Tensor | Sequence,
    *,
    batch_size: int = 256,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    label: str = "evaluating",
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
            with the same arguments (and number of ranks: ValueError otherwise) resumes from
            it. The file is removed when done.
        progress: print a progress line to stderr (rank 0 only).

    Returns:
        ``{name: (N,) tensor}`` in data-set order. When torch.distributed is initialised
        each rank evaluates its slice and every rank returns the gathered whole.
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = len(data)
    start, end = shard_bounds(n, rank, world)
    ckpt = _rank_checkpoint(checkpoint, distributed, rank)
    state = {"next": start, "results": {}, "n": n, "batch_size": batch_size,
             "start": start, "end": end, "world_size": world}
    if ckpt is not None and ckpt.exists():
        state = _resume(ckpt, state, rank)
    bar = _Progress(end - start, progress and rank == 0, label)
    while state["next"] < end:
        _run_batch(fn, data, state, batch_size, end)
        if ckpt is not None:
            save_checked(state, ckpt)
        bar.update(state["next"] - start)
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


def _resume(ckpt: Path, fresh: dict, rank: int) -> dict:
    """The state saved in ``ckpt``, once it is known to continue the run that ``fresh`` (this
    call's starting state) begins: the same data size and batch size (older files without
    the slice hold one slice, ``[0, n)``) and, for a rank, the same slice of as many ranks."""
    saved = load_checked_file(ckpt, "flowsolve data-set evaluation checkpoint")
    n, batch_size = fresh["n"], fresh["batch_size"]
    if saved["n"] != n or saved["batch_size"] != batch_size:
        raise ValueError(
            f"checkpoint {ckpt} was written for {saved['n']} samples in batches of "
            f"{saved['batch_size']}; this call has {n} and {batch_size}. Remove it or "
            "pass the same data and batch_size to resume"
        )
    slice_keys = ("start", "end", "world_size")
    mine = tuple(fresh[k] for k in slice_keys)
    theirs = tuple(saved.get(k) for k in slice_keys)
    start, end, world = mine
    legacy = theirs == (None, None, None) and world == 1  # older file: one slice, [0, n)
    if theirs != mine and not legacy:
        raise ValueError(
            f"checkpoint {ckpt} holds rank {rank}'s slice [{theirs[0]}, {theirs[1]}) of "
            f"{theirs[2]} ranks (None: not recorded); this call's slice is [{start}, "
            f"{end}) of {world} ranks, and resuming would duplicate or drop samples. "
            "Resume with the same number of ranks, or remove the rank checkpoints"
        )
    return saved


def _run_batch(fn: BatchFn, data: Tensor | Sequence, state: dict, batch_size: int,
               end: int) -> None:
    """Evaluate the batch starting at ``state["next"]`` (at most ``batch_size`` samples, none
    past ``end``), append its per-sample outputs to ``state["results"]`` on the CPU and
    advance ``state["next"]``."""
    lo = state["next"]
    hi = min(lo + batch_size, end)
    out = fn(_batch(data, lo, hi), lo)
    for key, value in out.items():
        if value.shape[:1] != (hi - lo,):
            raise ValueError(f"fn returned {key!r} of shape {tuple(value.shape)}; "
                             f"expected ({hi - lo},) for a batch of {hi - lo}")
        state["results"].setdefault(key, []).append(value.detach().cpu())
    state["next"] = hi
