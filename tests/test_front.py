"""The low-NFE front (flowsolve/studies/front.py): budgets respected, errors as measured
directly, the best pair per budget."""

import pytest
import torch

import flowsolve as fs
from flowsolve.ode.grids import as_grid
from flowsolve.ode.solve import sample
from flowsolve.studies.front import low_nfe_front, solve_within
from flowsolve.studies.specs import grid_label

F64 = torch.float64
PATH = fs.AffineGaussianPath(fs.CosineScheduler())
DATA = fs.GaussianMixture.ring(4, radius=2.0, std=0.5)
U = fs.analytic.marginal_velocity(DATA, PATH)
X0 = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))


def test_solve_within_takes_the_most_steps_that_fit_the_budget():
    assert solve_within(U, X0, "heun2", 9, path=PATH).steps == 4  # 2 evaluations a step
    assert solve_within(U, X0, "rk4", 9, path=PATH).nfe == 8
    assert solve_within(U, X0, "rk4", 3, path=PATH) is None
    assert solve_within(U, X0, "dpmpp_2m", 7, path=PATH, grid="logsnr").steps == 7


def test_the_front_measures_each_pair_as_a_direct_solve_and_picks_the_least_error():
    ref = sample(U, X0, "dopri8", rtol=1e-12, atol=1e-12).x
    front = low_nfe_front(U, X0, path=PATH, budgets=[4, 8], solvers=["ddim", "heun2"],
                          grids=["uniform", "logsnr", 3.0], reference=ref)
    assert {e.grid for e in front.entries} == {"uniform", "logsnr", "shift3"}
    assert len(front.entries) == 2 * 3 * 2
    for e in front.entries:
        grid = {"shift3": 3.0}.get(e.grid, e.grid)
        x = sample(U, X0, e.solver, steps=e.steps, grid=grid, path=PATH).x
        assert e.error == pytest.approx(float((x - ref).norm(dim=1).pow(2).mean().sqrt()),
                                        rel=1e-12)
        assert e.nfe <= e.budget
    best = front.best()
    for b in best:
        assert b.error == min(e.error for e in front.entries if e.budget == b.budget)
    assert "| 8 |" in front.table() and "heun2" in front.table()
    lines = front.to_csv().splitlines()
    assert lines[0] == "budget,solver,grid,steps,nfe,error" and len(lines) == 13
    assert float(lines[1].split(",")[-1]) == front.entries[0].error
    auto = low_nfe_front(U, X0, path=PATH, budgets=[4], solvers=["ddim"], grids=["uniform"])
    assert auto.entries[0].error == pytest.approx(front.entries[0].error, rel=1e-6)


def test_the_front_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="adaptive"):
        low_nfe_front(U, X0, path=PATH, solvers=["dopri5"])
    with pytest.raises(ValueError, match="budgets must be positive"):
        low_nfe_front(U, X0, path=PATH, budgets=[0])
    with pytest.raises(ValueError, match="needs path="):
        low_nfe_front(U, X0, path=None)
    with pytest.raises(ValueError, match="reference must be x"):
        low_nfe_front(U, X0, path=PATH, reference=X0[:3])
    assert grid_label(as_grid(3.0)) == "shift3" and grid_label(as_grid([0.0, 1.0])) == "given"
