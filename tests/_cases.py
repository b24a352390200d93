"""Cases shared by several test files: the schedulers, and a small Gaussian mixture."""

import torch

from flowsolve.paths.schedules import (
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialScheduler,
    VEScheduler,
)
from flowsolve.truth.analytic import GaussianMixture

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
    """Three unequal, anisotropic components in 2-D (the SDE and device tests' data)."""
    return GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
        torch.tensor([[0.5, 0.3], [0.3, 0.8], [1.0, 0.2]]),
        torch.tensor([0.5, 0.3, 0.2]),
    )
