r"""Optimised time grids: for one field, one fixed-step solver and a budget of ``N`` steps,
the grid ``t_0 .. t_N`` whose endpoint is closest to a reference (:func:`optimize_grid`),
kept in a JSON file (:meth:`GridSearch.save`, :func:`load_grid`).

**The error** of a grid is the RMS over the batch of the Euclidean distance at ``t1``,
``e = (1/B sum_b ||x_hat_b - x_ref_b||^2)^(1/2)`` (flattened per sample), with ``x_hat``
the fixed-step solve on that grid and ``x_ref`` the reference: a given tensor (a closed
form) or ``reference="auto"``, a tight adaptive solve (scipy's DOP853 on the CPU,
torchdiffeq's dopri8 elsewhere, float64 at ``rtol = atol = 1e-10``; in ``x0``'s dtype at
``1e-6`` for a field that cannot take float64).

**The search.** The ``N - 1`` interior times are parameterised by ``N - 1`` logits
``z_i`` (the first increment's logit is fixed at 0): the increments are ``softmax(0, z)
(t1 - t0)``, so every candidate runs strictly monotone from ``t0`` to ``t1``. The search
starts from the standard grid with the smallest calibration error (or ``start=``) and
minimises ``log e`` on the calibration batch with scipy: L-BFGS-B with forward differences
(``h = 1e-6`` in ``z``; each gradient costs ``N - 1`` solves) by default, or Nelder-Mead
/ Powell. It is deterministic (the same inputs give the same grid, bit for bit) and
stops after ``max_evals`` calibration solves at most; the grid returned is the best one
evaluated. The standard grids (``"uniform"``, ``ShiftGrid(3)`` and, with ``path=``,
``"logsnr"`` and ``"edm"``) and the optimised one are then compared on a held-out batch.

Example:
    >>> import torch, flowsolve as fs
    >>> path = fs.AffineGaussianPath(fs.CosineScheduler())
    >>> u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(8, std=0.2), path)
    >>> g = torch.Generator().manual_seed(0)
    >>> x0 = torch.randn(32, 2, dtype=torch.float64, generator=g)
    >>> res = optimize_grid(u, x0, "heun2", 3, path=path, held_out=32, generator=g,
    ...                     max_evals=20)
    >>> res.nfe, len(res.grid), res.held_out_error < res.standard[res.best_standard]
    (6, 4, True)
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from .._core.checks import check_span, generator_or_fresh
from .._core.errors import IntegrationError
from .._core.files import UnreadableFileError, write_atomically
from .._core.types import Field
from ..ode.args import as_path
from ..ode.grids import GivenGrid, ShiftGrid, time_grid
from ..ode.solve import ODE_SOLVERS, sample
from .references import LOW_PRECISION_REFERENCE_TOL, REFERENCE_TOL, takes_float64

__all__ = ["GridSearch", "optimize_grid", "load_grid", "auto_reference", "GRID_FORMAT",
           "STANDARD_GRIDS"]

GRID_FORMAT = "flowsolve.grid/1"
"""The ``format`` string of a grid file written by :meth:`GridSearch.save`."""

STANDARD_GRIDS = {"uniform": "uniform", "logsnr": "logsnr", "edm": "edm",
                  "shift3": ShiftGrid(3.0)}
"""The grids an optimised grid is compared with, by name (``logsnr`` and ``edm`` need
``path=``)."""

_METHODS = ("L-BFGS-B", "Nelder-Mead", "Powell")
_BOUND = 25.0  # |z_i|: increments within a factor e^50 of each other, all resolvable
_FD_STEP = 1e-6
_PENALTY = 1e3  # log-error of a candidate whose solve fails (non-finite, grid refused)


@dataclass(frozen=True)
class GridSearch:
    """What :func:`optimize_grid` returns.

    Attributes:
        grid: the optimised ``steps + 1`` times (float64), ``t0`` first, ``t1`` last.
        solver: the fixed-step solver it was optimised for; ``steps``: its cells ``N``.
        nfe: field evaluations per sample of a solve on ``grid`` (counted).
        calibration_error: the RMS error ``e`` on the calibration batch (see the module).
        held_out_error: ``e`` on the held-out batch (None without one).
        standard: ``{name: e}`` of each standard grid that applies, on the held-out batch
            (the calibration batch without one); ``inf`` where its solve failed.
        standard_calibration: the same on the calibration batch.
        best_standard: the name of the smallest error of ``standard``.
        start: where the search started (a standard grid's name, or ``"given"``).
        evaluations: calibration solves of the search (the standard grids not included).
        path: ``repr`` of the path (None without one); ``prediction``, ``t0``, ``t1``:
            as passed; ``method``: the scipy method; ``message``: how it stopped.
        reference: ``"auto"`` (a tight adaptive solve) or ``"given"``.
        seconds: wall time of the call, references included (not compared by ``==``).
    """

    grid: list[float]
    solver: str
    steps: int
    nfe: int
    calibration_error: float
    held_out_error: float | None
    standard: dict[str, float]
    standard_calibration: dict[str, float]
    best_standard: str
    start: str
    evaluations: int
    path: str | None
    prediction: str = "velocity"
    t0: float = 0.0
    t1: float = 1.0
    method: str = "L-BFGS-B"
    message: str = ""
    reference: str = "auto"
    calibration_size: int = 0
    held_out_size: int = 0
    seconds: float = field(default=0.0, compare=False)

    @property
    def improvement(self) -> float:
        """The best standard grid's error over the optimised grid's (held-out batch if
        there was one): how many times smaller the error became."""
        mine = self.calibration_error if self.held_out_error is None else self.held_out_error
        return self.standard[self.best_standard] / mine if mine > 0 else math.inf

    def as_grid(self) -> GivenGrid:
        """The grid as ``grid=`` of :func:`~flowsolve.ode.solve.sample` takes it."""
        return GivenGrid(tuple(self.grid))

    def table(self) -> str:
        """A Markdown table of the errors: each standard grid and the optimised one."""
        on = "held-out" if self.held_out_error is not None else "calibration"
        rows = [f"| grid | error ({on}) | vs optimised |", "|---|---|---|"]
        mine = self.calibration_error if self.held_out_error is None else self.held_out_error
        for name, e in [*self.standard.items(), ("optimised", mine)]:
            best = " (best standard)" if name == self.best_standard else ""
            rows.append(f"| {name}{best} | {e:.4g} | {e / mine:.3g}x |")
        return "\n".join(rows)

    def save(self, file: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the search as JSON (format ``"flowsolve.grid/1"``; floats exact) atomically.
        An existing ``file`` is replaced only with ``force=True`` (FileExistsError
        otherwise); a missing folder is created."""
        path = Path(file)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True to replace it, or choose "
                                  f"another file")
        doc = {"format": GRID_FORMAT, **asdict(self)}
        for key in ("standard", "standard_calibration"):  # JSON has no inf
            doc[key] = {k: (v if math.isfinite(v) else None) for k, v in doc[key].items()}
        data = json.dumps(doc, indent=1, allow_nan=False).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, lambda f: f.write(data), overwrite=force)

    @classmethod
    def load(cls, file: str | os.PathLike) -> GridSearch:
        """The search :meth:`save` wrote (FileNotFoundError, or
        :class:`~flowsolve._core.files.UnreadableFileError` naming what is wrong)."""
        path, doc = _read(file)
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in doc]
        if missing:
            raise UnreadableFileError(f"{path} is a grid file without the search's record "
                                      f"(missing {', '.join(missing)}); load_grid() reads its "
                                      f"grid")
        kwargs = {n: doc[n] for n in names if n in doc}
        kwargs["grid"] = list(_checked_grid(path, doc).times)
        try:
            for key in ("standard", "standard_calibration"):
                kwargs[key] = {str(k): (math.inf if v is None else float(v))
                               for k, v in kwargs[key].items()}
        except (AttributeError, TypeError, ValueError):
            raise UnreadableFileError(f"{path}: {key!r} must map grid names to errors; got "
                                      f"{kwargs[key]!r}") from None
        return cls(**kwargs)


