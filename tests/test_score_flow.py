"""[SF]2M: the score-and-flow loss on a bridge, the FlowAndScore model, its training and its
CLI (flowsolve/training/score_flow.py)."""

import pytest
import torch

import flowsolve as fs
from flowsolve.cli.main import main
from flowsolve.training.score_flow import FlowAndScore, score_flow_matching_loss
from tests._cases import F64, gen


class Exact(torch.nn.Module):
    """The marginal velocity and score of a bridge between the point masses x0 = x1 = 0:
    x_t = sigma_t eps, so v = (sigma'_t / sigma_t) x and s = -x / sigma_t^2."""

    def __init__(self, bridge, scale_v=1.0, scale_s=1.0):
        super().__init__()
        self.bridge, self.scale_v, self.scale_s = bridge, scale_v, scale_s
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, with_score=False):
        s, ds = self.bridge.sigma_t(torch.as_tensor(t, dtype=x.dtype))
        s, ds = s.reshape(-1, 1), ds.reshape(-1, 1)
        v = self.scale_v * ds / s * x
        return (v, -self.scale_s * x / s**2) if with_score else v


@pytest.mark.parametrize("schedule", ["brownian", "constant"])
def test_the_exact_marginal_fields_have_zero_loss(schedule):
    """Between point masses the conditional and marginal fields coincide: the exact pair has
    loss 0 to round-off, and scaling either field by 1.01 does not."""
    bridge = fs.GaussianBridge(0.7, schedule)
    z = torch.zeros(64, 3, dtype=F64)
    t = torch.rand(64, generator=gen(0), dtype=F64).clamp(0.01, 0.99)
    assert float(score_flow_matching_loss(Exact(bridge), bridge, z, z, t,
                                          generator=gen(1))) < 1e-28
    # (the constant bridge has sigma' = 0: its velocity is 0 whatever the scale)
    for kw in ({"scale_v": 1.01}, {"scale_s": 1.01})[schedule == "constant":]:
        bad = score_flow_matching_loss(Exact(bridge, **kw), bridge, z, z, t, generator=gen(1))
        assert float(bad) > 1e-6


def test_the_loss_is_the_flow_plus_the_weighted_score_regression():
    bridge = fs.GaussianBridge(0.5, "brownian")
    x0, x1 = torch.randn(2, 32, 2, generator=gen(2), dtype=F64)
    t = torch.rand(32, generator=gen(3), dtype=F64).clamp(0.05, 0.95)
    model = FlowAndScore(fs.MLP(2, hidden=8, depth=1), fs.MLP(2, hidden=8, depth=1)).double()
    got = score_flow_matching_loss(model, bridge, x0, x1, t, generator=gen(4), reduction="none")
    eps = torch.randn(32, 2, generator=gen(4), dtype=F64)  # the loss's draw
    sig = 0.5 * torch.sqrt(t * (1 - t))[:, None]
    dsig = 0.5 * (1 - 2 * t)[:, None] / (2 * torch.sqrt(t * (1 - t)))[:, None]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1 + sig * eps
    with torch.no_grad():
        v, s = model.flow(x_t, t), model.score(x_t, t)
    want = ((v - (x1 - x0 + dsig * eps)) ** 2).mean(1) + ((sig * s + eps) ** 2).mean(1)
    assert torch.allclose(got.detach(), want, atol=1e-12)
    assert model(x_t, t).shape == (32, 2)  # the velocity alone: a field


def test_refusals_say_what_is_accepted():
    model = FlowAndScore(fs.MLP(2, hidden=8, depth=1), fs.MLP(2, hidden=8, depth=1))
    z = torch.zeros(8, 2)
    with pytest.raises(ValueError, match="sigma > 0"):
        score_flow_matching_loss(model, fs.GaussianBridge(0.0, "brownian"), z, z)
    with pytest.raises(TypeError, match=r"\(velocity, score\).*FlowAndScore"):
        score_flow_matching_loss(fs.MLP(2, hidden=8, depth=1), fs.GaussianBridge(0.5), z, z)
    with pytest.raises(TypeError, match="nn.Module"):
        FlowAndScore(lambda x, t: x, fs.MLP(2, hidden=8, depth=1))
    cfg = fs.TrainConfig(steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="GaussianBridge"):
        fs.train(model, "moons", cfg)
    with pytest.raises(ValueError, match="GaussianBridge"):
        fs.train(model, "moons", cfg, path=fs.GaussianBridge(0.0, "brownian"))


def test_cli_trains_sf2m_and_samples_its_sde(tmp_path, capsys):
    out = tmp_path / "sf.pt"
    assert main(["train", "--data", "moons", "--method", "sf2m", "--sigma", "1.0", "--steps",
                 "20", "--batch-size", "64", "--hidden", "16", "--out", str(out)]) == 0
    assert main(["sample", "--model", str(out), "--sde", "--steps", "10", "--n", "50"]) == 0
    assert "the SDE (Euler-Maruyama, 10 steps): NFE 20" in capsys.readouterr().out
    assert main(["sample", "--model", str(out), "--n", "50", "--steps", "5"]) == 0
    assert "with rk4: NFE 20" in capsys.readouterr().out  # the ODE: the velocity alone
    cfm = tmp_path / "cfm.pt"
    assert main(["train", "--data", "moons", "--method", "cfm", "--steps", "5",
                 "--batch-size", "32", "--hidden", "8", "--out", str(cfm)]) == 0
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(cfm), "--sde"])
    assert "--sde needs a model trained with --method sf2m" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "sf2m", "--sigma", "0", "--out", str(tmp_path / "x.pt")])
    assert "--method sf2m needs --sigma > 0" in capsys.readouterr().err


