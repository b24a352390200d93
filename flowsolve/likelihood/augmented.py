r"""The augmented state of the instantaneous change of variables, shared by
:mod:`~flowsolve.likelihood.cnf` (data -> noise) and :mod:`~flowsolve.likelihood.generated`
(noise -> data).

For the flow ``dx/dt = u_t(x)`` the state ``z = [x.flatten(1), l]`` obeys

    dx/dt = u_t(x),      dl/dt = div u_t(x)

(one ``l`` column per Hutchinson probe, one for the exact divergence), so that
``log p_b(x_b) = log p_a(x_a) - (l_b - l_a)`` between any two times ``a`` and ``b``.
:class:`AugmentedSystem` is that right-hand side as a field for
:func:`flowsolve.ode.solve.sample`; the helpers here check the inputs, set up the
divergence, evaluate the prior and the Hutchinson standard error.

>>> import torch
>>> sys = AugmentedSystem(lambda x, t: -x, torch.Size([3, 2]), "auto", None, False, None)
>>> sys(torch.ones(3, 3, dtype=torch.float64), torch.tensor(0.5))[0].tolist()  # div(-x) = -2
[-1.0, -1.0, -2.0]
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._core.types import Field, restrict_rows
from ..ode.solve import ODE_SOLVERS, sample
from .divergence import EXACT_METHODS, PROBE_KINDS, make_probes, value_and_divergence

__all__ = [
    "Prior",
    "AugmentedSystem",
    "standard_normal_log_prob",
    "prior_fn",
    "prior_log_prob",
    "check_points",
    "AugmentedSolve",
    "solve_augmented",
    "check_interval",
    "check_gradient_options",
    "divergence_setup",
    "divergence_label",
    "probe_stderr",
    "shown_name",
    "qualname",
    "FUNCTIONS",
]

Prior = Callable[[Tensor], Tensor]


def standard_normal_log_prob(x: Tensor, std: float = 1.0) -> Tensor:
    """``log N(x; 0, std^2 I)`` summed over the event dims, ``(B,)``."""
    z = x.flatten(1) / std
    d = z.shape[1]
    return -0.5 * (z * z).sum(1) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def prior_fn(prior: Prior | Any | None) -> Prior:
    if prior is None:
        return standard_normal_log_prob
    if hasattr(prior, "log_prob") and callable(prior.log_prob):
        return prior.log_prob
    if callable(prior):
        return prior
    raise TypeError(
        "prior must be None (standard normal), an object with .log_prob(x) or a callable "
        f"x -> (B,); got {type(prior).__name__}"
    )


class AugmentedSystem(nn.Module):
    """``z = [x.flatten(1), l]`` -> ``[u.flatten(1), div]`` for the front door (a module, so
    that the adjoint method finds the field's parameters when the field is one)."""

    def __init__(self, field: Field, shape: torch.Size, method: str, probes: Tensor | None,
                 create_graph: bool, chunk_size: int | None):
        super().__init__()
        self.field, self.shape, self.method = field, shape, method
        self.probes, self.create_graph, self.chunk_size = probes, create_graph, chunk_size
        self.d = math.prod(shape[1:])

    def rows(self, index: Tensor) -> AugmentedSystem:
        """The system of the samples ``index`` (their probes; see
        :func:`~flowsolve._core.types.restrict_rows`)."""
        probes = None if self.probes is None else self.probes[:, index]
        return AugmentedSystem(restrict_rows(self.field, index),
                               torch.Size((len(index), *self.shape[1:])), self.method, probes,
                               self.create_graph, self.chunk_size)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        x = z[:, : self.d].reshape(z.shape[0], *self.shape[1:])
        with torch.enable_grad():
            res = value_and_divergence(
                self.field, x, t, method=self.method, probes=self.probes,
                create_graph=self.create_graph, chunk_size=self.chunk_size,
            )
        div = res.divergence[:, None] if res.estimates is None else res.estimates.T
        return torch.cat([res.value.flatten(1), div.to(z.dtype)], dim=1)


def check_points(x: Tensor, name: str = "x") -> None:
    if not (torch.is_tensor(x) and x.dim() >= 2 and x.is_floating_point()):
        raise ValueError(
            f"{name} must be a floating tensor shaped (B, *event_shape) with at least one "
            f"event dim; got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
        )


@dataclass(frozen=True, eq=False)
class AugmentedSolve:
    """What :func:`solve_augmented` returns.

    Attributes:
        x: the state at ``t1``, shaped like the input.
        integral: ``int_{t0}^{t1} div u_t(x_t) dt``, ``(B, k)``: one column per Hutchinson
            probe, one for the exact divergence (negative of the change of log-density).
        hutchinson: whether the columns are Hutchinson estimates.
        divergence: the label (``"exact (<method>)"``, ``"hutchinson (<probe>, k=<k>)"``).
        nfe, nfe_per_sample: as :class:`~flowsolve.ode.backends.Solution`.
    """

    x: Tensor
    integral: Tensor
    hutchinson: bool
    divergence: str
    nfe: int
    nfe_per_sample: Tensor | None


def solve_augmented(field: Field, x: Tensor, t0: float, t1: float, *, solver: str,
                    steps: int | None, rtol: float | None, atol: float | None,
                    divergence: str, n_probes: int, probe: str,
                    generator: torch.Generator | None, create_graph: bool, adjoint: bool,
                    chunk_size: int | None, solver_options: dict) -> AugmentedSolve:
    """Integrate ``[x, l]``, ``dl/dt = div u_t(x)``, ``l_{t0} = 0``, from ``t0`` to ``t1``
    (either direction) through :func:`~flowsolve.ode.solve.sample`: the one solve behind
    both :func:`~flowsolve.likelihood.cnf.log_likelihood` (data -> noise) and
    :func:`~flowsolve.likelihood.generated.sample_log_likelihood` (noise -> data). The
    result keeps its graph with ``create_graph`` and is detached otherwise."""
    probes, method, label = divergence_setup(x, divergence, n_probes, probe, generator)
    check_gradient_options(field, solver, create_graph, adjoint)
    k = n_probes if probes is not None else 1
    system = AugmentedSystem(field, x.shape, method, probes, create_graph, chunk_size)
    z = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], k)], dim=1)
    with torch.enable_grad() if create_graph else torch.no_grad():
        sol = sample(system, z, solver=solver, steps=steps, t0=t0, t1=t1, rtol=rtol,
                     atol=atol, adjoint=adjoint, **solver_options)
    return AugmentedSolve(sol.x[:, : system.d].reshape(x.shape), sol.x[:, system.d:],
                          probes is not None, label, sol.nfe, sol.nfe_per_sample)