def _read(file) -> tuple[Path, dict]:
    path = Path(file)
    if not path.exists():
        raise FileNotFoundError(f"no grid file at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UnreadableFileError(f"{path} cannot be read as a grid file (JSON written by "
                                  f"GridSearch.save): {type(err).__name__}: {err}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != GRID_FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("flowsolve.grid/")
        raise UnreadableFileError(
            f"{path} is not a grid file of format {GRID_FORMAT!r} (got format {fmt!r}" +
            ("; written by a newer flowsolve: upgrade)" if newer else
             "); grid files are written by GridSearch.save / optimize_grid"))
    return path, doc


def _checked_grid(path: Path, doc: dict) -> GivenGrid:
    ts = doc.get("grid")
    if not isinstance(ts, list) or not all(
            isinstance(t, numbers.Real) and not isinstance(t, bool) for t in ts):
        raise UnreadableFileError(f"{path}: 'grid' must be a list of numbers; got {ts!r}")
    try:
        grid = GivenGrid(tuple(float(t) for t in ts))
    except ValueError as err:
        raise UnreadableFileError(f"{path}: {err}") from None
    steps = doc.get("steps")
    if steps is not None and steps != grid.steps:
        raise UnreadableFileError(f"{path}: steps={steps!r} but the grid has {len(ts)} times "
                                  f"({grid.steps} steps)")
    return grid


def load_grid(file: str | os.PathLike) -> GivenGrid:
    """The grid of a file written by :meth:`GridSearch.save`, as ``grid=`` takes it.

    A missing file raises FileNotFoundError; one that is not JSON, of another format, or
    whose grid is not a strictly monotone sequence of times in [0, 1] raises
    :class:`~flowsolve._core.files.UnreadableFileError` naming the file and the problem.
    """
    path, doc = _read(file)
    return _checked_grid(path, doc)


# -- the search --------------------------------------------------------------------------------
def _rms(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).flatten(1).norm(dim=1).square().mean().sqrt())


def auto_reference(field, x0: Tensor, t0, t1, path, prediction) -> Tensor:
    """``x(t1)`` of ``x0`` by a tight adaptive solve: DOP853 (dopri8 off the CPU) at
    ``rtol = atol = 1e-10`` in float64, or at 1e-6 in ``x0``'s dtype for a field that cannot
    take float64; a non-velocity model is converted on ``path``. Returned in ``x0``'s
    dtype."""
    wide = takes_float64(field, x0, t0)
    tol = REFERENCE_TOL if wide else LOW_PRECISION_REFERENCE_TOL
    solver = "DOP853" if x0.device.type == "cpu" else "dopri8"
    try:
        with torch.no_grad():
            sol = sample(field, x0.detach().to(torch.float64 if wide else x0.dtype), solver,
                         t0=t0, t1=t1, rtol=tol, atol=tol, max_steps=100_000,
                         path=None if prediction == "velocity" else path,
                         prediction=prediction)
    except ValueError as err:
        if prediction == "velocity":
            raise
        raise ValueError(f"reference='auto' integrates the velocity of the {prediction!r} "
                         f"model with {solver}, which failed: {err}. Pass reference= (x(t1) "
                         f"of x0, e.g. from a many-step sampler solve) and held_out=(x0, "
                         f"x1_ref)") from err
    return sol.x.to(x0.dtype)


def _noise(n: int, like: Tensor, path, t0: float, generator) -> Tensor:
    sched = None if path is None else path.scheduler
    values = None if sched is None else sched(torch.tensor(t0, dtype=torch.float64))
    if values is None or float(values.alpha_t) != 0.0:
        raise ValueError(f"held_out={n} draws noise from p_t0 = N(0, sigma_t0^2 I), which needs "
                         f"path= with alpha_t0 = 0 (t0 = {t0!r} is "
                         f"{'unknown without a path' if values is None else 'not pure noise'});"
                         f" pass held_out=x0 (a batch) or (x0, x1_ref) instead")
    g = generator_or_fresh(generator)
    x = torch.randn(n, *like.shape[1:], generator=g, dtype=like.dtype, device=g.device)
    return (float(values.sigma_t) * x).to(like.device)


def _held_out(held_out, x0, reference, field, t0, t1, path, prediction, generator):
    """(x0, x1_ref) of the held-out batch, or None."""
    if held_out is None:
        return None
    drawn = isinstance(held_out, numbers.Integral) and not isinstance(held_out, bool)
    if drawn:
        if held_out < 1:
            raise ValueError(f"held_out={held_out!r}: a number of samples must be >= 1")
        held_out = _noise(int(held_out), x0, path, t0, generator)
    if isinstance(held_out, tuple) and len(held_out) == 2 and all(map(torch.is_tensor,
                                                                      held_out)):
        xh, ref = held_out
        if ref.shape != xh.shape:
            raise ValueError(f"held_out=(x0, x1_ref): x1_ref must be shaped like x0 "
                             f"{tuple(xh.shape)}; got {tuple(ref.shape)}")
    elif torch.is_tensor(held_out):
        if torch.is_tensor(reference) and not drawn:
            raise ValueError("held_out=x0 gets its reference the way the calibration batch "
                             "does, but reference= was given as a tensor: pass held_out=(x0, "
                             "x1_ref) with the held-out batch's reference too")
        xh, ref = held_out, None
    else:
        raise TypeError(f"held_out must be None, a number of noise samples, a batch x0 or a "
                        f"pair (x0, x1_ref) of tensors; got {type(held_out).__name__}")
    if xh.dim() < 1 or xh.shape[1:] != x0.shape[1:] or xh.shape[0] < 1:
        raise ValueError(f"held-out x0 must be (B, {', '.join(map(str, x0.shape[1:]))}) like "
                         f"the calibration x0; got {tuple(xh.shape)}")
    xh = xh.detach().to(dtype=x0.dtype, device=x0.device)
    if ref is None:
        ref = auto_reference(field, xh, t0, t1, path, prediction)
    return xh, ref.detach().to(dtype=x0.dtype, device=x0.device)


def _times(z: np.ndarray, t0: float, t1: float) -> list[float]:
    """``t0 + (t1 - t0) cumsum(softmax(0, z))``, ``t1`` exactly last."""
    logits = np.concatenate(([0.0], np.asarray(z, dtype=np.float64)))
    w = np.exp(logits - logits.max())
    c = np.cumsum(w / w.sum())
    return [t0, *(t0 + (t1 - t0) * c[:-1]).tolist(), t1]


def _logits(times: list[float]) -> np.ndarray:
    d = np.abs(np.diff(np.asarray(times, dtype=np.float64)))
    return np.clip(np.log(d[1:] / d[0]), -_BOUND, _BOUND)


class _Budget(Exception):
    """Raised inside the objective when ``max_evals`` solves are spent."""


def _count(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}; got {type(v).__name__} {v!r}")
    if v < low:
        raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    return int(v)


def _check_solver(solver) -> None:
    fixed = ", ".join(n for n, i in ODE_SOLVERS.items() if not i.adaptive)
    if not isinstance(solver, str) or solver not in ODE_SOLVERS.names():
        raise ValueError(f"unknown solver {solver!r}; a grid is optimised for a fixed-step "
                         f"solver: {fixed}")
    if ODE_SOLVERS[solver].adaptive:
        raise ValueError(f"solver {solver!r} is adaptive and chooses its own steps: there is "
                         f"no grid to optimise; fixed-step solvers: {fixed}")


def optimize_grid(field: Field, x0: Tensor, solver: str, steps: int, *, path=None,
                  prediction: str = "velocity", reference: str | Tensor = "auto",
                  held_out: int | Tensor | tuple[Tensor, Tensor] | None = None,
                  t0: float = 0.0, t1: float = 1.0, start=None, max_evals: int = 300,
                  method: str = "L-BFGS-B",
                  generator: torch.Generator | None = None) -> GridSearch:
    r"""The grid ``t0 = t_0 < .. < t_N = t1`` (or ``>`` backwards) that minimises the RMS
    error at ``t1`` of ``solver`` on the calibration batch ``x0``,
    ``e = (1/B sum_b ||x_hat_b - x_ref_b||^2)^(1/2)``, over
    ``t_i = t0 + (t1 - t0) sum_{j < i} softmax(0, z)_j`` (see the module for the search),
    compared with the standard grids on a held-out batch. Each gradient of L-BFGS-B costs
    ``N - 1`` solves, so ``max_evals`` should grow with ``steps`` (100-300 for 5-10 steps).

    Args:
        field, x0, solver, path, prediction, t0, t1: as :func:`~flowsolve.ode.solve.sample`
            takes them; ``solver`` fixed-step (adaptive solvers have no grid).
        steps: the number of cells ``N >= 2`` (one cell has no interior time to place).
        reference: ``x(t1)`` of ``x0`` (a tensor shaped like it: a closed form) or
            ``"auto"`` (a tight adaptive solve).
        held_out: the batch the grids are compared on: ``(x0, x1_ref)`` tensors; a batch
            ``x0`` (its reference solved as ``"auto"``); a number ``n`` of samples of
            ``p_t0 = N(0, sigma_t0^2 I)`` drawn from ``generator`` (needs ``path`` with
            ``alpha_t0 = 0``; their reference is solved as ``"auto"``); or None (every
            error on the calibration batch).
        start: the first grid (anything ``grid=`` takes); default the standard grid with the
            smallest calibration error.
        max_evals: at most this many calibration solves in the search (>= 1).
        method: ``"L-BFGS-B"`` (default), ``"Nelder-Mead"`` or ``"Powell"`` (scipy).
        generator: draws ``held_out=n`` (a fresh generator when None).

    Returns:
        :class:`GridSearch`.
    """
    _check_solver(solver)
    steps = _count("steps", steps, 2)
    max_evals = _count("max_evals", max_evals, 1)
    if method not in _METHODS:
        raise ValueError(f"method={method!r}; accepted: {', '.join(_METHODS)}")
    t0, t1 = check_span(t0, t1)
    path = as_path(path)
    if not torch.is_tensor(x0) or x0.dim() < 1 or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor (B, *event_shape); got "
                        f"{type(x0).__name__}")
    x0 = x0.detach()
    began = time.perf_counter()
    if isinstance(reference, str) and reference == "auto":
        ref = auto_reference(field, x0, t0, t1, path, prediction)
    elif torch.is_tensor(reference):
        if reference.shape != x0.shape:
            raise ValueError(f"reference must be x(t1) shaped like x0 {tuple(x0.shape)}; got "
                             f"{tuple(reference.shape)}")
        ref = reference.detach().to(dtype=x0.dtype, device=x0.device)
    else:
        raise ValueError(f"reference must be 'auto' or a tensor x(t1) shaped like x0; got "
                         f"{reference!r}")
    held = _held_out(held_out, x0, reference, field, t0, t1, path, prediction, generator)

    def error(times, x, r) -> tuple[float, int]:
        try:
            with torch.no_grad():
                sol = sample(field, x, solver, steps=steps, grid=times, t0=t0, t1=t1,
                             path=path, prediction=prediction)
        except IntegrationError:  # a non-finite state: the grid is unusable
            return math.inf, 0
        e = _rms(sol.x, r)
        return (e if math.isfinite(e) else math.inf), sol.nfe

    names = [n for n in STANDARD_GRIDS if path is not None or n not in ("logsnr", "edm")]
    grids = {}
    for name in names:
        try:
            grids[name] = time_grid(STANDARD_GRIDS[name], steps, t0=t0, t1=t1, path=path)
        except ValueError:  # e.g. an EDM range beyond a finite end
            continue
    calib = {n: error(g, x0, ref)[0] for n, g in grids.items()}
    if start is None:
        start_name = min(calib, key=lambda n: calib[n])
        if not math.isfinite(calib[start_name]):
            raise ValueError(f"solver {solver!r} with {steps} steps fails (non-finite) on "
                             f"every standard grid ({', '.join(calib)}): no grid to start "
                             f"from; pass start= (a grid)")
        first = grids[start_name]
    else:
        start_name, first = "given", time_grid(start, steps, t0=t0, t1=t1, path=path)

    best = {"f": math.inf, "z": None}
    spent = [0]

    def f(z) -> float:
        if spent[0] >= max_evals:
            raise _Budget
        spent[0] += 1
        times = _times(z, t0, t1)
        sign = 1.0 if t1 > t0 else -1.0
        if not all(sign * (b - a) > 0 for a, b in zip(times[:-1], times[1:], strict=True)):
            return _PENALTY
        e = error(times, x0, ref)[0]
        value = math.log(e) if 0 < e < math.inf else (-_PENALTY if e == 0 else _PENALTY)
        if value < best["f"]:
            best.update(f=value, z=np.array(z, dtype=np.float64))
        return value

    def f_and_grad(z) -> tuple[float, np.ndarray]:
        z = np.asarray(z, dtype=np.float64)
        value = f(z)
        grad = np.zeros_like(z)
        if value >= _PENALTY:
            return value, grad
        for i in range(z.size):  # forward differences, stepping into the bounds
            h = _FD_STEP if z[i] + _FD_STEP <= _BOUND else -_FD_STEP
            zi = z.copy()
            zi[i] += h
            grad[i] = (f(zi) - value) / h
        return value, grad

    z0 = _logits(first)
    bounds = [(-_BOUND, _BOUND)] * z0.size
    message = "max_evals reached"
    try:
        if method == "L-BFGS-B":
            out = scipy.optimize.minimize(f_and_grad, z0, jac=True, method=method,
                                          bounds=bounds,
                                          options={"maxiter": 10**6, "maxfun": 10**6})
        else:
            options = {"maxiter": 10**6, "maxfev": 10**6}
            if method == "Nelder-Mead":  # scipy's default simplex (5% of z0; 0 at uniform)
                step = np.where(z0 + 0.5 <= _BOUND, 0.5, -0.5)  # is too small to move
                options.update(initial_simplex=np.vstack([z0, z0 + np.diag(step)]),
                               xatol=1e-4, fatol=1e-6)
            out = scipy.optimize.minimize(f, z0, method=method, bounds=bounds,
                                          options=options)
        message = str(out.message)
    except _Budget:
        pass
    if best["z"] is None:  # every candidate failed
        raise ValueError(f"solver {solver!r} failed (non-finite or refused) on every grid "
                         f"tried from {start_name!r}; try another start=")
    grid = _times(best["z"], t0, t1)
    cal_error, nfe = error(grid, x0, ref)
    if held is None:
        held_error, standard = None, dict(calib)
    else:
        held_error, nfe = error(grid, *held)
        standard = {n: error(g, *held)[0] for n, g in grids.items()}
    return GridSearch(
        grid=grid, solver=solver, steps=steps, nfe=nfe, calibration_error=cal_error,
        held_out_error=held_error, standard=standard, standard_calibration=calib,
        best_standard=min(standard, key=lambda n: standard[n]), start=start_name,
        evaluations=spent[0], path=None if path is None else repr(path),
        prediction=prediction, t0=t0, t1=t1, method=method, message=message,
        reference="given" if torch.is_tensor(reference) else "auto",
        calibration_size=x0.shape[0], held_out_size=0 if held is None else held[0].shape[0],
        seconds=time.perf_counter() - began)
