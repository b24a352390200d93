"""Argument checks and time grids of the ODE front door (:mod:`flowsolve.ode.solve`).

* the state and the output times: :func:`check_state`, :func:`check_times` (the interval:
  :func:`~flowsolve._core.checks.check_span`);
* the solver's arguments (fixed-step: ``steps``; adaptive: ``rtol``, ``atol``,
  ``max_steps``; ``cuda_graph`` and ``adjoint``): :func:`check_solver_arguments`, which
  returns them normalised as the :class:`SolverArguments` every back end of
  :data:`flowsolve.ode.backends.BACKENDS` receives;
* the fixed-step grid (``linspace(t0, t1, steps + 1)`` or the one ``grid=`` names, built by
  :func:`flowsolve.ode.grids.time_grid`) and the output times on it: :func:`fixed_grid`,
  :func:`uniform_grid`, :func:`grid_indices`, :func:`times_tensor`.

Value checks read CPU tensors only (``x0`` on an accelerator is not inspected), so no check
synchronises a GPU.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.registry import SolverInfo
from ..paths.affine import AffineGaussianPath, canonical_prediction
from ..paths.schedules import Scheduler
from .grids import UniformGrid, as_grid, linspace, time_grid

DEFAULT_RTOL = DEFAULT_ATOL = 1e-5
DEFAULT_MAX_STEPS = 10_000


def check_state(x0) -> None:
    """``x0``: a non-empty floating tensor ``(B, *event_shape)``, finite (checked on CPU)."""
    if not torch.is_tensor(x0) or x0.dim() < 1 or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point tensor shaped (B, *event_shape); got "
                        f"{type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}")
    if x0.numel() == 0:
        raise ValueError(f"x0 is empty: shape {tuple(x0.shape)}")
    if x0.device.type == "cpu" and not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains inf or NaN")


def positive(name: str, v) -> float:
    """A finite number > 0 (tolerances)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a positive number; got {type(v).__name__}")
    if not 0 < v < math.inf:
        raise ValueError(f"{name} must be a positive number; got {v!r}")
    return float(v)


