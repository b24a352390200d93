"""GridBrownian: the law of one cell (increment and space-time Levy area) and the exact
aggregation of cells into longer queries (float64), on the uniform grid and on given times.

Conventions (torchsde's, ``torchsde/_brownian/brownian_interval.py``): ``bm(ta, tb,
return_U=True)`` returns ``W = W_tb - W_ta`` and ``U = int_ta^tb (W_s - W_ta) ds``; torchsde's
space-time Levy area is ``H = U / h - W / 2`` (``_H_to_U``: ``U = h (W / 2 + H)``), drawn as
``sqrt(h / 12) N(0, 1)``. The unscaled area ``A = U - h W / 2 = h H =
int_ta^tb (W_s - W_ta - (s - ta) / h W) ds`` (the integral of the Brownian bridge) has
variance ``h^3 / 12`` and is independent of ``W``.
"""

import math

import pytest
import torch

from flowsolve.sde.brownian import GridBrownian, nearest_index

F64 = torch.float64


def test_one_cell_has_the_law_of_brownian_motion_and_its_space_time_area():
    """200 000 independent cells of h = 0.2: Var W = h, Var A = h^3 / 12 (Var H = h / 12),
    A uncorrelated with W and with the next cell's A, Var U = h^3 / 3, E[U W] = h^2 / 2.
    A sample variance of n Gaussians has std sigma^2 sqrt(2 / (n - 1)), a sample correlation
    of independent ones 1 / sqrt(n); every check allows 5 of those."""
    rows, steps, t0, h = 25_000, 4, 0.5, 0.2
    bm = GridBrownian((rows, 2), steps=steps, t0=t0, t1=t0 + steps * h, dtype=F64,
                      generator=torch.Generator().manual_seed(20), levy_area="space-time")
    cells = [bm(t0 + k * h, t0 + (k + 1) * h, return_U=True) for k in range(steps)]
    w = torch.stack([c[0] for c in cells])  # (steps, rows, 2): independent cells
    u = torch.stack([c[1] for c in cells])
    area = u - h * w / 2  # A = h H
    n = w.numel()
    assert n == 200_000

    def check_variance(sample, exact):
        se = exact * math.sqrt(2 / (n - 1))
        assert abs(float(sample.var()) - exact) < 5 * se, (float(sample.var()), exact, se)
        assert abs(float(sample.mean())) < 5 * math.sqrt(exact / n), float(sample.mean())

    check_variance(w, h)
    check_variance(area, h**3 / 12)
    check_variance(area / h, h / 12)  # torchsde's H
    check_variance(u, h**3 / 3)
    tol = 5 / math.sqrt(n)
    corr = torch.corrcoef(torch.stack([w.flatten(), area.flatten()]))[0, 1]
    assert abs(float(corr)) < tol, float(corr)
    e_uw = float((u * w).mean())
    assert abs(e_uw - h**2 / 2) < 5 * float((u * w).std()) / math.sqrt(n), (e_uw, h**2 / 2)
    nxt = torch.corrcoef(torch.stack([area[:-1].flatten(), area[1:].flatten()]))[0, 1]
    assert abs(float(nxt)) < 5 / math.sqrt(area[1:].numel()), float(nxt)