def check_interval(t_interval: tuple[float, float]) -> tuple[float, float]:
    """``(t_lo, t_hi)`` as floats with ``0 <= t_lo < t_hi <= 1``."""
    t_lo, t_hi = (float(v) for v in t_interval)
    if not (0.0 <= t_lo < t_hi <= 1.0):
        raise ValueError(f"t_interval must satisfy 0 <= t_lo < t_hi <= 1; got {t_interval!r}")
    return t_lo, t_hi


def check_gradient_options(field: Field, solver: str, create_graph: bool,
                           adjoint: bool) -> None:
    """``create_graph`` needs a differentiable solver (scipy's return detached results);
    ``adjoint`` needs ``create_graph`` and the ``nn.Module`` holding the parameters."""
    if create_graph and ODE_SOLVERS[solver].library == "scipy":
        differentiable = ", ".join(n for n, i in ODE_SOLVERS.items()
                                   if i.library in ("torchdiffeq", "flowsolve")
                                   and not i.needs_path)
        raise ValueError(
            f"create_graph=True needs a differentiable solver; {solver!r} is scipy's (its result "
            f"is detached). Accepted: {differentiable}")
    if adjoint and not create_graph:
        raise ValueError("adjoint=True is for gradients: pass create_graph=True with it")
    if adjoint and not isinstance(field, nn.Module):
        raise ValueError("adjoint=True needs field to be the nn.Module holding the parameters "
                         f"(a lambda or function hides them); got {type(field).__name__}")


