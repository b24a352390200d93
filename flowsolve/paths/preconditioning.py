r"""EDM preconditioning (Karras et al. 2022, Table 1) of a raw network on any affine path.

EDM writes the ideal denoiser of the noise level ``r`` (EDM's sigma) as

    D(y; r) = c_skip(r) y + c_out(r) F(c_in(r) y, c_noise(r)),

    c_skip = sd^2 / (r^2 + sd^2),  c_out = r sd / sqrt(r^2 + sd^2),
    c_in = 1 / sqrt(r^2 + sd^2),   c_noise = ln(r) / 4,

with ``sd`` = sigma_data, chosen so that the network's input and its training target
have unit variance for data of variance ``sd^2`` (and ``F = 0`` is the exact denoiser of
``N(0, sd^2 I)`` data). On a flowsolve path ``x_t = alpha_t x1 + sigma_t x0`` the scaled
state ``y = x / alpha_t = x1 + r x0`` is EDM's noisy sample at ``r = sigma_t / alpha_t``
(EDM's own path is VE, ``alpha_t = 1``), so ``D(x / alpha_t; sigma_t / alpha_t) =
E[x1 | x_t = x]``: an ``"x1"``-prediction field (``sample(..., prediction="x1")``).

Example:
    >>> import torch, flowsolve as fs
    >>> c = edm_coefficients(torch.tensor(0.5), sigma_data=0.5)
    >>> [round(v.item(), 6) for v in c]
    [0.5, 0.353553, 1.414214, -0.173287]
    >>> path = fs.AffineGaussianPath(fs.VEScheduler(0.002, 80.0))
    >>> D = EDMPreconditioned(lambda y, c_noise: torch.zeros_like(y), path, sigma_data=0.5)
    >>> D(torch.ones(1, 2), 1.0)  # F = 0: the denoiser of N(0, sd^2 I), sd^2 y / (r^2 + sd^2)
    tensor([[1.0000, 1.0000]])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._core.checks import as_time, check_same_shape, per_sample
from .._core.types import restrict_rows
from .affine import AffineGaussianPath

__all__ = ["EDMCoefficients", "edm_coefficients", "EDMPreconditioned"]


class EDMCoefficients(NamedTuple):
    """EDM's preconditioning at one noise level (Karras et al. 2022, Table 1)."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def _sigma_data(v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"sigma_data must be a finite number > 0 (the data's standard "
                        f"deviation; EDM: 0.5); got {type(v).__name__} {v!r}")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"sigma_data must be a finite number > 0 (the data's standard "
                         f"deviation; EDM: 0.5); got {v!r}")
    return float(v)


def edm_coefficients(r: Tensor | float, sigma_data: float = 0.5) -> EDMCoefficients:
    r"""``c_skip = sd^2 / (r^2 + sd^2)``, ``c_out = r sd / sqrt(r^2 + sd^2)``, ``c_in = 1 /
    sqrt(r^2 + sd^2)``, ``c_noise = ln(r) / 4`` at the noise level ``r >= 0`` (EDM's sigma),
    elementwise."""
    sd = _sigma_data(sigma_data)
    r = torch.as_tensor(r)
    r = r if r.is_floating_point() else r.to(torch.get_default_dtype())
    if r.device.type == "cpu" and bool(((r < 0) | r.isnan()).any()):
        raise ValueError(f"the noise level r must be >= 0; got {r[(r < 0) | r.isnan()][0]!r}")
    norm = torch.sqrt(r * r + sd * sd)
    return EDMCoefficients(sd * sd / (r * r + sd * sd), r * sd / norm, 1 / norm,
                           torch.log(r) / 4)


