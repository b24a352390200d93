r"""Discrete-time diffusion models (DDPM, Stable Diffusion, iDDPM) as flowsolve paths and fields.

Such a model was trained on a table ``abar_n``, ``n = 0 .. T - 1`` (``n = 0`` the least
noisy), with ``x_n = sqrt(abar_n) x1 + sqrt(1 - abar_n) x0``, and is called as
``model(x, timesteps)``. In flowsolve's clock (t = 0 noise, t = 1 data) timestep ``n``
sits at ``t_n = 1 - (n + 1) / T``, and :class:`DiscreteVPScheduler` makes the table a
continuous variance-preserving schedule the way DPM-Solver's ``NoiseScheduleVP("discrete")``
does: ``log alpha_t`` is piecewise linear between the knots ``(t_n, log sqrt(abar_n))``,
and from ``t = 1 - 1/T`` it runs linearly on to ``log alpha = 0`` at ``t = 1`` (where
``sigma = 0``: the data; DPM-Solver extends its first segment instead), with
``sigma_t = sqrt(1 - alpha_t^2)``. :class:`DiscreteTimeModel` turns the model into a
flowsolve field ``(x, t) -> prediction``, calling it at ``timesteps = T (1 - t) - 1``
(continuous between the integers, as DPM-Solver's discrete wrapper passes them).

Example:
    >>> import torch, flowsolve as fs
    >>> sched = DiscreteVPScheduler.from_betas("linear")
    >>> n = torch.tensor([999, 500, 0])
    >>> torch.allclose(sched(sched.time_of(n)).alpha_t ** 2, sched.alphas_cumprod[n])
    True
    >>> eps_model = DiscreteTimeModel(lambda x, steps: 0 * x, sched, "epsilon")
    >>> eps_model.timesteps(torch.tensor([0.0, 0.5, 0.999], dtype=torch.float64)).tolist()
    [999.0, 499.0, 0.0]
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._core.checks import as_time, check_unit_interval
from .._core.types import restrict_rows
from .affine import AffineGaussianPath, canonical_prediction
from .schedules import Scheduler

__all__ = ["BETA_SCHEDULES", "DiscreteVPScheduler", "DiscreteTimeModel", "beta_table"]

BETA_SCHEDULES: dict[str, tuple[float | None, float | None]] = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (None, None),
}
"""The standard beta schedules and their default ``(beta_start, beta_end)``: ``"linear"``
(DDPM, Ho et al. 2020), ``"scaled_linear"`` (Stable Diffusion: linear in sqrt(beta)),
``"squaredcos_cap_v2"`` (iDDPM's cosine, Nichol & Dhariwal 2021; no start / end)."""


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite real number; got {type(v).__name__} {v!r}")
    return float(v)


def beta_table(kind: str, T: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> Tensor:
    r"""The betas ``(T,)`` of a standard schedule, in float64.

    * ``"linear"``: ``beta_n = linspace(beta_start, beta_end, T)`` (default 1e-4 .. 0.02);
    * ``"scaled_linear"``: ``beta_n = linspace(sqrt(beta_start), sqrt(beta_end), T)^2``
      (default 0.00085 .. 0.012);
    * ``"squaredcos_cap_v2"``: ``beta_n = min(1 - f((n+1)/T) / f(n/T), 0.999)`` with
      ``f(s) = cos((s + 0.008) / 1.008 * pi / 2)^2``.

    ``alphas_cumprod = cumprod(1 - beta)``. The same formulas as diffusers' schedulers,
    which evaluate them in float32.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; accepted: "
                         f"{', '.join(BETA_SCHEDULES)}")
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"T must be a positive int (the number of timesteps); got {T!r}")
    T = int(T)
    default_start, default_end = BETA_SCHEDULES[kind]
    if default_start is None:
        if beta_start is not None or beta_end is not None:
            raise ValueError(f"the {kind!r} schedule has no beta_start / beta_end; got "
                             f"beta_start={beta_start!r}, beta_end={beta_end!r}")
        n = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((n + 0.008) / 1.008 * (math.pi / 2)) ** 2
        return torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    start = _number("beta_start", default_start if beta_start is None else beta_start)
    end = _number("beta_end", default_end if beta_end is None else beta_end)
    if not 0 < start <= end < 1:
        raise ValueError(f"the {kind!r} schedule needs 0 < beta_start <= beta_end < 1; got "
                         f"beta_start={start!r}, beta_end={end!r}")
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    return torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2


def _as_float(t: Tensor | float) -> Tensor:
    """``t`` as a floating tensor (numbers and integer tensors in torch's default dtype, as
    the other schedulers take them)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _check_table(alphas_cumprod) -> Tensor:
    """The alpha-bar table as a float64 CPU tensor, or the error naming what is wrong."""
    try:
        table = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"alphas_cumprod must be a 1-d tensor, array or sequence of numbers; "
                        f"got {type(alphas_cumprod).__name__}") from err
    accepted = ("alphas_cumprod must be a 1-d table of T >= 1 finite values in (0, 1], "
                "strictly decreasing (index 0 the least noisy timestep)")
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError(f"{accepted}; got shape {tuple(table.shape)}")
    bad = ~torch.isfinite(table) | (table <= 0) | (table > 1)
    if bool(bad.any()):
        n = int(bad.nonzero()[0])
        hint = (" (a zero terminal SNR table: clip its last entry to a small positive value, "
                "as diffusers does with 2**-24)" if table[n] == 0 and n == len(table) - 1
                else "")
        raise ValueError(f"{accepted}; got alphas_cumprod[{n}] = {table[n].item()!r}{hint}")
    up = table[1:] >= table[:-1]
    if bool(up.any()):
        n = int(up.nonzero()[0])
        raise ValueError(f"{accepted}; got alphas_cumprod[{n}] = {table[n].item()!r} <= "
                         f"alphas_cumprod[{n + 1}] = {table[n + 1].item()!r}")
    if table[-1] == 1:
        raise ValueError(f"{accepted}; got a table with no noise (alphas_cumprod[-1] = 1)")
    return table


class DiscreteVPScheduler(Scheduler):
    r"""The variance-preserving schedule of an alpha-bar table, continuous in t.

    With ``T`` entries ``abar_n`` and knots ``t_j = j / T`` (``j = T - 1 - n`` holds
    ``L_j = log sqrt(abar_n)``; ``L_T = 0`` at ``t = 1``), on ``t_j <= t <= t_{j+1}``:

    ``log alpha_t = L_j + (T t - j) (L_{j+1} - L_j)``, ``alpha_t = exp(log alpha_t)``,
    ``sigma_t = sqrt(1 - alpha_t^2)`` (as ``sqrt(-expm1(2 log alpha_t))``),
    ``d alpha_t = alpha_t L'``, ``d sigma_t = -alpha_t^2 L' / sigma_t`` with the slope
    ``L' = T (L_{j+1} - L_j)``: exact for the interpolation, one-sided at a knot (the
    segment above it, toward the data; at ``t = 1`` the last segment's), and ``d sigma_t``
    is infinite at ``t = 1`` (use :meth:`sigma_d_sigma` ``= -alpha_t^2 L'``, finite).
    ``lambda_t = log alpha_t - log(1 - alpha_t^2) / 2``; its inverse is exact:
    ``log alpha = -log(1 + e^{-2 lambda}) / 2``, then the piecewise-linear interpolation
    inverted. ``alpha_0 = sqrt(abar_{T-1}) > 0``, so the source ``N(0, I)`` is the usual
    approximation (as for :class:`~flowsolve.paths.schedules.LinearVPScheduler`).

    Args:
        alphas_cumprod: the table ``abar_0 > abar_1 > ... > abar_{T-1} > 0`` (``abar_0 <=
            1``), any 1-d tensor, array or sequence (e.g. a diffusers scheduler's
            ``alphas_cumprod``); kept in float64.

    Attributes:
        T: the number of timesteps.
        alphas_cumprod: the table, float64, ``(T,)``.

    Example:
        >>> import torch
        >>> s = DiscreteVPScheduler([0.9, 0.5, 0.1])
        >>> s.time_of(torch.tensor([0, 1, 2])).tolist()  # t_n = 1 - (n + 1) / T
        [0.6666666666666667, 0.33333333333333337, 0.0]
        >>> t = torch.tensor([1 / 3, 1.0], dtype=torch.float64)
        >>> [round(a, 12) for a in (s.alpha(t) ** 2).tolist()], s.sigma(t)[1].item()
        ([0.5, 1.0], 0.0)
    """

    def __init__(self, alphas_cumprod: Tensor | Sequence[float]):
        table = _check_table(alphas_cumprod)
        self.alphas_cumprod = table
        self.T = len(table)
        # knots in increasing t: L_j at t = j / T, j = 0 .. T (L_T = 0 at t = 1)
        self._knots = torch.cat([0.5 * torch.log(table.flip(0)),
                                 torch.zeros(1, dtype=torch.float64)])
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {
            (torch.float64, self._knots.device): self._knots}
        self._made_by: str | None = None

    @classmethod
    def from_betas(cls, kind: str = "linear", T: int = 1000, beta_start: float | None = None,
                   beta_end: float | None = None) -> DiscreteVPScheduler:
        """The scheduler of a standard beta schedule (:func:`beta_table`, in float64):
        ``alphas_cumprod = cumprod(1 - beta)``."""
        betas = beta_table(kind, T, beta_start, beta_end)
        sched = cls(torch.cumprod(1 - betas, 0))
        args = [repr(kind), f"T={int(T)!r}"]
        args += [f"{k}={v!r}" for k, v in (("beta_start", beta_start), ("beta_end", beta_end))
                 if v is not None]
        sched._made_by = f"DiscreteVPScheduler.from_betas({', '.join(args)})"
        return sched

    def __repr__(self) -> str:
        if self._made_by is not None:
            return self._made_by
        digest = hashlib.sha256(self.alphas_cumprod.numpy().tobytes()).hexdigest()[:16]
        first, last = self.alphas_cumprod[0].item(), self.alphas_cumprod[-1].item()
        return (f"DiscreteVPScheduler(<T={self.T} alphas_cumprod {first!r} .. {last!r}, "
                f"sha256 {digest}>)")

    # -- the timestep clock ----------------------------------------------------------------
    def time_of(self, timesteps: Tensor | float) -> Tensor:
        """``t = 1 - (n + 1) / T`` of timesteps ``n`` (any real n in [-1, T - 1]; float64
        for integer input)."""
        n = torch.as_tensor(timesteps)
        n = n if n.is_floating_point() else n.to(torch.float64)
        return 1 - (n + 1) / self.T

    def timestep_of(self, t: Tensor | float) -> Tensor:
        """``n = T (1 - t) - 1``, the model's timestep at ``t`` (continuous; -1 at t = 1)."""
        t = _as_float(t)
        check_unit_interval(t)
        return (self.T - 1) - self.T * t

    # -- the schedule ----------------------------------------------------------------------
    def _knots_like(self, t: Tensor) -> Tensor:
        key = (t.dtype, t.device)
        if key not in self._cache:
            self._cache[key] = self._knots.to(device=t.device, dtype=t.dtype)
        return self._cache[key]

    def _log_alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(log alpha_t, its slope in t) of the piecewise-linear interpolation."""
        knots = self._knots_like(t)
        u = t * self.T
        near = torch.round(u)
        # a knot time computed in floating point (1 - (n + 1) / T) lands on the knot
        u = torch.where((u - near).abs() <= 8 * torch.finfo(t.dtype).eps * near, near, u)
        j = torch.floor(u).clamp(0, self.T - 1)
        k = j.long()
        lo, hi = knots[k], knots[k + 1]
        return lo + (u - j) * (hi - lo), (hi - lo) * self.T

    def _values(self, t):
        log_a, slope = self._log_alpha(t)
        alpha = torch.exp(log_a)
        sigma = torch.sqrt(0.0 - torch.expm1(2 * log_a))
        a2_slope = alpha * alpha * slope
        d_sigma = torch.where(a2_slope == 0, torch.zeros_like(sigma), -a2_slope / sigma)
        return alpha, sigma, alpha * slope, d_sigma

    def sigma_squared(self, t):
        """``sigma_t^2 = -expm1(2 log alpha_t)``."""
        t = _as_float(t)
        check_unit_interval(t)
        return 0.0 - torch.expm1(2 * self._log_alpha(t)[0])

    def sigma_d_sigma(self, t):
        """``sigma_t sigma'_t = -alpha_t^2 L'``: finite at t = 1, where ``sigma'_t`` is not."""
        t = _as_float(t)
        check_unit_interval(t)
        log_a, slope = self._log_alpha(t)
        return -torch.exp(2 * log_a) * slope

    def log_snr(self, t):
        """``log alpha_t - log(-expm1(2 log alpha_t)) / 2`` (``inf`` at t = 1)."""
        t = _as_float(t)
        check_unit_interval(t)
        log_a = self._log_alpha(t)[0]
        return log_a - 0.5 * torch.log(-torch.expm1(2 * log_a))

    def snr_inverse(self, snr):
        """Exact: ``log alpha = -log(1 + snr^-2) / 2``, located among the knots and
        interpolated back to t (computed in float64, returned in ``snr``'s dtype)."""
        snr = _as_float(snr)
        lam = torch.log(snr.to(torch.float64))
        self._check_snr_range(lam, snr.dtype)
        knots = self._knots.to(lam.device)
        log_a = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        idx = torch.searchsorted(knots, log_a.reshape(-1).contiguous()).reshape(log_a.shape)
        k = (idx - 1).clamp(0, self.T - 1)
        lo, hi = knots[k], knots[k + 1]
        w = torch.where(hi > lo, (log_a - lo) / (hi - lo), torch.zeros_like(log_a))
        return ((k + w.clamp(0, 1)) / self.T).clamp(0, 1).to(snr.dtype)


class DiscreteTimeModel:
    r"""A model called as ``model(x, timesteps)`` on the integer scale ``0 .. T - 1`` as a
    flowsolve field ``(x, t) -> prediction``.

    ``field(x, t) = model(x, T (1 - t) - 1)``, the timesteps a float tensor ``(B,)`` in
    ``t``'s (= ``x``'s) dtype, continuous between the integers (DPM-Solver's discrete
    wrapper); ``t`` is a number, 0-d or ``(B,)``, in [0, 1]. The prediction kind is kept:
    pass :attr:`prediction` and :attr:`path` to the samplers and conversions
    (``sample(field, x, "dpmpp_2m", path=field.path, prediction=field.prediction, ...)``).

    Args:
        model: ``(x, timesteps) -> Tensor`` shaped like ``x``.
        scheduler: the :class:`DiscreteVPScheduler` of the table it was trained on.
        prediction: ``"epsilon"`` (the noise), ``"v"`` (``alpha eps - sigma x1``) or ``"x1"``
            (the data); diffusers' names ``"v_prediction"`` and ``"sample"`` are accepted.

    Example:
        >>> import torch
        >>> sched = DiscreteVPScheduler.from_betas("scaled_linear", T=10)
        >>> f = DiscreteTimeModel(lambda x, n: x * n[:, None], sched, "v_prediction")
        >>> f(torch.ones(2, 1, dtype=torch.float64), 0.5).flatten().tolist(), f.prediction
        ([4.0, 4.0], 'v')
    """

    _DIFFUSERS = {"v_prediction": "v", "sample": "x1"}

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor],
                 scheduler: DiscreteVPScheduler, prediction: str = "epsilon"):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, timesteps); got "
                            f"{type(model).__name__}")
        if not isinstance(scheduler, DiscreteVPScheduler):
            raise TypeError(f"scheduler must be a DiscreteVPScheduler (the model's alpha-bar "
                            f"table); got {type(scheduler).__name__}")
        if not isinstance(prediction, str):
            raise TypeError(f"prediction must be a string; got {type(prediction).__name__}")
        kind = canonical_prediction(self._DIFFUSERS.get(prediction, prediction), "prediction")
        if kind not in ("epsilon", "v", "x1"):
            raise ValueError(f"a discrete-time diffusion model predicts 'epsilon', 'v' "
                             f"('v_prediction') or 'x1' ('sample'); got {prediction!r}")
        self.model, self.scheduler, self.prediction = model, scheduler, kind

    @property
    def path(self) -> AffineGaussianPath:
        """The :class:`~flowsolve.paths.affine.AffineGaussianPath` of the scheduler."""
        return AffineGaussianPath(self.scheduler)

    def rows(self, index: Tensor) -> DiscreteTimeModel:
        """The field of the samples ``index`` (see :func:`~flowsolve._core.types.restrict_rows`)."""
        return DiscreteTimeModel(restrict_rows(self.model, index), self.scheduler,
                                 self.prediction)

    def timesteps(self, t: Tensor | float) -> Tensor:
        """``T (1 - t) - 1``: the model's timesteps at ``t``."""
        return self.scheduler.timestep_of(t)

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x)
        steps = (self.scheduler.T - 1) - self.scheduler.T * t
        steps = steps.expand(x.shape[0]) if steps.dim() == 0 else steps
        out = self.model(x, steps)
        if not torch.is_tensor(out) or out.shape != x.shape:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"model(x, timesteps) must return a tensor shaped like x "
                             f"{tuple(x.shape)}; got {shape}")
        return out

    def __repr__(self) -> str:
        return (f"DiscreteTimeModel({self.model!r}, {self.scheduler!r}, "
                f"prediction={self.prediction!r})")
