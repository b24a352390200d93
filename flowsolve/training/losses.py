r"""Training losses on an affine Gaussian path: flow matching, denoising score matching, DDPM.

Every loss here is one regression, :func:`regression_loss`: draw ``x_t = alpha_t x1 +
sigma_t x0`` for the given pairs ``(x0, x1)`` and compare the model's output at
``(x_t, t)`` with the exact *conditional* target of its parameterisation,

=============  ============================================  =================================
prediction     conditional target for the pair ``(x0, x1)``  loss
=============  ============================================  =================================
``velocity``   ``dx_t = alpha'_t x1 + sigma'_t x0``            :func:`flow_matching_loss`
``score``      ``-x0 / sigma_t``                               :func:`denoising_score_matching_loss`
``epsilon``    ``x0`` (aliases ``x0``, ``noise``, ``eps``)     :func:`epsilon_loss`
``x1``         ``x1`` (alias ``data``)
``v``          ``alpha_t x0 - sigma_t x1``
=============  ============================================  =================================

(the table of :mod:`flowsolve.paths.affine`, with the posterior means replaced by the pair). The
regression is minimised by the *marginal* quantity, e.g. ``E[dx_t | x_t = x] = u_t(x)``,
whatever the coupling that produced the pairs, since for any function ``f``,
``E||f - target||^2 = E||f - E[target | x_t]||^2 + const``.

Per-sample loss: ``l_i = lambda(t_i) * (1/D) ||f_theta(x_t, t_i) - target_i||^2``, the
**mean** over the ``D`` entries of a sample's event shape (``D = prod(event_shape)``), shaped
``(B,)``. The papers' sum over entries is ``D`` times this: the same minimiser, gradients
``D`` times smaller here, so the loss scale does not grow with the data dimension.
``reduction="mean"`` averages over the batch, ``"none"`` returns ``(B,)``. An empty batch
(``B = 0``, or samples of no entries) raises ValueError with either reduction, as does
:func:`flowsolve.training.losses.bridge_matching_loss`: a mean over zero samples is undefined.

Time: ``t`` may be given (a number, 0-d or ``(B,)``); when omitted it is drawn per sample
from ``U[0, 1)``, kept in the open interval (0, 1), with :func:`sample_time` and
``generator``. The model is called as
``model(x_t, t, **model_kwargs)`` (e.g. ``y=labels``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._core.checks import generator_or_fresh, per_sample
from ..paths.affine import AffineGaussianPath, canonical_prediction, homogeneous_coefficients
from ..paths.bridges import GaussianBridge
from ..paths.schedules import ScheduleValues

__all__ = [
    "TIME_DISTRIBUTIONS",
    "REDUCTIONS",
    "DSM_WEIGHTINGS",
    "sample_time",
    "regression_loss",
    "flow_matching_loss",
    "denoising_score_matching_loss",
    "epsilon_loss",
    "label_dropout",
    "bridge_matching_loss",
    "clamp_bridge_time",
]

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
REDUCTIONS = ("mean", "none")
DSM_WEIGHTINGS = ("sigma_squared", "none", "likelihood")

Model = Callable[..., Tensor]
Weighting = Callable[[Tensor], Tensor]


# -- randomness ------------------------------------------------------------------------
def _draw(
    fn: Callable[..., Tensor],
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> Tensor:
    """``fn(shape)`` drawn on the generator's device, then moved to ``device`` (None: a
    fresh unseeded generator on ``device``; torch's global RNG is never used)."""
    dtype = dtype or torch.get_default_dtype()
    generator = generator_or_fresh(generator, device)
    out = fn(shape, generator=generator, dtype=dtype, device=generator.device)
    return out if device is None else out.to(device)