def count(name: str, v) -> int:
    """An int >= 1 (steps, step budgets)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be a positive int; got {v!r}")
    return int(v)


def _times_dtype(times) -> torch.dtype:
    """The floating dtype the times were given in: a tensor's or a NumPy array's own (an
    integer one: float64, exact), float64 for Python numbers and lists."""
    if torch.is_tensor(times) or hasattr(times, "dtype"):
        dtype = torch.as_tensor(times).dtype
        return dtype if dtype.is_floating_point else torch.float64
    return torch.float64


def check_times(times, t0: float, t1: float) -> list[float]:
    """Output times: strictly monotone from ``t0`` towards ``t1``, inside the interval.

    A time *outside* the interval by at most ``tol = min(4 eps max(|t0|, |t1|),
    1e-3 |t1 - t0|)`` is the endpoint it lies beyond, rounded: it is snapped to that
    endpoint (``eps`` the machine epsilon of the dtype the times were given in, float64 for
    Python numbers), so that times given in float32 (``linspace(0, 0.3, 11,
    dtype=float32)`` ends at 0.30000001) name their endpoint. A time inside the interval is
    never moved (a float64 time 2e-7 stays 2e-7); farther outside, times are refused, and
    the error quotes them as given."""
    if times is None:
        return []
    given = torch.as_tensor(times, dtype=torch.float64).reshape(-1).tolist()
    eps = torch.finfo(_times_dtype(times)).eps
    tol = min(4 * eps * max(abs(t0), abs(t1)), 1e-3 * abs(t1 - t0))
    lo, hi = min(t0, t1), max(t0, t1)
    out = [lo if lo - tol <= t < lo else hi if hi < t <= hi + tol else t for t in given]
    sign = 1.0 if t1 > t0 else -1.0
    inside = all(lo <= t <= hi for t in out)
    monotone = all(sign * (b - a) > 0 for a, b in zip(out[:-1], out[1:], strict=True))
    if not out or not inside or not monotone:
        problem = ("empty" if not out else "not strictly monotone" if inside
                   else "outside the interval")
        tol32 = min(4 * torch.finfo(torch.float32).eps * max(abs(t0), abs(t1)),
                    1e-3 * abs(t1 - t0))
        if not inside and eps < torch.finfo(torch.float32).eps and all(
                lo - tol32 <= t <= hi + tol32 for t in out):
            problem += (", by no more than float32 rounding: pass times computed in float32 "
                        "as a float32 tensor, whose rounding at the endpoints is accepted")
        raise ValueError(f"times must be non-empty, strictly monotone from t0={t0!r} towards "
                         f"t1={t1!r} and inside that interval; got {given!r} ({problem})")
    return out


def uniform_grid(t0: float, t1: float, steps: int) -> list[float]:
    """The explicit fixed-step grid ``linspace(t0, t1, steps + 1)`` (float64 values; any
    interval, as the SDE solves and Langevin dynamics use it)."""
    return linspace(t0, t1, steps)


def _describe(grid: list[float]) -> str:
    n = len(grid) - 1
    if grid == uniform_grid(grid[0], grid[-1], n):
        return f"linspace({grid[0]!r}, {grid[-1]!r}, {n + 1})"
    shown = grid if n <= 8 else [*grid[:4], "...", *grid[-4:]]
    return f"[{', '.join(str(t) for t in shown)}] ({n + 1} times)"


def grid_indices(out_times: list[float], grid: list[float]) -> list[int]:
    """Indices of ``out_times`` in ``grid`` (uniform or not, either direction); each must be
    a grid point, to 1e-3 of the smaller cell beside it, and no two times may name the same
    point."""
    n, sign = len(grid) - 1, 1.0 if grid[-1] > grid[0] else -1.0
    keys = [sign * g for g in grid]  # increasing
    idx: list[int] = []
    for t in out_times:
        j = min(max(bisect.bisect_left(keys, sign * t), 0), n)
        k = min((i for i in (j - 1, j) if 0 <= i <= n), key=lambda i: abs(grid[i] - t))
        cells = [abs(grid[i + 1] - grid[i]) for i in (k - 1, k) if 0 <= i < n]
        # within 1e-3 of a cell: times given in float32 (1e-7 off) still name their point
        if abs(grid[k] - t) > 1e-3 * min(cells):
            raise ValueError(f"times must be points of the grid {_describe(grid)} of a "
                             f"fixed-step solve; got {t!r}")
        if idx and idx[-1] == k:
            raise ValueError(f"times {out_times[len(idx) - 1]!r} and {t!r} both name the grid "
                             f"point {grid[k]!r} (index {k}) of {_describe(grid)}; give each "
                             f"grid point once")
        idx.append(k)
    return idx


def fixed_grid(grid, steps: int | None, t0: float, t1: float, path, solver: str) -> list[float]:
    """The grid of a fixed-step solve: ``grid=`` (:func:`flowsolve.ode.grids.as_grid`) built
    by :func:`~flowsolve.ode.grids.time_grid` from ``steps`` (given times fix it) on the
    checked interval ``[t0, t1]``."""
    spec = as_grid(grid)
    if steps is None and spec.steps is None:
        raise ValueError(f"solver {solver!r} is fixed-step: give steps=N (the grid "
                         f"linspace(t0, t1, N + 1), or N cells of grid={grid!r})")
    if steps is not None:
        steps = count("steps", steps)
    return time_grid(spec, steps, t0=t0, t1=t1, path=path)


def times_tensor(out_times: list[float], x0: Tensor) -> Tensor | None:
    """``out_times`` as a tensor in ``x0``'s dtype and device (None when empty)."""
    return torch.tensor(out_times, dtype=x0.dtype, device=x0.device) if out_times else None


