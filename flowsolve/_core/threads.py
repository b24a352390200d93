"""torch's intra-op thread count for one piece of long work, restored afterwards.

The library never changes torch's global state behind the user's back: long work
(training, solver studies, data-set likelihoods) takes ``threads=`` and sets it only for
its own duration. On a busy 2-core machine one thread is often much faster than two (small
tensor operations spin-wait for the other thread): a training run was measured ~10x faster.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["intra_op_threads", "check_threads"]


def check_threads(threads: object) -> int | None:
    """``threads``: None (leave torch's setting) or an int >= 1; ValueError otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be None (keep torch's setting, now "
                         f"{torch.get_num_threads()}) or an int >= 1; got {threads!r}")
    return int(threads)


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[int]:
    """Within the block, ``torch.set_num_threads(threads)`` (None: unchanged); the previous
    count is restored on exit, also on an exception. Yields the count in effect, for the
    results that report a time."""
    threads = check_threads(threads)
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
