"""Cases and helpers shared by several test files: the schedulers, a small Gaussian mixture,
seeded generators and noise, W2 between samples and fitted convergence orders.

Fixtures live in ``conftest.py`` (its ``gen`` fixture is a generator seeded with 1234; the
``gen(seed)`` here is the plain function for tests that pick their own seeds)."""

import math

import ot
import torch

from flowsolve.paths.schedules import (
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialScheduler,
    VEScheduler,
)
from flowsolve.truth.analytic import GaussianMixture

F64 = torch.float64

SCHEDULER_CASES = [
    CondOTScheduler(),
    PolynomialScheduler(1),
    PolynomialScheduler(2),
    PolynomialScheduler(3.5),
    PolynomialScheduler(0.5),
    CosineScheduler(),
    LinearVPScheduler(),
    LinearVPScheduler(beta_min=0.5, beta_max=5.0),
    LinearVPScheduler(beta_min=1.0, beta_max=1.0),  # constant beta
    VEScheduler(),
    VEScheduler(sigma_min=0.002, sigma_max=80.0),
]


def three_gaussians() -> GaussianMixture:
    """Three unequal, anisotropic components in 2-D (the ODE, SDE and device tests' data)."""
    return GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
        torch.tensor([[0.5, 0.3], [0.3, 0.8], [1.0, 0.2]]),
        torch.tensor([0.5, 0.3, 0.2]),
    )


def gen(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def _generator(seed: int | torch.Generator) -> torch.Generator:
    """``seed`` itself if it is a generator (draws then advance it), else ``gen(seed)``."""
    return seed if isinstance(seed, torch.Generator) else gen(seed)


def noise(n: int, seed: int | torch.Generator = 0, d: int = 2, dtype=F64) -> torch.Tensor:
    """``n`` standard normal points in ``d`` dimensions, drawn from ``seed``: a seed (a fresh
    generator) or a generator to draw from (it advances)."""
    g = _generator(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def batches(seed: int | torch.Generator, n: int = 64, m: int | None = None, d: int = 2,
            dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 ~ N(0, I) (``n`` points) and x1 ~ 0.5 N(0, I) + 3 (``m``, default ``n``), in that
    order from ``seed`` (a seed or a generator): the shapes of the couplings note."""
    g = _generator(seed)
    x0 = torch.randn(n, d, generator=g, dtype=dtype)
    x1 = 0.5 * torch.randn(m or n, d, generator=g, dtype=dtype) + 3
    return x0, x1


def random_mixture(seed: int | torch.Generator, d: int, k: int = 3) -> GaussianMixture:
    """``k`` components in ``d`` dimensions with random means, full covariances and weights,
    drawn (float64) from ``seed``: a seed or a generator to draw from."""
    g = _generator(seed)
    means = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    covs = a @ a.transpose(1, 2) / d + 0.3 * torch.eye(d, dtype=F64)
    return GaussianMixture(means, covs, torch.rand(k, generator=g, dtype=F64) + 0.5)


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between two empirical samples (uniform weights; POT's network simplex)."""
    wa = torch.full((len(a),), 1 / len(a), dtype=F64)
    wb = torch.full((len(b),), 1 / len(b), dtype=F64)
    return math.sqrt(ot.emd2(wa, wb, ot.dist(a, b)))


def slope(hs, errs) -> float:
    """Least-squares slope of log|err| against log(h): the empirical order (signed errors,
    e.g. weak errors, are fitted by their magnitude)."""
    x, y = torch.tensor(hs, dtype=F64).log(), torch.tensor(errs, dtype=F64).abs().log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


class Counter:
    """The test's own count of a field's calls (and the times called at), independent of
    flowsolve's counting."""

    def __init__(self, field):
        self.field, self.calls, self.times = field, 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.times.append(float(t))
        return self.field(x, t)
