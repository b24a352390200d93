r"""Closed-form ground truth: Gaussian-mixture data pushed along an affine Gaussian path.

For data ``x1 ~ sum_k w_k N(mu_k, S_k)`` and ``x_t = alpha_t x1 + sigma_t x0``,
``x0 ~ N(0, I)``, every quantity of the path has a closed form:

* ``p_t = sum_k w_k N(m_k, C_k)`` with ``m_k = alpha_t mu_k`` and
  ``C_k = alpha_t^2 S_k + sigma_t^2 I``;
* the posterior over components ``pi_k(x) = w_k N(x; m_k, C_k) / p_t(x)``;
* the marginal score ``grad log p_t(x) = -sum_k pi_k C_k^{-1} (x - m_k)``;
* the marginal velocity, the posterior average of the conditional velocities,
  ``u_t(x) = sum_k pi_k [alpha'_t mu_k + (alpha'_t alpha_t S_k + sigma'_t sigma_t I)
  C_k^{-1} (x - m_k)]``;
* the denoiser ``E[x1 | x_t = x] = sum_k pi_k [mu_k + alpha_t S_k C_k^{-1} (x - m_k)]``.

No formula divides by sigma_t or alpha_t, so all are exact and finite on the closed
interval [0, 1] (``sigma'_t sigma_t`` is taken from :meth:`Scheduler.sigma_d_sigma`), with
one exception: the velocity needs ``alpha'_t``, which is infinite for
PolynomialScheduler(n < 1) at t = 0; there the velocity field raises ValueError naming t
(checked on CPU tensors) rather than return NaN.
Each covariance is diagonalised once, ``S_k = V_k diag(lambda_k) V_k^T``, so that
``C_k = V_k diag(alpha^2 lambda_k + sigma^2) V_k^T`` costs O(d^2) per point and component,
and the mixture sum is a logsumexp over components.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.checks import as_time, check_finite_coefficients, generator_or_fresh
from .._core.types import Field
from ..paths.affine import AffineGaussianPath
from ..paths.schedules import Scheduler

__all__ = [
    "GaussianMixture",
    "Gaussian",
    "StandardNormal",
    "source_distribution",
    "marginal_log_prob",
    "marginal_score",
    "marginal_velocity",
    "posterior_mean",
]


class GaussianMixture:
    r"""``p(x) = sum_k w_k N(x; mu_k, S_k)`` in d dimensions.

    Args:
        means: ``(K, d)``, finite.
        covariances: ``(K, d)`` diagonal variances or ``(K, d, d)`` full, finite and
            positive definite.
        weights: ``(K,)`` finite and positive (normalised here); uniform when omitted.

    Parameters are kept in float64 and are fixed once built (copies in other dtypes and on
    other devices are cached); every method returns the dtype and device of its input
    (``sample``: of its ``dtype`` / ``device`` arguments).
    """

    def __init__(self, means: Tensor, covariances: Tensor, weights: Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64).detach().cpu()
        covs = torch.as_tensor(covariances, dtype=torch.float64).detach().cpu()
        if means.dim() != 2:
            raise ValueError(f"means must be shaped (K, d); got {tuple(means.shape)}")
        k, d = means.shape
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        for name, v in (("means", means), ("covariances", covs), ("weights", weights)):
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                at = tuple(bad.nonzero()[0].tolist())
                raise ValueError(f"{name} must be finite; got {v[at].item()!r} at index {at}")
        if weights.shape != (k,) or not bool((weights > 0).all()):
            raise ValueError(
                f"weights must be ({k},) and positive; got shape {tuple(weights.shape)} "
                f"with values {weights.tolist()}"
            )
        if covs.shape == (k, d):
            eigvals, eigvecs = covs, None
        elif covs.shape == (k, d, d):
            if not torch.allclose(covs, covs.transpose(1, 2), rtol=1e-10, atol=1e-12):
                raise ValueError("full covariances (K, d, d) must be symmetric")
            eigvals, eigvecs = torch.linalg.eigh(covs)
        else:
            raise ValueError(
                f"covariances must be ({k}, {d}) diagonal or ({k}, {d}, {d}) full to match "
                f"means {tuple(means.shape)}; got {tuple(covs.shape)}"
            )
        if not bool((eigvals > 0).all()):
            raise ValueError(
                f"covariances must be positive definite; smallest eigenvalue {eigvals.min():.3g}"
            )
        self.means, self.weights = means, weights / weights.sum()
        self.eigvals, self.eigvecs = eigvals, eigvecs
        self._covariances = covs
        self._copies: dict[tuple[torch.dtype, torch.device], tuple] = {}

    def parameters_like(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """``(means, eigvals, eigvecs or None, log weights)`` in ``x``'s dtype and device,
        copied once per (dtype, device) and cached: a field evaluation then makes no
        host-to-device copy, so it runs inside a CUDA graph and never waits on the host."""
        key = (x.dtype, x.device)
        copies = self.__dict__.setdefault("_copies", {})  # also for objects pickled before it
        if key not in copies:
            like = dict(dtype=x.dtype, device=x.device)
            # ordinary tensors even when first called under inference_mode, so that a later
            # call with autograd can save them for backward
            with torch.inference_mode(False), torch.no_grad():
                vecs = None if self.eigvecs is None else self.eigvecs.to(**like)
                copies[key] = (self.means.to(**like), self.eigvals.to(**like), vecs,
                               torch.log(self.weights).to(**like))
        return copies[key]

    def __getstate__(self) -> dict:
        """Pickles without the device copies (a CUDA copy cannot be unpickled on a CPU-only
        host or in every DataLoader worker)."""
        return {**self.__dict__, "_copies": {}}

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def covariances(self) -> Tensor:
        """``(K, d, d)`` full covariances (float64)."""
        c = self._covariances
        return torch.diag_embed(c) if c.dim() == 2 else c

    @property
    def mean(self) -> Tensor:
        """Mixture mean ``sum_k w_k mu_k`` (d,)."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """Mixture covariance ``sum_k w_k (S_k + mu_k mu_k^T) - mean mean^T`` (d, d)."""
        second = torch.einsum("k,kij->ij", self.weights, self.covariances)
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(self.mean, self.mean)

    @classmethod
    def ring(
        cls, n_components: int = 8, radius: float = 4.0, std: float = 0.5
    ) -> GaussianMixture:
        """``n_components`` isotropic 2-D Gaussians of standard deviation ``std`` evenly
        spaced on a circle of ``radius`` (the "8 Gaussians" data set), equal weights."""
        if isinstance(n_components, bool) or not isinstance(n_components, int) \
                or n_components < 1:
            raise ValueError(f"n_components must be an int >= 1; got {n_components!r}")
        angle = torch.arange(n_components, dtype=torch.float64) * (2 * math.pi / n_components)
        means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return cls(means, torch.full((n_components, 2), std**2, dtype=torch.float64))

    def __repr__(self) -> str:
        kind = "diagonal" if self.eigvecs is None else "full"
        return f"{type(self).__name__}(K={self.n_components}, d={self.dim}, {kind} covariances)"

    # -- sampling and density --------------------------------------------------------
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` independent draws, ``(n, d)``; randomness only from ``generator`` (drawn on
        its device; None: a fresh unseeded generator; torch's global RNG is never used)."""
        generator = generator_or_fresh(generator, "cpu")
        gen_device = generator.device
        comp = torch.multinomial(self.weights.to(gen_device), n, replacement=True,
                                 generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64,
                          device=gen_device)
        comp = comp.cpu()
        z = eps.cpu() * self.eigvals[comp].sqrt()
        if self.eigvecs is not None:
            z = torch.einsum("nij,nj->ni", self.eigvecs[comp], z)
        x = self.means[comp] + z
        return x.to(dtype=dtype or torch.get_default_dtype(), device=device)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``, ``(B,)``."""
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return _MixtureAtTime(self, x, alpha=one, sigma_sq=0 * one).log_prob()


class Gaussian(GaussianMixture):
    """``N(mean, covariance)``: a one-component mixture; ``covariance`` is ``(d,)`` diagonal
    or ``(d, d)`` full."""

    def __init__(self, mean: Tensor, covariance: Tensor):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(covariance, dtype=torch.float64)
        if mean.dim() != 1:
            raise ValueError(f"mean must be shaped (d,); got {tuple(mean.shape)}")
        super().__init__(mean[None], cov[None])


class StandardNormal(Gaussian):
    """``N(0, std^2 I)`` in ``dim`` dimensions (``std = 1`` by default)."""

    def __init__(self, dim: int, std: float = 1.0):
        if not (isinstance(dim, int) and dim > 0):
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        super().__init__(torch.zeros(dim, dtype=torch.float64),
                         torch.full((dim,), float(std) ** 2, dtype=torch.float64))


def source_distribution(path: AffineGaussianPath | Scheduler, dim: int) -> StandardNormal:
    """The source ``N(0, source_std^2 I)`` a flow on ``path`` starts from."""
    scheduler = path.scheduler if isinstance(path, AffineGaussianPath) else path
    return StandardNormal(dim, std=scheduler.source_std)


class _MixtureAtTime:
    """Per-component quantities of ``p_t`` at points ``x`` (B, d) for path coefficients
    alpha, sigma^2 (0-d or (B,)). Works in rotated coordinates ``z_k = V_k^T (x - alpha mu_k)``."""

    def __init__(self, mix: GaussianMixture, x: Tensor, alpha: Tensor, sigma_sq: Tensor):
        if x.dim() < 2 or x[0].numel() != mix.dim:
            raise ValueError(
                f"x must be shaped (B, {mix.dim}) (or (B, ...) with {mix.dim} entries per "
                f"sample) for {mix!r}; got {tuple(x.shape)}"
            )
        self.shape, self.mix = x.shape, mix
        x = x.reshape(x.shape[0], mix.dim)
        self.mu, self.lam, self.vecs, log_w = mix.parameters_like(x)
        self.alpha = alpha.reshape(-1, 1, 1) if alpha.dim() else alpha
        sigma_sq = sigma_sq.reshape(-1, 1, 1) if sigma_sq.dim() else sigma_sq
        diff = x[:, None, :] - self.alpha * self.mu  # (B, K, d)
        self.z = diff if self.vecs is None else torch.einsum("bkd,kde->bke", diff, self.vecs)
        self.c = self.alpha**2 * self.lam + sigma_sq  # eigenvalues of C_k, (B, K, d)
        self.log_joint = (
            log_w
            - 0.5 * torch.log(2 * math.pi * self.c).sum(-1)
            - 0.5 * (self.z * self.z / self.c).sum(-1)
        )  # (B, K)

    def log_prob(self) -> Tensor:
        return torch.logsumexp(self.log_joint, dim=1)

    def average(self, rotated: Tensor, offset: Tensor | None = None) -> Tensor:
        """``sum_k pi_k [offset_k + V_k rotated_k]`` reshaped like x."""
        post = torch.softmax(self.log_joint, dim=1)  # (B, K)
        vec = rotated if self.vecs is None else torch.einsum("bke,kde->bkd", rotated, self.vecs)
        if offset is not None:
            vec = vec + offset
        return torch.einsum("bk,bkd->bd", post, vec).reshape(self.shape)




class _MarginalField:
    """A closed-form field ``(x, t) -> Tensor`` of a Gaussian mixture on a path."""

    def __init__(self, data: GaussianMixture, path: AffineGaussianPath, what: str):
        if not isinstance(data, GaussianMixture):
            raise TypeError(f"data must be a flowsolve GaussianMixture; got {type(data).__name__}")
        if not isinstance(path, AffineGaussianPath):
            raise TypeError(f"path must be an AffineGaussianPath; got {type(path).__name__}")
        self.data, self.path, self.what = data, path, what

    def __repr__(self) -> str:
        return f"marginal_{self.what}({self.data!r}, {self.path!r})"

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x)
        sched = self.path.scheduler
        v = sched(t)
        at = _MixtureAtTime(self.data, x, v.alpha_t, sched.sigma_squared(t))
        if self.what == "log_prob":
            return at.log_prob()
        if self.what == "score":
            return at.average(-at.z / at.c)
        if self.what == "x1":
            return at.average(at.alpha * at.lam / at.c * at.z, offset=at.mu)
        # velocity: alpha' mu_k + (alpha' alpha lam + sigma sigma') / c * z
        s_ds = sched.sigma_d_sigma(t)
        check_finite_coefficients(t, "the marginal velocity", sched,
                                  **{"alpha'_t": v.d_alpha_t, "sigma_t sigma'_t": s_ds})
        s_ds = s_ds.reshape(-1, 1, 1) if s_ds.dim() else s_ds
        da = v.d_alpha_t.reshape(-1, 1, 1) if v.d_alpha_t.dim() else v.d_alpha_t
        return at.average((da * at.alpha * at.lam + s_ds) / at.c * at.z, offset=da * at.mu)


def marginal_log_prob(data: GaussianMixture, path: AffineGaussianPath) -> Field:
    """Field ``(x, t) -> log p_t(x)`` of shape ``(B,)``: the exact marginal density."""
    return _MarginalField(data, path, "log_prob")


def marginal_score(data: GaussianMixture, path: AffineGaussianPath) -> Field:
    """Field ``(x, t) -> grad_x log p_t(x) = -sum_k pi_k C_k^{-1} (x - alpha_t mu_k)``."""
    return _MarginalField(data, path, "score")


def marginal_velocity(data: GaussianMixture, path: AffineGaussianPath) -> Field:
    """Field ``(x, t) -> u_t(x) = E[alpha'_t x1 + sigma'_t x0 | x_t = x]``, the velocity
    whose flow carries the source to ``data`` along ``path`` (exact, finite on [0, 1]
    except where ``alpha'_t`` is infinite, PolynomialScheduler(n < 1) at t = 0: there it
    raises ValueError, checked on CPU tensors)."""
    return _MarginalField(data, path, "velocity")


def posterior_mean(data: GaussianMixture, path: AffineGaussianPath) -> Field:
    """Field ``(x, t) -> E[x1 | x_t = x]`` (the ideal denoiser / ``x1`` prediction)."""
    return _MarginalField(data, path, "x1")
