"""metrics: W2, MMD, path energy and straightness against closed forms."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from flowsolve.metrics import (
    MMDResult,
    mmd,
    normalized_path_energy,
    path_energy,
    straightness,
    wasserstein2,
)

F64 = torch.float64


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=F64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)


def _quantile_w2(x: np.ndarray, y: np.ndarray) -> float:
    """1-D W2 from the quantile functions, integrated exactly over the merged grid."""
    xs, ys = np.sort(x), np.sort(y)
    n, m = len(xs), len(ys)
    u = np.unique(np.concatenate([np.arange(n + 1) / n, np.arange(m + 1) / m]))
    mid = (u[:-1] + u[1:]) / 2
    qx, qy = xs[np.floor(mid * n).astype(int)], ys[np.floor(mid * m).astype(int)]
    return math.sqrt(float(np.sum(np.diff(u) * (qx - qy) ** 2)))


# -- wasserstein2 ------------------------------------------------------------------------
def test_w2_of_a_cloud_with_itself_is_zero(gen):
    x = torch.randn(300, 3, generator=gen, dtype=F64)
    assert wasserstein2(x, x).item() == 0.0


def test_w2_of_a_translated_cloud_is_the_shift(gen):
    # sum_i <x_i - x_sigma(i), s> = 0 for every permutation, so the identity is optimal
    # and W2^2 = |s|^2 exactly (up to rounding of the cost entries)
    x = torch.randn(400, 3, generator=gen, dtype=F64)
    s = torch.tensor([1.0, -2.0, 2.0], dtype=F64)
    assert wasserstein2(x, x + s).item() == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize("n,m", [(257, 257), (200, 130)])
def test_w2_in_1d_equals_the_quantile_formula(gen, n, m):
    x = torch.randn(n, 1, generator=gen, dtype=F64)
    y = 2 * torch.rand(m, 1, generator=gen, dtype=F64) + 1
    expected = _quantile_w2(x[:, 0].numpy(), y[:, 0].numpy())
    assert wasserstein2(x, y).item() == pytest.approx(expected, rel=1e-10)


def test_w2_between_gaussian_samples_matches_bures_wasserstein(gen):
    # y = A x + b with A symmetric positive definite is the gradient of a convex function,
    # so it is the optimal map between the empirical measures (cyclical monotonicity):
    # empirical W2^2 = mean |x_i - A x_i - b|^2 exactly. Between N(m, S) and its push-forward
    # N(A m + b, A S A) the same map is the Brenier map, so that mean of i.i.d. terms
    # converges to the Bures-Wasserstein value with a CLT error we bound at 5 sigma.
    d, n = 3, 1500
    s, a = _spd(d, gen), _spd(d, gen)
    mean, b = torch.tensor([0.5, -1.0, 0.0], dtype=F64), torch.tensor([2.0, 0.0, 1.0], dtype=F64)
    x = mean + torch.randn(n, d, generator=gen, dtype=F64) @ torch.linalg.cholesky(s).T
    y = x @ a.T + b
    per_point = (x - y).square().sum(1)
    w2 = wasserstein2(x, y).item()
    assert w2**2 == pytest.approx(per_point.mean().item(), rel=1e-10)

    s2, m2 = a @ s @ a, a @ mean + b
    root = scipy.linalg.sqrtm(s.numpy())
    cross = np.real(scipy.linalg.sqrtm(root @ s2.numpy() @ root))
    bw2 = float((mean - m2).square().sum()) + float(np.trace(s.numpy() + s2.numpy() - 2 * cross))
    mc_err = per_point.std().item() / math.sqrt(n)
    assert abs(w2**2 - bw2) < 5 * mc_err, (w2**2, bw2, mc_err)


def test_w2_flattens_event_dims_and_follows_dtype(gen):
    x = torch.randn(50, 2, 3, generator=gen)
    y = torch.randn(60, 6, generator=gen)
    w = wasserstein2(x, y.reshape(60, 2, 3))
    assert w.dtype == torch.float32 and w.dim() == 0
    assert w.item() == pytest.approx(wasserstein2(x.reshape(50, 6).double(), y.double()).item(),
                                     rel=1e-6)


def test_w2_max_samples_is_reproducible_with_a_generator():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=F64) + 1
    w_a = wasserstein2(x, y, max_samples=100, generator=torch.Generator().manual_seed(5))
    w_b = wasserstein2(x, y, max_samples=100, generator=torch.Generator().manual_seed(5))
    assert w_a.item() == w_b.item()


def test_w2_iteration_limit_raises_with_the_result_code(gen):
    x = torch.randn(200, 2, generator=gen, dtype=F64)
    with pytest.raises(RuntimeError, match=r"result code 3 \(max_iter_reached\).*max_iter=5"):
        wasserstein2(x, x + 1, max_iter=5)


def test_w2_rejects_bad_inputs(gen):
    x = torch.randn(10, 2, generator=gen)
    with pytest.raises(ValueError, match="same number of entries"):
        wasserstein2(x, torch.randn(10, 3, generator=gen))
    with pytest.raises(ValueError, match="max_samples"):
        wasserstein2(x, x, max_samples=0)
    with pytest.raises(TypeError, match="floating-point"):
        wasserstein2(torch.ones(3, 2, dtype=torch.long), x)
    with pytest.raises(ValueError, match="finite"):
        wasserstein2(x, torch.full((4, 2), float("nan")))


# -- mmd ---------------------------------------------------------------------------------
def _rbf_mmd2_gaussians(shift: torch.Tensor, h: float) -> float:
    """Population MMD^2 between N(0, I) and N(shift, I) for k = exp(-r^2 / 2h^2):
    E k(x, x') = (h^2 / (h^2 + 2))^(d/2) and E k(x, y) = that * exp(-|shift|^2 / 2(h^2 + 2))."""
    d = shift.numel()
    base = (h * h / (h * h + 2)) ** (d / 2)
    return 2 * base * (1 - math.exp(-float(shift.square().sum()) / (2 * (h * h + 2))))


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_mmd_matches_the_population_value_within_its_error_bar(gen, shift):
    d, h = 2, 1.0
    delta = torch.full((d,), shift, dtype=F64)
    x = torch.randn(600, d, generator=gen, dtype=F64)
    y = torch.randn(500, d, generator=gen, dtype=F64) + delta
    res = mmd(x, y, bandwidths=(h,))
    assert isinstance(res, MMDResult) and res.bandwidths == (h,)
    truth = _rbf_mmd2_gaussians(delta, h)
    assert abs(res.mmd2.item() - truth) < 4 * res.stderr.item(), (res, truth)
    if shift > 0:
        assert res.mmd2.item() > 5 * res.stderr.item()  # clearly positive


def test_mmd_stderr_matches_the_spread_over_repeats(gen):
    vals, errs = [], []
    for _ in range(40):
        x = torch.randn(120, 2, generator=gen, dtype=F64)
        y = torch.randn(100, 2, generator=gen, dtype=F64) + 0.4
        r = mmd(x, y, kernel="imq", bandwidths=(0.5, 1.0, 2.0))
        vals.append(r.mmd2)
        errs.append(r.stderr)
    spread, claimed = torch.stack(vals).std().item(), torch.stack(errs).mean().item()
    # the empirical std of 40 draws is itself uncertain by ~1/sqrt(2*39) ~ 11%
    assert 0.65 < claimed / spread < 1.5, (claimed, spread)


def test_mmd_default_bandwidths_are_the_median_heuristic(gen):
    x = torch.randn(100, 2, generator=gen)
    res = mmd(x, x + 3)
    assert len(res.bandwidths) == 3
    assert res.bandwidths[0] * 2 == pytest.approx(res.bandwidths[1])
    assert res.mmd2.dtype == torch.float32 and res.mmd2.item() > 5 * res.stderr.item()


def test_mmd_rejects_bad_arguments(gen):
    x = torch.randn(10, 2, generator=gen)
    with pytest.raises(ValueError, match=r"kernel must be one of \['imq', 'rbf'\]"):
        mmd(x, x, kernel="gauss")
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, x, bandwidths=(1.0, -1.0))
    with pytest.raises(ValueError, match="at least 2"):
        mmd(x[:1], x)


