"""The process group of a multi-process run, found or made from the torchrun environment.

``torchrun --nproc_per_node=N script.py`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, but joins nothing: until a process group is
initialised, each process is a world of one. A script that calls :func:`flowsolve.train` or
:func:`flowsolve.dataset_log_likelihood` without ``torch.distributed.init_process_group``
would then run N independent copies (N times the same data set evaluated, N trainings
writing ``world_size: 1`` to the same checkpoint), silently. :func:`ensure_process_group`
is the one place where flowsolve reads the rank and the number of processes, and it never
lets that happen.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

__all__ = ["ensure_process_group"]

#: what ``init_method="env://"`` reads, all set by torchrun
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _backend(device: torch.device) -> str:
    """``gloo`` for a CPU run; for an accelerator its default backend (NCCL for CUDA) for its
    tensors, with gloo beside it for CPU tensors and the object collectives."""
    if device.type == "cpu":
        return "gloo"
    backend = dist.Backend.default_device_backend_map.get(device.type)
    if backend is None:
        raise ValueError(
            f"flowsolve has no process-group backend for device {device.type!r}; call "
            "torch.distributed.init_process_group(backend=..., init_method='env://') with a "
            "backend for that device before flowsolve"
        )
    return f"cpu:gloo,{device.type}:{backend}"


def _destroy_if_still(group: object) -> None:
    """At interpreter exit: destroy the group flowsolve made, unless the script already did
    (or replaced it with its own)."""
    if dist.is_initialized() and dist.group.WORLD is group:
        dist.destroy_process_group()


def ensure_process_group(device: torch.device | str = "cpu") -> tuple[int, int]:
    """``(rank, world_size)`` of this process; a process group is initialised first when
    the torchrun environment asks for one and none is running.

    - A process group is initialised (by the script, or by an earlier flowsolve call): its
      rank and size.
    - Otherwise, ``WORLD_SIZE`` unset or 1 (a plain ``python script.py``, ``torchrun
      --nproc_per_node=1``): ``(0, 1)``, and nothing is initialised.
    - Otherwise (``WORLD_SIZE > 1``: torchrun, or another launcher that sets the same
      variables): ``torch.distributed.init_process_group(backend, init_method="env://")``
      with ``backend = "gloo"`` for a CPU ``device``, and ``"cpu:gloo,cuda:nccl"`` for a
      CUDA one (NCCL for the CUDA tensors, gloo for CPU tensors and the object collectives,
      so these need no current CUDA device). Each process must hold its own GPU: under
      torchrun, put the model on ``cuda:LOCAL_RANK``.

    **Initialise, not refuse.** Each process of a torchrun launch has everything
    ``env://`` needs, and every other answer is worse: carrying on alone is the silent bug
    this function exists for, and refusing asks every script to repeat a call whose
    arguments flowsolve knows. Calling ``init_process_group`` yourself first still works
    (any backend, any init method): flowsolve then uses that group as it is. What cannot be
    initialised is refused with a ValueError naming the exact call: ``WORLD_SIZE > 1`` with
    ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT`` missing, a torch build without
    torch.distributed, or a device with no default backend.

    **Who destroys it.** A group flowsolve initialised stays up for the rest of the process:
    the next :func:`~flowsolve.train` or data-set evaluation uses it, and so can the
    script's own collectives (``torch.distributed.barrier()``, ``all_reduce``). It is
    destroyed at interpreter exit (``atexit``) unless the script has already called
    ``torch.distributed.destroy_process_group()``, which it may do at any time.

    Args:
        device: where the run's tensors live (the model's device): it picks the backend.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` for a single process.

    Raises:
        ValueError: ``WORLD_SIZE > 1`` but no process group can be initialised (see above).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return 0, 1
    call = ("torch.distributed.init_process_group(backend, init_method=..., rank=..., "
            f"world_size={world})")
    if not dist.is_available():
        raise ValueError(
            f"WORLD_SIZE={world}: this is one of {world} processes, but this torch build has "
            "no torch.distributed, so they cannot share the work; run one process (unset "
            "WORLD_SIZE) or install a torch build with distributed support"
        )
    missing = [name for name in _ENV if os.environ.get(name, "").strip() == ""]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world}: this is one of {world} processes, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set, so flowsolve cannot join them "
            "(each would run alone). Launch with `torchrun --nproc_per_node="
            f"{world} script.py`, which sets them, or call {call} before flowsolve, or unset "
            "WORLD_SIZE to run one process"
        )
    device = torch.device(device)
    dist.init_process_group(_backend(device), init_method="env://")
    atexit.register(_destroy_if_still, dist.group.WORLD)
    return dist.get_rank(), dist.get_world_size()
