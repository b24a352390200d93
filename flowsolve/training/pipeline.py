r"""The batch producer of training: data -> source -> coupling, with no model.

Batch ``k`` of rank ``r`` is a pure function of ``(seed, k, r)``: each batch draws from its
own ``torch.Generator`` seeded by a splitmix64 hash of those numbers, and a finite data set
is visited in epochs, epoch ``e`` being a permutation drawn from ``(seed, e)`` (the
remainder of an epoch that does not fill a global batch is dropped). So the exact CPU OT
solve can run in DataLoader workers, overlapping the training step, with results identical
to the main process; and a checkpoint needs only the seed and the step to resume the data
order exactly.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .couplings import Coupling
from .data import LabeledSamples, get_dataset

__all__ = ["Batch", "BatchProducer"]

_M64 = (1 << 64) - 1
# device types whose batches draw() checks for non-finite entries as it makes them (a host
# reduction, no synchronisation); batches drawn elsewhere (data on a GPU) are checked only on
# failure: when a coupling refuses them, or by the training loop when its loss is non-finite
_CHECKED_AT_DRAW = ("cpu",)
# stream tags of the seed hash: data, source, coupling, training step
DATA_STREAM, SOURCE_STREAM, COUPLING_STREAM, STEP_STREAM = 1, 2, 3, 4


# -- the batch producer: data -> source -> coupling, no model -----------------------------
def mix_seed(*values: int) -> int:
    """A seed from integers: splitmix64 (Steele, Lea & Flood 2014) chained over ``values``."""
    h = 0
    for v in values:
        h = (h + (v & _M64) + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


@dataclass
class Batch:
    """Coupled pairs ``(x0[i], x1[i])`` ``(B, *event_shape)`` and the labels ``y`` ``(B,)``
    of x1 (the model's condition). ``y0`` ``(B,)``: the labels of a labelled source's x0,
    in x0's order, in a batch as drawn (:meth:`BatchProducer.draw`); ``None`` once coupled
    (a coupling returns no order for them) or for an unlabelled source."""

    x0: Tensor
    x1: Tensor
    y: Tensor | None = None
    y0: Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> Batch:
        y, y0 = (None if t is None else t.to(device, non_blocking=True)
                 for t in (self.y, self.y0))
        return Batch(self.x0.to(device, dtype, non_blocking=True),
                     self.x1.to(device, dtype, non_blocking=True), y, y0)

    def pin_memory(self) -> Batch:
        y, y0 = (None if t is None else t.pin_memory() for t in (self.y, self.y0))
        return Batch(self.x0.pin_memory(), self.x1.pin_memory(), y, y0)


class _Sample:
    """``obj.sample(n, generator=g)`` as a picklable sampler."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        return self.obj.sample(n, generator=generator)


class _Stream:
    """Batches of one side (data or source): from a finite set in epochs, or a sampler."""

    def __init__(self, obj: Any, what: str, batch_size: int, seed: int, rank: int, world: int):
        self.b, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.x = self.y = self.fn = None
        if isinstance(obj, LabeledSamples):
            self.x, self.y = obj.x, obj.y
        elif isinstance(obj, tuple) and len(obj) == 2 and all(map(torch.is_tensor, obj)):
            self.x, self.y = obj
        elif torch.is_tensor(obj):
            self.x = obj
        elif isinstance(obj, str):
            self.fn = _Sample(get_dataset(obj))
        elif hasattr(obj, "sample"):
            self.fn = _Sample(obj)
        elif callable(obj):
            self.fn = obj
        else:
            raise TypeError(f"{what} must be a tensor (N, ...), LabeledSamples or (x, y), a data "
                            "set name, an object with .sample(n, generator=) or a callable "
                            f"f(n, generator=); got {type(obj).__name__}")
        if self.y is not None and self.y.shape[:1] != self.x.shape[:1]:
            raise ValueError(f"{what} (x, y) must hold one label per sample, len(x) == len(y); "
                             f"got x {tuple(self.x.shape)} and y {tuple(self.y.shape)}")
        if self.x is not None:
            n = self.x.shape[0]
            self.per_epoch = n // (batch_size * world)
            if self.per_epoch == 0:
                raise ValueError(f"{what} holds {n} samples, fewer than one global batch of "
                                 f"batch_size * world_size = {batch_size * world}")
            self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, k: int) -> tuple[Tensor, Tensor | None]:
        if self.x is None:
            out = self.fn(self.b, generator=seeded_generator(mix_seed(self.seed, k, self.rank)))
            if isinstance(out, LabeledSamples):
                return out.x, out.y
            return (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        epoch, slot = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = seeded_generator(mix_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.x.shape[0], generator=g)
        start = (slot * self.world + self.rank) * self.b
        idx = self._perm[start:start + self.b]
        return self.x[idx], None if self.y is None else self.y[idx]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _accepts_generator(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)


def _takes_y0(coupling: Callable) -> bool:
    """Whether ``coupling`` names a ``y0`` parameter (the source labels): in ``plan`` for a
    :class:`~flowsolve.training.couplings.Coupling` (whose call forwards its keywords there), in the
    call itself otherwise. ``**kwargs`` alone does not count: label-free couplings (the
    independent, paired and OT couplings) forward those to a ``plan`` without ``y0``."""
    fn = coupling.plan if isinstance(coupling, Coupling) else coupling
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "y0" in params and params["y0"].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY)