# -- trajectories ------------------------------------------------------------------------
def test_straight_constant_speed_paths_are_ideal(gen):
    x0 = torch.randn(16, 2, 2, generator=gen, dtype=F64)
    x1 = torch.randn(16, 2, 2, generator=gen, dtype=F64)
    times = torch.tensor([0.0, 0.1, 0.15, 0.5, 0.9, 1.0], dtype=F64)  # uneven grid
    traj = x0 + times.reshape(-1, 1, 1, 1) * (x1 - x0)
    chord2 = (x1 - x0).square().flatten(1).sum(1)
    assert torch.allclose(path_energy(traj, times), chord2, rtol=1e-13, atol=0)
    assert straightness(traj, times).abs().max().item() < 1e-25


def test_path_energy_and_straightness_of_a_quarter_circle():
    # x(t) = (cos(pi t / 2), sin(pi t / 2)): speed pi/2, energy pi^2/4, chord^2 = 2.
    # The chord approximation of the arc has relative energy error ~ (pi/2 dt)^2 / 12.
    t = torch.linspace(0, 1, 2001, dtype=F64)
    traj = torch.stack([torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)], -1)[:, None]
    pe = path_energy(traj).item()
    assert pe == pytest.approx(math.pi**2 / 4, rel=1e-6)
    assert straightness(traj).item() == pytest.approx(math.pi**2 / 4 - 2, rel=1e-5)