class EDMPreconditioned:
    r"""A raw network ``F`` as the denoiser ``E[x1 | x_t = x]`` of a path, by EDM's
    preconditioning in ``y = x / alpha_t`` and ``r = sigma_t / alpha_t``.

    ``D(x, t) = c_skip y + c_out F(c_in y, c_noise)``, evaluated in forms that do not divide
    by ``alpha_t``: with ``n_t = sigma_t^2 + alpha_t^2 sd^2``,

    ``c_skip y = alpha_t sd^2 x / n_t``, ``c_out = sigma_t sd / sqrt(n_t)``,
    ``c_in y = x / sqrt(n_t)``, ``c_noise = (ln sigma_t - ln alpha_t) / 4 = -lambda_t / 4``

    (``c_noise`` is ``inf`` where ``alpha_t = 0`` and ``-inf`` where ``sigma_t = 0``; the
    samplers never call the model at ``sigma_t = 0``). Use it with ``prediction="x1"``.

    Args:
        network: ``F(x_in, c_noise)`` with ``x_in`` shaped like ``x`` and ``c_noise`` a
            ``(B,)`` tensor; returns ``x``'s shape.
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath` (EDM's own: VE).
        sigma_data: ``sd``, the data's standard deviation (EDM: 0.5).
    """

    def __init__(self, network: Callable[[Tensor, Tensor], Tensor], path: AffineGaussianPath,
                 sigma_data: float = 0.5):
        if not callable(network):
            raise TypeError(f"network must be callable as F(x_in, c_noise); got "
                            f"{type(network).__name__}")
        if not isinstance(path, AffineGaussianPath):
            raise TypeError(f"path must be an AffineGaussianPath; got {type(path).__name__}")
        self.network, self.path, self.sigma_data = network, path, _sigma_data(sigma_data)

    def __repr__(self) -> str:
        return f"EDMPreconditioned({self.network!r}, {self.path!r}, sigma_data={self.sigma_data!r})"

    def rows(self, index: Tensor) -> EDMPreconditioned:
        """The field of the samples ``index`` (see :func:`~flowsolve._core.types.restrict_rows`)."""
        return EDMPreconditioned(restrict_rows(self.network, index), self.path, self.sigma_data)

    def coefficients(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip / alpha_t, c_out, c_in / alpha_t, c_noise)`` at ``t`` (0-d or ``(B,)``):
        the factors of ``x`` and of ``F`` in :meth:`__call__`."""
        t = as_time(t, x)
        v = self.path.scheduler(t)
        a, s, sd2 = v.alpha_t, v.sigma_t, self.sigma_data ** 2
        n_t = s * s + a * a * sd2
        root = torch.sqrt(n_t)
        c_noise = (torch.log(s) - torch.log(a)) / 4
        return a * sd2 / n_t, s * self.sigma_data / root, 1 / root, c_noise

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        skip, out, c_in, c_noise = self.coefficients(x, t)
        c_noise = c_noise.expand(x.shape[0]) if c_noise.dim() == 0 else c_noise
        f = self.network(per_sample(c_in, x) * x, c_noise)
        if not torch.is_tensor(f) or f.shape != x.shape:
            shape = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
            raise ValueError(f"network(x_in, c_noise) must return a tensor shaped like x "
                             f"{tuple(x.shape)}; got {shape}")
        return per_sample(skip, x) * x + per_sample(out, x) * f

    def target(self, x: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        r"""The network's regression target at ``x = x_t``: the ``F`` with ``D(x, t) = x1``,
        ``F* = (x1 - c_skip y) / c_out = (x1 - alpha_t sd^2 x / n_t) sqrt(n_t) / (sigma_t
        sd)`` (singular where ``sigma_t = 0``). Its variance is 1 for ``x1 ~ N(0, sd^2)``."""
        check_same_shape(x, x1, "x", "x1")
        skip, out, _, _ = self.coefficients(x, t)
        return (x1 - per_sample(skip, x) * x) / per_sample(out, x)

    def loss_weight(self, t: Tensor | float) -> Tensor:
        r"""EDM's loss weight ``lambda(r) = (r^2 + sd^2) / (r sd)^2 = 1 / c_out^2 = n_t /
        (sigma_t sd)^2``, so that ``lambda |D - x1|^2 = |F - F*|^2`` (shaped like ``t``;
        infinite where ``sigma_t = 0``)."""
        v = self.path.scheduler(t)
        a, s, sd2 = v.alpha_t, v.sigma_t, self.sigma_data ** 2
        return (s * s + a * a * sd2) / (s * s * sd2)