def _open_unit_interval(t: Tensor) -> Tensor:
    """``t`` with an exact 0 replaced by ``eps / 2`` and an exact 1 by ``1 - eps / 2``
    (``eps = torch.finfo(t.dtype).eps``; ``eps / 2`` is the grid step of ``torch.rand`` and
    ``1 - eps / 2`` the largest number below 1). Every other entry is returned bit for bit;
    no host synchronisation."""
    step = torch.finfo(t.dtype).eps / 2
    return torch.where(t == 0, step, t).clamp(max=1 - step)


def sample_time(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    distribution: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
) -> Tensor:
    r"""Draw ``n`` training times in the open interval (0, 1), shape ``(n,)``.

    * ``"uniform"``: ``t ~ U[0, 1)``.
    * ``"logit_normal"``: ``t = 1 / (1 + exp(-z))``, ``z ~ N(loc, scale^2)``, the density
      ``p(t) = N(logit t; loc, scale^2) / (t (1 - t))`` of Esser et al. (2024, SD3), which
      puts more weight on the middle of the path (``loc`` shifts it: ``loc > 0`` towards
      the data, t = 1). SD3 runs time the other way (t = 1 is noise there, its time is
      ``1 - t``), so the location has the opposite sign: SD3's ``m`` is ``loc = -m`` here.

    A draw that rounds to exactly 0 (``U[0, 1)`` in float32: about once in 2^24) or to
    exactly 1 (``sigmoid`` in float32 at large ``loc + scale z``) is moved to ``eps / 2``,
    resp. ``1 - eps / 2`` (``eps`` of ``dtype``), where e.g. the likelihood weighting is
    finite; every other draw is unchanged. Randomness only from ``generator`` (draws happen
    on its device, then move to ``device``; None: a fresh unseeded generator on ``device``;
    torch's global RNG is never used); ``dtype`` defaults to torch's default dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> t = sample_time(4, generator=g, distribution="logit_normal")
        >>> t.shape, bool(((t > 0) & (t < 1)).all())
        (torch.Size([4]), True)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    if distribution == "uniform":
        return _open_unit_interval(_draw(torch.rand, (n,), generator, dtype, device))
    if distribution == "logit_normal":
        if not (math.isfinite(loc) and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"logit_normal needs a finite loc and a finite scale > 0; got loc={loc!r}, "
                f"scale={scale!r}"
            )
        z = _draw(torch.randn, (n,), generator, dtype, device)
        return _open_unit_interval(torch.sigmoid(loc + scale * z))
    raise ValueError(
        f"distribution={distribution!r} is not a time distribution; accepted: "
        f"{', '.join(TIME_DISTRIBUTIONS)}"
    )


# -- the shared regression core ----------------------------------------------------------
def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not accepted; accepted: {', '.join(REDUCTIONS)}"
        )


def check_model_and_samples(model: Any, x0: Tensor | None, x1: Tensor, *,
                             x0_optional: bool) -> None:
    """A callable model and floating ``(B, *event_shape)`` tensors ``x0`` (or ``None`` when
    ``x0_optional``) and ``x1``, not empty (``B = 0`` or a sample of no entries: the loss is
    a mean over both, undefined for none); TypeError / ValueError naming what was wrong."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t); got {type(model).__name__}")
    for name, x in (("x0", x0), ("x1", x1)):
        if x is None and name == "x0" and x0_optional:
            continue
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() < 1 or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a floating tensor shaped (B, *event_shape); got dtype "
                f"{x.dtype} and shape {tuple(x.shape)}"
            )
        if x.numel() == 0:
            what = "the batch is empty (B = 0)" if x.shape[0] == 0 else \
                "its samples have no entries"
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}: {what}. A loss is a mean over the "
                "samples of a batch and the entries of each, undefined for none of them "
                "(refused with reduction='none' too); skip empty batches"
            )


def _check_inputs(model: Any, path: Any, x0: Tensor | None, x1: Tensor) -> None:
    if not isinstance(path, AffineGaussianPath):
        raise TypeError(f"path must be an AffineGaussianPath; got {type(path).__name__}")
    check_model_and_samples(model, x0, x1, x0_optional=True)