def divergence_setup(x: Tensor, divergence: str, n_probes: int, probe: str,
                      generator: torch.Generator | None) -> tuple[Tensor | None, str, str]:
    """``(probes, method, label)``: Hutchinson's probes drawn once from ``generator`` (None
    for an exact divergence), the method :func:`value_and_divergence` takes, and the
    :attr:`LikelihoodResult.divergence` label."""
    if divergence == "hutchinson":
        if not (isinstance(n_probes, int) and n_probes >= 1):
            raise ValueError(f"n_probes must be an int >= 1; got {n_probes!r}")
        if probe not in PROBE_KINDS:
            raise ValueError(f"probe={probe!r}; accepted: {', '.join(PROBE_KINDS)}")
        probes = make_probes(x.shape, n_probes, kind=probe, generator=generator,
                             dtype=x.dtype, device=x.device)
        return probes, divergence, divergence_label(divergence, n_probes, probe)
    if divergence == "exact" or divergence in EXACT_METHODS:
        method = "auto" if divergence == "exact" else divergence
        return None, method, divergence_label(divergence, n_probes, probe)
    raise ValueError(f"divergence={divergence!r}; accepted: exact, hutchinson, "
                     f"{', '.join(EXACT_METHODS)}")


def divergence_label(divergence: str = "exact", n_probes: int = 1,
                      probe: str = "rademacher") -> str:
    """The :attr:`LikelihoodResult.divergence` label: ``"exact (<method>)"`` or
    ``"hutchinson (<probe>, k=<k>)"``."""
    if divergence == "hutchinson":
        return f"hutchinson ({probe}, k={n_probes})"
    return f"exact ({'auto' if divergence == 'exact' else divergence})"


def prior_log_prob(prior: Prior | Any | None, x0: Tensor) -> Tensor:
    """``log p_0(x0)``, ``(B,)``; any other shape, and any inf or NaN, raises ValueError
    naming the prior."""
    prior_lp = prior_fn(prior)(x0)
    if not (torch.is_tensor(prior_lp) and prior_lp.shape == x0.shape[:1]):
        got = tuple(prior_lp.shape) if torch.is_tensor(prior_lp) else type(prior_lp).__name__
        raise ValueError(
            f"prior log_prob must return ({x0.shape[0]},), one log-density per sample summed over "
            f"the event dims; got {got} from prior={shown_name(prior)}. Accepted: None, "
            "flowsolve.StandardNormal(d, std), "
            "torch.distributions.Independent(Normal(...), n_event_dims) or a callable x -> (B,)")
    bad = ~torch.isfinite(prior_lp.detach())
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"prior log_prob returned {prior_lp[i].item()!r} for sample {i} "
            f"({int(bad.sum())} of {bad.numel()} non-finite) from prior={shown_name(prior)}, "
            f"at the source point x0 = {x0[i].flatten()[:4].tolist()}"
            f"{' ...' if x0[i].numel() > 4 else ''}: the prior must give a finite "
            "log-density at every point the flow maps x to. Check the prior (its parameters, "
            "its support, its dtype) or pass prior=None for N(0, I)")
    return prior_lp


def shown_name(obj: object) -> str:
    """``obj``'s repr where its class defines one, else its qualified name (the repr of a
    function or of a plain object holds its address, a module's spans lines)."""
    if obj is None:
        return "None"
    if isinstance(obj, (nn.Module, *FUNCTIONS)) or type(obj).__repr__ is object.__repr__:
        return qualname(obj)
    return repr(obj)


def probe_stderr(per_channel: Tensor, prior_lp: Tensor, hutchinson: bool) -> Tensor | None:
    """Standard error of the mean over Hutchinson's ``k`` probe channels (the columns of
    ``per_channel``), ``(B,)``: NaN (like ``prior_lp``) for ``k = 1``; None for the exact
    divergence."""
    if not hutchinson:
        return None
    k = per_channel.shape[1]
    if k > 1:
        return per_channel.std(1, unbiased=True) / math.sqrt(k)
    return torch.full_like(prior_lp, float("nan"))


FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType,
              functools.partial)

def qualname(obj: object) -> str:
    """``module.qualname`` of a function or method, else of ``obj``'s class."""
    target = obj.func if isinstance(obj, functools.partial) else obj
    target = getattr(target, "__func__", target)  # a bound method: its function
    if not isinstance(target, (types.FunctionType, types.BuiltinFunctionType, type)):
        target = type(target)
    return f"{getattr(target, '__module__', None)}.{target.__qualname__}"


