r"""Field adapters: a model of any parameterisation presented as a velocity (or as any other
parameterisation), and classifier-free guidance.

A *field* is any callable ``(x, t) -> Tensor`` shaped like ``x``, with ``x`` shaped
``(B, *event_shape)`` and ``t`` a 0-d or ``(B,)`` tensor in [0, 1].

**Conversions.** On an :class:`~flowsolve.paths.affine.AffineGaussianPath` every parameterisation
(velocity, score, epsilon, x1, v) is an affine function of any other,
``to = A_t x + B_t prediction``, with the coefficients of
:meth:`AffineGaussianPath.conversion_coefficients`. For example a score model gives the
probability-flow velocity

    u_t(x) = (alpha'_t / alpha_t) x + (sigma_t^2 alpha'_t / alpha_t - sigma'_t sigma_t) s_t(x),

which is singular where ``alpha_t = 0`` (t = 0 for CondOT and cosine). Conversions are
singular only where ``alpha_t = 0``, ``sigma_t = 0`` or ``sigma'_t`` is infinite, i.e. at the
ends of [0, 1] for the shipped schedulers. A :class:`ConvertedField` checks its coefficients
on every call by default (on a GPU that is a host synchronisation per call); built with
``interval=(t_lo, t_hi)``, or re-bound with :meth:`ConvertedField.on_interval` (which
:func:`flowsolve.ode.solve.sample` does for the interval it integrates over), it checks them
once on that interval and calls never synchronise.

**Classifier-free guidance** (Ho & Salimans 2022) in flowsolve's convention:

    f_w(x, t) = (1 - w) f(x, t | null) + w f(x, t | y),

so ``w = 1`` is the conditional model and ``w = 0`` the unconditional one. The other common
form ``(1 + w') f(x, t | y) - w' f(x, t | null)`` is the same with ``w = 1 + w'`` (its
``w' = 0`` is our ``w = 1``). The combination is linear in the prediction and every
conversion above is affine with a ``B_t`` shared by both halves, so guiding a score model
and then converting equals converting and then guiding: guidance works the same for
velocity, score, epsilon and x1 models.

**Scheduler transfer** (a velocity trained on one scheduler sampled under another) is the
third kind of field adapter; it lives in :mod:`flowsolve.paths.transfer`
(:func:`~flowsolve.paths.transfer.transfer`), kept apart because it changes the clock as well as
the parameterisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._core.checks import as_time
from .._core.types import Field, restrict_rows
from .affine import AffineGaussianPath

__all__ = ["Field", "ConvertedField", "convert_field", "as_velocity", "as_score",
           "GuidedField", "guided", "probability_flow"]


_CHECK_POINTS = 1025  # grid on which an interval is checked once (ends included exactly)


def _check_callable(model, name: str = "model") -> None:
    if not callable(model):
        raise TypeError(f"{name} must be callable (x, t) -> Tensor; got {type(model).__name__}")


def _check_interval_arg(interval) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        msg = f"interval must be a pair (t_lo, t_hi) of numbers; got {interval!r}"
        raise TypeError(msg) from None
    lo, hi = min(lo, hi), max(lo, hi)
    if not (0.0 <= lo <= hi <= 1.0 and math.isfinite(hi)):
        raise ValueError(f"interval must lie in [0, 1] (0 = noise, 1 = data); got {interval!r}")
    return lo, hi


class ConvertedField:
    r"""A model predicting ``from_kind`` presented as a ``to_kind`` field on ``path``:
    ``(x, t) -> A_t x + B_t model(x, t)``.

    Args:
        model: a field ``(x, t) -> Tensor`` predicting ``from_kind``.
        path: the :class:`AffineGaussianPath` the model was trained on.
        from_kind, to_kind: ``"velocity"``, ``"score"``, ``"epsilon"`` (``"x0"``,
            ``"noise"``), ``"x1"`` (``"data"``) or ``"v"``.
        interval: ``(t_lo, t_hi)``: check the coefficients once on this interval (ValueError
            naming the first singular t) and never per call; calls with CPU times outside it
            raise. The first call in each dtype also checks the two ends as that dtype
            rounds them (on the CPU, no device synchronisation): ``1 - 1e-8`` is exactly 1 in
            float32. ``None``: check every call.

    Shapes: ``x`` ``(B, *event_shape)``, ``t`` 0-d or ``(B,)``; output shaped like ``x``.
    """

    def __init__(self, model: Field, path: AffineGaussianPath, from_kind: str,
                 to_kind: str = "velocity", *,
                 interval: tuple[float, float] | None = None):
        _check_callable(model)
        if not isinstance(path, AffineGaussianPath):
            raise TypeError(f"path must be an AffineGaussianPath; got {type(path).__name__}")
        # validates both names (ValueError listing the accepted ones)
        path.conversion_coefficients(torch.tensor(0.5, dtype=torch.float64), from_kind, to_kind)
        self.model, self.path, self.from_kind, self.to_kind = model, path, from_kind, to_kind
        self.interval: tuple[float, float] | None = None
        self._checked_dtypes: set[torch.dtype] = {torch.float64}  # the grid's dtype
        if interval is not None:
            self.interval = self._check_once(*_check_interval_arg(interval))

    def __repr__(self) -> str:
        return (f"ConvertedField({self.model!r}, {self.path!r}, {self.from_kind!r} -> "
                f"{self.to_kind!r}, interval={self.interval})")

    def _check_once(self, lo: float, hi: float) -> tuple[float, float]:
        t = torch.linspace(lo, hi, _CHECK_POINTS, dtype=torch.float64)
        a_t, b_t = self.path.conversion_coefficients(t, self.from_kind, self.to_kind)
        self._raise_if_singular(t, a_t, b_t, lo, hi)
        return lo, hi

    def _raise_if_singular(self, t: Tensor, a_t: Tensor, b_t: Tensor, lo: float, hi: float,
                           note: str = "") -> None:
        bad = ~(torch.isfinite(a_t) & torch.isfinite(b_t))
        if bool(bad.any()):
            where = t[bad][0].item()
            raise ValueError(
                f"converting {self.from_kind!r} to {self.to_kind!r} on {self.path!r} is "
                f"singular at t={where!r}{note}, inside interval=[{lo!r}, {hi!r}]: restrict "
                "it to [eps, 1 - eps] where the conversion is regular")

    def _check_ends_in(self, dtype: torch.dtype) -> None:
        """Check the interval's ends as ``dtype`` rounds them, computed in ``dtype`` on the
        CPU (once per dtype)."""
        lo, hi = self.interval
        ends = torch.tensor([lo, hi], dtype=dtype)
        a_t, b_t = self.path.conversion_coefficients(ends, self.from_kind, self.to_kind)
        self._raise_if_singular(ends, a_t, b_t, lo, hi, f" (an end rounded to {dtype})")
        self._checked_dtypes.add(dtype)

    def on_interval(self, t_lo: float, t_hi: float) -> ConvertedField:
        """The same field, checked once on ``[t_lo, t_hi]`` (either order) instead of per call."""
        return ConvertedField(self.model, self.path, self.from_kind, self.to_kind,
                              interval=(t_lo, t_hi))

    def rows(self, index: Tensor) -> ConvertedField:
        """The field for the samples ``index`` (:func:`~flowsolve._core.types.restrict_rows`
        of the model)."""
        out = ConvertedField(restrict_rows(self.model, index), self.path, self.from_kind,
                             self.to_kind)
        out.interval, out._checked_dtypes = self.interval, self._checked_dtypes
        return out

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x)
        if self.interval is not None and t.dtype not in self._checked_dtypes:
            self._check_ends_in(t.dtype)
        if self.interval is not None and t.device.type == "cpu":
            lo, hi = self.interval
            slack = 1e-12
            outside = ((t < lo - slack) | (t > hi + slack)).reshape(-1)
            if bool(outside.any()):
                raise ValueError(
                    f"t={t.reshape(-1)[outside][0].item()!r} is outside the interval "
                    f"[{lo!r}, {hi!r}] this field was checked on; use on_interval(...) for "
                    "the interval you need")
        prediction = self.model(x, t)
        return self.path.convert(prediction, x, t, self.from_kind, self.to_kind,
                                 check=self.interval is None)


def convert_field(model: Field, path: AffineGaussianPath, from_kind: str, to_kind: str, *,
                  interval: tuple[float, float] | None = None) -> ConvertedField:
    """Present a ``from_kind`` model as a ``to_kind`` field (see :class:`ConvertedField`)."""
    return ConvertedField(model, path, from_kind, to_kind, interval=interval)


def as_velocity(model: Field, path: AffineGaussianPath, from_kind: str, *,
                interval: tuple[float, float] | None = None) -> ConvertedField:
    r"""The velocity ``u_t(x) = A_t x + B_t model(x, t)`` of a ``from_kind`` model.

    From a score model this is the probability-flow ODE's velocity
    ``u = (alpha'/alpha) x + (sigma^2 alpha'/alpha - sigma' sigma) s``.

    Example:
        >>> import torch, flowsolve as fs
        >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
        >>> data = fs.GaussianMixture.ring(4)
        >>> u = as_velocity(fs.analytic.marginal_score(data, path), path, "score")
        >>> x = torch.randn(3, 2, dtype=torch.float64)
        >>> exact = fs.analytic.marginal_velocity(data, path)
        >>> bool(torch.allclose(u(x, 0.3), exact(x, 0.3)))
        True
    """
    return ConvertedField(model, path, from_kind, "velocity", interval=interval)


def as_score(model: Field, path: AffineGaussianPath, from_kind: str = "velocity", *,
             interval: tuple[float, float] | None = None) -> ConvertedField:
    r"""The score ``grad log p_t(x) = A_t x + B_t model(x, t)`` of a ``from_kind`` model
    (from a velocity: ``s = (alpha u - alpha' x) / (sigma (alpha' sigma - alpha sigma'))``,
    singular where ``sigma_t = 0``)."""
    return ConvertedField(model, path, from_kind, "score", interval=interval)


class GuidedField:
    r"""Classifier-free guidance ``f_w(x, t) = (1 - w) f(x, t | null) + w f(x, t | y)``.

    ``model(x, t, y)`` is a conditional model whose ``null_label`` means "no label"
    (e.g. :class:`flowsolve.training.nets.MLP`, trained with label dropout). For ``w`` other than 0
    and 1 each call evaluates the conditional and unconditional halves in **one** batched
    model call of ``2B`` samples
    (``x`` and ``t`` repeated, labels ``[y, null]``), so one guided evaluation is one model
    evaluation. ``w = 1`` is the conditional model and ``w = 0`` the unconditional one,
    exactly and at the cost of a ``B``-sample call (the other half would be multiplied by 0).

    Attributes:
        labels: ``(B, ...)`` labels of the samples being generated.
        w: guidance weight; null_label: the label value meaning "unconditional".
    """

    def __init__(self, model: Callable[[Tensor, Tensor, Tensor], Tensor], labels: Tensor,
                 w: float, *, null_label: int | float | Tensor | None = None):
        _check_callable(model)
        if not torch.is_tensor(labels) or labels.dim() < 1:
            raise TypeError(f"labels must be a tensor shaped (B, ...); got "
                            f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"w must be a finite number (1 = conditional, 0 = unconditional); "
                            f"got {type(w).__name__}")
        if not math.isfinite(w):
            raise ValueError(f"w must be a finite number (1 = conditional, 0 = unconditional); "
                             f"got {w!r}")
        if null_label is None:
            null_label = getattr(model, "null_label", None)
            if null_label is None:
                raise ValueError("null_label is required: the label value meaning "
                                 "'unconditional' (the model has no null_label attribute)")
        given = torch.as_tensor(null_label)
        if (not labels.is_floating_point() and given.is_floating_point()
                and not bool((given == given.round()).all())):
            raise ValueError(f"null_label must be an integer for labels of dtype {labels.dtype} "
                             f"(it would be truncated); got {null_label!r}")
        null = torch.as_tensor(null_label, dtype=labels.dtype, device=labels.device)
        try:
            null = null.expand_as(labels)
        except RuntimeError:
            raise ValueError(f"null_label of shape {tuple(null.shape)} does not broadcast to "
                             f"labels of shape {tuple(labels.shape)}") from None
        self.model, self.labels, self.w = model, labels, float(w)
        self.null_label = null_label
        self._both = torch.cat([labels, null])  # (2B, ...): conditional half first

    def __repr__(self) -> str:
        return f"GuidedField({self.model!r}, w={self.w:g}, null_label={self.null_label!r})"

    def rows(self, index: Tensor) -> GuidedField:
        """The guided field of the samples ``index``: their labels."""
        return GuidedField(restrict_rows(self.model, index), self.labels[index], self.w,
                           null_label=self.null_label)

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        b = x.shape[0] if torch.is_tensor(x) and x.dim() else -1
        if b != self.labels.shape[0]:
            raise ValueError(f"x must hold one sample per label, (B, ...) with B = "
                             f"{self.labels.shape[0]}; got x of shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        t = as_time(t, x)
        if self.w in (0.0, 1.0):
            return self.model(x, t, self._both[b:] if self.w == 0 else self.labels)
        t2 = t if t.dim() == 0 else torch.cat([t, t])
        out = self.model(torch.cat([x, x]), t2, self._both)
        cond, uncond = out[:b], out[b:]
        return torch.add(uncond * (1.0 - self.w), cond, alpha=self.w)


def guided(model: Callable[[Tensor, Tensor, Tensor], Tensor], labels: Tensor, w: float, *,
           null_label: int | float | Tensor | None = None) -> GuidedField:
    r"""Classifier-free guidance ``(1 - w) f(x, t | null) + w f(x, t | y)`` of a conditional
    model ``model(x, t, y)`` for the labels ``labels`` ``(B, ...)``: a field ``(x, t)``.

    ``w = 1``: conditional; ``w = 0``: unconditional; ``w > 1`` extrapolates (the
    ``(1 + w') cond - w' uncond`` form has ``w = 1 + w'``). Works for velocity and score
    (and epsilon, x1) models alike. ``null_label`` defaults to ``model.null_label``.

    Example:
        >>> import torch
        >>> model = lambda x, t, y: x * y[:, None]          # "conditional" on y
        >>> f = guided(model, torch.tensor([2.0, 3.0]), w=1.5, null_label=0.0)
        >>> f(torch.ones(2, 1), 0.5).flatten().tolist()     # 1.5 * y + (-0.5) * 0
        [3.0, 4.5]
    """
    return GuidedField(model, labels, w, null_label=null_label)


def probability_flow(score: Field, path: AffineGaussianPath, *,
                     interval: tuple[float, float] | None = None) -> ConvertedField:
    r"""The probability-flow ODE's velocity of a score model on ``path``,
    ``u_t(x) = (alpha'_t/alpha_t) x + (sigma_t^2 alpha'_t/alpha_t - sigma'_t sigma_t) s_t(x)``.

    Its flow has the marginals ``p_t`` of ``s_t = grad log p_t``. Singular where
    ``alpha_t = 0`` (t = 0 for CondOT / cosine): start from ``t0 = eps`` with a sample of
    ``p_eps`` (the front door checks the interval once, see :mod:`flowsolve.paths.fields`).
    """
    return as_velocity(score, path, "score", interval=interval)
