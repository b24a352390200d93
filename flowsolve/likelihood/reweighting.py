r"""Importance reweighting of a model's samples against an unnormalised target (the
Boltzmann-generator use): samples ``x_i ~ q`` (the model) with their log-density
``log q(x_i)`` (:func:`~flowsolve.likelihood.generated.sample_log_likelihood` returns both)
and a target known up to a constant, ``log p*(x) = log p(x) + log Z``.

With ``log w_i = log p*(x_i) - log q(x_i)``:

* self-normalised weights ``wbar_i = w_i / sum_j w_j``;
* Kish's effective sample size ``ESS = (sum w)^2 / sum w^2 = 1 / sum wbar^2`` and its
  fraction ``ESS / N`` (1 when ``q = p``);
* ``log Z = log E_q[w] ~ logsumexp(log w) - log N``, with the delta-method standard error
  ``sd(w) / (sqrt(N) mean(w))`` and a normal confidence interval;
* a reweighted expectation ``E_p[f] ~ sum_i wbar_i f(x_i)`` with the standard error of the
  self-normalised estimator ``sqrt(sum_i wbar_i^2 (f_i - mu)^2)``.

All sums are done from ``log w`` shifted by its maximum (no overflow for any constant).

Example:
    >>> import torch, flowsolve as fs
    >>> data = fs.GaussianMixture.ring(4, radius=2.0, std=0.5)
    >>> x = data.sample(1000, generator=torch.Generator().manual_seed(0)).double()
    >>> w = reweight(data.log_prob(x), data.log_prob(x) + 3.0)  # q = p, log Z = 3
    >>> round(w.ess_fraction, 6), round(w.log_z, 6)
    (1.0, 3.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import norm
from torch import Tensor

__all__ = ["ImportanceWeights", "reweight"]


@dataclass(frozen=True, eq=False)
class ImportanceWeights:
    """Self-normalised importance weights of ``N`` samples (float64, on the CPU).

    Attributes:
        log_w: ``log p*(x_i) - log q(x_i)``, ``(N,)`` (``-inf`` where the target is 0).
        weights: the self-normalised weights ``wbar_i``, ``(N,)``, summing to 1.
    """

    log_w: Tensor
    weights: Tensor

    @property
    def n(self) -> int:
        return self.log_w.shape[0]

    @property
    def ess(self) -> float:
        """Kish's effective sample size ``1 / sum wbar_i^2`` (between 1 and N)."""
        return float(1.0 / self.weights.square().sum())

    @property
    def ess_fraction(self) -> float:
        """``ESS / N``: 1 when the model is the target."""
        return self.ess / self.n

    @property
    def log_z(self) -> float:
        """``log Z ~ logsumexp(log w) - log N``."""
        return float(torch.logsumexp(self.log_w, 0) - math.log(self.n))

    @property
    def log_z_stderr(self) -> float:
        """Delta-method standard error of :attr:`log_z`: ``sd(w) / (sqrt(N) mean(w))``
        (``sd`` with ``N - 1``; scale-free, so computed from ``w / max w``)."""
        if self.n < 2:
            return math.nan
        w = torch.exp(self.log_w - self.log_w.max())
        return float(w.std(unbiased=True) / (math.sqrt(self.n) * w.mean()))

    def log_z_interval(self, level: float = 0.95) -> tuple[float, float]:
        """The normal confidence interval ``log_z +- z_{(1+level)/2} log_z_stderr``."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1); got {level!r}")
        half = float(norm.ppf(0.5 + level / 2)) * self.log_z_stderr
        return self.log_z - half, self.log_z + half

    def expectation(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """``(E_p[f], its standard error)`` from ``values = f(x_i)``, shaped ``(N, ...)``:
        ``mu = sum wbar_i f_i`` and ``sqrt(sum wbar_i^2 (f_i - mu)^2)`` (elementwise over the
        trailing dimensions)."""
        f = torch.as_tensor(values).detach().to("cpu", torch.float64)
        if f.dim() == 0 or f.shape[0] != self.n:
            raise ValueError(f"values must be f(x_i) shaped (N, ...) with N = {self.n}; got "
                             f"{tuple(f.shape)}")
        wb = self.weights.reshape(-1, *([1] * (f.dim() - 1)))
        mu = (wb * f).sum(0)
        se = (wb.square() * (f - mu).square()).sum(0).sqrt()
        return mu, se


def reweight(log_model: Tensor, log_target: Tensor) -> ImportanceWeights:
    r"""Importance weights of samples of a model against an unnormalised target.

    Args:
        log_model: ``log q(x_i)``, ``(N,)``: the model's log-density of its samples (e.g.
            ``sample_log_likelihood(...).log_prob``); finite.
        log_target: ``log p*(x_i)``, ``(N,)``: the unnormalised target; finite or ``-inf``
            (a sample outside the target's support gets weight 0).

    Returns:
        :class:`ImportanceWeights` (float64, on the CPU).
    """
    lq = _vector(log_model, "log_model")
    lp = _vector(log_target, "log_target")
    if lq.shape != lp.shape:
        raise ValueError(f"log_model and log_target must both be (N,); got {tuple(lq.shape)} "
                         f"and {tuple(lp.shape)}")
    if not bool(torch.isfinite(lq).all()):
        i = int((~torch.isfinite(lq)).nonzero()[0, 0])
        raise ValueError(f"log_model must be finite (the model's log-density of its own "
                         f"samples); sample {i} has {lq[i].item()!r}")
    if bool(torch.isnan(lp).any() | (lp == math.inf).any()):
        i = int((torch.isnan(lp) | (lp == math.inf)).nonzero()[0, 0])
        raise ValueError(f"log_target must be finite or -inf; sample {i} has {lp[i].item()!r}")
    log_w = lp - lq
    if not bool(torch.isfinite(log_w).any()):
        raise ValueError("every sample has target density 0 (log_target = -inf): no weight "
                         "is positive; the model's samples miss the target's support")
    weights = torch.softmax(log_w, 0)
    return ImportanceWeights(log_w, weights)


def _vector(v, name: str) -> Tensor:
    if not torch.is_tensor(v) or v.dim() != 1 or v.shape[0] < 1 or not v.is_floating_point():
        raise ValueError(f"{name} must be a non-empty floating tensor shaped (N,); got "
                         f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
    return v.detach().to("cpu", torch.float64)
