r"""UniPC: the unified predictor-corrector of Zhao et al. (2023), in the data prediction.

Notation of :mod:`flowsolve.ode.semilinear`: ``D`` the data prediction, ``lambda`` the
log-SNR; a step from ``s = t_i`` to ``t = t_{i+1}`` has ``h = lambda_t - lambda_s`` and
``hh = -h`` (the data form's sign). With the model values ``D_s`` and ``D_{s_m}`` at the
``k - 1`` earlier grid points ``s_m`` (``r_m = (lambda_{s_m} - lambda_s) / h < 0``,
``dD_m = (D_{s_m} - D_s) / r_m``):

* **UniP-k** (predictor, order ``k``):
  ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{hh} - 1) D_s - alpha_t B(h) sum_m rho_m dD_m``;
* **UniC-k** (corrector, order ``k + 1``) adds the model value ``D_t`` at the predicted
  point as the point ``r = 1``:
  ``x_t^c = (sigma_t / sigma_s) x_s - alpha_t (e^{hh} - 1) D_s
  - alpha_t B(h) [sum_m rho^c_m dD_m + rho^c_k (D_t - D_s)]``.

The weights solve ``R rho = b`` with ``R_{jm} = r_m^{j-1}`` (``j = 1..k``; the predictor
uses the ``k - 1`` earlier points, the corrector those and ``r = 1``) and
``b_j = j! hh phi_{j+1}(hh) / B(h)``, ``phi_{j+1}(z) = sum_{n >= 0} z^n / (n + j + 1)!``;
as in the reference code the order-2 predictor takes ``rho = 1/2`` and the order-1 corrector
``rho^c = 1/2`` (the ``h -> 0`` limits of ``b_1``). ``B(h) = hh`` (``bh1``) or
``B(h) = e^{hh} - 1`` (``bh2``).

The corrector's model value ``D_t``, taken at the *predicted* point, is the next step's
``D_s`` (the corrected state is not evaluated again), so NFE = steps; the final step has no
corrector and never evaluates the model at ``t1``. Step ``i`` uses ``k = min(p, 1 + number
of usable earlier values)`` (warm-up; the order-1 start caps the global order of UniPC-3 at
3 as h -> 0, though its error constant is small on log-SNR grids). A step with an infinite
end is a DDIM step (:func:`~flowsolve.ode.semilinear.ddim_step`) without corrector, and a
value at an infinite ``lambda`` is never used as history; a step of length 0 in ``lambda``
(two times with one log-SNR in float64) is ``x_t = (sigma_t / sigma_s) x_s`` and ends the
history. All coefficients, the small linear solves included, are computed once per grid on
the host in Python floats (:func:`unipc_plan`): the loop only combines tensors.

Example:
    >>> import torch, flowsolve as fs
    >>> from flowsolve.ode.solve import sample
    >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
    >>> u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4), path)
    >>> x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> res = sample(u, x0, "unipc2_bh2", steps=10, path=path, grid="logsnr")
    >>> res.nfe, res.steps
    (10, 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .semilinear import Denoiser, Node, Noise, Sampler, ddim_step, infinite_step

__all__ = ["UniPC", "UniPCStep", "phi", "unipc_weights", "unipc_plan", "SAMPLERS"]

VARIANTS = ("bh1", "bh2")


def phi(k: int, z: float) -> float:
    r"""``phi_k(z) = sum_{n >= 0} z^n / (n + k)! = (e^z - sum_{j<k} z^j / j!) / z^k``
    (``phi_0 = e^z``), by its series for ``|z| < 1`` (no cancellation) and by the recursion
    ``phi_{j+1} = (phi_j - 1/j!) / z`` from ``phi_1 = expm1(z) / z`` otherwise.

    Example:
        >>> phi(2, 0.0), abs(phi(2, 1.0) - (math.e - 2)) < 1e-15
        (0.5, True)
    """
    if not (isinstance(k, int) and k >= 0):
        raise ValueError(f"phi: k must be an int >= 0; got {k!r}")
    if k == 0:
        return math.exp(z)
    if abs(z) < 1.0:
        term, total, n = 1.0 / math.factorial(k), 0.0, 0
        while abs(term) > 1e-18 * max(abs(total), 1e-300) and n < 60:
            total += term
            n += 1
            term *= z / (n + k)
        return total
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def unipc_weights(rs: list[float], h: float, variant: str) -> tuple[list[float], float]:
    r"""``(rho, B(h))``: the weights of the differences ``dD_m`` for the ratios ``rs`` (the
    earlier points' ``r_m``, then ``1.0`` for the corrector's point) over a step of length
    ``h > 0`` in ``lambda``. ``k = len(rs)``; ``rho`` solves ``R rho = b`` with
    ``R_{jm} = r_m^{j-1}``, ``b_j = j! hh phi_{j+1}(hh) / B(h)``, ``hh = -h``, except
    ``rho = [1/2]`` for one ratio (order-2 predictor, order-1 corrector).

    Example:
        >>> unipc_weights([-1.0], 0.1, "bh1")[0]
        [0.5]
        >>> rho, b = unipc_weights([-1.0, 1.0], 0.1, "bh1")
        >>> [round(v, 6) for v in rho], b  # h -> 0: [1/12, 5/12]
        ([0.079289, 0.404453], -0.1)
    """
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant must be one of {VARIANTS}; got {variant!r}")
    hh = -h
    big_b = hh if variant == "bh1" else math.expm1(hh)
    k = len(rs)
    if k == 0:
        return [], big_b
    if k == 1:
        return [0.5], big_b
    b = [math.factorial(j) * hh * phi(j + 1, hh) / big_b for j in range(1, k + 1)]
    return _solve([[r ** (j - 1) for r in rs] for j in range(1, k + 1)], b), big_b


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """``a^{-1} b`` for a small square system (Gaussian elimination with partial pivoting,
    in host floats)."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if m[piv][col] == 0.0:
            raise ValueError("UniPC: singular coefficient matrix (two grid points with the "
                             "same log-SNR)")
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [u - f * v for u, v in zip(m[r], m[col], strict=True)]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


