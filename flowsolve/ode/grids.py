r"""Time grids of the fixed-step solvers: where the ``steps + 1`` times ``t_0 .. t_N`` of a
fixed-step solve lie.

Every fixed-step solver of :func:`flowsolve.ode.solve.sample` takes ``grid=``: a name of
:data:`GRIDS`, a grid object (:class:`UniformGrid`, :class:`LogSNRGrid`, :class:`EDMGrid`,
:class:`ShiftGrid`, :class:`GivenGrid`: the names with their options), a positive number
(the shift ``s`` of :class:`ShiftGrid`) or the times themselves (a tensor, array or
sequence). :func:`time_grid` builds the times of any of them:

=============  ==========================================================  ===========
``grid=``      the times                                                   needs path
=============  ==========================================================  ===========
``"uniform"``  ``linspace(t0, t1, N + 1)`` (the default)                   no
``"logsnr"``   uniform in ``lambda_t = log(alpha_t / sigma_t)``            yes
``"edm"``      EDM's rho-spacing of ``sigma_t / alpha_t`` (rho = 7)        yes
``s > 0``      the rectified-flow shift of ``sigma = 1 - t`` by ``s``      no
times          exactly the times given (first ``t0``, last ``t1``)         no
=============  ==========================================================  ===========

Every grid starts at ``t0`` and ends at ``t1`` exactly, and is strictly monotone in the
direction of integration. The path-dependent grids are built on ``[min(t0, t1), max(t0,
t1)]`` and reversed for a backward solve (``t0 > t1``), so a data-to-noise solve steps
through the same times; the uniform and the shift grid run ``linspace`` in the direction
of the solve, as the uniform grid always has.

**Infinite ends.** ``lambda_t`` is ``-inf`` where ``alpha_t = 0`` (t = 0 on CondOT,
cosine, polynomial paths) and ``+inf`` where ``sigma_t = 0`` (t = 1 on all but VE), so
neither a log-SNR grid nor an EDM grid can be spaced up to such an end. flowsolve does
what EDM does (Karras et al. 2022, eq. 5): the noise level ``sigma_t / alpha_t`` of the
spaced points runs from ``sigma_max`` in place of infinity and down to ``sigma_min`` in
place of 0 (EDM's 80 and 0.002 by default). The end itself stays a grid point, one step
beyond: on [0, 1] of the CondOT path the grid is ``t_0 = 0``, then ``N - 1`` points spaced
from ``sigma/alpha = 80`` down to ``0.002``, then ``t_N = 1`` (EDM's final step to
``sigma = 0``). A finite end is never clipped: with ``t0 = 1e-3`` the spacing starts at
``sigma/alpha = 999``. The times are found with the scheduler's ``snr_inverse``.

Example:
    >>> import flowsolve as fs
    >>> path = fs.AffineGaussianPath(fs.CosineScheduler())
    >>> [round(t, 4) for t in time_grid("logsnr", 4, path=path)]
    [0.0, 0.008, 0.7578, 0.9987, 1.0]
    >>> [round(t, 4) for t in time_grid(ShiftGrid(3.0), 4)]
    [0.0, 0.1, 0.25, 0.5, 1.0]
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .._core.checks import check_span
from ..paths.affine import AffineGaussianPath
from ..paths.schedules import Scheduler

__all__ = ["TimeGrid", "UniformGrid", "LogSNRGrid", "EDMGrid", "ShiftGrid", "GivenGrid",
           "GRIDS", "as_grid", "time_grid", "linspace"]

ACCEPTED = ('"uniform", "logsnr", "edm", a shift s > 0 (a number or ShiftGrid(s)), a '
            "TimeGrid object (UniformGrid, LogSNRGrid, EDMGrid, ShiftGrid, GivenGrid) or the "
            "times themselves (a 1-d tensor, array or sequence)")


def linspace(t0: float, t1: float, steps: int) -> list[float]:
    """``linspace(t0, t1, steps + 1)`` in float64, as Python floats: the uniform grid
    (computed as the fixed-step solvers always have, so the default grid is unchanged)."""
    return torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()


def _number(cls: str, name: str, v, *, lo: float = 0.0) -> float:
    """A finite real number > ``lo``, or the error naming it."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{cls}: {name} must be a finite number > {lo:g}; got "
                        f"{type(v).__name__} {v!r}")
    if not (math.isfinite(v) and v > lo):
        raise ValueError(f"{cls}: {name} must be a finite number > {lo:g}; got {v!r}")
    return float(v)