@dataclass(frozen=True)
class SolverArguments:
    """The checked arguments of one solve, as every back end receives them.

    Attributes:
        t0, t1: the interval (floats, distinct, in [0, 1]).
        steps: grid cells of a fixed-step solver; None for an adaptive one.
        grid: a fixed-step solver's ``steps + 1`` times (float64 Python floats, ``t0``
            first and ``t1`` last; :func:`fixed_grid`); None for an adaptive one.
        rtol, atol, max_steps: an adaptive solver's tolerances and step budget (defaults
            filled in); fixed-step: None, except the tolerances of a torchdiffeq solver that
            takes them (implicit Adams), passed on as given.
        out_times: the checked output times (:func:`check_times`; empty: none requested).
        options, check_finite, cuda_graph, adjoint: as given to the front door.
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath` of ``path=`` (a
            scheduler given there is wrapped), or None.
        prediction: what the field predicts (``"velocity"`` unless ``prediction=`` said
            otherwise; the samplers read it, the other solvers get a converted field).
    """

    t0: float
    t1: float
    steps: int | None
    rtol: float | None
    atol: float | None
    max_steps: int | None
    out_times: list[float]
    options: dict | None
    check_finite: bool
    cuda_graph: bool
    adjoint: bool
    grid: list[float] | None = None
    path: AffineGaussianPath | None = None
    prediction: str = "velocity"


def as_path(path) -> AffineGaussianPath | None:
    """``path=`` as an :class:`~flowsolve.paths.affine.AffineGaussianPath` (a scheduler is
    wrapped; None stays None); TypeError otherwise."""
    if path is None or isinstance(path, AffineGaussianPath):
        return path
    if isinstance(path, Scheduler):
        return AffineGaussianPath(path)
    raise TypeError(f"path must be an AffineGaussianPath or a Scheduler; got "
                    f"{type(path).__name__}")


def check_resolvable(rtol: float, atol: float, x0: Tensor, dtype: torch.dtype) -> None:
    """Refuse tolerances the state's dtype cannot resolve: an adaptive step is accepted when
    its error estimate is below ``atol + rtol |x|``, and rounding alone leaves an error of
    about ``eps |x|`` (``eps``: the dtype's machine epsilon). With ``rtol < eps / 10`` and
    ``atol < eps * max(1, max |x0|) / 10`` no step can pass: the step size shrinks until it
    underflows or time becomes NaN (tolerances near ``eps`` itself still work, slowly: the
    float32 study's 1e-7). ``dtype`` is the solver's state: ``x0``'s for torchdiffeq, float64
    for scipy (which integrates a float64 copy). ``max |x0|`` is read on the CPU only (1
    elsewhere: no synchronisation)."""
    eps = torch.finfo(dtype).eps
    scale = 1.0
    if x0.device.type == "cpu":
        scale = max(1.0, float(x0.detach().abs().max()))
    if rtol < eps / 10 and atol < eps * scale / 10:
        raise ValueError(
            f"rtol={rtol!r} and atol={atol!r} are below what {dtype} can resolve (machine "
            f"epsilon {eps:.3g}; the state's scale {scale:.3g}): no step can meet them. Use "
            f"rtol >= {eps / 10:.3g} or atol >= {eps * scale / 10:.3g}; for a reference "
            "solution, a float64 state with rtol and atol near 1e-10")