class BatchProducer(Dataset):
    """Batch ``k`` = coupling(source draw, data draw): a pure function of ``(seed, k, rank)``.

    Args:
        data: the ``x1`` side: a tensor ``(N, ...)``, ``LabeledSamples`` / ``(x, y)`` (visited
            in epochs), a data-set name of :mod:`flowsolve.training.data`, an object with
            ``.sample(n, generator=)`` or a callable ``f(n, generator=)`` returning a
            tensor or ``(x, y)``.
        source: the ``x0`` side, in the same forms; ``None`` draws ``N(0, I)`` shaped like x1.
            A labelled source (``LabeledSamples``, ``(x, y)`` or a sampler returning one)
            gives its labels to the coupling as ``y0`` (below).
        coupling: ``coupling(x0, x1, *extras) -> (x0, x1, *extras)`` (extras: the labels
            of x1), given ``generator=`` when it accepts one, and the source labels as
            ``y0=`` when the source is labelled and the coupling names a ``y0`` parameter
            (:class:`~flowsolve.training.couplings.ClassConditionalOT`: pairs then match labels,
            ``y0 == y1``); label-free couplings (independent, paired, OT) take no ``y0``
            and pair a labelled source as an unlabelled one. ``None`` is the independent
            coupling.
        batch_size, seed, rank, world_size: as in :func:`train`.
        dtype: floating dtype of the produced pairs (default: torch's default dtype).

    ``producer[k]`` is batch ``k``; a ``DataLoader(producer, batch_size=None,
    sampler=range(start, stop), num_workers=w)`` yields the same batches for any ``w``.
    A batch with non-finite entries is refused by a ValueError that names it (batch,
    step, x1 or x0, count): as drawn on the CPU, and where a coupling refuses it elsewhere.
    """

    def __init__(self, data: Any, source: Any = None, coupling: Callable | None = None, *,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype | None = None):
        _check_int(batch_size, "batch_size", 1)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int (any, hashed to 64 bits); got "
                            f"{type(seed).__name__} {seed!r}")
        seed = int(seed)
        if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, world_size); got rank={rank!r}, "
                             f"world_size={world_size!r}")
        if coupling is not None and not callable(coupling):
            raise TypeError("coupling must be None or callable as coupling(x0, x1, *extras); "
                            f"got {type(coupling).__name__}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.data = _Stream(data, "data", batch_size, mix_seed(seed, DATA_STREAM), rank, world_size)
        self.source = None if source is None else _Stream(
            source, "source", batch_size, mix_seed(seed, SOURCE_STREAM), rank, world_size)
        self.coupling = coupling
        self._coupling_takes_generator = coupling is not None and _accepts_generator(coupling)
        self._coupling_takes_y0 = coupling is not None and _takes_y0(coupling)
        self.dtype = dtype or torch.get_default_dtype()

    def __len__(self) -> int:
        return 1 << 62

    def draw(self, k: int) -> Batch:
        """The uncoupled batch ``k`` (with the source labels ``y0`` of a labelled source).

        A batch on the CPU with a non-finite entry in x1 or x0 (in the producer's dtype) is
        refused here, by a ValueError naming the batch, the step, the side and the count
        (one sum a side: about 20 us for 256 x 2 pairs, 0.2 ms for 128 images of 3 x 32 x
        32); batches on another device are not checked here (that would synchronise the
        host every step): see :meth:`non_finite` and :meth:`find_non_finite`."""
        drawn1, y = self.data(k)
        x1 = drawn1.to(self.dtype)
        y0 = None
        if self.source is None:
            g = seeded_generator(mix_seed(self.seed, SOURCE_STREAM, k, self.rank))
            drawn0 = x0 = torch.randn(x1.shape, generator=g, dtype=self.dtype)
        else:
            drawn0, y0 = self.source(k)
            x0 = drawn0.to(self.dtype)
        if x0.shape != x1.shape:
            raise ValueError(f"source batches {tuple(x0.shape)} and data batches "
                             f"{tuple(x1.shape)} must have the same shape")
        batch = Batch(x0, x1, y, y0)
        if x0.device.type in _CHECKED_AT_DRAW and x1.device.type in _CHECKED_AT_DRAW:
            # one sum a side (N(0, I) noise needs none); a sum that overflowed: recounted
            total = x1.sum() if self.source is None else x0.sum() + x1.sum()
            if not math.isfinite(float(total)):
                problem = self.non_finite(batch, k, drawn=(drawn0, drawn1))
                if problem is not None:
                    raise ValueError(problem)
        return batch

    def non_finite(self, batch: Batch, k: int, *, drawn: tuple[Tensor, Tensor] | None = None,
                   coupled: bool = False) -> str | None:
        """What is non-finite in batch ``k`` (reads counts: a synchronisation off the CPU),
        or None: the side (x1, the data; x0, the source), the number of entries and the
        batch; ``drawn``: the tensors as drawn, before the conversion to the producer's
        dtype (finite there: an overflow of that dtype). ``coupled``: the batch came out of
        the coupling (whose input was finite)."""
        parts, advice = [], set()
        for side, x, raw in (("x1 (the data)", batch.x1, None if drawn is None else drawn[1]),
                             ("x0 (the source)", batch.x0, None if drawn is None else drawn[0])):
            bad = int((~torch.isfinite(x)).sum())
            if not bad:
                continue
            what = f"{side} has {bad} non-finite {'entry' if bad == 1 else 'entries'}"
            if raw is not None and raw.dtype != x.dtype and bool(torch.isfinite(raw).all()):
                what += (f", finite as drawn in {_dtype_name(raw.dtype)} (largest magnitude "
                         f"{float(raw.abs().max()):.3g}) but beyond the range of "
                         f"{_dtype_name(x.dtype)}, the batches' dtype (the model's in training)")
                advice.add("rescale the data (or train a model of a wider dtype)")
            else:
                advice.add("clean or filter the data and the source")
            parts.append(what)
        if not parts:
            return None
        where = f"batch {k} (training step {k + 1}" + (
            f", rank {self.rank})" if self.world_size > 1 else ")")
        if coupled:
            return (f"the coupling {self.coupling!r} returned non-finite pairs for {where} from "
                    f"finite inputs: {'; '.join(parts)}")
        return (f"non-finite training data in {where}: {'; '.join(parts)}. Training needs "
                f"finite data: {' and '.join(sorted(advice))}")

    def find_non_finite(self, steps: range, device: torch.device | None = None) -> str | None:
        """The first problem :meth:`non_finite` finds in batches ``steps``, drawn again (a
        pure function of the seed and k) and then coupled (on ``device`` if given, as
        ``couple_on_device`` does); None if they are all finite. For a training loss that
        turned non-finite: reads each batch (synchronises), so call it only then."""
        for k in steps:
            batch = self.draw(k)
            problem = self.non_finite(batch, k)
            if problem is None and self.coupling is not None:
                if device is not None:
                    batch = batch.to(device, self.dtype)
                problem = self.non_finite(self.couple(batch, k), k, coupled=True)
            if problem is not None:
                return problem
        return None

    def couple(self, batch: Batch, k: int) -> Batch:
        """Apply the coupling to ``batch`` (randomness seeded by ``(seed, k, rank)``); the
        source labels ``batch.y0`` go to a coupling that takes ``y0``."""
        if self.coupling is None:
            return batch
        extras = () if batch.y is None else (batch.y,)
        kwargs = {}
        if self._coupling_takes_generator:
            seed = mix_seed(self.seed, COUPLING_STREAM, k, self.rank)
            kwargs["generator"] = seeded_generator(seed, batch.x0.device)
        if self._coupling_takes_y0 and batch.y0 is not None:
            kwargs["y0"] = batch.y0
        try:
            out = self.coupling(batch.x0, batch.x1, *extras, **kwargs)
        except ValueError as err:  # name non-finite data (off the CPU, unchecked so far)
            problem = self.non_finite(batch, k)
            if problem is not None:
                raise ValueError(problem) from err
            raise
        if not isinstance(out, (tuple, list)) or len(out) != 2 + len(extras) or \
                out[0].shape != batch.x0.shape or out[1].shape != batch.x1.shape:
            raise TypeError("coupling(x0, x1, *extras) must return (x0, x1, *extras) with the "
                            f"shapes it was given ({len(extras)} extras)")
        return Batch(out[0], out[1], out[2] if extras else None)

    def __getitem__(self, k: int) -> Batch:
        return self.couple(self.draw(k), k)
