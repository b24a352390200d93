r"""Toy 2-D distributions at the scales of the literature, and the 8x8 digits.

Every sampler is written in torch and draws only from the ``torch.Generator`` it is given
(float64 on the generator's device, then cast to ``dtype`` / moved to ``device``; None: a
fresh unseeded generator on the CPU; torch's global RNG is never used). The definitions,
so that numbers compare with published tables:

================  =====================================================================
name              definition
================  =====================================================================
``8gaussians``    8 isotropic Gaussians, std 1, centres at radius 5 and angles
                  ``2 pi k / 8``, equal weights: the N->8gaussians target of Tong et al.
                  (TMLR 2024) as re-run in [SF]2M (torchdyn ``ToyDataset("gaussians")``
                  with ``radius=5, std_gaussians=1``; torchdyn draws exactly N/8 points per
                  component plus a 1e-3 per-component offset, neither reproduced). An
                  analytic :class:`~flowsolve.truth.analytic.GaussianMixture` (exact
                  ``log_prob``); mean 0, covariance ``(r^2 / 2 + std^2) I = 13.5 I``.
``8gaussians_torchcfm``  torchcfm's *package* ``sample_8gaussians``: radius 5 but
                  ``MultivariateNormal(0, sqrt(0.1) I)`` takes a covariance, so the
                  per-coordinate variance is ``sqrt(0.1) = 0.316`` (std 0.562), not 0.1.
``moons``         ``make_moons(noise=0.05)`` times 2, then the first coordinate minus 1
                  (the [SF]2M / runner N->moons target).
``scurve``        ``make_s_curve(noise=0.05)``, coordinates (0, 2), times 1.5.
``circles``       ``make_circles(factor=0.5, noise=0.05)`` times 3.5 (radii 3.5, 1.75).
``checkerboard``  FFJORD's: ``x1 ~ U[-2, 2)``, ``x2 ~ U([-2, -1) u [0, 1)) + (floor(x1)
                  mod 2)``, times 2: uniform on the 8 squares of side 2 of [-4, 4]^2 with
                  ``floor(x/2) + floor(y/2)`` even.
``2spirals``      FFJORD's: ``r = sqrt(u) 540 (2 pi / 360)``, arm ``a = (-cos(r) r + 0.5
                  u', sin(r) r + 0.5 u'')`` and its mirror ``-a``, both divided by 3, plus
                  ``N(0, 0.1^2 I)``.
``moons_dsb``     the moons->8gaussians *source* (DSB code, as in the runner):
                  ``make_moons(noise=0.1)`` standardised by one scalar mean and standard
                  deviation over all coordinates, times 7.
``8gaussians_dsb``  the moons->8gaussians *target*: 8 Gaussians at radius 12, std 1.5.
================  =====================================================================

``make_moons``, ``make_s_curve`` and ``make_circles`` reproduce scikit-learn's
definitions (sklearn.datasets, v1.x) in torch, so scikit-learn is not needed:

* moons: ``n_out = n // 2`` points ``(cos a, sin a)`` and ``n - n_out`` points
  ``(1 - cos a, 1/2 - sin a)``, ``a`` evenly spaced on ``[0, pi]`` (``linspace``, endpoints
  included), shuffled, plus ``N(0, noise^2 I)``. Continuous-limit moments: mean
  ``(1/2, 1/4)``, ``Var x = 3/4``, ``Var y = 9/16 - 1/pi``, ``Cov = 1/8 - 1/pi``.
* s-curve: ``t ~ U[-3 pi / 2, 3 pi / 2)``, ``(sin t, 2 u, sign(t) (cos t - 1))`` plus
  ``N(0, noise^2 I_3)``; returns the points and ``t``. Mean of the (0, 2) coordinates 0,
  ``E sin^2 t = 1/2``, ``E z^2 = 3/2 + 4 / (3 pi)``, ``E[x z] = -1 / (3 pi)``.
* circles: ``n // 2`` points on the unit circle and the rest on the circle of radius
  ``factor``, angles ``linspace(0, 2 pi)`` without the endpoint, shuffled, plus noise.

The moons and circles are *evenly spaced* before the noise, as in scikit-learn: a
sample is not i.i.d. along the curve. ``moons_dsb`` standardises with the population
mean ``3/8`` and standard deviation (closed form in :func:`_moons_dsb`) rather than the
sample's own, so that its distribution does not depend on ``n`` (the DSB code uses the
sample's; at n = 10,000 the two differ by about 1%).

References: Grathwohl et al. (2019), FFJORD (``lib/toy_data.py``); Tong et al. (2024);
Tong et al. (2024b), [SF]2M, App. F; De Bortoli et al. (2021), DSB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.checks import generator_or_fresh
from ..truth.analytic import GaussianMixture

__all__ = [
    "LabeledSamples",
    "ToyDataset",
    "DATASETS",
    "get_dataset",
    "sample_dataset",
    "sample_labeled",
    "make_moons",
    "make_s_curve",
    "make_circles",
    "load_digits",
]

F64 = torch.float64
Device = torch.device | str | None


@dataclass(frozen=True)
class LabeledSamples:
    """Samples ``x`` ``(N, *event_shape)`` with integer labels ``y`` ``(N,)``.

    Indexing gives ``(x[i], y[i])``, so it can serve as a map-style data set.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[:1] != self.y.shape:
            raise ValueError(f"x {tuple(self.x.shape)} and y {tuple(self.y.shape)} must have "
                             "the same number of samples, y shaped (N,)")

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# -- randomness ------------------------------------------------------------------------
def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape: tuple[int, ...], g: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=g, dtype=F64, device=_device_of(g))