def test_euler_path_energy_is_the_riemann_sum_of_speed(gen):
    def v(x, t):
        return torch.stack([-x[:, 1], x[:, 0]], 1) * (1 + t)

    x = torch.randn(8, 2, generator=gen, dtype=F64)
    times = torch.linspace(0, 1, 11, dtype=F64)
    states, riemann = [x], torch.zeros(8, dtype=F64)
    for k in range(10):
        dt = times[k + 1] - times[k]
        vel = v(states[-1], times[k])
        riemann = riemann + dt * vel.square().sum(1)
        states.append(states[-1] + dt * vel)
    assert torch.allclose(path_energy(torch.stack(states), times), riemann, rtol=1e-13)


def test_normalized_path_energy_is_zero_for_the_ot_flow(gen):
    d, n = 2, 300
    a = _spd(d, gen)
    x0 = torch.randn(n, d, generator=gen, dtype=F64)
    x1 = x0 @ a.T + 1.0  # the optimal map (see the W2 test), straight-line interpolation
    traj = x0 + torch.linspace(0, 1, 5, dtype=F64).reshape(-1, 1, 1) * (x1 - x0)
    w2sq = wasserstein2(x0, x1) ** 2
    assert normalized_path_energy(traj, w2sq).item() < 1e-12
    bent = traj.clone()
    bent[2] += 0.5  # detour half-way: PE grows, so NPE > 0
    assert normalized_path_energy(bent, w2sq).item() > 0.1


