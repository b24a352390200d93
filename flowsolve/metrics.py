r"""Distances between sample clouds and measures of how straight a flow's paths are.

* :func:`wasserstein2` -- the exact 2-Wasserstein distance between two empirical
  measures (POT's network simplex);
* :func:`mmd` -- the unbiased maximum mean discrepancy with a standard error;
* :func:`path_energy`, :func:`normalized_path_energy`, :func:`straightness` -- kinetic
  energy and straightness of sampled trajectories ``(T, B, *event_shape)``.

Sample clouds are ``(N, *event_shape)``; event dimensions are flattened, so an image
batch ``(N, C, H, W)`` is a cloud of ``C*H*W``-vectors. Scalar results are 0-d tensors and
per-sample results ``(B,)`` tensors, in the dtype and on the device of the input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ot
import torch
from torch import Tensor

from ._core.checks import generator_or_fresh

__all__ = [
    "wasserstein2",
    "MMDResult",
    "mmd",
    "MMD_KERNELS",
    "path_energy",
    "normalized_path_energy",
    "straightness",
]

#: POT's network-simplex result codes (``ot.lp.emd_wrap``).
_EMD_STATUS = {0: "infeasible", 1: "optimal", 2: "unbounded", 3: "max_iter_reached"}


def _cloud(x: Tensor, name: str) -> Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, *event_shape); "
                        f"got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must be shaped (N, *event_shape) with N >= 1; "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    return x.reshape(x.shape[0], -1)


def _subsample(x: Tensor, max_samples: int | None, generator: torch.Generator | None) -> Tensor:
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    generator = generator_or_fresh(generator, "cpu")
    keep = torch.randperm(x.shape[0], generator=generator, device=generator.device)
    keep = keep[:max_samples]
    return x[keep.to(x.device)]


def wasserstein2(
    x: Tensor,
    y: Tensor,
    *,
    max_samples: int | None = None,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Exact 2-Wasserstein distance between the empirical measures of ``x`` and ``y``.

    .. math::
        W_2(\hat\mu, \hat\nu) = \Big( \min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij}
        \lVert x_i - y_j \rVert^2 \Big)^{1/2}, \qquad a = \tfrac1N \mathbf 1_N,\;
        b = \tfrac1M \mathbf 1_M,

    solved exactly by POT's network simplex (``ot.emd2``; Bonneel et al., SIGGRAPH Asia
    2011). **Returns** :math:`W_2`, **not** :math:`W_2^2` (square it for the path-energy
    comparison of :func:`normalized_path_energy`).

    The squared distances are computed in float64 from differences (not from
    ``|x|^2 + |y|^2 - 2 x.y``), so ``W2(x, x + s) == |s|`` to rounding.

    Args:
        x: ``(N, *event_shape)``; event dims are flattened.
        y: ``(M, *event_shape)`` with the same number of entries per sample.
        max_samples: if set, each cloud larger than this is first subsampled without
            replacement (with ``generator``); memory and time are O(N M).
        max_iter: network-simplex iteration limit; default ``max(10**5, 10 * N * M)``,
            far above what converged problems need (about ``80 * N`` at N = 2048, d = 16).
        generator: randomness of the subsampling only (drawn on its device). None: a fresh
            unseeded generator on the CPU; torch's global RNG is never used.

    Returns:
        0-d tensor, dtype and device of ``x``.

    Raises:
        RuntimeError: the solver did not reach optimality (its result code and the limit
            are named); the distance is never returned from a sub-optimal plan.
    """
    xf, yf = _cloud(x, "x"), _cloud(y, "y")
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y must have the same number of entries per sample; got "
                         f"x {tuple(x.shape)} and y {tuple(y.shape)}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None; got {max_samples!r}")
    if max_samples is not None:
        generator = generator_or_fresh(generator, "cpu")
    xf = _subsample(xf, max_samples, generator).detach().to("cpu", torch.float64)
    yf = _subsample(yf, max_samples, generator).detach().to("cpu", torch.float64)
    cost = torch.cdist(xf, yf, compute_mode="donot_use_mm_for_euclid_dist").square().numpy()
    if not np.isfinite(cost).all():
        raise ValueError("x and y must be finite; the squared-distance matrix has "
                         f"{int((~np.isfinite(cost)).sum())} non-finite entries")
    n, m = cost.shape
    limit = max(100_000, 10 * n * m) if max_iter is None else int(max_iter)
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    with warnings.catch_warnings():  # POT warns on result code 3; we raise instead
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ot\.")
        w2sq, log = ot.emd2(a, b, cost, numItermax=limit, log=True)
    code = int(log["result_code"])
    if code != 1:
        raise RuntimeError(
            f"wasserstein2: ot.emd2 returned result code {code} "
            f"({_EMD_STATUS.get(code, 'unknown')}) on a {n}x{m} problem with "
            f"max_iter={limit}; the cost of the unfinished plan ({float(w2sq):.6g}) is not "
            f"W2^2. Raise max_iter or pass max_samples to shrink the problem."
        )
    return torch.tensor(math.sqrt(max(float(w2sq), 0.0)), dtype=x.dtype, device=x.device)


