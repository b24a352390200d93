"""The public surface of the design brief works as written, end to end."""

import torch

import flowsolve as fs

F64 = torch.float64


def test_design_sketch_runs_and_agrees_with_closed_forms():
    g = torch.Generator().manual_seed(0)
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64)
    data = fs.GaussianMixture(means, torch.full((2, 2), 0.25, dtype=F64), torch.tensor([0.4, 0.6]))
    u = fs.analytic.marginal_velocity(data, path)
    s = fs.analytic.marginal_score(data, path)
    x0 = torch.randn(256, 2, generator=g, dtype=F64)

    res = fs.sample(u, x0, solver="rk4", steps=20)
    assert res.nfe == 80 and res.x.shape == x0.shape
    ada = fs.sample(u, x0, solver="dopri5", rtol=1e-8, atol=1e-8)
    assert (res.x - ada.x).abs().max() < 1e-3

    sde = fs.sample_sde(u, x0, score=s, diffusion=0.5, solver="euler", steps=200, generator=g)
    assert fs.wasserstein2(sde.x, data.sample(256, generator=g, dtype=F64)) < 0.6

    x1 = data.sample(8, generator=g, dtype=F64)
    ll = fs.log_likelihood(u, x1, divergence="exact", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ll.log_prob, data.log_prob(x1), rtol=0, atol=1e-4)
    assert ll.stderr is None and ll.nfe > 0

    y1 = torch.arange(256)
    x0c, x1c, y1c = fs.OTCoupling(method="exact")(x0, data.sample(256, generator=g, dtype=F64),
                                                   y1)
    assert x0c.shape == x0.shape and sorted(y1c.tolist()) == list(range(256))

    v = fs.transfer(u, source=fs.CondOTScheduler(), target=fs.CosineScheduler())
    exact = fs.analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CosineScheduler()))
    torch.testing.assert_close(v(x1, 0.4), exact(x1, 0.4))


def test_compare_solvers_front_door_on_the_design_sketch():
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    data = fs.GaussianMixture.ring(4, radius=2.0, std=0.4)
    u = fs.analytic.marginal_velocity(data, path)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    table = fs.compare_solvers(u, x0, solvers=["euler", "rk4"], steps=[16, 32, 64], repeats=1)
    assert abs(table.orders["euler"]["fitted"] - 1) < 0.3
    assert abs(table.orders["rk4"]["fitted"] - 4) < 0.5
    assert {r["solver"] for r in table.records} == {"euler", "rk4"}


def test_documented_module_paths_survive_the_regrouping():
    """``flowsolve.analytic``, ``.couplings``, ``.data``, ``.divergence`` and ``.metrics`` were
    documented as modules before the subpackages existed: each still imports (``import``,
    ``from ... import``, attribute) as the module that now holds those names."""
    import importlib
    import subprocess
    import sys

    homes = {"analytic": "flowsolve.truth.analytic", "couplings": "flowsolve.training.couplings",
             "data": "flowsolve.training.data", "divergence": "flowsolve.likelihood.divergence",
             "metrics": "flowsolve.metrics"}
    for name, home in homes.items():
        module = importlib.import_module(f"flowsolve.{name}")
        assert module is importlib.import_module(home) is getattr(fs, name)
    # in a fresh interpreter, the old import statements as users wrote them
    code = ("import flowsolve.analytic as a, flowsolve.divergence as d\n"
            "from flowsolve.couplings import OTCoupling\n"
            "from flowsolve.data import DATASETS\n"
            "from flowsolve.metrics import wasserstein2\n"
            "assert a.GaussianMixture and d.value_and_divergence and OTCoupling and DATASETS\n")
    subprocess.run([sys.executable, "-c", code], check=True)