@dataclass(frozen=True)
class UniPCStep:
    """The host coefficients of one UniPC step: ``x_t = a x + sum_m w[m] D[src[m]]`` (the
    predictor) and, where ``wc`` is not None, ``x_t^c = a x + sum_m wc[m] D[src[m]] +
    wc_t D_t`` (the corrector). ``src`` lists grid indices, the step's start first; ``ddim``
    marks a step with an infinite end (:func:`ddim_step`); ``order`` is the predictor's ``k``.
    """

    ddim: bool
    order: int
    src: tuple[int, ...] = ()
    a: float = 0.0
    w: tuple[float, ...] = ()
    wc: tuple[float, ...] | None = None
    wc_t: float = 0.0


def unipc_plan(grid: list[Node], p: int, variant: str, corrector: bool) -> list[UniPCStep]:
    """The coefficients of every step of UniPC of order ``p`` on ``grid`` (host floats)."""
    plan, n_steps = [], len(grid) - 1
    for i in range(n_steps):
        s, t = grid[i], grid[i + 1]
        if infinite_step(s, t):
            plan.append(UniPCStep(ddim=True, order=1))
            continue
        h = t.lam - s.lam
        history = []  # earlier points, newest first, with finite and strictly rising lambda
        for j in range(i - 1, max(i - p, -1), -1):
            if h == 0.0 or not (math.isfinite(grid[j].lam) and grid[j].lam < grid[j + 1].lam):
                break
            history.append(j)
        rs = [(grid[j].lam - s.lam) / h for j in history]
        k = 1 + len(history)
        first = -t.alpha * math.expm1(-h)  # coefficient of D_s in the first-order part
        rho, big_b = unipc_weights(rs, h, variant)
        src = (i, *history)
        w = _weights(first, t.alpha * big_b, rho, rs)
        wc, wc_t = None, 0.0
        if corrector and i < n_steps - 1:
            rho_c, _ = unipc_weights([*rs, 1.0], h, variant)
            wc = _weights(first, t.alpha * big_b, rho_c[:-1], rs)
            wc_t = -t.alpha * big_b * rho_c[-1]
            wc = (wc[0] - wc_t, *wc[1:])  # rho^c_k (D_t - D_s)
        plan.append(UniPCStep(False, k, src, t.sigma / s.sigma, w, wc, wc_t))
    return plan


