r"""Closed-form entropic optimal transport and Schrodinger bridge between two Gaussians.

Between ``mu = N(m0, S0)`` and ``nu = N(m1, S1)`` in d dimensions, for the squared
Euclidean cost and the regularisation ``reg = 2 sigma^2``, the entropic OT problem

    min_{pi in Pi(mu, nu)}  E_pi |X0 - X1|^2 + reg KL(pi | mu x nu)

(POT's ``ot.sinkhorn(a, b, M, reg)`` on the raw squared cost: ``min <P, M> - reg H(P)``)
has a Gaussian optimum, the joint law of ``(X0, X1)`` with cross-covariance

    C = Cov(X0, X1) = 1/2 S0^{1/2} D S0^{-1/2} - sigma^2/2 I,
    D = (4 S0^{1/2} S1 S0^{1/2} + sigma^4 I)^{1/2}.

Derivation (checked by the tests): for a Gaussian plan the objective is, up to constants,
``-2 tr C - sigma^2 log det(S1 - C^T S0^{-1} C)``; its stationarity condition
``sigma^2 S0^{-1} C = S1 - C^T S0^{-1} C`` makes ``K = S0^{-1} C`` symmetric with
``K S0 K + sigma^2 K = S1``, which ``L = S0^{1/2} K S0^{1/2} = (D - sigma^2 I) / 2`` solves
(``L^2 + sigma^2 L = S0^{1/2} S1 S0^{1/2}``). The conditional law is
``X1 | X0 = x ~ N(m1 + K (x - m0), sigma^2 K)``, and the joint precision's off-diagonal
block is ``-I / sigma^2``: the density is ``exp(phi(x0) + psi(x1) - |x0 - x1|^2 / reg)``,
the form that characterises the optimum. ``sigma = 0`` is the unregularised problem: ``K``
becomes the Monge map ``T = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2}`` and the
cost the Bures-Wasserstein distance ``W2^2 = |m0 - m1|^2 + tr S0 + tr S1 - 2 tr(S0^{1/2}
S1 S0^{1/2})^{1/2}``.

The Schrodinger bridge with reference ``dX = sigma dW`` between mu (t = 0) and nu (t = 1)
has this static plan and is the mixture of Brownian bridges over it, as SB-CFM's
:class:`~flowsolve.paths.bridges.GaussianBridge` (``sigma, "brownian"``) draws it:

    X_t = (1 - t) X0 + t X1 + sigma sqrt(t (1 - t)) Z,

Gaussian with ``m_t = (1 - t) m0 + t m1`` and
``Sigma_t = (1 - t)^2 S0 + t^2 S1 + t (1 - t) (C + C^T + sigma^2 I)``.
Its SDE ``dX = f_t(X) dt + sigma dW`` has the drift
``f_t(x) = E[X1 - x | X_t = x] / (1 - t) = (m1 - m0) + B_t Sigma_t^{-1} (x - m_t)`` with

    B_t = t S1 + (1 - t) C^T - t C - (1 - t) S0 - sigma^2 t I

(the factor ``1 - t`` cancels, so the drift is finite on the closed interval [0, 1]); its
probability-flow ODE has the velocity ``v_t = f_t - sigma^2/2 grad log p_t``, the field
SB-CFM's regression learns. With ``sigma = 0`` the marginals are McCann's displacement
interpolation ``N(m_t, W_t S0 W_t)``, ``W_t = (1 - t) I + t T``.

References: Janati, Muzellec, Peyre & Cuturi, "Entropic optimal transport between
unbalanced Gaussian measures has a closed form", NeurIPS 2020; Mallasto, Gerolin & Minh,
"Entropy-regularized 2-Wasserstein distance between Gaussian measures", Information
Geometry 2022; Bunne, Hsieh, Cuturi & Krause, "The Schrodinger bridge between Gaussian
measures has a closed form", AISTATS 2023; McCann, "A convexity principle for interacting
gases", Advances in Mathematics 1997; Tong et al., "Improving and generalizing flow-based
generative models with minibatch optimal transport", TMLR 2024 (SB-CFM).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.checks import as_time, check_unit_interval, generator_or_fresh

__all__ = ["GaussianSchrodingerBridge"]


def _sym_sqrt(s: Tensor) -> Tensor:
    """``S^{1/2}`` of a symmetric positive semi-definite matrix (eigendecomposition)."""
    lam, v = torch.linalg.eigh(s)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def _sym(s: Tensor) -> Tensor:
    return (s + s.T) / 2


def _check_covariance(name: str, s: Tensor, d: int) -> Tensor:
    """``s`` as a (d, d) symmetric positive definite float64 matrix ((d,): a diagonal)."""
    if s.shape == (d,):
        s = torch.diag(s)
    if s.shape != (d, d):
        raise ValueError(f"{name} must be ({d}, {d}) (or ({d},) diagonal) to match the mean's "
                         f"dimension {d}; got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} must be finite")
    scale = float(s.abs().max())
    if not torch.allclose(s, s.T, rtol=0, atol=1e-12 * max(scale, 1e-300)):
        raise ValueError(f"{name} must be symmetric; largest asymmetry "
                         f"{float((s - s.T).abs().max()):.3g}")
    s = _sym(s)
    smallest = float(torch.linalg.eigvalsh(s).min())
    if not smallest > 0:
        raise ValueError(f"{name} must be positive definite; smallest eigenvalue {smallest:.3g}")
    return s


class GaussianSchrodingerBridge:
    r"""Entropic OT plan and Schrodinger bridge of noise ``sigma`` from ``N(m0, S0)`` (t = 0)
    to ``N(m1, S1)`` (t = 1), in closed form (see the module docstring for the formulas).

    Args:
        m0, m1: ``(d,)`` means, finite.
        S0, S1: ``(d, d)`` symmetric positive definite covariances (``(d,)``: diagonal).
        sigma: the reference Brownian motion's diffusion coefficient, a finite number
            ``>= 0``; the entropic regularisation is ``reg = 2 sigma^2`` on the raw squared
            cost, SB-CFM's pairing (``OTCoupling("sinkhorn", reg=2 * sigma**2,
            normalize=None)``) for its path ``GaussianBridge(sigma, "brownian")``.
            ``sigma = 0``: unregularised OT (the Monge map) and McCann's displacement
            interpolation.

    Parameters are kept in float64 on the CPU. The fields :meth:`drift`, :meth:`score`,
    :meth:`velocity` (``(x, t) -> (B, d)``) and :meth:`log_prob` (``(B,)``) take ``x``
    ``(B, d)`` and ``t`` a number, 0-d or ``(B,)`` in [0, 1], compute in float64 and
    return ``x``'s dtype and device.

    Example:
        >>> import torch
        >>> from flowsolve.truth.gaussian_bridge import GaussianSchrodingerBridge
        >>> sb = GaussianSchrodingerBridge(torch.zeros(2), torch.eye(2), torch.ones(2),
        ...                                4 * torch.eye(2), sigma=0.0)
        >>> sb.monge_map()
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """

    def __init__(self, m0: Tensor, S0: Tensor, m1: Tensor, S1: Tensor, sigma: float):
        m0 = torch.as_tensor(m0, dtype=torch.float64).detach().cpu()
        m1 = torch.as_tensor(m1, dtype=torch.float64).detach().cpu()
        if m0.dim() != 1 or m0.shape != m1.shape or m0.numel() == 0:
            raise ValueError(f"m0 and m1 must both be shaped (d,) with the same d >= 1; got "
                             f"{tuple(m0.shape)} and {tuple(m1.shape)}")
        for name, m in (("m0", m0), ("m1", m1)):
            if not bool(torch.isfinite(m).all()):
                raise ValueError(f"{name} must be finite; got {m.tolist()}")
        d = m0.shape[0]
        S0 = _check_covariance("S0", torch.as_tensor(S0, dtype=torch.float64).detach().cpu(), d)
        S1 = _check_covariance("S1", torch.as_tensor(S1, dtype=torch.float64).detach().cpu(), d)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) \
                or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0; got {sigma!r}")
        self.m0, self.S0, self.m1, self.S1, self.sigma = m0, S0, m1, S1, float(sigma)
        eye = torch.eye(d, dtype=torch.float64)
        a = _sym_sqrt(S0)  # S0^{1/2}
        a_inv = torch.linalg.inv(a)
        s2 = self.sigma**2
        dmat = _sym_sqrt(4 * a @ S1 @ a + s2**2 * eye)  # D
        self._C = 0.5 * a @ dmat @ a_inv - 0.5 * s2 * eye
        # K = S0^{-1} C = S0^{-1/2} (D - sigma^2 I) / 2 S0^{-1/2}: symmetric
        self._K = _sym(0.5 * a_inv @ (dmat - s2 * eye) @ a_inv)
        self._T = _sym(a_inv @ _sym_sqrt(a @ S1 @ a) @ a_inv)
        self._copies: dict[torch.device, tuple[Tensor, ...]] = {}

    def __repr__(self) -> str:
        return f"GaussianSchrodingerBridge(d={self.dim}, sigma={self.sigma!r})"

    # -- the static plan -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.m0.shape[0]

    @property
    def reg(self) -> float:
        """The entropic regularisation ``2 sigma^2`` (on the raw squared cost)."""
        return 2 * self.sigma**2

    @property
    def cross_covariance(self) -> Tensor:
        """``C = Cov(X0, X1) = E[(X0 - m0)(X1 - m1)^T]`` of the optimal plan, ``(d, d)``:
        ``1/2 S0^{1/2} D S0^{-1/2} - sigma^2/2 I``, ``D = (4 S0^{1/2} S1 S0^{1/2} +
        sigma^4 I)^{1/2}`` (``S0 T`` at ``sigma = 0``)."""
        return self._C.clone()

    @property
    def conditional_gain(self) -> Tensor:
        """``K = S0^{-1} C`` (symmetric, ``(d, d)``): ``E[X1 | X0 = x] = m1 + K (x - m0)``,
        ``Cov(X1 | X0) = sigma^2 K``; ``K = T`` at ``sigma = 0``."""
        return self._K.clone()

    @property
    def joint_mean(self) -> Tensor:
        """``(m0, m1)`` of the plan, ``(2d,)``."""
        return torch.cat([self.m0, self.m1])

    @property
    def joint_covariance(self) -> Tensor:
        """``[[S0, C], [C^T, S1]]`` of the plan, ``(2d, 2d)`` (singular at ``sigma = 0``)."""
        return torch.cat([torch.cat([self.S0, self._C], 1),
                          torch.cat([self._C.T, self.S1], 1)], 0)

    def monge_map(self) -> Tensor:
        """The matrix ``T = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2}`` (symmetric
        positive definite, ``(d, d)``) of the Monge map ``x -> m1 + T (x - m0)``, the
        unregularised (``sigma = 0``) optimal transport from ``N(m0, S0)`` to ``N(m1, S1)``
        for the squared Euclidean cost, whatever this object's ``sigma``."""
        return self._T.clone()

    def transport_cost(self) -> float:
        """``E_pi |X0 - X1|^2 = |m0 - m1|^2 + tr S0 + tr S1 - 2 tr C`` under the plan (the
        Bures-Wasserstein ``W2^2`` at ``sigma = 0``)."""
        return float(((self.m0 - self.m1) ** 2).sum() + torch.trace(self.S0)
                     + torch.trace(self.S1) - 2 * torch.trace(self._C))

    def mutual_information(self) -> float:
        """``KL(pi | mu x nu) = 1/2 [log det S1 - log det(sigma^2 K)]`` (``log det S0 + log
        det S1 - log det`` of the joint covariance, halved); ``inf`` at ``sigma = 0``."""
        if self.sigma == 0:
            return math.inf
        cond = self.sigma**2 * self._K  # Cov(X1 | X0)
        return 0.5 * float(torch.logdet(self.S1) - torch.logdet(cond))

    def entropic_cost(self) -> float:
        """The entropic objective at the optimum, ``E_pi |X0 - X1|^2 + reg KL(pi | mu x
        nu)`` with ``reg = 2 sigma^2`` (its ``sigma -> 0`` limit, the transport cost, at
        ``sigma = 0``)."""
        if self.sigma == 0:
            return self.transport_cost()
        return self.transport_cost() + self.reg * self.mutual_information()

    def sample_plan(self, n: int, *, generator: torch.Generator | None = None,
                    dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(x0, x1)`` of the plan, each ``(n, d)``: ``x0 = m0 + S0^{1/2} z0``,
        ``x1 = m1 + K (x0 - m0) + sigma K^{1/2} z1``; randomness only from ``generator``
        (drawn on its device; None: a fresh unseeded generator; torch's global RNG is never
        used); ``dtype`` None: torch's default."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1; got {n!r}")
        generator = generator_or_fresh(generator, "cpu")
        z = torch.randn(2, n, self.dim, generator=generator, dtype=torch.float64,
                        device=generator.device).cpu()
        x0 = self.m0 + z[0] @ _sym_sqrt(self.S0)
        x1 = self.m1 + (x0 - self.m0) @ self._K + self.sigma * z[1] @ _sym_sqrt(self._K)
        like = dict(dtype=dtype or torch.get_default_dtype(), device=device)
        return x0.to(**like), x1.to(**like)

    # -- the bridge's marginals and fields -------------------------------------------------
    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(m_t, Sigma_t)`` of ``X_t = (1 - t) X0 + t X1 + sigma sqrt(t(1 - t)) Z``:
        ``m_t = (1 - t) m0 + t m1``, ``Sigma_t = (1 - t)^2 S0 + t^2 S1 + t (1 - t) (C + C^T
        + sigma^2 I)``; float64, ``(d,)`` and ``(d, d)`` for a number or 0-d ``t``,
        ``(T, d)`` and ``(T, d, d)`` for ``t`` of shape ``(T,)``."""
        t = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        if t.dim() > 1:
            raise ValueError(f"t must be a number, 0-d or (T,); got shape {tuple(t.shape)}")
        check_unit_interval(t)
        return self._moments(t, self._params(torch.device("cpu")))[:2]

    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The bridge's SDE drift ``f_t(x) = E[X1 - x | X_t = x] / (1 - t) = (m1 - m0) +
        B_t Sigma_t^{-1} (x - m_t)``, ``B_t = t S1 + (1 - t) C^T - t C - (1 - t) S0 -
        sigma^2 t I`` (finite on [0, 1]); ``dX = f_t(X) dt + sigma dW`` carries ``N(m0,
        S0)`` through the marginals to ``N(m1, S1)``."""
        return self._field(x, t, "drift")

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad log p_t(x) = -Sigma_t^{-1} (x - m_t)``."""
        return self._field(x, t, "score")

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The probability-flow ODE velocity ``v_t(x) = f_t(x) - sigma^2/2 grad log p_t(x) =
        (m1 - m0) + (B_t + sigma^2/2 I) Sigma_t^{-1} (x - m_t)``: SB-CFM's regression
        target, whose flow carries ``N(m0, S0)`` to ``N(m1, S1)`` through the marginals."""
        return self._field(x, t, "velocity")

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``log p_t(x) = -1/2 [d log(2 pi) + log det Sigma_t + (x - m_t)^T Sigma_t^{-1}
        (x - m_t)]``, ``(B,)``."""
        return self._field(x, t, "log_prob")

    # -- internals -------------------------------------------------------------------------
    def _params(self, device: torch.device) -> tuple[Tensor, ...]:
        """``(m0, m1, S0, S1, C)`` in float64 on ``device``, copied once per device."""
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            with torch.inference_mode(False), torch.no_grad():
                copies[device] = tuple(p.to(device) for p in
                                       (self.m0, self.m1, self.S0, self.S1, self._C))
        return copies[device]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_copies": {}}

    def _moments(self, t: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """``(m_t, Sigma_t, B_t)`` for float64 ``t`` 0-d or ``(T,)``."""
        m0, m1, S0, S1, C = params
        s2 = self.sigma**2
        eye = torch.eye(self.dim, dtype=torch.float64, device=m0.device)
        tv, tm = t[..., None], t[..., None, None]
        m_t = (1 - tv) * m0 + tv * m1
        sigma_t = ((1 - tm) ** 2 * S0 + tm**2 * S1
                   + tm * (1 - tm) * (C + C.T + s2 * eye))
        b_t = tm * S1 + (1 - tm) * C.T - tm * C - (1 - tm) * S0 - s2 * tm * eye
        return m_t, sigma_t, b_t

    def _field(self, x: Tensor, t: Tensor | float, what: str) -> Tensor:
        t = as_time(t, x)
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must be shaped (B, {self.dim}) (or (B, ...) with {self.dim} "
                             f"entries per sample) for {self!r}; got {tuple(x.shape)}")
        shape, dtype = x.shape, x.dtype
        x64 = x.reshape(shape[0], self.dim).to(torch.float64)
        m0, m1 = self._params(x.device)[:2]
        m_t, sigma_t, b_t = self._moments(t.to(torch.float64), self._params(x.device))
        chol = torch.linalg.cholesky(sigma_t)
        diff = (x64 - m_t)[..., None]  # (B, d, 1)
        y = torch.cholesky_solve(diff, chol)  # Sigma_t^{-1} (x - m_t)
        if what == "log_prob":
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            quad = (diff * y).sum((-2, -1))
            return (-0.5 * (self.dim * math.log(2 * math.pi) + logdet + quad)).to(dtype)
        if what == "score":
            out = -y
        else:
            gain = b_t if what == "drift" else \
                b_t + 0.5 * self.sigma**2 * torch.eye(self.dim, dtype=torch.float64,
                                                      device=x.device)
            out = (m1 - m0)[:, None] + gain @ y
        return out.squeeze(-1).to(dtype).reshape(shape)