class TimeGrid(ABC):
    """A rule placing the ``steps + 1`` times of a fixed-step solve from ``t0`` to ``t1``.

    Subclasses implement :meth:`build`; ``needs_path`` says whether it reads the path's
    scheduler. Use :func:`time_grid`, which checks the arguments, rather than ``build``.
    """

    name: ClassVar[str]
    needs_path: ClassVar[bool] = False

    @property
    def steps(self) -> int | None:
        """The number of cells the grid fixes by itself (:class:`GivenGrid`), else None."""
        return None

    @abstractmethod
    def build(self, t0: float, t1: float, steps: int,
              scheduler: Scheduler | None) -> list[float]:
        """``steps + 1`` float64 times from ``t0`` to ``t1`` (checked, distinct, in [0, 1])."""


@dataclass(frozen=True)
class UniformGrid(TimeGrid):
    r"""Uniform in t: ``t_i = t0 + (i / N) (t1 - t0)``, i.e. ``linspace(t0, t1, N + 1)``."""

    name: ClassVar[str] = "uniform"

    def build(self, t0, t1, steps, scheduler=None):
        return linspace(t0, t1, steps)


class _NoiseLevelGrid(TimeGrid):
    r"""A grid spaced uniformly in a function ``v`` of the noise level
    ``r_t = sigma_t / alpha_t = exp(-lambda_t)`` (see the module's note on infinite ends).

    On ``[lo, hi]`` with ``r`` falling from ``r(lo)`` to ``r(hi)``: an end with ``r``
    infinite (``alpha = 0``) or zero (``sigma = 0``) is a grid point of its own and the
    spacing runs from ``sigma_max`` / to ``sigma_min`` instead; the ``M`` spaced points
    (``M = N + 1`` minus the number of such ends) are ``v_i = v_a + i / (M - 1) (v_b -
    v_a)``, ``i = 0 .. M - 1`` (one spaced point between two such ends: the middle of
    ``[v_a, v_b]``), and ``t_i = snr_inverse(exp(lambda_i))``. Built on ``[min(t0, t1),
    max(t0, t1)]``, reversed for ``t0 > t1``."""

    needs_path: ClassVar[bool] = True
    sigma_min: float
    sigma_max: float

    def _check_bounds(self) -> None:
        cls = type(self).__name__
        _number(cls, "sigma_min", self.sigma_min)
        _number(cls, "sigma_max", self.sigma_max)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"{cls}: need sigma_min < sigma_max; got sigma_min="
                             f"{self.sigma_min!r}, sigma_max={self.sigma_max!r}")

    @abstractmethod
    def _to_v(self, lam: float) -> float:
        """The spacing variable at log-SNR ``lam`` (finite)."""

    @abstractmethod
    def _to_lambda(self, v: float) -> float:
        """The log-SNR at ``v`` (inverse of :meth:`_to_v`)."""

    def build(self, t0, t1, steps, scheduler):
        lo, hi = min(t0, t1), max(t0, t1)
        lam_lo, lam_hi = scheduler.log_snr(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
        inf_lo, inf_hi = lam_lo == -math.inf, lam_hi == math.inf
        lam_a = -math.log(self.sigma_max) if inf_lo else lam_lo
        lam_b = -math.log(self.sigma_min) if inf_hi else lam_hi
        if not lam_a < lam_b:
            ends = (f"sigma/alpha is infinite at t={lo!r}, so the spacing starts at sigma_max="
                    f"{self.sigma_max!r}" if inf_lo else
                    f"sigma/alpha is 0 at t={hi!r}, so the spacing ends at sigma_min="
                    f"{self.sigma_min!r}")
            raise ValueError(
                f"grid {self.name!r} on [{lo!r}, {hi!r}] of {scheduler!r}: {ends}, beyond the "
                f"other end (sigma/alpha from {math.exp(-lam_lo):.6g} to "
                f"{math.exp(-lam_hi):.6g}); widen sigma_min / sigma_max "
                f"({type(self).__name__}(sigma_min=..., sigma_max=...)) or move t0 / t1")
        m = steps + 1 - inf_lo - inf_hi
        v_a, v_b = self._to_v(lam_a), self._to_v(lam_b)
        if m == 1 and inf_lo and inf_hi:
            fractions = [0.5]
        elif m == 1:  # one spaced point: the finite end itself
            fractions = [1.0] if inf_lo else [0.0]
        else:
            fractions = [i / (m - 1) for i in range(m)]
        lams = [self._to_lambda(v_a + f * (v_b - v_a)) for f in fractions]
        ts = scheduler.snr_inverse(torch.tensor(lams, dtype=torch.float64).exp()).tolist()
        times = [lo] * inf_lo + ts + [hi] * inf_hi
        times[0], times[-1] = lo, hi  # exactly the ends
        return times if t0 < t1 else times[::-1]


@dataclass(frozen=True)
class LogSNRGrid(_NoiseLevelGrid):
    r"""Uniform in the log-SNR ``lambda_t = log(alpha_t / sigma_t)``:
    ``lambda_i = lambda_a + (i / (M - 1)) (lambda_b - lambda_a)`` with ``lambda_a =
    lambda(t0)``, ``lambda_b = lambda(t1)``, or ``-log sigma_max`` / ``-log sigma_min`` for
    an infinite end (which stays a grid point of its own; see the module's note), and
    ``t_i = snr_inverse(exp(lambda_i))``. The grid of DPM-Solver (Lu et al. 2022); EDM's
    grid in the limit ``rho -> inf``.

    Args:
        sigma_min: the noise level ``sigma_t / alpha_t`` that replaces 0 at an end where
            ``sigma_t = 0`` (EDM's 0.002).
        sigma_max: the noise level that replaces infinity at an end where ``alpha_t = 0``
            (EDM's 80).
    """

    name: ClassVar[str] = "logsnr"
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        self._check_bounds()

    def _to_v(self, lam):
        return lam

    def _to_lambda(self, v):
        return v


@dataclass(frozen=True)
class EDMGrid(_NoiseLevelGrid):
    r"""EDM's grid (Karras et al. 2022, eq. 5) in the noise level ``r_t = sigma_t / alpha_t``:
    ``r_i = (r_a^{1/rho} + (i / (M - 1)) (r_b^{1/rho} - r_a^{1/rho}))^rho``, ``i = 0 ..
    M - 1``, from ``r_a = r(t0)`` (or ``sigma_max`` where ``alpha_t0 = 0``) to ``r_b =
    r(t1)`` (or ``sigma_min`` where ``sigma_t1 = 0``, followed by ``t1`` itself, EDM's last
    step to ``sigma = 0``), and ``t_i = snr_inverse(1 / r_i)``. ``rho = 7`` puts the steps
    where the noise is small; ``rho -> inf`` is :class:`LogSNRGrid`.

    Args:
        rho: the exponent, a finite number > 0 (EDM: 7).
        sigma_min: as :class:`LogSNRGrid` (EDM's 0.002).
        sigma_max: as :class:`LogSNRGrid` (EDM's 80).
    """

    name: ClassVar[str] = "edm"
    rho: float = 7.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        _number("EDMGrid", "rho", self.rho)
        self._check_bounds()

    def _to_v(self, lam):  # r^(1/rho) = exp(-lambda / rho)
        return math.exp(-lam / self.rho)

    def _to_lambda(self, v):
        return -self.rho * math.log(v)


@dataclass(frozen=True)
class ShiftGrid(TimeGrid):
    r"""The time shift of rectified-flow image models (Esser et al. 2024, SD3) in the noise
    level ``sigma = 1 - t`` of the CondOT path, whatever the path:
    ``sigma' = s sigma / (1 + (s - 1) sigma)``, i.e. ``t' = f_s(u) = u / (1 + (s - 1)(1 -
    u))``, applied to a grid uniform in ``u``: ``u_i = linspace(f_s^{-1}(t0), f_s^{-1}(t1),
    N + 1)`` with ``f_s^{-1} = f_{1/s}`` (on [0, 1]: ``u_i = i / N``), ``t_i = f_s(u_i)``.
    ``s > 1`` puts the steps near the noise (SD3: 3), ``s < 1`` near the data; ``s = 1`` is
    the uniform grid, bit for bit.

    Args:
        shift: ``s``, a finite number > 0.
    """

    name: ClassVar[str] = "shift"
    shift: float

    def __post_init__(self):
        _number("ShiftGrid", "shift", self.shift)

    @staticmethod
    def _f(s: float, u: float) -> float:
        return u / (1 + (s - 1) * (1 - u))

    def build(self, t0, t1, steps, scheduler=None):
        s = float(self.shift)
        u = linspace(self._f(1 / s, t0), self._f(1 / s, t1), steps)
        times = [self._f(s, v) for v in u]
        times[0], times[-1] = t0, t1
        return times


@dataclass(frozen=True)
class GivenGrid(TimeGrid):
    r"""The times given, used exactly: a 1-d sequence, finite, inside [0, 1], strictly
    monotone (no repeats), at least two points. In a solve from ``t0`` to ``t1`` it must
    run in that direction and start at ``t0`` and end at ``t1`` (a first or last time within
    4 ulps of the dtype it was given in, as for ``times=``, is that end); ``steps`` is then
    ``len(times) - 1`` (it may be given, and must agree).

    Args:
        times: the grid, as Python floats (float64).
        eps: the machine epsilon of the dtype the times came in (float64's by default).
    """

    name: ClassVar[str] = "given"
    times: tuple[float, ...]
    eps: float = field(default=torch.finfo(torch.float64).eps, repr=False)

    def __post_init__(self):
        ts = self.times
        problem = ("fewer than two times" if len(ts) < 2 else
                   "not finite" if not all(math.isfinite(t) for t in ts) else
                   "outside [0, 1]" if not all(-4 * self.eps <= t <= 1 + 4 * self.eps
                                               for t in ts) else
                   None)
        if problem is None:
            sign = 1.0 if ts[1] > ts[0] else -1.0
            if not all(sign * (b - a) > 0 for a, b in zip(ts[:-1], ts[1:], strict=True)):
                problem = "not strictly monotone (no repeats)"
        if problem:
            raise ValueError(f"grid times must be a 1-d sequence of at least two finite times "
                             f"in [0, 1], strictly monotone; got {list(ts)!r} ({problem})")

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def build(self, t0, t1, steps, scheduler=None):
        ts = list(self.times)
        tol = 4 * self.eps * max(abs(t0), abs(t1), 1e-300)
        if abs(ts[0] - t0) > tol or abs(ts[-1] - t1) > tol:
            raise ValueError(f"grid times must start at t0={t0!r} and end at t1={t1!r} (the "
                             f"interval of the solve: pass t0=/t1= for another one); got "
                             f"{ts[0]!r} .. {ts[-1]!r}")
        ts[0], ts[-1] = t0, t1
        return ts


GRIDS: dict[str, Callable[..., TimeGrid]] = {
    "uniform": UniformGrid,
    "logsnr": LogSNRGrid,
    "edm": EDMGrid,
    "shift": ShiftGrid,
}
"""Grid name -> the class building it; the class's keyword arguments are the grid's options
(``GRIDS["edm"](rho=5)``); ``"shift"`` needs its ``shift``."""


def as_grid(grid) -> TimeGrid:
    """The :class:`TimeGrid` that ``grid=`` names: a name of :data:`GRIDS` (with its default
    options), a :class:`TimeGrid` (itself), a positive number ``s`` (``ShiftGrid(s)``) or a
    1-d tensor / array / sequence of times (:class:`GivenGrid`)."""
    if isinstance(grid, TimeGrid):
        return grid
    if isinstance(grid, str):
        if grid == "shift":
            raise ValueError('grid="shift" needs its factor s: grid=ShiftGrid(s) or grid=s '
                             "(a number > 0; SD3 uses 3.0)")
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; accepted: {ACCEPTED}")
        return GRIDS[grid]()
    if isinstance(grid, numbers.Real) and not isinstance(grid, bool):
        return ShiftGrid(grid)
    if torch.is_tensor(grid) or hasattr(grid, "__array__") or isinstance(grid, (list, tuple)):
        if torch.is_tensor(grid) or hasattr(grid, "dtype"):
            dtype = torch.as_tensor(grid).dtype
            eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
        else:
            eps = torch.finfo(torch.float64).eps
        try:
            ts = torch.as_tensor(grid, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"grid times must be numbers; got {grid!r}") from err
        if ts.dim() != 1:
            raise ValueError(f"grid times must be 1-d; got shape {tuple(ts.shape)}")
        return GivenGrid(tuple(ts.tolist()), eps)
    raise TypeError(f"grid must be one of {ACCEPTED}; got {type(grid).__name__} {grid!r}")


def _scheduler(path) -> Scheduler | None:
    if path is None or isinstance(path, Scheduler):
        return path
    if isinstance(path, AffineGaussianPath):
        return path.scheduler
    raise TypeError(f"path must be an AffineGaussianPath or a Scheduler; got "
                    f"{type(path).__name__}")


def time_grid(grid="uniform", steps: int | None = None, *, t0: float = 0.0, t1: float = 1.0,
              path: AffineGaussianPath | Scheduler | None = None) -> list[float]:
    r"""The ``steps + 1`` times of a fixed-step solve from ``t0`` to ``t1`` on ``grid``.

    Args:
        grid: ``"uniform"``, ``"logsnr"``, ``"edm"``, a shift ``s > 0`` (a number), a
            :class:`TimeGrid` (``EDMGrid(rho=5)``, ``ShiftGrid(3.0)``, ...) or the times
            (:class:`GivenGrid`).
        steps: the number of cells ``N`` (required, except for given times, which fix it).
        t0: the first time, in [0, 1].
        t1: the last time, in [0, 1], not ``t0``; ``t0 > t1`` is a backward grid.
        path: an :class:`~flowsolve.paths.affine.AffineGaussianPath` or its scheduler:
            required by ``"logsnr"`` and ``"edm"``, unused by the others.

    Returns:
        ``N + 1`` float64 Python floats, ``t0`` first and ``t1`` last exactly, strictly
        monotone.

    Example:
        >>> time_grid("uniform", 4)
        [0.0, 0.25, 0.5, 0.75, 1.0]
        >>> time_grid([0.0, 0.5, 0.9, 1.0])
        [0.0, 0.5, 0.9, 1.0]
    """
    spec = as_grid(grid)
    t0, t1 = check_span(t0, t1)
    if spec.steps is not None:
        if steps is not None and steps != spec.steps:
            raise ValueError(f"steps={steps!r} disagrees with the {spec.steps + 1} grid times "
                             f"given ({spec.steps} steps); leave steps out or make them agree")
        steps = spec.steps
    if steps is None:
        raise ValueError(f"grid {spec.name!r} needs steps=N (the number of cells)")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be a positive int; got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    scheduler = _scheduler(path)
    if spec.needs_path and scheduler is None:
        raise ValueError(f"grid {spec.name!r} is built from the path's alpha_t / sigma_t: pass "
                         f"path= (an AffineGaussianPath or a Scheduler); grids without a "
                         f"path: uniform, a shift, given times")
    times = spec.build(t0, t1, int(steps), scheduler)
    sign = 1.0 if t1 > t0 else -1.0
    if len(times) != steps + 1 or not all(
            math.isfinite(a) and sign * (b - a) > 0 for a, b in zip(times[:-1], times[1:],
                                                                     strict=True)):
        raise ValueError(f"grid {spec.name!r} with steps={steps} on [{t0!r}, {t1!r}] has "
                         f"repeated or non-monotone times in float64 (too many steps for the "
                         f"range?): {times!r}")
    return times
