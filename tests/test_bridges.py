"""Gaussian bridges (I-CFM / OT-CFM / SB-CFM paths)."""

import pytest
import torch

import flowsolve as fs
from flowsolve.paths.bridges import GaussianBridge
from flowsolve.training.losses import bridge_matching_loss

F64 = torch.float64


@pytest.mark.parametrize("bridge", [GaussianBridge(0.0), GaussianBridge(0.3),
                                    GaussianBridge(0.5, "brownian")], ids=repr)
def test_velocity_is_time_derivative_of_the_sample(bridge, gen):
    x0, x1, eps = (torch.randn(16, 3, generator=gen, dtype=F64) for _ in range(3))
    t = (0.01 + 0.98 * torch.rand(16, generator=gen, dtype=F64)).requires_grad_(True)
    s = bridge.sample(x0, x1, t, noise=eps)
    dxdt = torch.stack([torch.autograd.grad(s.x_t[:, i].sum(), t, retain_graph=True)[0]
                        for i in range(3)], dim=1)
    torch.testing.assert_close(s.dx_t, dxdt, rtol=1e-12, atol=1e-12)


def test_brownian_bridge_variance_and_sb_target(gen):
    bridge = GaussianBridge(0.7, "brownian")
    x0, x1 = torch.zeros(200_000, 1, dtype=F64), torch.ones(200_000, 1, dtype=F64)
    s = bridge.sample(x0, x1, 0.3, generator=gen)
    var = 0.49 * 0.3 * 0.7
    assert abs(s.x_t.var().item() - var) < 5 * var * (2 / 200_000) ** 0.5
    # SB-CFM's target written with x_t: (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0
    mu = 0.7 * x0 + 0.3 * x1
    torch.testing.assert_close(s.dx_t, (1 - 0.6) / (2 * 0.21) * (s.x_t - mu) + x1 - x0)
    with pytest.raises(ValueError, match="infinite at t = 0 and 1"):
        bridge.sample(x0[:2], x1[:2], 1.0, generator=gen)


def test_zero_noise_bridge_is_the_condot_path_and_loss(gen):
    data = fs.GaussianMixture.ring(4, radius=2.0, std=0.3)
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(data, path)
    x0 = torch.randn(512, 2, generator=gen, dtype=F64)
    x1 = data.sample(512, generator=gen, dtype=F64)
    t = torch.rand(512, generator=gen, dtype=F64)
    a = bridge_matching_loss(u, GaussianBridge(0.0), x0, x1, t, reduction="none")
    b = fs.flow_matching_loss(u, path, x0, x1, t, reduction="none")
    torch.testing.assert_close(a, b)


def test_repr_holds_the_exact_sigma():
    """A training resume compares the path by its repr: a sigma that differs in the 7th
    significant digit must give another repr, which rebuilds the bridge exactly."""
    near = GaussianBridge(0.1000004)
    assert repr(GaussianBridge(0.1)) == "GaussianBridge(sigma=0.1, schedule='constant')"
    assert repr(near) == "GaussianBridge(sigma=0.1000004, schedule='constant')"
    for bridge in (near, GaussianBridge(1, "brownian"), GaussianBridge(0.1)):
        rebuilt = eval(repr(bridge), {"GaussianBridge": GaussianBridge})  # noqa: S307
        assert (rebuilt.sigma, rebuilt.schedule) == (bridge.sigma, bridge.schedule)
        assert repr(rebuilt) == repr(bridge)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="sigma"):
        GaussianBridge(-1.0)
    with pytest.raises(ValueError, match="accepted: constant, brownian"):
        GaussianBridge(0.1, "linear")
    with pytest.raises(ValueError, match="reduction"):
        bridge_matching_loss(lambda x, t: x, GaussianBridge(), torch.zeros(2, 1),
                             torch.zeros(2, 1), reduction="sum")


def test_loss_inputs_are_checked_naming_what_is_accepted():
    u = lambda x, t: x  # noqa: E731
    x = torch.zeros(2, 1)
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    with pytest.raises(TypeError, match="model must be callable.*got str"):
        bridge_matching_loss("mlp", GaussianBridge(), x, x)
    with pytest.raises(TypeError, match="bridge must be a flowsolve.paths.bridges.GaussianBridge; "
                                        "got str"):
        bridge_matching_loss(u, "constant", x, x)
    with pytest.raises(TypeError, match="got AffineGaussianPath.*flow_matching_loss"):
        bridge_matching_loss(u, path, x, x)
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor; got NoneType"):
        bridge_matching_loss(u, GaussianBridge(), None, x)
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor; got list"):
        bridge_matching_loss(u, GaussianBridge(), x, [0.0, 0.0])
    with pytest.raises(ValueError, match="x0 must be a floating tensor.*torch.int64"):
        bridge_matching_loss(u, GaussianBridge(), x.long(), x.long())
    with pytest.raises(ValueError, match=r"x1 must be a floating tensor.*shape \(\)"):
        bridge_matching_loss(u, GaussianBridge(), x, torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"x0 \(2, 1\) and x1 \(3, 1\)"):
        bridge_matching_loss(u, GaussianBridge(), x, torch.zeros(3, 1))
    # the valid call: zero model, rectified flow: (1/D) ||x1 - x0||^2 = 4
    ones = torch.ones(2, 1)
    loss = bridge_matching_loss(lambda x, t: torch.zeros_like(x), GaussianBridge(), -ones, ones)
    assert loss.item() == 4.0