# -- maximum mean discrepancy -------------------------------------------------------------
def _rbf(d2: Tensor, h: float) -> Tensor:
    return torch.exp(-d2 / (2 * h * h))


def _imq(d2: Tensor, h: float) -> Tensor:
    return h / torch.sqrt(h * h + d2)


#: kernel name -> ``k_h(r^2)``; ``h`` is the bandwidth.
MMD_KERNELS = {"rbf": _rbf, "imq": _imq}


@dataclass(frozen=True)
class MMDResult:
    """Unbiased squared MMD and its standard error.

    Attributes:
        mmd2: 0-d, the unbiased estimate of MMD^2 (can be slightly negative when the
            distributions agree).
        stderr: 0-d, estimated standard deviation of ``mmd2`` over repeated draws.
        bandwidths: the bandwidths whose kernels were summed.
    """

    mmd2: Tensor
    stderr: Tensor
    bandwidths: tuple[float, ...]


def _centred_sq(k: Tensor, square: bool) -> Tensor:
    """Mean square of the doubly centred kernel matrix (diagonal left out if ``square``)."""
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    if square:
        n = k.shape[0]
        return (kc.square().sum() - kc.diagonal().square().sum()) / (n * (n - 1))
    return kc.square().mean()


def _offdiag_mean(k: Tensor) -> Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def mmd(
    x: Tensor,
    y: Tensor,
    kernel: str = "rbf",
    bandwidths: Sequence[float] | None = None,
) -> MMDResult:
    r"""Unbiased maximum mean discrepancy between samples ``x ~ P`` and ``y ~ Q``.

    With the kernel :math:`k = \sum_h k_h` summed over ``bandwidths``,

    .. math::
        \widehat{\mathrm{MMD}}{}^2_u = \frac{1}{N(N-1)} \sum_{i \ne i'} k(x_i, x_{i'})
        + \frac{1}{M(M-1)} \sum_{j \ne j'} k(y_j, y_{j'})
        - \frac{2}{NM} \sum_{i, j} k(x_i, y_j)

    (Gretton et al., "A kernel two-sample test", JMLR 2012, Eq. 3), an unbiased estimate
    of :math:`\mathrm{MMD}^2(P, Q)`, zero iff P = Q for a characteristic kernel. Kernels:
    ``"rbf"`` :math:`k_h = \exp(-r^2 / 2h^2)`, ``"imq"`` :math:`k_h = h / \sqrt{h^2 + r^2}`.

    The standard error uses the Hoeffding decomposition of the two-sample U-statistic,
    :math:`\mathrm{Var} \approx 4\,\mathrm{Var}(f_x)/N + 4\,\mathrm{Var}(f_y)/M
    + 2\,\overline{\tilde k_{xx}^2}/N^2 + 2\,\overline{\tilde k_{yy}^2}/M^2
    + 4\,\overline{\tilde k_{xy}^2}/(NM)`, with the projections
    :math:`f_x(x_i) = \mathrm{mean}_{i' \ne i} k(x_i, x_{i'}) - \mathrm{mean}_j k(x_i, y_j)`
    (and symmetrically :math:`f_y`) and :math:`\tilde k` the doubly centred kernel
    matrices. Measured over 200 repeats (N = 200, M = 150, d = 2): within 3% of the
    spread of the estimate when P differs from Q; conservative (1.6x) when P = Q, where
    the plug-in first-order terms carry their own O(1/N^2) noise.

    Args:
        x: ``(N, *event_shape)``, N >= 2.
        y: ``(M, *event_shape)``, M >= 2.
        kernel: ``"rbf"`` or ``"imq"``.
        bandwidths: positive bandwidths; default the median pairwise distance ``h_med`` of
            the pooled sample times ``(0.5, 1, 2)`` (a data-dependent choice: compare two
            models with the same explicit bandwidths).

    Returns:
        :class:`MMDResult`, tensors in the dtype and on the device of ``x``.
    """
    if kernel not in MMD_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(MMD_KERNELS)}; got {kernel!r}")
    xf, yf = _cloud(x, "x"), _cloud(y, "y")
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y must have the same number of entries per sample; got "
                         f"x {tuple(x.shape)} and y {tuple(y.shape)}")
    n, m = xf.shape[0], yf.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples on each side; got N={n}, M={m}")
    yf = yf.to(xf)
    dxx = torch.cdist(xf, xf).square()
    dyy = torch.cdist(yf, yf).square()
    dxy = torch.cdist(xf, yf).square()
    if bandwidths is None:
        pooled = torch.cat([dxx[torch.triu_indices(n, n, 1, device=xf.device).unbind()],
                            dyy[torch.triu_indices(m, m, 1, device=xf.device).unbind()],
                            dxy.flatten()])
        h_med = float(pooled.median().sqrt())
        bandwidths = tuple(f * h_med for f in (0.5, 1.0, 2.0)) if h_med > 0 else (1.0,)
    bandwidths = tuple(float(h) for h in bandwidths)
    if not bandwidths or any(not (h > 0 and math.isfinite(h)) for h in bandwidths):
        raise ValueError(f"bandwidths must be positive finite numbers; got {bandwidths!r}")
    k_h = MMD_KERNELS[kernel]
    kxx = sum(k_h(dxx, h) for h in bandwidths)
    kyy = sum(k_h(dyy, h) for h in bandwidths)
    kxy = sum(k_h(dxy, h) for h in bandwidths)
    mmd2 = _offdiag_mean(kxx) + _offdiag_mean(kyy) - 2 * kxy.mean()
    # first-order (projection) terms of the Hoeffding decomposition
    fx = (kxx.sum(1) - kxx.diagonal()) / (n - 1) - kxy.mean(1)
    fy = (kyy.sum(1) - kyy.diagonal()) / (m - 1) - kxy.mean(0)
    var = (4 * fx.var() / n + 4 * fy.var() / m
           + 2 * _centred_sq(kxx, True) / n**2 + 2 * _centred_sq(kyy, True) / m**2
           + 4 * _centred_sq(kxy, False) / (n * m))
    return MMDResult(mmd2=mmd2.to(x.dtype), stderr=var.sqrt().to(x.dtype),
                     bandwidths=bandwidths)