def test_trajectory_arguments_are_checked(gen):
    traj = torch.randn(4, 3, 2, generator=gen)
    with pytest.raises(ValueError, match=r"times must be shaped \(T,\) = \(4,\)"):
        path_energy(traj, torch.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="strictly increasing"):
        straightness(traj, torch.tensor([0.0, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="T >= 2"):
        path_energy(traj[:1])
    with pytest.raises(ValueError, match="w2_squared must be positive"):
        normalized_path_energy(traj, 0.0)


def test_mmd_is_the_u_statistic_and_unbiased_under_the_null(gen):
    # the formula term by term on a small input (diagonals left out of the within-sample means)
    x = torch.randn(7, 2, generator=gen, dtype=F64)
    y = torch.randn(5, 2, generator=gen, dtype=F64) + 0.5
    h = 0.8

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * h * h))

    kxx, kyy = k(x, x), k(y, y)
    within = (kxx.sum() - kxx.diag().sum()) / (7 * 6) + (kyy.sum() - kyy.diag().sum()) / (5 * 4)
    expected = within - 2 * k(x, y).mean()
    torch.testing.assert_close(mmd(x, y, bandwidths=(h,)).mmd2, expected, rtol=1e-13, atol=1e-15)
    # unbiased: the mean over P = Q draws is 0 within its standard error; the biased
    # V-statistic (diagonals kept) averages 2 (1 - E k) / N, here about +0.07
    draws = torch.stack([mmd(torch.randn(20, 2, generator=gen, dtype=F64),
                             torch.randn(20, 2, generator=gen, dtype=F64),
                             bandwidths=(1.0,)).mmd2 for _ in range(1000)])
    assert abs(draws.mean().item()) < 3 * draws.std().item() / 1000**0.5


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_and_its_stderr_equal_a_double_loop_on_three_and_four_points(gen, kernel):
    """N = 3, M = 4 by plain loops in float64: the U-statistic (diagonals left out, / N(N-1))
    and the documented variance 4 Var(f_x)/N + 4 Var(f_y)/M + 2 <kc_xx^2>_{i!=i'}/N^2
    + 2 <kc_yy^2>_{j!=j'}/M^2 + 4 <kc_xy^2>/(NM), Var unbiased (/ (N - 1)), <.>_{i!=i'} the
    mean over the N(N - 1) off-diagonal pairs, kc the doubly centred kernel matrix."""
    x = torch.randn(3, 2, generator=gen, dtype=F64)
    y = torch.randn(4, 2, generator=gen, dtype=F64) + 0.7
    hs = (0.6, 1.5)
    if kernel == "rbf":
        def k(a, b):
            r2 = sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True))
            return sum(math.exp(-r2 / (2 * h * h)) for h in hs)
    else:
        def k(a, b):
            r2 = sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True))
            return sum(h / math.sqrt(h * h + r2) for h in hs)
    xs, ys = x.tolist(), y.tolist()
    n, m = len(xs), len(ys)

    def gram(a, b):
        return [[k(p, q) for q in b] for p in a]

    def centred(g):
        rows, cols = len(g), len(g[0])
        r = [sum(g[i][j] for j in range(cols)) / cols for i in range(rows)]
        c = [sum(g[i][j] for i in range(rows)) / rows for j in range(cols)]
        a = sum(map(sum, g)) / (rows * cols)
        return [[g[i][j] - r[i] - c[j] + a for j in range(cols)] for i in range(rows)]

    def offdiag_mean(g):
        s = len(g)
        return sum(g[i][j] for i in range(s) for j in range(s) if i != j) / (s * (s - 1))

    def squared(g):
        return [[e * e for e in row] for row in g]

    def var(v):
        mean = sum(v) / len(v)
        return sum((e - mean) ** 2 for e in v) / (len(v) - 1)

    kxx, kyy, kxy = gram(xs, xs), gram(ys, ys), gram(xs, ys)
    mmd2 = offdiag_mean(kxx) + offdiag_mean(kyy) - 2 * sum(map(sum, kxy)) / (n * m)
    fx = [sum(kxx[i][i2] for i2 in range(n) if i2 != i) / (n - 1) - sum(kxy[i]) / m
          for i in range(n)]
    fy = [sum(kyy[j][j2] for j2 in range(m) if j2 != j) / (m - 1)
          - sum(kxy[i][j] for i in range(n)) / n for j in range(m)]
    cxx2, cyy2 = offdiag_mean(squared(centred(kxx))), offdiag_mean(squared(centred(kyy)))
    cxy2 = sum(map(sum, squared(centred(kxy)))) / (n * m)
    variance = (4 * var(fx) / n + 4 * var(fy) / m + 2 * cxx2 / n**2 + 2 * cyy2 / m**2
                + 4 * cxy2 / (n * m))
    res = mmd(x, y, kernel=kernel, bandwidths=hs)
    assert res.mmd2.item() == pytest.approx(mmd2, rel=1e-12, abs=1e-15)
    assert res.stderr.item() == pytest.approx(math.sqrt(variance), rel=1e-12)
    # every term is present: each alone moves the standard error by far more than 1e-12
    assert min(var(fx), var(fy), cxx2, cyy2, cxy2) > 1e-6
