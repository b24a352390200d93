"""flowsolve: the dynamics of flow-matching and diffusion models.

Time runs from t = 0 (source / noise) to t = 1 (data); an affine path is
``x_t = alpha_t x1 + sigma_t x0``; a field is any callable ``(x, t) -> Tensor``.
The subpackages follow the layers of the maths (``paths``, ``truth``, ``ode``, ``sde``,
``likelihood``, ``training``, ``studies``, ``cli``) and hold more than the flat names below.
The documented module names ``flowsolve.analytic``, ``.couplings``, ``.data``,
``.divergence`` and ``.metrics`` stay importable as before.
"""

import sys as _sys

from . import metrics
from ._core.errors import IntegrationError, NonFiniteStateError
from ._core.registry import SolverInfo, SolverRegistry
from .likelihood import divergence
from .likelihood.bits import BitsPerDim, bits_per_dim, dequantize
from .likelihood.cnf import (
    LikelihoodResult,
    dataset_bits_per_dim,
    dataset_log_likelihood,
    log_likelihood,
    score_log_likelihood,
)
from .likelihood.divergence import value_and_divergence
from .metrics import mmd, normalized_path_energy, path_energy, straightness, wasserstein2
from .ode.solve import ODE_SOLVERS, Solution, sample
from .paths.affine import PREDICTIONS, AffineGaussianPath, PathSample
from .paths.bridges import GaussianBridge
from .paths.fields import (
    GuidedField,
    as_score,
    as_velocity,
    convert_field,
    guided,
    probability_flow,
)
from .paths.schedules import (
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
from .paths.transfer import TransferredField, transfer
from .sde.brownian import GridBrownian
from .sde.diffusions import DIFFUSIONS, DiffusionSchedule, diffusion_schedule
from .sde.solve import SDE_SOLVERS, SDESolution, langevin, sample_sde
from .studies.compare import Study, compare_solvers
from .training import couplings, data
from .training.couplings import (
    ClassConditionalOT,
    CouplingResult,
    IndependentCoupling,
    OTCoupling,
    PairedCoupling,
    get_coupling,
)
from .training.ema import EMA
from .training.loop import TrainConfig, TrainResult, load_weights, train
from .training.losses import (
    bridge_matching_loss,
    denoising_score_matching_loss,
    epsilon_loss,
    flow_matching_loss,
    label_dropout,
    regression_loss,
    sample_time,
)
from .training.nets import MLP, SinusoidalTimeEmbedding, initial_weights_from
from .training.unet import UNet
from .truth import analytic
from .truth.analytic import Gaussian, GaussianMixture, StandardNormal

# The module paths documented before the regrouping (``import flowsolve.analytic``) name
# the modules that now live in subpackages; importing flowsolve registers them.
for _name, _module in {"analytic": analytic, "couplings": couplings, "data": data,
                       "divergence": divergence}.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)
del _name, _module

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