# -- trajectories ------------------------------------------------------------------------
def _trajectory(trajectory: Tensor, times: Tensor | Sequence[float] | None) -> tuple:
    if not torch.is_tensor(trajectory) or trajectory.dim() < 2:
        raise ValueError("trajectory must be a tensor shaped (T, B, *event_shape) with "
                         f"T >= 2; got {getattr(trajectory, 'shape', type(trajectory))}")
    T = trajectory.shape[0]
    if T < 2:
        raise ValueError(f"trajectory needs T >= 2 time points; got shape "
                         f"{tuple(trajectory.shape)}")
    like = dict(dtype=trajectory.dtype, device=trajectory.device)
    if times is None:
        times = torch.linspace(0, 1, T, **like)
    times = torch.as_tensor(times, **like)
    if times.shape != (T,):
        raise ValueError(f"times must be shaped (T,) = ({T},) to match trajectory "
                         f"{tuple(trajectory.shape)}; got {tuple(times.shape)}")
    dt = times[1:] - times[:-1]
    if times.device.type == "cpu" and not bool((dt > 0).all()):
        raise ValueError(f"times must be strictly increasing; got {times.tolist()}")
    dx = (trajectory[1:] - trajectory[:-1]).flatten(2)  # (T-1, B, D)
    return dx, dt