def test_sf2m_learns_the_gaussian_schrodinger_bridge():
    """Trained on N(m0, S0) -> N(m1, S1) with SB-CFM's pairs (entropic OT, reg = 2 sigma^2)
    and the Brownian bridge, the learned bridge's SDE and ODE samples at t = 0.25 .. 1 have
    the closed-form marginals, and its velocity, score and SDE drift are the closed-form
    ones on them. Measured (1000 steps): means within 0.015, covariances 0.065; relative
    RMS errors velocity 1.4 %, drift 1.5 %, score 10 %."""
    from flowsolve.truth.gaussian_bridge import GaussianSchrodingerBridge

    g = gen(0)
    m0, m1 = torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 1.0])
    l0 = torch.tensor([[1.0, 0.0], [0.5, 0.8]])
    l1 = torch.tensor([[0.6, 0.0], [-0.4, 1.2]])
    sigma = 0.5
    sb = GaussianSchrodingerBridge(m0.double(), (l0 @ l0.T).double(), m1.double(),
                                   (l1 @ l1.T).double(), sigma)
    with fs.initial_weights_from(gen(7)):
        model = FlowAndScore(fs.MLP(2, hidden=64, depth=3), fs.MLP(2, hidden=64, depth=3))
    cfg = fs.TrainConfig(steps=1000, batch_size=256, lr=2e-3, ema_decay=0.99, progress=False)
    run = fs.train(model, lambda n, generator=None: m1 + torch.randn(n, 2, generator=generator)
                   @ l1.T, cfg, source=lambda n, generator=None: m0 + torch.randn(
                       n, 2, generator=generator) @ l0.T,
                   path=fs.GaussianBridge(sigma, "brownian"),
                   coupling=fs.OTCoupling("sinkhorn", reg=2 * sigma**2, normalize=None,
                                          max_iter=20_000), generator=g, threads=1)
    net = run.ema_model.eval().double()
    x0 = (m0 + torch.randn(4000, 2, generator=g) @ l0.T).double()
    times = [0.25, 0.5, 0.75, 1.0]
    with torch.no_grad():
        sde = fs.sample_sde(net, x0, score=net.score, diffusion=sigma, steps=200,
                            generator=g, times=times)
        ode = fs.sample(net, x0, "rk4", steps=40, times=times)
        for k, t in enumerate(times):
            m, cov = sb.marginal(t)
            for x in (sde.trajectory[k], ode.trajectory[k]):
                assert (x.mean(0) - m).abs().max() < 0.05, (t, x.mean(0), m)
                assert (torch.cov(x.T) - cov).abs().max() < 0.15, (t, torch.cov(x.T), cov)
        for t in times[:3]:
            m, cov = sb.marginal(t)
            x = m + torch.randn(4000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
            tv = torch.full((4000,), t, dtype=F64)

            def rel(a, b):
                return float((a - b).norm(dim=1).pow(2).mean().sqrt()
                             / b.norm(dim=1).pow(2).mean().sqrt())

            v, s = net(x, tv, with_score=True)
            assert rel(v, sb.velocity(x, tv)) < 0.05
            assert rel(v + sigma**2 / 2 * s, sb.drift(x, tv)) < 0.05
            assert rel(s, sb.score(x, tv)) < 0.2


def test_an_sf2m_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    """The trainer's checkpoints hold both networks: stopped after its checkpoint at step 6
    and resumed, a run ends with the weights and losses of the uninterrupted one."""
    cfg = fs.TrainConfig(steps=12, batch_size=32, ema_decay=0.9, checkpoint_every=6,
                         log_every=1, progress=False)
    kwargs = dict(path=fs.GaussianBridge(0.5, "brownian"),
                  coupling=fs.OTCoupling("sinkhorn", reg=0.5, normalize=None))

    def model(seed):
        with fs.initial_weights_from(gen(seed)):
            return FlowAndScore(fs.MLP(2, hidden=8, depth=1), fs.MLP(2, hidden=8, depth=1))

    whole = fs.train(model(0), "moons", cfg, generator=gen(1), **kwargs)

    def stop(log):
        if log.step > 8:
            raise KeyboardInterrupt

    ckpt = tmp_path / "sf2m.pt"
    with pytest.raises(KeyboardInterrupt):
        fs.train(model(0), "moons", cfg, generator=gen(1), checkpoint=ckpt, callback=stop,
                 **kwargs)
    resumed = fs.train(model(5), "moons", cfg, checkpoint=ckpt, **kwargs)
    assert resumed.start_step == 6 and resumed.losses == whole.losses
    for a, b in zip(whole.ema_model.parameters(), resumed.ema_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(n.startswith("score.") for n, _ in resumed.model.named_parameters())
