"""Probability paths, parameterisations and closed-form ground truth, in one page.

Run: .venv/bin/python examples/paths_and_ground_truth.py
"""

import torch

import flowsolve as fs
from flowsolve import analytic

torch.set_default_dtype(torch.float64)
gen = torch.Generator().manual_seed(0)

# Data with closed forms: a 3-component mixture with full covariances.
data = fs.GaussianMixture(
    means=torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]]),
    covariances=torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 0.5]],
                              [[0.3, -0.1], [-0.1, 0.6]]]),
    weights=torch.tensor([0.5, 0.3, 0.2]),
)

for scheduler in [fs.CondOTScheduler(), fs.CosineScheduler(), fs.LinearVPScheduler()]:
    path = fs.AffineGaussianPath(scheduler)
    x0, x1 = torch.randn(4096, 2, generator=gen), data.sample(4096, generator=gen)
    t = torch.rand(4096, generator=gen)
    sample = path.sample(x0, x1, t)  # x_t and the flow-matching target dx_t

    u = analytic.marginal_velocity(data, path)  # E[dx_t | x_t]: what a perfect model learns
    score = analytic.marginal_score(data, path)
    # The marginal velocity is the best regression onto dx_t: its CFM loss is the minimum.
    cfm_at_optimum = ((u(sample.x_t, t) - sample.dx_t) ** 2).sum(1).mean()
    cfm_at_zero = (sample.dx_t**2).sum(1).mean()

    # Any parameterisation converts into any other; here score -> velocity at t = 0.5.
    x = sample.x_t[:5]
    v_from_score = path.convert(score(x, 0.5), x, 0.5, "score", "velocity")
    gap = (v_from_score - u(x, 0.5)).abs().max()
    print(f"{scheduler!r:48} CFM loss at u*: {cfm_at_optimum:7.4f} (zero field: "
          f"{cfm_at_zero:7.4f})   |score->velocity - u*|: {gap:.1e}")

# The exact log-density of the data, and of the path's marginal at t = 0.5.
path = fs.AffineGaussianPath(fs.CondOTScheduler())
x = data.sample(5, generator=gen)
print("log p_1(x)   =", [round(v, 4) for v in data.log_prob(x).tolist()])
log_p_half = analytic.marginal_log_prob(data, path)(x, 0.5)
print("log p_0.5(x) =", [round(v, 4) for v in log_p_half.tolist()])