def path_energy(trajectory: Tensor, times: Tensor | Sequence[float] | None = None) -> Tensor:
    r"""Kinetic energy of each sampled path, ``(B,)``.

    .. math::
        E_b = \int_{t_0}^{t_{T-1}} \lVert \dot x_b(t) \rVert^2 \, dt
        \approx \sum_{k} \frac{\lVert x_b(t_{k+1}) - x_b(t_k) \rVert^2}{t_{k+1} - t_k},

    the exact energy of the piecewise-linear interpolant of the saved states; for an Euler
    trajectory (``x_{k+1} = x_k + dt_k v(x_k, t_k)``) it equals the left Riemann sum of
    :math:`\lVert v \rVert^2` along the path, the path energy PE of Tong et al., TMLR 2024
    (averaged over the batch there). By Cauchy-Schwarz,
    :math:`E_b \ge \lVert x_b(t_{T-1}) - x_b(t_0) \rVert^2 / (t_{T-1} - t_0)` with equality
    iff the path is a straight line at constant speed.

    Args:
        trajectory: ``(T, B, *event_shape)`` states at ``times``.
        times: ``(T,)`` strictly increasing; default ``linspace(0, 1, T)``.
    """
    dx, dt = _trajectory(trajectory, times)
    return (dx.square().sum(-1) / dt[:, None]).sum(0)


def normalized_path_energy(
    trajectory: Tensor, w2_squared: Tensor | float, times: Tensor | Sequence[float] | None = None
) -> Tensor:
    r"""Normalised path energy ``NPE = |PE - W_2^2(q_0, q_1)| / W_2^2(q_0, q_1)``, 0-d.

    ``PE`` is the batch mean of :func:`path_energy` over ``t in [0, 1]`` and ``w2_squared``
    the squared 2-Wasserstein distance between source and target (e.g.
    ``wasserstein2(x0_test, x1_test) ** 2``), the least energy any flow between them
    can have (Benamou-Brenier). NPE = 0 for the optimal-transport flow (Tong et al.,
    "Improving and generalizing flow-based generative models with minibatch optimal
    transport", TMLR 2024, Sec. 5.1).
    """
    w2sq = torch.as_tensor(w2_squared, dtype=trajectory.dtype, device=trajectory.device)
    if w2sq.dim() != 0:
        raise ValueError(f"w2_squared must be a scalar; got shape {tuple(w2sq.shape)}")
    if w2sq.device.type == "cpu" and not bool(w2sq > 0):
        raise ValueError(f"w2_squared must be positive; got {float(w2sq)!r}")
    pe = path_energy(trajectory, times).mean()
    return (pe - w2sq).abs() / w2sq


def straightness(trajectory: Tensor, times: Tensor | Sequence[float] | None = None) -> Tensor:
    r"""Straightness of each sampled path in the sense of rectified flow, ``(B,)``.

    .. math::
        S_b = \int_{t_0}^{t_{T-1}} \Big\lVert \dot x_b(t)
        - \frac{x_b(t_{T-1}) - x_b(t_0)}{t_{T-1} - t_0} \Big\rVert^2 dt
        = E_b - \frac{\lVert x_b(t_{T-1}) - x_b(t_0) \rVert^2}{t_{T-1} - t_0},

    the per-path integrand of Liu, Gong & Liu, "Flow straight and fast: learning to
    generate and transfer data with rectified flow", ICLR 2023, Eq. (5)
    (:math:`S(Z) = \int_0^1 E \lVert (Z_1 - Z_0) - \dot Z_t \rVert^2 dt`; average over the
    batch for theirs). ``S_b >= 0`` and ``S_b = 0`` exactly for a straight line traversed
    at constant speed, the paths of a perfectly rectified flow (one Euler step is then
    exact). Computed on the piecewise-linear interpolant of the saved states as
    ``sum_k dt_k |dx_k / dt_k - Delta / tau|^2`` (no cancellation of two large terms).

    Args:
        trajectory: ``(T, B, *event_shape)``.
        times: ``(T,)`` strictly increasing; default ``linspace(0, 1, T)``.
    """
    dx, dt = _trajectory(trajectory, times)
    tau = dt.sum()
    chord = dx.sum(0) / tau  # (B, D) average velocity
    dev = dx / dt[:, None, None] - chord
    return (dev.square().sum(-1) * dt[:, None]).sum(0)
