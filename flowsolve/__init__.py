"""flowsolve: the dynamics of flow-matching and diffusion models.

Time runs from t = 0 (source / noise) to t = 1 (data); an affine path is
``x_t = alpha_t x1 + sigma_t x0``; a field is any callable ``(x, t) -> Tensor``.
The modules (``flowsolve.analytic``, ``.couplings``, ``.data``, ``.metrics``, ...) hold
more than the flat names below.
"""

from . import analytic, couplings, data, divergence, metrics
from .analytic import Gaussian, GaussianMixture, StandardNormal
from .bridges import GaussianBridge, bridge_matching_loss
from .brownian import GridBrownian
from .couplings import (
    ClassConditionalOT,
    CouplingResult,
    IndependentCoupling,
    OTCoupling,
    PairedCoupling,
    get_coupling,
)
from .dequantize import BitsPerDim, bits_per_dim, dequantize
from .diffusions import DIFFUSIONS, DiffusionSchedule, diffusion_schedule
from .divergence import value_and_divergence
from .dynamics import IntegrationError, NonFiniteStateError, probability_flow
from .ema import EMA
from .fields import GuidedField, as_score, as_velocity, convert_field, guided
from .likelihood import (
    LikelihoodResult,
    dataset_bits_per_dim,
    dataset_log_likelihood,
    log_likelihood,
    score_log_likelihood,
)
from .losses import (
    denoising_score_matching_loss,
    epsilon_loss,
    flow_matching_loss,
    label_dropout,
    regression_loss,
    sample_time,
)
from .metrics import mmd, normalized_path_energy, path_energy, straightness, wasserstein2
from .nets import MLP, SinusoidalTimeEmbedding, initial_weights_from
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
from .solve import ODE_SOLVERS, Solution, sample
from .studies import Study, compare_solvers
from .train import TrainConfig, TrainResult, load_weights, train
from .transfer import TransferredField, transfer
from .unet import UNet

__version__ = "0.1.0"

__all__ = [
    # modules
    "analytic", "couplings", "data", "divergence", "metrics",
    # schedulers and paths
    "Scheduler", "ScheduleValues", "SCHEDULERS", "get_scheduler", "CondOTScheduler",
    "PolynomialScheduler", "CosineScheduler", "LinearVPScheduler", "VEScheduler",
    "AffineGaussianPath", "PathSample", "PREDICTIONS", "GaussianBridge",
    # ground truth
    "GaussianMixture", "Gaussian", "StandardNormal",
    # losses and training
    "flow_matching_loss", "denoising_score_matching_loss", "epsilon_loss", "regression_loss",
    "bridge_matching_loss", "sample_time", "label_dropout", "MLP", "SinusoidalTimeEmbedding",
    "initial_weights_from",
    "UNet", "train", "TrainConfig", "TrainResult", "EMA", "load_weights",
    # couplings and metrics
    "OTCoupling", "IndependentCoupling", "PairedCoupling", "ClassConditionalOT",
    "CouplingResult", "get_coupling", "wasserstein2", "mmd", "path_energy", "straightness",
    "normalized_path_energy",
    # fields and transfer
    "as_velocity", "as_score", "convert_field", "guided", "GuidedField", "probability_flow",
    "transfer", "TransferredField",
    # solving
    "sample", "Solution", "ODE_SOLVERS", "sample_sde", "SDESolution", "SDE_SOLVERS",
    "langevin", "GridBrownian", "DiffusionSchedule", "DIFFUSIONS", "diffusion_schedule",
    "SolverInfo", "SolverRegistry", "IntegrationError", "NonFiniteStateError",
    "compare_solvers", "Study",
    # likelihood
    "log_likelihood", "score_log_likelihood", "dataset_log_likelihood",
    "dataset_bits_per_dim", "LikelihoodResult", "value_and_divergence", "dequantize",
    "bits_per_dim", "BitsPerDim",
]