def _randn(shape: tuple[int, ...], g: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=g, dtype=F64, device=_device_of(g))


def _shuffle(x: Tensor, y: Tensor, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(x.shape[0], generator=g, device=_device_of(g))
    return x[perm], y[perm]


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    return n


def _check_noise(noise: float | None) -> float:
    noise = 0.0 if noise is None else noise
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0 or None; got {noise!r}")
    return float(noise)


# -- scikit-learn's generators, in torch ----------------------------------------------------
def make_moons(
    n: int, *, noise: float | None = None, shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``make_moons`` in torch: points ``(n, 2)`` float64 and moon labels
    ``(n,)`` (0 outer, 1 inner); definition in the module docstring."""
    n, noise = _check_n(n), _check_noise(noise)
    generator = generator_or_fresh(generator, "cpu")
    dev = _device_of(generator)
    n_out = n // 2
    a_out = torch.linspace(0, math.pi, n_out, dtype=F64, device=dev)
    a_in = torch.linspace(0, math.pi, n - n_out, dtype=F64, device=dev)
    x = torch.cat([torch.stack([a_out.cos(), a_out.sin()], 1),
                   torch.stack([1 - a_in.cos(), 0.5 - a_in.sin()], 1)])
    y = torch.cat([torch.zeros(n_out, dtype=torch.long, device=dev),
                   torch.ones(n - n_out, dtype=torch.long, device=dev)])
    if shuffle:
        x, y = _shuffle(x, y, generator)
    if noise > 0:
        x = x + noise * _randn((n, 2), generator)
    return x, y


def make_s_curve(
    n: int, *, noise: float | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``make_s_curve`` in torch: points ``(n, 3)`` float64 and the curve
    parameter ``t`` ``(n,)``; definition in the module docstring."""
    n, noise = _check_n(n), _check_noise(noise)
    generator = generator_or_fresh(generator, "cpu")
    t = 3 * math.pi * (_rand((n,), generator) - 0.5)
    height = 2 * _rand((n,), generator)
    x = torch.stack([t.sin(), height, torch.sign(t) * (t.cos() - 1)], 1)
    if noise > 0:
        x = x + noise * _randn((n, 3), generator)
    return x, t


def make_circles(
    n: int, *, noise: float | None = None, factor: float = 0.8, shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``make_circles`` in torch: points ``(n, 2)`` float64 and labels
    ``(n,)`` (0 unit circle, 1 circle of radius ``factor``)."""
    n, noise = _check_n(n), _check_noise(noise)
    if not 0 <= factor < 1:
        raise ValueError(f"factor must lie in [0, 1); got {factor!r}")
    generator = generator_or_fresh(generator, "cpu")
    dev = _device_of(generator)
    n_out = n // 2
    parts, labels = [], []
    for label, (m, radius) in enumerate(((n_out, 1.0), (n - n_out, factor))):
        a = torch.arange(m, dtype=F64, device=dev) * (2 * math.pi / max(m, 1))
        parts.append(radius * torch.stack([a.cos(), a.sin()], 1))
        labels.append(torch.full((m,), label, dtype=torch.long, device=dev))
    x, y = torch.cat(parts), torch.cat(labels)
    if shuffle:
        x, y = _shuffle(x, y, generator)
    if noise > 0:
        x = x + noise * _randn((n, 2), generator)
    return x, y


# -- the named data sets ---------------------------------------------------------------------
Sampler = Callable[[int, "torch.Generator | None"], tuple[Tensor, Tensor]]


def _mixture_sampler(mix: GaussianMixture) -> Sampler:
    """Draws from ``mix`` with the component index as the label."""

    def sample(n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
        dev = _device_of(g)
        if n == 0:  # torch.multinomial refuses to draw no samples
            return (torch.zeros(0, mix.dim, dtype=F64, device=dev),
                    torch.zeros(0, dtype=torch.long, device=dev))
        comp = torch.multinomial(mix.weights.to(dev), n, replacement=True, generator=g)
        z = _randn((n, mix.dim), g) * mix.eigvals.to(dev)[comp].sqrt()
        if mix.eigvecs is not None:
            z = torch.einsum("nij,nj->ni", mix.eigvecs.to(dev)[comp], z)
        return mix.means.to(dev)[comp] + z, comp

    return sample


def _moons(n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    x, y = make_moons(n, noise=0.05, generator=g)
    return x * 2 - torch.tensor([1.0, 0.0], dtype=F64, device=x.device), y


def _scurve(n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    x, t = make_s_curve(n, noise=0.05, generator=g)
    return 1.5 * x[:, [0, 2]], (t >= 0).long()


def _circles(n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    x, y = make_circles(n, noise=0.05, factor=0.5, generator=g)
    return 3.5 * x, y


def _checkerboard(n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    x1 = 4 * _rand((n,), g) - 2
    row = torch.randint(0, 2, (n,), generator=g, device=_device_of(g))
    column = torch.floor(x1)
    x2 = _rand((n,), g) - 2 * row + torch.remainder(column, 2)
    label = 2 * (column.long() + 2) + row
    return 2 * torch.stack([x1, x2], 1), label


def _spirals(n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    r = _rand((n,), g).sqrt() * (540 * 2 * math.pi / 360)
    arm = torch.stack([-r.cos() * r + 0.5 * _rand((n,), g), r.sin() * r + 0.5 * _rand((n,), g)], 1)
    label = (torch.arange(n, device=arm.device) >= n // 2).long()
    sign = 1 - 2 * label.to(F64)
    x = sign[:, None] * arm / 3 + 0.1 * _randn((n, 2), g)
    return _shuffle(x, label, g)


# population moments of make_moons(noise=s), pooled over both coordinates
def _moons_dsb_moments(noise: float) -> tuple[float, float]:
    """(mean, std) of all coordinates of make_moons(noise) pooled: mean ``(1/2 + 1/4) / 2
    = 3/8``; second moment ``(E x^2 + E y^2) / 2`` with ``E x^2 = 1 + s^2`` and
    ``E y^2 = 5/8 - 1/pi + s^2`` (continuous limit)."""
    mean = 3 / 8
    second = 0.5 * ((1 + noise**2) + (5 / 8 - 1 / math.pi + noise**2))
    return mean, math.sqrt(second - mean**2)


def _moons_dsb(n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    x, y = make_moons(n, noise=0.1, generator=g)
    mean, std = _moons_dsb_moments(0.1)
    return (x - mean) / std * 7, y


@dataclass(frozen=True)
class ToyDataset:
    """A named 2-D distribution: ``sample`` / ``sample_labeled`` draw from it; when it is a
    Gaussian mixture, ``distribution`` holds it (exact ``log_prob``, marginal fields)."""

    name: str
    description: str
    sampler: Sampler
    num_classes: int
    distribution: GaussianMixture | None = None
    dim: int = 2

    def sample_labeled(
        self, n: int, *, generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None, device: Device = None,
    ) -> LabeledSamples:
        """``n`` points ``(n, 2)`` and their labels ``(n,)`` (component, moon, arm, ...)."""
        x, y = self.sampler(_check_n(n), generator_or_fresh(generator, "cpu"))
        x = x.to(dtype=dtype or torch.get_default_dtype(), device=device)
        return LabeledSamples(x, y.to(device=device))

    def sample(
        self, n: int, *, generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None, device: Device = None,
    ) -> Tensor:
        """``n`` points ``(n, 2)``; randomness only from ``generator`` (None: a fresh
        unseeded generator; torch's global RNG is never used)."""
        return self.sample_labeled(n, generator=generator, dtype=dtype, device=device).x

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` ``(B,)``, for the Gaussian-mixture data sets only."""
        if self.distribution is None:
            raise ValueError(f"{self.name!r} has no closed-form density; those with one: "
                             f"{', '.join(k for k, v in DATASETS.items() if v.distribution)}")
        return self.distribution.log_prob(x)


def _mixture(name: str, description: str, radius: float, std: float) -> ToyDataset:
    mix = GaussianMixture.ring(8, radius=radius, std=std)
    return ToyDataset(name, description, _mixture_sampler(mix), 8, mix)


DATASETS: dict[str, ToyDataset] = {
    d.name: d
    for d in (
        _mixture("8gaussians", "8 Gaussians, radius 5, std 1 (Tong et al. runner)", 5.0, 1.0),
        _mixture("8gaussians_torchcfm", "torchcfm package: radius 5, variance sqrt(0.1)",
                 5.0, 0.1**0.25),
        ToyDataset("moons", "make_moons(noise=0.05) x2, first coordinate -1", _moons, 2),
        ToyDataset("scurve", "make_s_curve(noise=0.05), coordinates (0, 2), x1.5", _scurve, 2),
        ToyDataset("circles", "make_circles(factor=0.5, noise=0.05) x3.5", _circles, 2),
        ToyDataset("checkerboard", "FFJORD checkerboard on [-4, 4]^2", _checkerboard, 8),
        ToyDataset("2spirals", "FFJORD two spirals", _spirals, 2),
        ToyDataset("moons_dsb", "make_moons(noise=0.1) standardised x7 (moons->8gaussians "
                   "source)", _moons_dsb, 2),
        _mixture("8gaussians_dsb", "8 Gaussians, radius 12, std 1.5 (moons->8gaussians "
                 "target)", 12.0, 1.5),
    )
}


def get_dataset(name: str) -> ToyDataset:
    """The registered data set ``name`` (keys of :data:`DATASETS`)."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown data set {name!r}; accepted: {', '.join(DATASETS)}") from None


def sample_dataset(
    name: str, n: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None, device: Device = None,
) -> Tensor:
    """``n`` samples ``(n, 2)`` of the named data set (see the module table).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_dataset("moons", 4, generator=g).shape
        torch.Size([4, 2])
    """
    return get_dataset(name).sample(n, generator=generator, dtype=dtype, device=device)


def sample_labeled(
    name: str, n: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None, device: Device = None,
) -> LabeledSamples:
    """``n`` samples of the named data set with their labels (component, moon, arm...)."""
    return get_dataset(name).sample_labeled(n, generator=generator, dtype=dtype, device=device)


# -- a small real data set ----------------------------------------------------------------
def load_digits(*, dtype: torch.dtype | None = None) -> LabeledSamples:
    """scikit-learn's 8x8 handwritten digits (1797 images, UCI): ``x`` ``(1797, 1, 8, 8)``
    scaled from the 17 grey levels 0..16 to [-1, 1] (``x / 8 - 1``), ``y`` ``(1797,)`` in
    0..9. Needs scikit-learn (``pip install flowsolve[data]``), which ships the data."""
    try:
        from sklearn.datasets import load_digits as _sklearn_digits
    except ImportError as err:
        raise ImportError(
            "load_digits needs scikit-learn, which ships the 8x8 digits: "
            "pip install flowsolve[data] (or pip install scikit-learn)"
        ) from err
    bunch = _sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=F64)
    x = (images / 8 - 1).reshape(-1, 1, 8, 8).to(dtype or torch.get_default_dtype())
    return LabeledSamples(x, torch.as_tensor(bunch.target, dtype=torch.long))
