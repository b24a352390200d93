"""Scheduler cases shared by the scheduler and path tests."""

from flowsolve.schedules import (
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialScheduler,
    VEScheduler,
)

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
