r"""Discrete data and continuous densities: uniform dequantisation and bits per dimension.

Integer data ``k in {0, ..., n_bins - 1}^D`` is modelled through ``z = k + u``,
``u ~ U[0, 1)^D``, mapped affinely to the model's space ``y = low + (high - low) z / n_bins``.
Jensen's inequality gives the bound used by every published CNF figure,

    log P(k) >= E_u[log p_z(k + u)],   log p_z(z) = log p_y(y) + D log((high - low) / n_bins),

and ``K`` draws give the tighter importance-weighted bound (in expectation over the draws)

    log P(k) >= E[log (1/K) sum_{j=1}^K p_z(k + u_j)],   u_1, ..., u_K ~ U[0, 1)^D iid.

Bits per dimension: ``bpd = -log P / (D ln 2)``. For 8-bit data in ``[-1, 1]`` this is
``-log p_y(y) / (D ln 2) + 7``. Continuous data has no ``P``: its "bits/dim" is the density's
``-log p(x) / (D ln 2)`` (:func:`continuous_bits_per_dim`, what ``flowsolve likelihood``
prints), which depends on the units of ``x`` and is not comparable with the dequantised
figure. Published CIFAR-10 numbers mix the two estimators
(Score SDE: the mean of K = 1 draws; Flow Matching: the K = 50 bound), about 0.1 bit/dim
apart: :class:`BitsPerDim` always says which one it holds.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.checks import generator_or_fresh

__all__ = ["BitsPerDim", "dequantize", "bits_per_dim", "continuous_bits_per_dim",
           "discrete_bits_per_dim"]


@dataclass(frozen=True)
class BitsPerDim:
    """Per-sample bits/dim (``(B,)``) with the estimator that produced them.

    Attributes:
        bpd: bits per dimension, ``(B,)``.
        nll_nats: ``-log P(k)`` bound in nats, ``(B,)``.
        estimator: ``"uniform dequantisation, mean of K=1 (over K draws)"`` or
            ``"uniform dequantisation, importance-weighted K=..."``.
        draws: the number K of dequantisation draws.

    The aggregate over the samples is derived, never stored: :attr:`mean_bpd` and its
    standard error :attr:`mean_bpd_stderr`.
    """

    bpd: Tensor
    nll_nats: Tensor
    estimator: str
    draws: int

    @property
    def mean_bpd(self) -> Tensor:
        """The data set's bits/dim: the mean of :attr:`bpd` over its ``N`` samples (0-d)."""
        return self.bpd.mean()

    @property
    def mean_bpd_stderr(self) -> Tensor:
        """Standard error of :attr:`mean_bpd`, ``sqrt(sum_n (bpd_n - mean)^2 / (N - 1)) /
        sqrt(N)`` from all ``N`` per-sample values (it covers the spread of the data and of
        the dequantisation and probe draws); NaN for ``N < 2`` (0-d)."""
        n = self.bpd.numel()
        if n < 2:
            return torch.full((), float("nan"), dtype=self.bpd.dtype, device=self.bpd.device)
        return self.bpd.std(unbiased=True) / math.sqrt(n)


def estimator_label(draws: int, importance_weighted: bool) -> str:
    if importance_weighted:
        return f"uniform dequantisation, importance-weighted K={draws}"
    return f"uniform dequantisation, mean of K=1 (over {draws} draws)"


def check_draws(draws: int) -> None:
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws must be an int >= 1; got {draws!r}")


def check_range(n_bins: int, low: float, high: float) -> None:
    if not (isinstance(n_bins, int) and n_bins >= 2):
        raise ValueError(f"n_bins must be an int >= 2; got {n_bins!r}")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"need finite low < high; got low={low!r}, high={high!r}")


def check_dim(dim: int) -> int:
    """``dim`` as an int ``D >= 1``: the number of entries of one sample. 0 (which would give
    NaN or inf bits/dim), negative or non-integer values raise ValueError naming it."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be a positive int, the number D of entries of one sample "
                         f"(e.g. x[0].numel()); got {dim!r}")
    return int(dim)


def dequantize(
    k: Tensor,
    *,
    n_bins: int = 256,
    low: float = -1.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``y = low + (high - low) (k + u) / n_bins`` with ``u ~ U[0, 1)`` from ``generator``
    (drawn on its device; None: a fresh unseeded generator on k's device; torch's global
    RNG is never used).

    ``k`` holds integers in ``[0, n_bins)`` (any integer or float dtype); anything else
    raises ValueError (checked on CPU tensors).
    """
    check_range(n_bins, low, high)
    if k.device.type == "cpu" and k.numel():
        kd = k.double()  # in k's own dtype n_bins may wrap (uint8: 256 -> 0)
        bad = (kd < 0) | (kd >= n_bins) | (kd != torch.floor(kd))
        if bool(bad.any()):
            raise ValueError(f"k must hold integers in [0, {n_bins}); got {k[bad][0].item()!r}")
    dtype = dtype or torch.get_default_dtype()
    generator = generator_or_fresh(generator, k.device)
    u = torch.rand(k.shape, generator=generator, dtype=dtype, device=generator.device)
    u = u.to(k.device)
    return low + (high - low) * (k.to(dtype) + u) / n_bins


