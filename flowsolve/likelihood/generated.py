r"""The log-density of generated samples, computed in the sampling direction.

Sampling integrates ``dx/dt = u_t(x)`` from noise ``x_0 ~ p_0`` (t = t_lo) to data
(t = t_hi). Integrating the augmented state ``(x_t, l_t)`` with ``dl/dt = div u_t(x_t)``,
``l_{t_lo} = 0``, *forwards* in the same solve gives the samples and their log-density
under the flow at once:

    log p_1(x_1) = log p_0(x_0) - int_{t_lo}^{t_hi} div u_t(x_t) dt = log p_0(x_0) - l_{t_hi}.

Every ODE solver of :func:`flowsolve.ode.solve.sample` is available except the low-NFE
samplers (their update is an exponential-integrator step of the sample, not a field on the
augmented state); an adaptive solver controls the error of the log-density channel too.
The divergence is exact or Hutchinson's estimate with ``k`` fixed probes carried as ``k``
channels (result: their mean, with its standard error across channels), as in
:func:`flowsolve.likelihood.cnf.log_likelihood`, which computes the same number from the
other end (data -> noise).

With ``create_graph=True`` both the samples and their log-density stay differentiable with
respect to the field's parameters and to ``x0`` (the reparameterisation gradient), e.g. for
a Boltzmann generator trained by the reverse KL divergence

    KL(p_1 || p*) = E_{x_0 ~ p_0}[log p_1(x_1(x_0)) - log p*(x_1(x_0))]

(an unnormalised target shifts it by the constant log Z), whose Monte-Carlo estimate over
one batch of ``x0`` is differentiated through both ``x_1(x_0)`` and ``log p_1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._core.types import Field
from ..ode.solve import ODE_SOLVERS
from .augmented import (
    Prior,
    check_interval,
    check_points,
    prior_log_prob,
    probe_stderr,
    solve_augmented,
)

__all__ = ["GeneratedLikelihood", "sample_log_likelihood"]


@dataclass(frozen=True, eq=False)
class GeneratedLikelihood:
    """What :func:`sample_log_likelihood` returns (``B`` samples).

    Attributes:
        x: the generated samples ``x_{t_hi}``, shaped like ``x0``.
        log_prob: ``log p_{t_hi}(x)`` in nats, ``(B,)`` (the mean over probe channels for
            Hutchinson).
        stderr: ``(B,)`` standard error of the Hutchinson estimate across its ``k`` probe
            channels (NaN for ``k = 1``); ``None`` for the exact divergence.
        x0: the source points the samples were generated from.
        prior_log_prob: ``log p_0(x0)``, ``(B,)``.
        delta_log_prob: ``-int div u dt``, ``(B,)`` (channel mean).
        nfe: field evaluations of the one solve (samples and densities together).
        divergence: ``"exact (<method>)"`` or ``"hutchinson (<probe>, k=<k>)"``.
        solver: the solver that ran.
        nfe_per_sample: ``(B,)`` int64, the evaluations each sample took part in, with
            ``step_control="per_sample"``; None otherwise.
    """

    x: Tensor
    log_prob: Tensor
    stderr: Tensor | None
    x0: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    nfe: int
    divergence: str
    solver: str
    nfe_per_sample: Tensor | None = None


def _accepted_solvers() -> str:
    return ", ".join(n for n, i in ODE_SOLVERS.items() if not i.needs_path)


def _check_solver(solver: str) -> None:
    """Any ODE solver of the front door except the low-NFE samplers."""
    info = ODE_SOLVERS.get(solver) if isinstance(solver, str) else None
    if info is None:
        raise ValueError(f"solver={solver!r} is not an ODE solver; accepted: "
                         f"{_accepted_solvers()}")
    if info.needs_path:
        raise ValueError(
            f"solver={solver!r} is a low-NFE sampler: its update is an exponential-integrator "
            "step of the sample through the denoiser, not a field on the augmented state "
            "(x, log-density), so it cannot carry the log-density. Accepted: "
            f"{_accepted_solvers()}")


def sample_log_likelihood(
    field: Field,
    x0: Tensor,
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
) -> GeneratedLikelihood:
    r"""Generate ``x = x_{t_hi}`` from ``x0`` and return ``log p_{t_hi}(x) = log p_0(x0) -
    int_{t_lo}^{t_hi} div u_t(x_t) dt`` from the same forward solve.

    Args:
        field: the velocity ``(x, t) -> Tensor``.
        x0: source points ``(B, *event_shape)`` at ``t_lo`` (float64 for tight answers).
        prior: the source density at ``t_lo``, as :func:`flowsolve.likelihood.cnf.log_likelihood`
            (None: ``N(0, I)``; an object with ``log_prob``; a callable -> (B,)).
        solver, steps, rtol, atol: any solver of :data:`flowsolve.ode.solve.ODE_SOLVERS`
            except the low-NFE samplers (``needs_path``: ValueError); fixed-step solvers need
            ``steps``, adaptive ones take ``rtol`` / ``atol``. Extra keywords go to
            :func:`~flowsolve.ode.solve.sample`.
        divergence, n_probes, probe, generator: as :func:`~flowsolve.likelihood.cnf.log_likelihood`
            (Hutchinson's probes drawn once from ``generator`` and fixed for the solve).
        t_interval: ``(t_lo, t_hi)``, ``0 <= t_lo < t_hi <= 1``.
        create_graph: keep the graph through the solve and the divergence, so that ``x``
            and ``log_prob`` can be differentiated with respect to the field's parameters
            and to ``x0`` (and the prior's parameters): the reverse-KL loss
            ``mean_i [log p_1(x_i) - log p*(x_i)]`` of a Boltzmann generator, or a
            maximum-likelihood objective. torchdiffeq's and the ``fast_*`` solvers, and
            ``step_control="per_sample"`` (backpropagation through its steps); scipy's:
            ValueError. Otherwise every result is detached.
        adjoint: with ``create_graph``: differentiate by the adjoint method (memory
            independent of the number of steps; torchdiffeq solvers, shared step control;
            ``field`` must be the ``nn.Module`` holding the parameters). The backward
            solve's evaluations are not in ``nfe``.
        chunk_size: cotangents per backward / vmap chunk of the exact divergence (bounds
            memory), as :func:`~flowsolve.likelihood.divergence.value_and_divergence`.

    Returns:
        :class:`GeneratedLikelihood`.

    >>> import torch, flowsolve as fs
    >>> u = lambda x, t: x                   # x_t = e^t x_0: p_1 = N(0, e^2 I)
    >>> x0 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> res = sample_log_likelihood(u, x0, rtol=1e-10, atol=1e-10)
    >>> exact = torch.distributions.Normal(0.0, torch.e).log_prob(res.x).sum(1)
    >>> bool(torch.allclose(res.log_prob, exact, atol=1e-8)), res.solver
    (True, 'dopri5')
    """
    check_points(x0, "x0")
    _check_solver(solver)
    t_lo, t_hi = check_interval(t_interval)
    with torch.enable_grad() if create_graph else torch.no_grad():  # a bad prior fails fast
        prior_lp = prior_log_prob(prior, x0)
    res = solve_augmented(field, x0, t_lo, t_hi, solver=solver, steps=steps, rtol=rtol,
                          atol=atol, divergence=divergence, n_probes=n_probes, probe=probe,
                          generator=generator, create_graph=create_graph, adjoint=adjoint,
                          chunk_size=chunk_size, solver_options=solver_options)
    channels = -res.integral  # -int div, one column per probe
    per_channel = prior_lp[:, None] + channels
    return GeneratedLikelihood(
        x=res.x, log_prob=per_channel.mean(1),
        stderr=probe_stderr(per_channel, prior_lp, res.hutchinson), x0=x0,
        prior_log_prob=prior_lp, delta_log_prob=channels.mean(1), nfe=res.nfe,
        divergence=res.divergence, solver=solver, nfe_per_sample=res.nfe_per_sample,
    )
