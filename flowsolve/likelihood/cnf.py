r"""Exact CNF log-likelihoods by the instantaneous change of variables.

For the flow ``dx/dt = u_t(x)`` carrying the source ``p_0`` at t = 0 to ``p_1`` at t = 1,

    log p_1(x) = log p_0(x_0) - int_0^1 div u_t(x_t) dt,     x_1 = x,

(Chen et al. 2018; Grathwohl et al. 2019). flowsolve integrates the augmented state
``(x_t, l_t)`` with ``dl/dt = div u_t(x_t)``, ``l_1 = 0``, *backwards* from t = 1 to t = 0
through the ODE front door (:func:`flowsolve.ode.solve.sample`), so every registered solver,
fixed-step or adaptive, is available, the NFE is counted, and for an adaptive solver the
log-density channel is part of the error control. Then ``log p_1(x) = log p_0(x_0) + l_0``.

The divergence is exact (:mod:`~flowsolve.likelihood.divergence`, vectorised) or
Hutchinson's estimate with ``k`` probes drawn once per solve and carried as ``k``
log-density channels: the result is their mean, with the standard error across channels.

A score model (diffusion) is evaluated through its probability-flow ODE: see
:func:`score_log_likelihood`. Whole data sets (batched, resumable, sharded) are in
:mod:`flowsolve.likelihood.dataset_likelihood`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._core.types import Field
from ..paths.affine import AffineGaussianPath
from ..paths.fields import probability_flow
from .augmented import Prior, standard_normal_log_prob
from .augmented import check_interval as _check_interval
from .augmented import check_points as _check_points
from .augmented import prior_log_prob as _prior_log_prob
from .augmented import probe_stderr as _probe_stderr
from .augmented import solve_augmented as _solve_augmented

__all__ = ["LikelihoodResult", "log_likelihood", "score_log_likelihood"]


@dataclass(frozen=True)
class LikelihoodResult:
    """What :func:`log_likelihood` returns (``B`` samples).

    Attributes:
        log_prob: ``log p_{t_hi}(x)`` in nats, ``(B,)`` (the mean over probe channels for
            Hutchinson).
        stderr: ``(B,)`` standard error of the Hutchinson estimate across its ``k`` probe
            channels (NaN for ``k = 1``); ``None`` for the exact divergence.
        x0: the source points ``x_{t_lo}`` the flow maps ``x`` to, shaped like ``x``.
        prior_log_prob: ``log p_0(x0)``, ``(B,)``.
        delta_log_prob: ``-int div u dt``, ``(B,)`` (channel mean).
        nfe: field evaluations counted by the front door.
        divergence: ``"exact (<method>)"`` or ``"hutchinson (<probe>, k=<k>)"``.
        solver: the solver that ran.
        nfe_per_sample: ``(B,)`` int64, the evaluations each sample took part in, with
            ``step_control="per_sample"``; None otherwise.
    """

    log_prob: Tensor
    stderr: Tensor | None
    x0: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    nfe: int
    divergence: str
    solver: str
    nfe_per_sample: Tensor | None = None


def log_likelihood(
    field: Field,
    x: Tensor,
    *,
    prior: Prior | Any | None = None,
    solver: str = "dopri5",
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    divergence: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    t_interval: tuple[float, float] = (0.0, 1.0),
    create_graph: bool = False,
    adjoint: bool = False,
    chunk_size: int | None = None,
    **solver_options: Any,
) -> LikelihoodResult:
    r"""``log p_1(x) = log p_0(x_0) - int_0^1 div u_t(x_t) dt`` for the flow of ``field``.

    Args:
        field: the velocity ``(x, t) -> Tensor``.
        x: points ``(B, *event_shape)``; use float64 for tight answers.
        prior: the source density at ``t_lo``: ``None`` for ``N(0, I)``, an object with
            ``log_prob`` (e.g. ``flowsolve.StandardNormal(d, std)`` or
            ``torch.distributions.Independent(Normal(...), n_event_dims)``) or a callable
            -> (B,); any other output shape (a per-element ``Normal``, ``(B, 1)``), and any
            inf or NaN, raise ValueError naming the prior (and the first such sample).
        solver, steps, rtol, atol: any solver of :data:`flowsolve.ode.solve.ODE_SOLVERS`;
            fixed-step solvers need ``steps``, adaptive ones take ``rtol`` / ``atol``
            (default 1e-5). Extra keywords go to the front door.
        divergence: ``"exact"`` (method chosen by
            :func:`~flowsolve.likelihood.divergence.auto_method`), one of the exact methods by
            name, or ``"hutchinson"``.
        n_probes, probe, generator: Hutchinson's ``k`` probes (``"rademacher"`` or
            ``"gaussian"``), drawn once from ``generator`` and fixed for the whole solve
            (None: a fresh unseeded generator; torch's global RNG is never used).
        t_interval: ``(t_lo, t_hi)``: the result is ``log p_{t_hi}(x)`` with the prior at
            ``t_lo`` (e.g. ``(1e-5, 1.0)`` where a field is singular at t = 0).
        create_graph: keep the graph through the divergence so the result can be
            differentiated with respect to the field's parameters (maximum-likelihood
            fine-tuning; torchdiffeq and ``fast_*`` solvers, not scipy's: ValueError);
            otherwise the result is detached.
        adjoint: with ``create_graph``: differentiate by the adjoint method (memory
            independent of the number of steps; torchdiffeq solvers; ``field`` must be the
            ``nn.Module`` holding the parameters). The backward solve's evaluations are not
            in ``nfe`` unless the gradient was computed before reading it.

    Returns:
        :class:`LikelihoodResult`.
    """
    _check_points(x)
    t_lo, t_hi = _check_interval(t_interval)
    res = _solve_augmented(field, x, t_hi, t_lo, solver=solver, steps=steps, rtol=rtol,
                           atol=atol, divergence=divergence, n_probes=n_probes, probe=probe,
                           generator=generator, create_graph=create_graph, adjoint=adjoint,
                           chunk_size=chunk_size, solver_options=solver_options)
    channels = res.integral  # int_{t_hi}^{t_lo} div = -int_{t_lo}^{t_hi} div, per probe
    with torch.enable_grad() if create_graph else torch.no_grad():
        prior_lp = _prior_log_prob(prior, res.x)
    per_channel = prior_lp[:, None] + channels
    stderr = _probe_stderr(per_channel, prior_lp, res.hutchinson)
    return LikelihoodResult(
        log_prob=per_channel.mean(1), stderr=stderr, x0=res.x, prior_log_prob=prior_lp,
        delta_log_prob=channels.mean(1), nfe=res.nfe, divergence=res.divergence,
        solver=solver, nfe_per_sample=res.nfe_per_sample,
    )


def score_log_likelihood(
    score: Field, x: Tensor, path: AffineGaussianPath, *, t_interval=(1e-5, 1.0), **kwargs
) -> LikelihoodResult:
    """Log-likelihood of a score model through its probability-flow ODE on ``path``
    (``u = (alpha'/alpha) x + (sigma^2 alpha'/alpha - sigma sigma') s``), with the prior
    ``N(0, c^2 I)``, ``c = path.source_std`` (``sigma_max`` for VE), at ``t_lo``:
    ``log p_0(z) = -|z|^2 / (2 c^2) - d log c - (d/2) log(2 pi)`` over the ``d`` entries of a
    sample (pass ``prior=`` for another). The velocity is singular where alpha_t = 0, so
    ``t_lo`` defaults to 1e-5 at the noise end, where the prior is a close approximation
    of p_{t_lo}. (Song et al. 2021 also cut at 1e-5, but at the *data* end, tau = 1e-5 in
    their reversed time, our t_hi = 1 - 1e-5, where a score trained on sigma_t > 0 is
    singular; pass ``t_interval=(1e-5, 1 - 1e-5)`` for that.) Other keywords as
    :func:`log_likelihood`."""
    field = probability_flow(score, path, interval=tuple(t_interval))
    kwargs.setdefault("prior", lambda z: standard_normal_log_prob(z, path.source_std))
    return log_likelihood(field, x, t_interval=t_interval, **kwargs)