def check_solver_arguments(info: SolverInfo, x0: Tensor, t0: float, t1: float, *,
                           steps, rtol, atol, max_steps, times, options, check_finite: bool,
                           cuda_graph: bool, adjoint: bool, takes_tolerances: bool,
                           adaptive_solvers: Sequence[str], grid="uniform",
                           path=None, prediction: str = "velocity") -> SolverArguments:
    """Check the solver-dependent arguments of :func:`flowsolve.ode.solve.sample`.

    An adaptive solver refuses ``steps``, a ``grid`` other than ``"uniform"`` and ``path``
    (it chooses its own steps), and fills in ``rtol``, ``atol`` (default 1e-5 each) and
    ``max_steps`` (default 10 000); a fixed-step one requires ``steps`` (unless ``grid`` is
    the times themselves), builds its grid (:func:`fixed_grid`; ``path`` for the log-SNR
    and EDM grids), and refuses ``max_steps`` and, unless ``takes_tolerances``
    (torchdiffeq's implicit Adams: its corrector's tolerance), ``rtol``/``atol``; its
    ``times`` must be points of its grid. ``cuda_graph`` needs a ``fast_*`` solver and
    ``x0`` on CUDA; ``adjoint`` a torchdiffeq solver (fixed-step: without ``times``).
    A sampler (``info.needs_path``) requires ``path`` and integrates from noise to data
    (``t0 < t1``); any solver given a ``prediction`` other than ``"velocity"`` requires
    ``path`` (to convert the model).

    Args:
        info: the solver; ``x0``: the checked state; ``t0``, ``t1``: the checked interval
            (:func:`~flowsolve._core.checks.check_span`).
        takes_tolerances: whether a fixed-step solver accepts ``rtol``/``atol``.
        adaptive_solvers: the adaptive solvers' names, for the message refusing a
            fixed-step solve without ``steps``.

    Returns:
        :class:`SolverArguments`: the normalised values.
    """
    solver = info.name
    fixed = None
    path = as_path(path)
    prediction = canonical_prediction(prediction, "prediction")
    if path is None and (info.needs_path or prediction != "velocity"):
        why = (f"solver {solver!r} steps in the path's log-SNR" if info.needs_path else
               f"a {prediction!r} model is converted to a velocity on the path")
        raise ValueError(f"{why}: pass path= (the AffineGaussianPath the model was trained on, "
                         f"or its Scheduler)")
    if info.needs_path and not t0 < t1:
        raise ValueError(f"solver {solver!r} integrates from noise to data (t0 < t1); got "
                         f"t0={t0!r}, t1={t1!r}. For data to noise use an ODE solver such as "
                         f"'rk4' or 'dopri5' (with prediction= and path= for a non-velocity "
                         f"model)")
    if info.adaptive:
        if steps is not None:
            raise ValueError(f"steps={steps!r}: solver {solver!r} is adaptive; it takes rtol, "
                             "atol and max_steps, not steps")
        if not (isinstance(grid, UniformGrid) or isinstance(grid, str) and grid == "uniform"):
            raise ValueError(f"grid={grid!r}: solver {solver!r} is adaptive and chooses its own "
                             f"steps; grid= applies to the fixed-step solvers "
                             f"(rk4, heun2, fast_*, ...)")
        if path is not None and prediction == "velocity":
            raise ValueError(f"path= shapes the grid of a fixed-step solver (or converts a "
                             f"non-velocity model: prediction=); solver {solver!r} is adaptive "
                             f"(leave path out)")
        rtol = positive("rtol", DEFAULT_RTOL if rtol is None else rtol)
        atol = positive("atol", DEFAULT_ATOL if atol is None else atol)
        check_resolvable(rtol, atol, x0,
                         torch.float64 if info.library == "scipy" else x0.dtype)
        max_steps = count("max_steps", DEFAULT_MAX_STEPS if max_steps is None else max_steps)
    else:
        spec = as_grid(grid)
        if steps is None and spec.steps is None:
            raise ValueError(f"solver {solver!r} is fixed-step: give steps=N (the grid "
                             f"linspace(t0, t1, N + 1)); adaptive solvers: "
                             f"{', '.join(adaptive_solvers)}")
        if steps is not None:
            steps = count("steps", steps)
        if max_steps is not None:
            raise ValueError(f"max_steps={max_steps!r} applies to adaptive solvers; {solver!r} "
                             f"takes exactly steps={steps}")
        if (rtol is not None or atol is not None) and not takes_tolerances:
            raise ValueError(f"rtol/atol apply to adaptive solvers; {solver!r} is fixed-step "
                             f"(got rtol={rtol!r}, atol={atol!r})")
        fixed = fixed_grid(spec, steps, t0, t1, path, solver)
        steps = len(fixed) - 1
    if cuda_graph and (info.library != "flowsolve" or info.needs_path or not x0.is_cuda):
        raise ValueError(f"cuda_graph=True needs a fast_* solver and x0 on a CUDA device; got "
                         f"solver={solver!r}, x0 on {x0.device}")
    out_times = check_times(times, t0, t1)
    if fixed is not None:
        grid_indices(out_times, fixed)
    if adjoint and (info.library != "torchdiffeq" or out_times and not info.adaptive):
        raise ValueError(f"adjoint=True needs a torchdiffeq solver (and, fixed-step, no times); "
                         f"got solver={solver!r}, times={times!r}")
    if info.needs_path and options:
        raise ValueError(f"solver {solver!r} takes no options; got options={options!r}")
    return SolverArguments(t0, t1, steps, rtol, atol, max_steps, out_times, options,
                           check_finite, cuda_graph, adjoint, fixed, path, prediction)