def _weighted_regression(
    model: Model,
    path: AffineGaussianPath,
    x0: Tensor | None,
    x1: Tensor,
    t: Tensor | float | None,
    prediction: str,
    factor: Callable[[Tensor, ScheduleValues, Tensor], Tensor],
    generator: torch.Generator | None,
    reduction: str,
    model_kwargs: dict[str, Any],
) -> Tensor:
    r"""``factor(t, values, n) * mean_D(r^2)`` with the homogeneous residual
    ``r = n_t f_theta - (p1_t x1 + p2_t x0)`` (``n_t f = p1_t x1 + p2_t x0`` is the conditional
    target, :func:`~flowsolve.paths.affine.homogeneous_coefficients`; ``n_t = sigma_t`` for
    the score, else 1).

    ``r`` stays finite where ``sigma_t = 0`` even for the score, so a weighting that cancels
    ``1 / n_t^2`` (``factor = 1``) is finite on the whole of [0, 1]."""
    kind = canonical_prediction(prediction, "prediction")
    check_reduction(reduction)
    _check_inputs(model, path, x0, x1)
    if t is None or x0 is None:
        generator = generator_or_fresh(generator, x1.device)
    if t is None:
        t = sample_time(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
    if x0 is None:
        x0 = _draw(torch.randn, tuple(x1.shape), generator, x1.dtype, x1.device)
    s = path.sample(x0, x1, t)
    v = path.scheduler(s.t)
    n_t, p1_t, p2_t = homogeneous_coefficients(kind, v)
    target = per_sample(p1_t, x1) * x1 + per_sample(p2_t, x0) * x0
    out = model(s.x_t, s.t, **model_kwargs)
    if not torch.is_tensor(out) or out.shape != x1.shape:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(
            f"model(x, t) must return a tensor shaped like x, {tuple(x1.shape)}; got {got}"
        )
    r = per_sample(n_t, out) * out - target
    loss = factor(s.t, v, n_t) * r.pow(2).reshape(r.shape[0], -1).mean(1)
    loss = loss.expand(x1.shape[0])
    return loss.mean() if reduction == "mean" else loss


def _lambda_of(weighting: Weighting, t: Tensor) -> Tensor:
    lam = torch.as_tensor(weighting(t), dtype=t.dtype, device=t.device)
    if lam.shape not in ((), t.shape):
        raise ValueError(
            f"weighting(t) must return a number or a tensor shaped like t, {tuple(t.shape)}; "
            f"got shape {tuple(lam.shape)}"
        )
    return lam


def regression_loss(
    model: Model,
    path: AffineGaussianPath,
    x0: Tensor | None,
    x1: Tensor,
    t: Tensor | float | None = None,
    *,
    prediction: str = "velocity",
    weighting: Weighting | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> Tensor:
    r"""Regress a model of any parameterisation on its conditional target along ``path``.

    ``l_i = lambda(t_i) (1/D) ||f_theta(x_t, t_i) - target_i||^2`` with
    ``x_t = alpha_t x1 + sigma_t x0`` and the target of ``prediction`` (module table:
    ``velocity``, ``score``, ``epsilon``, ``x1``, ``v`` or an alias). Minimised by the
    marginal quantity of that parameterisation for any ``lambda > 0``.

    Args:
        model: ``model(x_t, t, **model_kwargs)`` returning ``(B, *event_shape)``.
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath`.
        x0: source samples ``(B, *event_shape)``, or ``None`` to draw ``x0 ~ N(0, I)`` from
            ``generator``.
        x1: data samples, same shape; ``(x0[i], x1[i])`` are the coupled pairs.
        t: a number, 0-d or ``(B,)`` tensor in [0, 1]; ``None`` draws ``t ~ U[0, 1)`` kept
            in (0, 1) (:func:`sample_time`).
        prediction: what the model outputs.
        weighting: ``lambda(t)`` (a callable of the ``(B,)`` or 0-d time), 1 when omitted.
        generator: the randomness for ``t`` and ``x0`` when they are drawn (None: a fresh
            unseeded generator on x1's device; torch's global RNG is never used).
        reduction: ``"mean"`` (a 0-d tensor) or ``"none"`` (``(B,)``).

    The score target ``-x0 / sigma_t`` is infinite where ``sigma_t = 0`` (t = 1 except for
    VE and linear-beta VP); :func:`denoising_score_matching_loss` with ``"sigma_squared"``
    is finite there.
    """
    if weighting is not None and not callable(weighting):
        raise TypeError(
            f"weighting must be None or a callable lambda(t); got {type(weighting).__name__}"
        )

    def factor(t: Tensor, v: ScheduleValues, n_t: Tensor) -> Tensor:
        lam = 1.0 if weighting is None else _lambda_of(weighting, t)
        return lam / (n_t * n_t)

    return _weighted_regression(
        model, path, x0, x1, t, prediction, factor, generator, reduction, model_kwargs
    )


def flow_matching_loss(
    model: Model,
    path: AffineGaussianPath,
    x0: Tensor | None,
    x1: Tensor,
    t: Tensor | float | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> Tensor:
    r"""Conditional flow matching: ``l_i = (1/D) ||u_theta(x_t, t) - dx_t||^2``.

    ``x_t = alpha_t x1 + sigma_t x0`` and ``dx_t = alpha'_t x1 + sigma'_t x0`` for the given
    pairs, from any coupling (independent, OT, ...). The minimiser is the marginal velocity
    ``u_t(x) = E[dx_t | x_t = x]`` of the coupling (Lipman et al. 2023; Tong et al. 2024).
    Arguments as in :func:`regression_loss`.

    Example:
        >>> import flowsolve as fs
        >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
        >>> x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
        >>> flow_matching_loss(lambda x, t: x1 - x0, path, x0, x1).item()  # exact target
        0.0
    """
    return regression_loss(
        model, path, x0, x1, t, prediction="velocity", generator=generator,
        reduction=reduction, **model_kwargs,
    )


def _dsm_factor(weighting: str | Weighting) -> Callable[[Tensor, ScheduleValues, Tensor], Tensor]:
    """``lambda_t / sigma_t^2``, the weight on ``(1/D) ||sigma_t s_theta + x0||^2``."""
    if callable(weighting):
        return lambda t, v, n_t: _lambda_of(weighting, t) / (v.sigma_t * v.sigma_t)
    if weighting == "sigma_squared":
        return lambda t, v, n_t: torch.ones_like(v.sigma_t)
    if weighting == "none":
        return lambda t, v, n_t: 1 / (v.sigma_t * v.sigma_t)
    if weighting == "likelihood":
        return _likelihood_factor
    raise ValueError(
        f"weighting={weighting!r} is not accepted; accepted: {', '.join(DSM_WEIGHTINGS)} "
        "or a callable lambda(t)"
    )


def _likelihood_factor(t: Tensor, v: ScheduleValues, n_t: Tensor) -> Tensor:
    # g_t^2 / sigma_t^2 = 2 d/dt log(alpha_t / sigma_t)
    #                  = 2 (alpha'_t / alpha_t - sigma'_t / sigma_t)
    return 2 * (v.d_alpha_t / v.alpha_t - v.d_sigma_t / v.sigma_t)


def denoising_score_matching_loss(
    model: Model,
    path: AffineGaussianPath,
    x0: Tensor | None,
    x1: Tensor,
    t: Tensor | float | None = None,
    *,
    weighting: str | Weighting = "sigma_squared",
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> Tensor:
    r"""Denoising score matching: ``l_i = lambda_t (1/D) ||s_theta(x_t, t) + x0 / sigma_t||^2``.

    The target ``-x0 / sigma_t = grad log p_t(x_t | x1)`` is the conditional score; the
    minimiser is the marginal score ``grad log p_t`` (Vincent 2011). The code evaluates
    ``(lambda_t / sigma_t^2) (1/D) ||sigma_t s_theta + x0||^2``. Weightings ``lambda_t``:

    * ``"sigma_squared"`` (default): ``lambda_t = sigma_t^2``, i.e.
      ``(1/D) ||sigma_t s_theta + x0||^2``, finite on all of [0, 1]; equal to
      :func:`epsilon_loss` of the model ``eps_theta = -sigma_t s_theta`` (Song et al. 2021,
      Ho et al. 2020).
    * ``"none"``: ``lambda_t = 1``; infinite where ``sigma_t = 0``.
    * ``"likelihood"``: ``lambda_t = g_t^2 = 2 sigma_t^2 d/dt log(alpha_t / sigma_t)
      = 2 (sigma_t^2 alpha'_t / alpha_t - sigma_t sigma'_t)``, the squared diffusion
      coefficient of the forward SDE (Song, Durkan, Murray & Ermon 2021, "Maximum
      likelihood training of score-based diffusion models"). Derivation in our time
      direction: in diffusion time ``s = 1 - t`` the path is the marginal of
      ``dx = f_s x ds + g_s dW`` with ``f_s = d log alpha / ds`` and
      ``d sigma^2 / ds = 2 f_s sigma^2 + g_s^2``, so ``g^2 = 2 sigma^2 d/ds log(sigma /
      alpha)``; ``d/ds = -d/dt`` gives the formula above, >= 0 because
      ``alpha_t / sigma_t`` increases with t. Examples: linear-beta VP ``g^2 = beta(1 - t)``,
      VE ``g^2 = 2 sigma_t^2 log(sigma_max / sigma_min)``, CondOT ``g^2 = 2 (1 - t) / t``.
      With ``t ~ U[0, 1]``, ``D/2`` times this loss is, up to a constant that does not
      depend on the model, the score-matching bound on the negative log-likelihood of the
      SDE model. The weight ``lambda_t / sigma_t^2`` is infinite (or NaN, 0 / 0) where
      ``alpha_t = 0`` (t = 0 for CondOT, cosine, polynomial) and where ``sigma_t = 0``
      (t = 1 for CondOT, cosine, polynomial, linear-beta VP); of the shipped schedulers only
      VE's is finite on all of [0, 1].
    * a callable ``lambda(t)`` of the ``(B,)`` (or 0-d) time.

    Other arguments as in :func:`regression_loss`.
    """
    factor = _dsm_factor(weighting)
    return _weighted_regression(
        model, path, x0, x1, t, "score", factor, generator, reduction, model_kwargs
    )


def epsilon_loss(
    model: Model,
    path: AffineGaussianPath,
    x0: Tensor | None,
    x1: Tensor,
    t: Tensor | float | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> Tensor:
    r"""The DDPM "simple" loss: ``l_i = (1/D) ||eps_theta(x_t, t) - x0||^2``.

    The model predicts the noise ``x0`` of ``x_t = alpha_t x1 + sigma_t x0``; the minimiser
    is ``E[x0 | x_t] = -sigma_t grad log p_t`` (Ho et al. 2020). Equal to
    :func:`denoising_score_matching_loss` with ``weighting="sigma_squared"`` of the score
    model ``s_theta = -eps_theta / sigma_t``. Arguments as in :func:`regression_loss`.
    """
    return regression_loss(
        model, path, x0, x1, t, prediction="epsilon", generator=generator,
        reduction=reduction, **model_kwargs,
    )


# -- classifier-free guidance ------------------------------------------------------------
def label_dropout(
    labels: Tensor,
    p: float,
    null_label: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Replace each sample's label by ``null_label`` independently with probability ``p``.

    The conditioning dropout of classifier-free guidance training (Ho & Salimans 2022):
    one model learns ``u_t(x | y)`` and, on the null label, ``u_t(x)``. ``labels`` is
    ``(B, ...)``; one draw ``u_i ~ U[0, 1)`` per sample replaces the whole label
    ``labels[i]`` (every entry, as :class:`flowsolve.paths.fields.GuidedField`'s unconditional
    half does) where ``u_i < p``. Returns a new tensor shaped and typed like ``labels``;
    ``p = 0`` returns the labels unchanged and ``p = 1`` all ``null_label``, exactly.
    Randomness only from ``generator`` (None: a fresh unseeded generator on the labels'
    device; torch's global RNG is never used).

    Example:
        >>> label_dropout(torch.tensor([3, 1, 4]), 1.0, null_label=10).tolist()
        [10, 10, 10]
    """
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dim() < 1:
        raise ValueError("labels must be shaped (B, ...), one label per sample; got a 0-d tensor")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a number in [0, 1]; got {type(p).__name__}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1]; got p={p!r}")
    if isinstance(null_label, bool) or not isinstance(null_label, int):
        raise TypeError(f"null_label must be an int; got {type(null_label).__name__}")
    u = _draw(torch.rand, (labels.shape[0],), generator, torch.float32, labels.device)
    drop = per_sample(u < p, labels)  # (B, 1, ...): the whole label of a sample
    return torch.where(drop, torch.full_like(labels, null_label), labels)


# -- bridges -----------------------------------------------------------------------------
def clamp_bridge_time(bridge: GaussianBridge, t: Tensor) -> Tensor:
    """``t`` clamped to ``[1e-5, 1 - 1e-5]`` for the Brownian bridge (its velocity is
    infinite at t = 0 and 1); unchanged for a constant-noise bridge."""
    return t.clamp(1e-5, 1 - 1e-5) if bridge.schedule == "brownian" else t


def bridge_matching_loss(
    model: Callable[..., Tensor],
    bridge: GaussianBridge,
    x0: Tensor,
    x1: Tensor,
    t: Tensor | float | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> Tensor:
    r"""``l_i = (1/D) ||v_theta(x_t, t_i) - dx_t||^2`` on a :class:`GaussianBridge`.

    ``model(x_t, t, **model_kwargs)`` returns ``(B, *event_shape)``; ``x0`` and ``x1`` are
    floating ``(B, *event_shape)`` tensors of coupled pairs (``x0`` is required: a bridge's
    source need not be Gaussian). ``t`` is drawn with :func:`~flowsolve.training.losses.sample_time`
    in (0, 1) (clamped to ``[1e-5, 1 - 1e-5]`` for the Brownian bridge) when omitted;
    ``reduction`` is ``"mean"`` or ``"none"`` (``(B,)``). ``t`` and the bridge noise come
    from ``generator`` (None: a fresh unseeded generator on x1's device; torch's global RNG
    is never used). Bad input: TypeError / ValueError as in
    :func:`flowsolve.training.losses.flow_matching_loss`.
    """
    check_reduction(reduction)
    if not isinstance(bridge, GaussianBridge):
        hint = (" (an AffineGaussianPath goes to flowsolve.flow_matching_loss)"
                if isinstance(bridge, AffineGaussianPath) else "")
        raise TypeError(f"bridge must be a flowsolve.paths.bridges.GaussianBridge; got "
                        f"{type(bridge).__name__}{hint}")
    check_model_and_samples(model, x0, x1, x0_optional=False)
    generator = generator_or_fresh(generator, x1.device)
    if t is None:
        t = clamp_bridge_time(bridge, sample_time(x1.shape[0], generator=generator,
                                                  dtype=x1.dtype, device=x1.device))
    s = bridge.sample(x0, x1, t, generator=generator)
    out = model(s.x_t, s.t, **model_kwargs)
    if not torch.is_tensor(out) or out.shape != x1.shape:
        raise ValueError(f"model(x, t) must return a tensor shaped like x, {tuple(x1.shape)}")
    loss = (out - s.dx_t).pow(2).reshape(x1.shape[0], -1).mean(1)
    return loss.mean() if reduction == "mean" else loss
