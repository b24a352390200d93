r"""The semi-linear form of the probability-flow ODE, shared by the low-NFE samplers.

On an affine Gaussian path ``x_t = alpha_t x1 + sigma_t x0`` write the model as its
posterior means, the data prediction ``D = E[x1 | x_t]`` and the noise prediction
``eps = E[x0 | x_t]`` (tied by ``x = alpha_t D + sigma_t eps``), and the log-SNR
``lambda_t = log(alpha_t / sigma_t)``. The probability-flow ODE is then

    dx/dt = (sigma'_t / sigma_t) x + alpha_t lambda'_t D(x, t),

so over a step from ``s`` to ``t``, with ``h = lambda_t - lambda_s``,

    x_t / sigma_t = x_s / sigma_s + int_{lambda_s}^{lambda_t} e^lambda D dlambda       (data)
    x_t / alpha_t = x_s / alpha_s - int_{lambda_s}^{lambda_t} e^-lambda eps dlambda    (noise)

(Lu et al. 2022, DPM-Solver and DPM-Solver++). The samplers of :mod:`flowsolve.ode`
(DDIM, DPM-Solver, DPM-Solver++, UniPC, EDM) approximate those integrals. This module holds
what they share:

* :class:`Node`: ``t``, ``alpha_t``, ``sigma_t``, ``lambda_t`` at a grid time, as host floats
  (``lambda`` is ``-inf`` where ``alpha_t = 0``, ``+inf`` where ``sigma_t = 0``);
* :class:`Denoiser`: a model of any parameterisation (velocity, score, epsilon, x1, v) as
  ``(D, eps)``, its conversion coefficients computed once on the host at the times the
  sampler will call it (no per-call check, no host synchronisation);
* :func:`ddim_step`: the first-order step ``x_t = alpha_t D_s + sigma_t eps_s`` (DDIM,
  DPM-Solver-1, DPM-Solver++(1)), which is finite for every pair of times, infinite
  ``h`` included: it is the exact limit of every sampler's update over a step with an
  infinite end, since the higher-order corrections of a step of infinite length in
  ``lambda`` have no finite limit (the reference implementations also take a first-order
  step to ``sigma = 0``);
* :class:`Sampler`: the interface a sampler implements (its evaluation times and its step),
  and :class:`SamplerLoop`: the loop over a grid, with NFE counted, finiteness recorded on
  the device (read once at the end), and the trajectory kept at chosen grid points.

Example:
    >>> import torch, flowsolve as fs
    >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
    >>> [round(n.lam, 4) for n in nodes(path.scheduler, [0.0, 0.5, 1.0])]
    [-inf, 0.0, inf]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .._core.counting import CountingField
from .._core.errors import NonFiniteStateError
from .._core.finite import FiniteRecord
from .._core.types import Field
from ..paths.affine import AffineGaussianPath, canonical_prediction
from ..paths.schedules import Scheduler

__all__ = ["Node", "nodes", "Posterior", "Denoiser", "ddim_step", "infinite_step",
           "Sampler", "SamplerLoop", "Noise"]


@dataclass(frozen=True)
class Node:
    """The path at one time, as host floats.

    Attributes:
        t: the time.
        alpha: ``alpha_t``.
        sigma: ``sigma_t``.
        lam: ``lambda_t = log(alpha_t / sigma_t)`` (``-inf`` at ``alpha_t = 0``, ``inf`` at
            ``sigma_t = 0``).
    """

    t: float
    alpha: float
    sigma: float
    lam: float

    @property
    def r(self) -> float:
        """The noise level ``sigma_t / alpha_t = e^{-lambda_t}`` (EDM's sigma; inf at
        ``alpha_t = 0``)."""
        return math.inf if self.alpha == 0 else self.sigma / self.alpha


def nodes(scheduler: Scheduler, times: Sequence[float]) -> list[Node]:
    """:class:`Node` at each of ``times`` (one float64 evaluation of ``scheduler`` on the CPU)."""
    tt = torch.tensor([float(t) for t in times], dtype=torch.float64)
    v = scheduler(tt)
    lam = scheduler.log_snr(tt)
    return [Node(float(t), a, s, la) for t, a, s, la in
            zip(times, v.alpha_t.tolist(), v.sigma_t.tolist(), lam.tolist(), strict=True)]


def infinite_step(s: Node, t: Node) -> bool:
    """True where the step from ``s`` to ``t`` has infinite length in ``lambda`` (it starts
    where ``alpha = 0`` or ends where ``sigma = 0``)."""
    return not math.isfinite(t.lam - s.lam)


class Posterior(NamedTuple):
    """The posterior means at ``(x, t)``: ``D = E[x1 | x_t = x]``, ``eps = E[x0 | x_t = x]``
    (``eps`` None where ``sigma_t = 0`` and the model does not give it)."""

    D: Tensor
    eps: Tensor | None


def _affine(a: float, x: Tensor, b: float, m: Tensor) -> Tensor:
    """``a x + b m`` with host-float coefficients (no device branch)."""
    if a == 0.0:
        return m * b
    return torch.add(m * b, x, alpha=a)


class Denoiser:
    r"""A model of any parameterisation as the posterior means ``(D, eps)`` at planned times.

    ``D = a_D(t) x + b_D(t) m(x, t)`` and ``eps = a_eps(t) x + b_eps(t) m(x, t)``, the
    coefficients of :meth:`~flowsolve.paths.affine.AffineGaussianPath.conversion_coefficients`
    computed once, in float64 on the CPU, at every time of ``times``; the model is called
    with those times as 0-d tensors on ``like``'s device, made once. A call at a time not
    planned is a KeyError (a sampler's bug, not a user's).

    Args:
        model: a field ``(x, t) -> Tensor`` predicting ``prediction``.
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath` it was trained on.
        prediction: ``"velocity"``, ``"score"``, ``"epsilon"``, ``"x1"`` or ``"v"``
            (aliases as for the path's conversions).
        times: every time the sampler will call the model at.
        like: a tensor with the state's dtype and device.
        solver: the sampler's name, for messages.

    Raises:
        ValueError: ``D`` is not finite at one of ``times`` (an epsilon or score model at
            ``alpha_t = 0``, where it carries no information about the data), naming it.
    """

    def __init__(self, model: Field, path: AffineGaussianPath, prediction: str,
                 times: Sequence[float], like: Tensor, solver: str = "sampler"):
        kind = canonical_prediction(prediction, "prediction")
        self.model = CountingField(model, like_input=True)
        self.prediction = kind
        times = sorted({float(t) for t in times})
        tt = torch.tensor(times, dtype=torch.float64)
        a_d, b_d = path.conversion_coefficients(tt, kind, "x1")
        a_e, b_e = path.conversion_coefficients(tt, kind, "epsilon")
        sigma = path.scheduler(tt).sigma_t
        ok_d = torch.isfinite(a_d) & torch.isfinite(b_d)
        if not bool(ok_d.all()):
            where = tt[~ok_d][0].item()
            raise ValueError(
                f"solver {solver!r}: a {kind!r} model gives no data prediction "
                f"E[x1 | x_t] at t={where!r} on {path!r} (the conversion is singular there: "
                f"alpha_t = 0 for epsilon and score models); start at t0 > {where!r} or give "
                f"a velocity, x1 or v model")
        ok_e = torch.isfinite(a_e) & torch.isfinite(b_e)
        if not bool((ok_e | (sigma == 0)).all()):
            where = tt[~ok_e][0].item()
            raise ValueError(f"solver {solver!r}: a {kind!r} model gives no noise prediction "
                             f"at t={where!r} on {path!r}")
        self._index = {t: k for k, t in enumerate(times)}
        self._coef = [(ad, bd, ae if oe else None, be if oe else None) for ad, bd, ae, be, oe in
                      zip(a_d.tolist(), b_d.tolist(), a_e.tolist(), b_e.tolist(),
                          ok_e.tolist(), strict=True)]
        self._t = torch.tensor(times, dtype=like.dtype, device=like.device)

    @property
    def nfe(self) -> int:
        """Model evaluations so far (counted)."""
        return self.model.nfe

    def model_time(self, t: float) -> Tensor:
        """The 0-d time tensor the model is called with at ``t``."""
        return self._t[self._index[t]]

    def __call__(self, x: Tensor, t: float) -> Posterior:
        """``(D, eps)`` at ``(x, t)``: one model evaluation."""
        k = self._index[t]
        m = self.model(x, self._t[k])
        ad, bd, ae, be = self._coef[k]
        eps = None if ae is None else _affine(ae, x, be, m)
        return Posterior(_affine(ad, x, bd, m), eps)


def ddim_step(t: Node, post: Posterior) -> Tensor:
    r"""The first-order step to ``t`` from a state whose posterior means are ``post``:
    ``x_t = alpha_t D_s + sigma_t eps_s`` (DDIM with eta = 0 = DPM-Solver-1 =
    DPM-Solver++(1); equal to ``(sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s`` and to
    ``(alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s``, and finite where they are not:
    ``alpha_s = 0`` or ``sigma_t = 0``)."""
    if t.sigma == 0.0:
        return post.D * t.alpha
    return _affine(t.alpha, post.D, t.sigma, post.eps)


Noise = Callable[[int, Tensor], Tensor]
"""Fresh standard normal noise for step ``i`` shaped like the given tensor: ``noise(i, x)``
(the stochastic samplers' source of randomness, seeded by a generator or read from a
Brownian path)."""


class Sampler(ABC):
    """A fixed-step sampler of the semi-linear probability-flow ODE (or of an SDE with the
    same marginals). Subclasses set the class facts and implement :meth:`step`; a sampler
    that calls the model off the grid (singlestep stages, EDM's churn) also overrides
    :meth:`evaluation_times`.

    Attributes:
        name: the registered name (``solver="dpmpp_2m"``).
        order: the declared global order in the step size in ``lambda`` (None: none claimed).
        multistep: reuses earlier model evaluations.
        stochastic: draws fresh noise (``noise`` in :meth:`step`).
    """

    name: ClassVar[str]
    order: ClassVar[float | None]
    multistep: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False

    def prepare(self, grid: list[Node], scheduler: Scheduler) -> dict:
        """Host facts a solve on ``grid`` needs that its nodes do not hold (a singlestep
        method's stage nodes), computed once before the loop; each solve's ``memory``
        starts as a shallow copy of it (default: ``{}``)."""
        return {}

    def evaluation_times(self, grid: list[Node], scheduler: Scheduler) -> list[float]:
        """Every time the model will be called at on ``grid`` (default: every grid time but
        the last)."""
        return [n.t for n in grid[:-1]]

    @abstractmethod
    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        """The state at ``grid[i + 1]`` from ``x`` at ``grid[i]``. ``memory`` is a dict kept
        across the steps of one solve (a multistep method's history)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SamplerLoop:
    """Run a :class:`Sampler` over a grid: ``(x_N, [x_k for k in record], finite, nfe)``.

    The grid's nodes, the model's times and its conversion coefficients are all prepared
    on the host before the loop, so the loop never reads from the device: finiteness of
    each state is recorded there (:class:`~flowsolve._core.finite.FiniteRecord`) and read
    once at the end (on the CPU, at once).

    Args:
        sampler: the method.
        model, path, prediction: the model and what it predicts on ``path``.
        grid: ``t_0 < ... < t_N`` (host floats, noise to data).
        x_like: a tensor with the state's dtype and device.
        record: grid indices whose states to keep.
    """

    def __init__(self, sampler: Sampler, model: Field, path: AffineGaussianPath,
                 prediction: str, grid: Sequence[float], x_like: Tensor,
                 record: Sequence[int] = ()):
        self.sampler, self.record = sampler, list(record)
        self.grid = list(grid)
        self.nodes = nodes(path.scheduler, self.grid)
        self.prepared = sampler.prepare(self.nodes, path.scheduler)
        times = sampler.evaluation_times(self.nodes, path.scheduler)
        self.denoiser = Denoiser(model, path, prediction, times, x_like, sampler.name)

    def __call__(self, x: Tensor, noise: Noise | None = None, check_finite: bool = True
                 ) -> tuple[Tensor, list[Tensor], FiniteRecord | None]:
        saved = [x] if 0 in self.record else []
        finite = FiniteRecord(x.device) if check_finite else None
        memory: dict = dict(self.prepared)
        for i in range(len(self.grid) - 1):
            x = self.sampler.step(x, i, self.nodes, self.denoiser, memory, noise)
            if finite is not None and finite.add(x, i):
                break
            if i + 1 in self.record:
                saved.append(x)
        return x, saved, finite

    @property
    def nfe(self) -> int:
        return self.denoiser.nfe

    def check(self, finite: FiniteRecord | None) -> None:
        """Raise :class:`~flowsolve._core.errors.NonFiniteStateError` naming the first
        non-finite step."""
        n = None if finite is None else finite.first_bad()
        if n is not None:
            g = self.grid
            raise NonFiniteStateError(
                self.sampler.name, g[n + 1], f"the state became non-finite in step {n + 1} of "
                f"{len(g) - 1}, from t={g[n]:.6g} to t={g[n + 1]:.6g}")
