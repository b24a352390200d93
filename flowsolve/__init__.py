"""flowsolve: the dynamics of flow-matching and diffusion models.

Time runs from t = 0 (source / noise) to t = 1 (data); an affine path is
``x_t = alpha_t x1 + sigma_t x0``; a field is any callable ``(x, t) -> Tensor``.
The subpackages follow the layers of the maths (``paths``, ``truth``, ``ode``, ``sde``,
``likelihood``, ``training``, ``studies``, ``cli``) and hold more than the flat names below.
The documented module names ``flowsolve.analytic``, ``.couplings``, ``.data``,
``.divergence`` and ``.metrics`` stay importable as before.
"""

import importlib as _importlib
import sys as _sys
from importlib.machinery import ModuleSpec as _ModuleSpec

__version__ = "0.1.0"

# Every flat name and the module that holds it. Nothing is imported until a name is first
# used (PEP 562 module __getattr__ below): `import flowsolve` and the `flowsolve` command's
# --help / --version start without torch. A new flat name goes here and in __all__.
_HOMES: dict[str, str] = {name: home for home, names in {
    "._core.errors": ("IntegrationError", "NonFiniteStateError"),
    "._core.registry": ("SolverInfo", "SolverRegistry"),
    ".likelihood.bits": ("BitsPerDim", "bits_per_dim", "continuous_bits_per_dim",
                         "dequantize"),
    ".likelihood.cnf": ("LikelihoodResult", "log_likelihood", "score_log_likelihood"),
    ".likelihood.dataset_likelihood": ("DatasetLikelihood", "dataset_bits_per_dim",
                                       "dataset_log_likelihood"),
    ".likelihood.divergence": ("value_and_divergence",),
    ".likelihood.generated": ("GeneratedLikelihood", "sample_log_likelihood"),
    ".likelihood.reweighting": ("ImportanceWeights", "reweight"),
    ".metrics": ("mmd", "normalized_path_energy", "path_energy", "straightness",
                 "wasserstein2"),
    ".ode.grids": ("EDMGrid", "GivenGrid", "LogSNRGrid", "ShiftGrid", "time_grid"),
    ".ode.solve": ("ODE_SOLVERS", "Solution", "sample"),
    ".paths.affine": ("PREDICTIONS", "AffineGaussianPath", "PathSample"),
    ".paths.bridges": ("GaussianBridge",),
    ".paths.discrete": ("DiscreteTimeModel", "DiscreteVPScheduler", "beta_table"),
    ".paths.preconditioning": ("EDMPreconditioned", "edm_coefficients"),
    ".paths.fields": ("GuidedField", "as_score", "as_velocity", "convert_field", "guided",
                      "probability_flow"),
    ".paths.schedules": ("SCHEDULERS", "CondOTScheduler", "CosineScheduler",
                         "LinearVPScheduler", "PolynomialScheduler", "Scheduler",
                         "ScheduleValues", "VEScheduler", "get_scheduler"),
    ".paths.transfer": ("TransferredField", "transfer"),
    ".sde.brownian": ("GridBrownian",),
    ".sde.diffusions": ("DIFFUSIONS", "DiffusionSchedule", "diffusion_schedule"),
    ".sde.backends": ("SDE_SOLVERS", "SDESolution"),
    ".sde.solve": ("langevin", "sample_sde"),
    ".studies.compare": ("Study", "compare_solvers"),
    ".studies.front": ("Front", "low_nfe_front"),
    ".studies.grid_search": ("GridSearch", "load_grid", "optimize_grid"),
    ".training.couplings": ("ClassConditionalOT", "ConditionalCouplingResult", "ConditionalOT",
                            "CouplingResult", "IndependentCoupling", "OTCoupling",
                            "PairedCoupling", "PartialOTCoupling", "RelaxedCouplingResult",
                            "UnbalancedOTCoupling", "get_coupling"),
    ".training.ema": ("EMA",),
    ".training.config": ("TrainConfig",),
    ".training.loop": ("TrainResult", "load_weights", "train"),
    ".training.losses": ("bridge_matching_loss", "denoising_score_matching_loss",
                         "epsilon_loss", "flow_matching_loss", "label_dropout",
                         "regression_loss", "sample_time"),
    ".training.nets": ("MLP", "SinusoidalTimeEmbedding", "initial_weights_from"),
    ".training.score_flow": ("FlowAndScore", "score_flow_matching_loss"),
    ".training.unet": ("UNet",),
    ".truth.analytic": ("Gaussian", "GaussianMixture", "StandardNormal"),
    ".truth.gaussian_bridge": ("GaussianSchrodingerBridge",),
}.items() for name in names}

