"""flowsolve: the dynamics of flow-matching and diffusion models.

Time runs from t = 0 (source / noise) to t = 1 (data); an affine path is
``x_t = alpha_t x1 + sigma_t x0``; a field is any callable ``(x, t) -> Tensor``.
"""

from . import analytic
from .analytic import Gaussian, GaussianMixture, StandardNormal
from .brownian import GridBrownian
from .diffusions import DIFFUSIONS, DiffusionSchedule, diffusion_schedule
from .losses import (
    denoising_score_matching_loss,
    epsilon_loss,
    flow_matching_loss,
    label_dropout,
    regression_loss,
    sample_time,
)
from .nets import MLP, SinusoidalTimeEmbedding
from .paths import PREDICTIONS, AffineGaussianPath, PathSample
from .registry import SolverInfo, SolverRegistry
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
from .sde import SDE_SOLVERS, SDESolution, langevin, sample_sde
from .transfer import TransferredField, transfer

__version__ = "0.1.0"

__all__ = [
    "analytic",
    "Gaussian",
    "GaussianMixture",
    "StandardNormal",
    "denoising_score_matching_loss",
    "epsilon_loss",
    "flow_matching_loss",
    "label_dropout",
    "regression_loss",
    "sample_time",
    "MLP",
    "SinusoidalTimeEmbedding",
    "PREDICTIONS",
    "AffineGaussianPath",
    "PathSample",
    "SolverInfo",
    "SolverRegistry",
    "SCHEDULERS",
    "CondOTScheduler",
    "CosineScheduler",
    "LinearVPScheduler",
    "PolynomialScheduler",
    "Scheduler",
    "ScheduleValues",
    "VEScheduler",
    "get_scheduler",
    "GridBrownian",
    "DIFFUSIONS",
    "DiffusionSchedule",
    "diffusion_schedule",
    "SDE_SOLVERS",
    "SDESolution",
    "langevin",
    "sample_sde",
    "TransferredField",
    "transfer",
]