def _weights(first: float, scale: float, rho: list[float], rs: list[float]
             ) -> tuple[float, ...]:
    """Weights of ``(D_s, D_{s_1}, ...)`` in ``first D_s - scale sum_m rho_m (D_{s_m} - D_s)
    / r_m``."""
    per = [scale * q / r for q, r in zip(rho, rs, strict=True)]
    return (first + sum(per), *(-c for c in per))


def _combine(a: float, x: Tensor, weights: tuple[float, ...], values: list[Tensor]) -> Tensor:
    """``a x + sum_m weights[m] values[m]`` (host-float coefficients)."""
    out = x * a
    for c, v in zip(weights, values, strict=True):
        out = torch.add(out, v, alpha=c)
    return out


class UniPC(Sampler):
    r"""UniPC of order ``p`` in the data prediction: UniP-p with the UniC corrector (declared
    order ``p + 1``), or UniP-p alone with ``corrector=False`` (order ``p``; not registered).

    Args:
        p: 1, 2 or 3 (model values the predictor combines).
        variant: ``"bh1"`` (``B(h) = hh``) or ``"bh2"`` (``B(h) = e^{hh} - 1``).
        corrector: apply UniC on every step but the last.
    """

    multistep = True

    def __init__(self, p: int, variant: str = "bh1", corrector: bool = True):
        if isinstance(p, bool) or p not in (1, 2, 3):
            raise ValueError(f"UniPC order p must be 1, 2 or 3; got {p!r}")
        if variant not in VARIANTS:
            raise ValueError(f"UniPC variant must be one of {VARIANTS}; got {variant!r}")
        self.p, self.variant, self.corrector = p, variant, bool(corrector)
        self.name = f"unipc{p}_{variant}" if corrector else f"unip{p}_{variant}"
        self.order = float(p + 1 if corrector else p)

    def __repr__(self) -> str:
        return f"UniPC(p={self.p}, variant={self.variant!r}, corrector={self.corrector})"

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        if i == 0:
            memory["plan"] = unipc_plan(grid, self.p, self.variant, self.corrector)
            memory["D"] = {}
        plan: UniPCStep = memory["plan"][i]
        values: dict[int, Tensor] = memory["D"]
        post = memory.pop("post", None)  # the corrector's evaluation at grid[i]
        if post is None:
            post = denoiser(x, grid[i].t)
        values[i] = post.D
        values.pop(i - self.p, None)  # no longer needed
        t = grid[i + 1]
        if plan.ddim:
            return ddim_step(t, post)
        hist = [values[j] for j in plan.src]
        x_pred = _combine(plan.a, x, plan.w, hist)
        if plan.wc is None:
            return x_pred
        post_t = denoiser(x_pred, t.t)
        memory["post"] = post_t
        return torch.add(_combine(plan.a, x, plan.wc, hist), post_t.D, alpha=plan.wc_t)


SAMPLERS: tuple[Sampler, ...] = tuple(UniPC(p, v) for v in VARIANTS for p in (1, 2, 3))
"""``unipc{1,2,3}_{bh1,bh2}``, registered in :data:`flowsolve.ode.backends.ODE_SOLVERS`."""
