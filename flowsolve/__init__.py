"""flowsolve: the dynamics of flow-matching and diffusion models."""
from . import analytic
from .analytic import Gaussian, GaussianMixture, StandardNormal
from .paths import PREDICTIONS, AffineGaussianPath, PathSample
from .schedules import (
    SCHEDULERS,
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialScheduler,
    Scheduler,
    ScheduleValues,
    VEScheduler,
    get_scheduler,
)
