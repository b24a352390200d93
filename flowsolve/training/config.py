r"""The settings of a training run, :class:`TrainConfig`: checked when built, stored as
plain Python values (a checkpoint holds plain types only, and a resume compares them).
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..paths.affine import canonical_prediction
from .losses import DSM_WEIGHTINGS, TIME_DISTRIBUTIONS

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train` (AdamW lr 1e-3, weight decay 1e-5 as in Tong et al. 2024).

    ``steps`` optimizer steps of ``batch_size`` pairs per rank; AdamW(``lr``, ``betas``,
    ``weight_decay``) with a linear warm-up over ``warmup_steps``; gradient-norm clipping
    at ``grad_clip`` (None: off); EMA decay ``ema_decay`` (None: no EMA), warmed up as
    ``min(ema_decay, (1 + n) / (10 + n))`` at step n unless ``ema_warmup=False``. ``prediction``:
    what the model outputs (``velocity``, ``score``, ``epsilon``, ``x1``, ``v``);
    ``dsm_weighting`` for ``score``; ``time_distribution`` of t. ``label_dropout``: the
    probability of replacing a label by the model's ``null_label``. The loss is logged
    (mean over the interval, over ranks) every ``log_every`` steps; a checkpoint is written
    every ``checkpoint_every`` steps (0: only at the end). ``num_workers`` DataLoader
    workers produce and couple batches (0: the main process; then ``couple_on_device``
    couples on the model's device, e.g. a GPU Sinkhorn). Workers are forked where the
    platform allows (``worker_start_method=None``); a coupling that uses CUDA inside a
    worker needs ``"spawn"`` and picklable data, source and coupling. Numbers may be numpy
    scalars: they are stored as Python ints / floats (a checkpoint holds plain types only).
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    grad_clip: float | None = None
    ema_decay: float | None = 0.999
    ema_warmup: bool = True
    prediction: str = "velocity"
    dsm_weighting: str = "sigma_squared"
    time_distribution: str = "uniform"
    label_dropout: float = 0.0
    log_every: int = 100
    checkpoint_every: int = 0
    num_workers: int = 0
    prefetch_factor: int = 2
    worker_start_method: str | None = None
    couple_on_device: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # built-in types only: numpy scalars would pass the checks below but are not
        # loadable by torch.load(weights_only=True) once written into a checkpoint
        for name, value in _coerced(self).items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "prediction", canonical_prediction(self.prediction, "prediction"))
        for name, (ok, accepted) in _RULES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not ok(value):
                raise ValueError(f"{name} must be {accepted}; got {value!r}")
        if not isinstance(self.ema_warmup, bool):
            raise ValueError(f"ema_warmup must be True or False; got {self.ema_warmup!r}")
        if self.couple_on_device and self.num_workers:
            raise ValueError("couple_on_device=True needs num_workers=0 (workers run on the "
                             f"host); got num_workers={self.num_workers}")


def _builtin(value: Any) -> Any:
    """``value`` as the built-in type of its kind: numpy (or other) integers -> int, reals ->
    float, strings -> str, bools -> bool, sequences element-wise as a tuple; anything else
    unchanged (the field's check then names it)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if type(value) in (int, float, str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (tuple, list)):
        return tuple(_builtin(v) for v in value)
    return value


def _coerced(cfg: TrainConfig) -> dict[str, Any]:
    """Every field of ``cfg`` through :func:`_builtin`: the kind follows the value, so no
    list of fields needs keeping (a float given for an int field stays a float: refused)."""
    return {f.name: _builtin(getattr(cfg, f.name)) for f in fields(cfg)}


def _int_at_least(minimum: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and v >= minimum), f"an int >= {minimum}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: _int_at_least(1) for k in ("steps", "batch_size", "log_every", "prefetch_factor")},
    **{k: _int_at_least(0) for k in ("warmup_steps", "checkpoint_every", "num_workers")},
    "lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": (lambda v: v is None or _number(v) and v > 0, "None or a number > 0"),
    "ema_decay": (lambda v: v is None or _number(v) and 0 <= v < 1, "None or in [0, 1)"),
    "label_dropout": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "time_distribution": (lambda v: v in TIME_DISTRIBUTIONS, f"one of {TIME_DISTRIBUTIONS}"),
    "dsm_weighting": (lambda v: v in DSM_WEIGHTINGS, f"one of {DSM_WEIGHTINGS}"),
    "worker_start_method": (lambda v: v is None or v in multiprocessing.get_all_start_methods(),
                            "None or a multiprocessing start method"),
}