# The module names documented before the regrouping and the modules that hold them now:
# attributes (fs.analytic) and imports (import flowsolve.analytic) give the same module.
_MODULES = {"analytic": ".truth.analytic", "couplings": ".training.couplings",
            "data": ".training.data", "divergence": ".likelihood.divergence",
            "metrics": ".metrics"}
_SUBPACKAGES = ("_core", "paths", "truth", "ode", "sde", "likelihood", "training", "studies",
                "cli")


def __getattr__(name: str):
    """A flat name, documented module or subpackage, imported on first use and kept."""
    if name in _HOMES:
        value = getattr(_importlib.import_module(_HOMES[name], __name__), name)
    elif name in _MODULES:
        value = _importlib.import_module(_MODULES[name], __name__)
        _sys.modules.setdefault(f"{__name__}.{name}", value)
    elif name in _SUBPACKAGES:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})


class _DocumentedModules:
    """The import finder of ``import flowsolve.analytic`` (and ``.couplings``, ``.data``,
    ``.divergence``): the module that now holds those names, registered under the old name
    too. It keeps its own ``__spec__`` (which the import system sets to the alias's)."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MODULES or name == "metrics":
            return None  # flowsolve/metrics.py is found as a file
        return _ModuleSpec(fullname, _DocumentedModules, loader_state=_MODULES[name])

    @staticmethod
    def create_module(spec: _ModuleSpec):
        module = _importlib.import_module(spec.loader_state, __name__)
        spec.loader_state = module.__spec__
        return module

    @staticmethod
    def exec_module(module) -> None:
        module.__spec__ = module.__spec__.loader_state


if not any(getattr(f, "__qualname__", None) == "_DocumentedModules"
           and getattr(f, "__module__", None) == __name__ for f in _sys.meta_path):
    _sys.meta_path.append(_DocumentedModules)

__all__ = [
    # modules
    "analytic", "couplings", "data", "divergence", "metrics",
    # schedulers and paths
    "Scheduler", "ScheduleValues", "SCHEDULERS", "get_scheduler", "CondOTScheduler",
    "PolynomialScheduler", "CosineScheduler", "LinearVPScheduler", "VEScheduler",
    "AffineGaussianPath", "PathSample", "PREDICTIONS", "GaussianBridge",
    # ground truth
    "GaussianMixture", "Gaussian", "StandardNormal", "GaussianSchrodingerBridge",
    # losses and training
    "flow_matching_loss", "denoising_score_matching_loss", "epsilon_loss", "regression_loss",
    "bridge_matching_loss", "sample_time", "label_dropout", "MLP", "SinusoidalTimeEmbedding",
    "initial_weights_from", "FlowAndScore", "score_flow_matching_loss",
    "UNet", "train", "TrainConfig", "TrainResult", "EMA", "load_weights",
    # couplings and metrics
    "OTCoupling", "IndependentCoupling", "PairedCoupling", "ClassConditionalOT",
    "CouplingResult", "get_coupling", "UnbalancedOTCoupling", "PartialOTCoupling",
    "RelaxedCouplingResult", "ConditionalOT", "ConditionalCouplingResult", "wasserstein2",
    "mmd", "path_energy", "straightness",
    "normalized_path_energy",
    # fields and transfer
    "as_velocity", "as_score", "convert_field", "guided", "GuidedField", "probability_flow",
    "transfer", "TransferredField",
    # solving
    "sample", "Solution", "ODE_SOLVERS", "sample_sde", "SDESolution", "SDE_SOLVERS",
    "langevin", "GridBrownian", "DiffusionSchedule", "DIFFUSIONS", "diffusion_schedule",
    "SolverInfo", "SolverRegistry", "IntegrationError", "NonFiniteStateError",
    "compare_solvers", "Study",
    # low-NFE sampling: grids, optimised grids, the front, discrete-time models
    "time_grid", "LogSNRGrid", "EDMGrid", "ShiftGrid", "GivenGrid", "optimize_grid",
    "GridSearch", "load_grid", "low_nfe_front", "Front", "DiscreteVPScheduler",
    "DiscreteTimeModel", "beta_table", "EDMPreconditioned", "edm_coefficients",
    # likelihood
    "log_likelihood", "score_log_likelihood", "dataset_log_likelihood",
    "dataset_bits_per_dim", "LikelihoodResult", "DatasetLikelihood", "value_and_divergence",
    "dequantize", "bits_per_dim", "continuous_bits_per_dim", "BitsPerDim",
    "sample_log_likelihood", "GeneratedLikelihood", "reweight", "ImportanceWeights",
]