def test_longer_queries_aggregate_the_cells_exactly():
    """Over [t_a, t_b] = union of cells k = a..b-1: W = sum_k W_k and
    U = int_ta^tb (W_s - W_ta) ds = sum_k [U_k + (t_b - t_{k+1}) W_k]
    (cell k contributes its own U_k plus h (W_tk - W_ta), and W_j enters the later cells)."""
    steps, t0, h = 6, -0.4, 0.2
    bm = GridBrownian((3, 2), steps=steps, t0=t0, t1=t0 + steps * h, dtype=F64,
                      generator=torch.Generator().manual_seed(21), levy_area="space-time")
    grid = [t0 + k * h for k in range(steps + 1)]
    cells = [bm(grid[k], grid[k + 1], return_U=True) for k in range(steps)]
    for a in range(steps):
        for b in range(a + 1, steps + 1):
            w, u = bm(grid[a], grid[b], return_U=True)
            w_sum = sum(cells[k][0] for k in range(a, b))
            u_sum = sum(cells[k][1] + (b - k - 1) * h * cells[k][0] for k in range(a, b))
            torch.testing.assert_close(w, w_sum, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(u, u_sum, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bm(grid[4]), bm(grid[0], grid[4]), rtol=0, atol=0)  # from t0


def test_a_given_grid_has_the_law_of_brownian_motion():
    """Cells of unequal lengths h_k (0.02 .. 0.3): Var W_k = h_k, Var A_k = h_k^3 / 12, each
    A uncorrelated with its W, over 40 000 rows x 2 (80 000 draws a cell); 5 standard
    errors as above."""
    grid = [0.5, 0.52, 0.6, 0.9, 1.0, 1.3]
    bm = GridBrownian((40_000, 2), grid=grid, dtype=F64, levy_area="space-time",
                      generator=torch.Generator().manual_seed(22))
    assert bm.steps == 5 and (bm.t0, bm.t1) == (0.5, 1.3) and bm.grid == grid
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        h = b - a
        w, u = bm(a, b, return_U=True)
        area = u - h * w / 2
        n = w.numel()
        for sample, exact in ((w, h), (area, h**3 / 12)):
            se = exact * math.sqrt(2 / (n - 1))
            assert abs(float(sample.var()) - exact) < 5 * se, (a, b, float(sample.var()), exact)
        corr = torch.corrcoef(torch.stack([w.flatten(), area.flatten()]))[0, 1]
        assert abs(float(corr)) < 5 / math.sqrt(n)


def test_a_given_grid_aggregates_its_cells_exactly():
    """W and U = sum_k [U_k + (t_b - t_{k+1}) W_k] over any run of unequal cells."""
    grid = [-0.4, -0.35, 0.0, 0.1, 0.45, 0.5, 1.0]
    bm = GridBrownian((3, 2), grid=torch.tensor(grid, dtype=F64), dtype=F64,
                      generator=torch.Generator().manual_seed(23), levy_area="space-time")
    n = len(grid) - 1
    cells = [bm(grid[k], grid[k + 1], return_U=True) for k in range(n)]
    for a in range(n):
        for b in range(a + 1, n + 1):
            w, u = bm(grid[a], grid[b], return_U=True)
            w_sum = sum(cells[k][0] for k in range(a, b))
            u_sum = sum(cells[k][1] + (grid[b] - grid[k + 1]) * cells[k][0] for k in range(a, b))
            torch.testing.assert_close(w, w_sum, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(u, u_sum, rtol=1e-12, atol=1e-14)
    # the uniform grid given as times draws the same motion as steps=
    ts = torch.linspace(0, 1, 9, dtype=F64)
    a = GridBrownian((3, 2), grid=ts, dtype=F64, generator=torch.Generator().manual_seed(24))
    b = GridBrownian((3, 2), steps=8, dtype=F64, generator=torch.Generator().manual_seed(24))
    for t in ts[1:].tolist():
        torch.testing.assert_close(a(t), b(t), rtol=1e-14, atol=1e-15)


def test_a_given_grid_is_checked_and_queried_on_its_points():
    gen = torch.Generator().manual_seed(25)
    bm = GridBrownian((2, 1), grid=[0.0, 0.1, 0.5, 1.0], generator=gen)
    bm(0.1, 0.5)
    bm(torch.tensor(0.1, dtype=torch.float32), 0.5)  # float32 rounding names its point
    # cells below a hundred float32 ulps: a float32 time names the point it was rounded from
    fine = GridBrownian((2, 1), grid=[0.0, 0.999, 0.999001, 1.0], generator=gen)
    t32 = torch.tensor(0.999001, dtype=torch.float32)
    assert abs(float(t32) - 0.999001) > 1e-2 * 1e-6
    torch.testing.assert_close(fine(t32, 1.0), fine(0.999001, 1.0), rtol=0, atol=0)
    for t in (0.3, 0.101, 1.2):
        with pytest.raises(ValueError, match=r"can only be queried at its grid points; got"):
            bm(0.0, t)
    for grid, problem in (([0.0, 0.5, 0.5], "not strictly increasing"), ([0.3], "fewer than two"),
                          ([0.0, float("nan")], "not finite"), ([[0.0, 1.0]], "not 1-d")):
        with pytest.raises(ValueError, match=problem):
            GridBrownian((2, 1), grid=grid)
    with pytest.raises(ValueError, match="exactly one of steps= .* or grid="):
        GridBrownian((2, 1), steps=4, grid=[0.0, 1.0])
    with pytest.raises(ValueError, match="exactly one of steps="):
        GridBrownian((2, 1))
    with pytest.raises(ValueError, match=r"t1=2.0 disagrees with grid="):
        GridBrownian((2, 1), grid=[0.0, 1.0], t1=2.0)
    assert "grid=[0.0 .. 1.0] (3 cells)" in repr(bm)


def test_nearest_point_on_a_device_without_a_check():
    """The accelerator's lookup (searchsorted, no synchronisation) picks the nearest point."""
    times = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=F64)
    v = torch.tensor([-1.0, 0.0, 0.04, 0.06, 0.1, 0.29, 0.31, 0.99, 1.0, 2.0], dtype=F64)
    assert nearest_index(times, v).tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 3, 3]