def bits_per_dim(
    log_prob: Tensor, dim: int, *, n_bins: int = 256, low: float = -1.0, high: float = 1.0
) -> Tensor:
    """``-(log p_y(y) + D log((high - low) / n_bins)) / (D ln 2)`` for a density ``log p_y``
    of dequantised data of ``D = dim`` entries in ``[low, high)``: the bits/dim of the
    discrete data the points ``y`` dequantise (see :func:`continuous_bits_per_dim` for a
    continuous density). ``dim`` must be an int >= 1 (ValueError otherwise)."""
    dim = check_dim(dim)
    check_range(n_bins, low, high)
    log_pz = log_prob + dim * math.log((high - low) / n_bins)
    return -log_pz / (dim * math.log(2.0))


def continuous_bits_per_dim(log_prob: Tensor | float, dim: int) -> Tensor | float:
    r"""Bits per dimension of a continuous density: ``-log p(x) / (D ln 2)`` with ``D = dim``
    entries per sample (``log_prob`` in nats, any shape; a float gives a float). This is what
    ``flowsolve likelihood`` prints beside the nats for continuous 2-D points.

    It differs from the bits/dim of discrete data (:func:`bits_per_dim`,
    :func:`discrete_bits_per_dim`): those bound ``-log2 P(k) / D`` of integer data through a
    dequantised density and add the cell volume, ``-D log((high - low) / n_bins)`` nats (+7
    bits/dim for 8-bit data in [-1, 1]); a density has no such term, so this figure depends
    on the units of ``x`` (rescaling ``x`` by ``c`` shifts it by ``log2 c``) and may be
    negative. Compare it only between models of the same continuous data.

    >>> continuous_bits_per_dim(-2 * math.log(2.0), 2)
    1.0

    ``dim`` must be an int >= 1 (ValueError otherwise).
    """
    dim = check_dim(dim)
    return -log_prob / (dim * math.log(2.0))


def discrete_bits_per_dim(
    log_prob_fn: Callable[[Tensor], Tensor],
    k: Tensor,
    *,
    draws: int = 1,
    importance_weighted: bool = False,
    n_bins: int = 256,
    low: float = -1.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> BitsPerDim:
    """Bits/dim of integer data ``k`` (B, ...) under a continuous model ``log_prob_fn(y)``
    -> (B,), from ``draws`` uniform dequantisations.

    ``importance_weighted=False`` averages the K single-draw bounds (the Score SDE
    convention); ``True`` takes ``log (1/K) sum exp`` of them, the tighter importance-weighted
    bound (the Flow Matching convention). The draws come from ``generator`` as in
    :func:`dequantize` (None: a fresh unseeded generator; torch's global RNG is never used).
    """
    check_draws(draws)
    if not (torch.is_tensor(k) and k.dim() >= 1 and k.shape[0] >= 1 and k[0].numel() >= 1):
        got = tuple(k.shape) if torch.is_tensor(k) else type(k).__name__
        raise ValueError("k must be a tensor (B, *event_shape) of at least one sample of at "
                         f"least one entry; got {got}")
    dim = k[0].numel()

    def log_prob(y: Tensor) -> Tensor:
        lp = log_prob_fn(y)
        if not (torch.is_tensor(lp) and lp.shape == y.shape[:1]):
            got = tuple(lp.shape) if torch.is_tensor(lp) else type(lp).__name__
            raise ValueError(f"log_prob_fn(y) must return ({y.shape[0]},) log-densities, one per "
                             f"sample (summed over the event dims); got {got}")
        return lp

    log_pz = torch.stack([
        log_prob(dequantize(k, n_bins=n_bins, low=low, high=high, generator=generator,
                            dtype=dtype))
        + dim * math.log((high - low) / n_bins)
        for _ in range(draws)
    ])  # (K, B)
    if importance_weighted:
        bound = torch.logsumexp(log_pz, dim=0) - math.log(draws)
    else:
        bound = log_pz.mean(0)
    return BitsPerDim(bpd=-bound / (dim * math.log(2.0)), nll_nats=-bound,
                      estimator=estimator_label(draws, importance_weighted), draws=draws)
