"""On-device checks: every public entry point runs on the device of its inputs and gives the
CPU's numbers (float64, to ~1e-10), on closed-form Gaussian-mixture fields and small MLPs.

The device is ``FLOWSOLVE_TEST_DEVICE`` (default ``cuda``; the whole module is skipped when
that device is not available). ``FLOWSOLVE_TEST_DEVICE=cpu`` runs every check on the CPU,
where "device == CPU" is trivial, so each test also compares with a reference computed
independently of the code under test (a hand-written loop, a closed form, POT's numpy
solver, a dense Jacobian): that run proves the tests themselves right on a machine without
a GPU. The CUDA-graph checks need CUDA and skip themselves elsewhere, after their eager part.

    FLOWSOLVE_TEST_DEVICE=cpu python -m pytest -q tests/test_gpu.py
"""

import math
import os

import numpy as np
import ot
import pytest
import torch
from _cases import batches as two_clouds
from _cases import gen, noise, random_mixture, three_gaussians
from torch import nn

import flowsolve as fs
from flowsolve import NonFiniteStateError
from flowsolve.likelihood.cnf import log_likelihood
from flowsolve.likelihood.divergence import (
    EXACT_METHODS,
    auto_method,
    make_probes,
    value_and_divergence,
)
from flowsolve.ode.solve import CapturedSampler, sample
from flowsolve.paths.bridges import GaussianBridge
from flowsolve.sde.solve import GridBrownian, langevin, sample_sde

DEVICE = torch.device(os.environ.get("FLOWSOLVE_TEST_DEVICE", "cuda"))


def _available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    module = getattr(torch, device.type, None)
    if module is None or not module.is_available():
        return False
    return device.index is None or device.index < module.device_count()


pytestmark = pytest.mark.skipif(
    not _available(DEVICE),
    reason=f"FLOWSOLVE_TEST_DEVICE={DEVICE} is not available (CUDA-only checks; "
           "FLOWSOLVE_TEST_DEVICE=cpu runs them on the CPU)")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")

F64 = torch.float64
EXACT = 1e-10  # device against CPU, float64
PATH = fs.AffineGaussianPath(fs.CondOTScheduler())
DATA = three_gaussians()
U = fs.analytic.marginal_velocity(DATA, PATH)
S = fs.analytic.marginal_score(DATA, PATH)


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE.type and (DEVICE.index is None or t.device.index == DEVICE.index)


def close(got: torch.Tensor, want: torch.Tensor, atol: float = EXACT) -> None:
    """``got`` (any device) equals ``want`` to ``atol``, compared on the CPU."""
    torch.testing.assert_close(got.detach().cpu(), want.detach().cpu(), rtol=0, atol=atol)


def mlp(d: int, seed: int = 0, hidden: int = 32) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fs.MLP(d, hidden=hidden, depth=2, time_embedding_dim=8).double().eval()


def grid(steps: int) -> list[float]:
    return torch.linspace(0.0, 1.0, steps + 1, dtype=F64).tolist()


def hand_euler(field, x, steps, upto=None):
    """Euler over the first ``upto`` cells of ``linspace(0, 1, steps + 1)`` (all: None)."""
    g = grid(steps)[: None if upto is None else upto + 1]
    for a, b in zip(g[:-1], g[1:], strict=True):
        x = x + (b - a) * field(x, torch.tensor(a, dtype=F64))
    return x


def hand_rk4_38(field, x, steps, upto=None):
    """Kutta's 3/8 rule, written out (torchdiffeq's "rk4"), as :func:`hand_euler`."""
    g = grid(steps)[: None if upto is None else upto + 1]
    for a, b in zip(g[:-1], g[1:], strict=True):
        h = b - a
        k1 = field(x, torch.tensor(a, dtype=F64))
        k2 = field(x + h * k1 / 3, torch.tensor(a + h / 3, dtype=F64))
        k3 = field(x + h * (k2 - k1 / 3), torch.tensor(a + 2 * h / 3, dtype=F64))
        k4 = field(x + h * (k1 - k2 + k3), torch.tensor(b, dtype=F64))
        x = x + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8
    return x


# -- the ODE front door ----------------------------------------------------------------------
FIXED = {"fast_euler": hand_euler, "euler": hand_euler, "fast_rk4": hand_rk4_38,
         "rk4": hand_rk4_38}


@pytest.mark.parametrize("solver", ["fast_euler", "fast_rk4", "euler", "rk4", "dopri5"])
def test_sample_runs_on_the_device_and_matches_the_cpu(solver):
    x0 = noise(64, 1)
    if solver == "dopri5":
        kw = {"rtol": 1e-10, "atol": 1e-10, "times": [0.25, 0.5]}
    else:
        kw = {"steps": 16, "times": [0.5, 1.0]}
    dev = sample(U, x0.to(DEVICE), solver, **kw)
    cpu = sample(U, x0, solver, **kw)
    assert on_device(dev.x) and on_device(dev.times) and on_device(dev.trajectory)
    assert dev.x.dtype == F64 and dev.trajectory.shape == (2, 64, 2)
    if solver == "dopri5":  # adaptive: the step sequence may differ by a rounding decision
        close(dev.x, cpu.x, atol=1e-8)
        close(dev.trajectory, cpu.trajectory, atol=1e-8)
        # counted evaluations are dopri5's: 6 per attempted step (FSAL) + the first
        # evaluation and the initial-step probe; at most two attempted steps apart
        for res in (dev, cpu):
            assert res.nfe == 6 * (res.steps + res.rejected) + 2
        assert abs(dev.nfe - cpu.nfe) <= 12
        ref = hand_rk4_38(U, x0, 512)  # independent: RK4 on a fine grid
        close(dev.x, ref, atol=1e-7)
    else:
        close(dev.x, cpu.x)
        close(dev.trajectory, cpu.trajectory)
        assert dev.nfe == cpu.nfe == 16 * (4 if "rk4" in solver else 1)
        close(dev.x, FIXED[solver](U, x0, 16), atol=1e-12)
        close(dev.trajectory[0], FIXED[solver](U, x0, 16, upto=8), atol=1e-12)


def test_backward_solve_on_the_device_returns_to_the_start():
    x0 = noise(32, 2)
    fwd = sample(U, x0.to(DEVICE), "fast_rk4", steps=64)
    back = sample(U, fwd.x, "fast_rk4", steps=64, t0=1.0, t1=0.0)
    assert on_device(back.x)
    close(back.x, x0, atol=1e-5)  # RK4 at h = 1/64, both ways
    close(fwd.x, sample(U, x0, "fast_rk4", steps=64).x)


def test_non_finite_state_is_reported_from_the_device():
    """The fast loop records finiteness on the device and reads it once at the end."""
    def blows_up(x, t):
        return torch.where(t < 0.45, -x, torch.full_like(x, math.inf))

    for x in (noise(8, 3), noise(8, 3).to(DEVICE)):
        with pytest.raises(NonFiniteStateError, match="step 6 of 10"):
            sample(blows_up, x, "fast_euler", steps=10)


class Linear(nn.Module):
    """u(x, t) = A x + t b: a capturable field (parameters on the device, no host reads)."""

    def __init__(self, d: int):
        super().__init__()
        g = gen(11)
        self.a = nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=F64))
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=F64))

    def forward(self, x, t):
        return x @ self.a.T + t * self.b


def _fields(model: str):
    """The same network on the device and on the CPU (the same initial weights)."""
    field = (mlp(2) if model == "mlp" else Linear(2)).to(DEVICE)
    field_cpu = field.cpu() if DEVICE.type == "cpu" else (
        mlp(2) if model == "mlp" else Linear(2))
    return field, field_cpu


@pytest.mark.parametrize("solver", ["fast_euler", "fast_rk4"])
@pytest.mark.parametrize("model", ["mlp", "linear"])
def test_fast_loop_on_a_network_matches_a_hand_loop(solver, model):
    field, field_cpu = _fields(model)
    xb = noise(128, 5)
    with torch.no_grad():
        eager = sample(field, xb.to(DEVICE), solver, steps=16, times=[0.5, 1.0])
        close(eager.x, FIXED[solver](field_cpu, xb, 16), atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("solver", ["fast_euler", "fast_rk4"])
@pytest.mark.parametrize("model", ["mlp", "linear"])
def test_captured_sampler_replays_new_inputs(solver, model):
    field, field_cpu = _fields(model)
    xa, xb = noise(128, 4), noise(128, 5)
    steps, times = 16, [0.5, 1.0]
    ref = FIXED[solver]
    with torch.no_grad():
        eager = sample(field, xb.to(DEVICE), solver, steps=steps, times=times)
        sampler = CapturedSampler(field, xa.to(DEVICE), solver, steps=steps, times=times)
        for x in (xb, xa, xb):  # new inputs are copied into the captured buffer
            got = sampler(x.to(DEVICE))
            assert on_device(got.x) and got.nfe == eager.nfe
            want = sample(field, x.to(DEVICE), solver, steps=steps, times=times)
            close(got.x, want.x, atol=1e-12)
            close(got.trajectory, want.trajectory, atol=1e-12)
            close(got.x, ref(field_cpu, x, steps))
        one_shot = sample(field, xb.to(DEVICE), solver, steps=steps, cuda_graph=True)
        close(one_shot.x, eager.x, atol=1e-12)


@needs_cuda
def test_captured_sampler_reports_a_non_finite_state():
    def blows_up(x, t):
        return torch.where(t < 0.45, -x, torch.full_like(x, math.inf))

    sampler = CapturedSampler(blows_up, noise(8, 3).to(DEVICE), "fast_euler", steps=10)
    with pytest.raises(NonFiniteStateError, match="step 6 of 10"):
        sampler(noise(8, 6).to(DEVICE))


@needs_cuda
def test_captured_sampler_on_the_analytic_field():
    # the mixture's parameters are cached on the device (GaussianMixture.parameters_like):
    # no host-to-device copy inside the captured loop
    x = noise(64, 7).to(DEVICE)
    got = CapturedSampler(U, x, "fast_rk4", steps=8)(x)
    close(got.x, sample(U, x, "fast_rk4", steps=8).x, atol=1e-12)


# -- the low-NFE samplers ----------------------------------------------------------------------
COSINE = fs.AffineGaussianPath(fs.CosineScheduler())
U_COS = fs.analytic.marginal_velocity(DATA, COSINE)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "dpm_solver_3",
                                    "unipc2_bh2", "edm_heun"])
@pytest.mark.parametrize("grid", ["uniform", "logsnr"])
def test_samplers_on_the_device_match_the_cpu(solver, grid):
    """The samplers' loop reads nothing from the device; their numbers are the CPU's, and
    DDIM's are a hand-written x_t = alpha_t D + sigma_t eps."""
    x0 = noise(64, 21)
    kw = dict(steps=8, path=COSINE, grid=grid, times=fs.time_grid(grid, 8, path=COSINE)[4:5])
    dev = sample(U_COS, x0.to(DEVICE), solver, **kw)
    cpu = sample(U_COS, x0, solver, **kw)
    assert on_device(dev.x) and on_device(dev.trajectory) and dev.nfe == cpu.nfe
    close(dev.x, cpu.x)
    close(dev.trajectory, cpu.trajectory)
    if solver == "ddim":
        d_true = fs.analytic.posterior_mean(DATA, COSINE)
        x, times = x0, fs.time_grid(grid, 8, path=COSINE)
        for a, b in zip(times[:-1], times[1:], strict=True):
            sa = COSINE.scheduler(torch.tensor(a, dtype=F64))
            sb = COSINE.scheduler(torch.tensor(b, dtype=F64))
            d = d_true(x, torch.tensor(a, dtype=F64))
            eps = (x - sa.alpha_t * d) / sa.sigma_t
            x = sb.alpha_t * d + sb.sigma_t * eps
        close(dev.x, x, atol=1e-10)


@pytest.mark.parametrize("solver", ["ancestral", "dpmpp_2m_sde", "edm_stochastic"])
def test_stochastic_samplers_on_the_device_match_the_cpu(solver):
    """A CPU generator, or one GridBrownian on the device, gives the CPU's samples."""
    x0 = noise(64, 22)
    times = fs.time_grid("logsnr", 12, path=COSINE)
    kw = dict(solver=solver, path=COSINE, grid=times)
    cpu = sample_sde(U_COS, x0, generator=gen(23), **kw)
    dev = sample_sde(U_COS, x0.to(DEVICE), generator=gen(23), **kw)
    assert on_device(dev.x) and dev.nfe == cpu.nfe
    close(dev.x, cpu.x)
    bm_cpu = GridBrownian(x0.shape, grid=times, generator=gen(24), dtype=F64)
    bm_dev = GridBrownian(x0.shape, grid=times, generator=gen(24), dtype=F64, device=DEVICE)
    close(bm_dev(times[3], times[7]), bm_cpu(times[3], times[7]))
    close(sample_sde(U_COS, x0.to(DEVICE), bm=bm_dev, **kw).x,
          sample_sde(U_COS, x0, bm=bm_cpu, **kw).x)


def test_torchsde_solvers_on_a_logsnr_grid_on_the_device():
    x0 = noise(64, 25)
    kw = dict(path=COSINE, diffusion="sigma_scaled", solver="euler", grid="logsnr", steps=16,
              t0=0.01, t1=0.99)
    close(sample_sde(U_COS, x0.to(DEVICE), generator=gen(26), **kw).x,
          sample_sde(U_COS, x0, generator=gen(26), **kw).x)


# -- SDE sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "heun", "srk"])
def test_sample_sde_on_the_device_matches_the_cpu(solver):
    """A CPU generator draws the same Brownian path for a state on any device."""
    x0 = noise(64, 8)
    kw = dict(score=S, diffusion=1.0, solver=solver, steps=20, times=[0.5, 1.0])
    dev = sample_sde(U, x0.to(DEVICE), generator=gen(9), **kw)
    cpu = sample_sde(U, x0, generator=gen(9), **kw)
    assert on_device(dev.x) and on_device(dev.trajectory) and dev.x.dtype == F64
    close(dev.x, cpu.x)
    close(dev.trajectory, cpu.trajectory)
    assert (dev.nfe, dev.nfe_drift, dev.nfe_diffusion) == (cpu.nfe, cpu.nfe_drift,
                                                          cpu.nfe_diffusion)
    levy = "space-time" if solver == "srk" else "none"
    bm = GridBrownian(x0.shape, steps=20, generator=gen(9), dtype=F64, device=DEVICE,
                      levy_area=levy)
    close(sample_sde(U, x0.to(DEVICE), bm=bm, **kw).x, cpu.x)
    if solver == "euler":  # independent: Euler-Maruyama by hand on the same increments
        w = GridBrownian(x0.shape, steps=20, generator=gen(9), dtype=F64)
        g, x = grid(20), x0
        for a, b in zip(g[:-1], g[1:], strict=True):
            t = torch.tensor(a, dtype=F64)
            x = x + (b - a) * (U(x, t) + 0.5 * S(x, t)) + w(a, b)
        close(dev.x, x, atol=1e-12)


def test_sample_sde_velocity_only_and_device_generator():
    x0 = noise(64, 10)
    kw = dict(path=PATH, diffusion="sigma_scaled", steps=20)
    dev = sample_sde(U, x0.to(DEVICE), generator=gen(11), **kw)
    close(dev.x, sample_sde(U, x0, generator=gen(11), **kw).x)
    both = sample_sde(U, x0.to(DEVICE), score=S, generator=gen(11), **kw)
    close(dev.x, both.x, atol=1e-8)  # the converted score against the exact one
    a = sample_sde(U, x0.to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(0), **kw)
    b = sample_sde(U, x0.to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(0), **kw)
    assert on_device(a.x) and torch.equal(a.x, b.x) and bool(torch.isfinite(a.x).all())


def test_langevin_on_the_device_matches_the_cpu():
    x0 = noise(32, 12)
    kw = dict(steps=20, dt=0.01, score_t=1.0)
    dev = langevin(S, x0.to(DEVICE), generator=gen(13), **kw)
    assert on_device(dev.x)
    close(dev.x, langevin(S, x0, generator=gen(13), **kw).x)
    w, x = GridBrownian(x0.shape, steps=20, t1=0.2, generator=gen(13), dtype=F64), x0
    one = torch.tensor(1.0, dtype=F64)
    for k in range(20):
        x = x + 0.01 * 0.5 * S(x, one) + w(0.01 * k, 0.01 * (k + 1))
    close(dev.x, x, atol=1e-12)


# -- likelihood --------------------------------------------------------------------------------
def mixture(d: int, seed: int, k: int = 3) -> fs.GaussianMixture:
    return random_mixture(seed, d, k)


def test_exact_log_likelihood_on_the_device():
    data = mixture(3, 14)
    u = fs.analytic.marginal_velocity(data, PATH)
    x = data.sample(16, generator=gen(15), dtype=F64)
    dev = log_likelihood(u, x.to(DEVICE), solver="rk4", steps=20)
    cpu = log_likelihood(u, x, solver="rk4", steps=20)
    for field in ("log_prob", "x0", "prior_log_prob", "delta_log_prob"):
        assert on_device(getattr(dev, field)), field
        close(getattr(dev, field), getattr(cpu, field))
    assert dev.nfe == cpu.nfe == 80 and dev.stderr is None
    tight = log_likelihood(u, x.to(DEVICE), solver="dopri5", rtol=1e-10, atol=1e-10)
    close(tight.log_prob, data.log_prob(x), atol=1e-6)  # independent: the mixture density
    for method in EXACT_METHODS:
        res = log_likelihood(u, x.to(DEVICE), solver="rk4", steps=20, divergence=method)
        assert res.divergence == f"exact ({method})"
        close(res.log_prob, cpu.log_prob)


def test_hutchinson_log_likelihood_on_the_device():
    data = mixture(3, 16)
    u = fs.analytic.marginal_velocity(data, PATH)
    x = data.sample(16, generator=gen(17), dtype=F64)
    kw = dict(solver="rk4", steps=12, divergence="hutchinson", n_probes=4)
    dev = log_likelihood(u, x.to(DEVICE), generator=gen(18), **kw)  # CPU probes, moved over
    cpu = log_likelihood(u, x, generator=gen(18), **kw)
    assert on_device(dev.log_prob) and on_device(dev.stderr)
    close(dev.log_prob, cpu.log_prob)
    close(dev.stderr, cpu.stderr)
    res = log_likelihood(u, x.to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(0), **kw)
    assert on_device(res.log_prob) and bool((res.stderr > 0).all())
    # independent: Rademacher probes are exact for a diagonal Jacobian, u = a x
    a, d = 0.7, 3
    lin = log_likelihood(lambda x, t: a * x, x.to(DEVICE), generator=gen(19),
                         **{**kw, "steps": 48})
    want = fs.StandardNormal(d).log_prob(math.exp(-a) * x) - d * a
    close(lin.log_prob, want, atol=1e-8)  # RK4's error at h = 1/48
    assert float(lin.stderr.abs().max()) < 1e-12


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_likelihood_gradients_on_the_device_match_the_cpu(divergence):
    x = noise(8, 20)
    grads = []
    for device in (DEVICE, torch.device("cpu")):
        model = mlp(2, seed=1).to(device)
        res = log_likelihood(model, x.to(device), solver="rk4", steps=4, create_graph=True,
                             divergence=divergence, generator=gen(21))
        assert res.log_prob.device.type == device.type and res.log_prob.requires_grad
        res.log_prob.sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(on_device(g) for g in grads[0])
    for g_dev, g_cpu in zip(*grads, strict=True):
        close(g_dev, g_cpu, atol=1e-9)
    # independent: a central difference of one weight, on the CPU
    model, h = mlp(2, seed=1), 1e-6
    w = next(model.parameters())

    def ll():
        with torch.no_grad():
            return log_likelihood(model, x, solver="rk4", steps=4, divergence=divergence,
                                  generator=gen(21)).log_prob.sum()

    w.data[0, 0] += h
    up = ll()
    w.data[0, 0] -= 2 * h
    down = ll()
    w.data[0, 0] += h
    assert abs(float(grads[1][0][0, 0]) - float((up - down) / (2 * h))) < 1e-6


# -- divergence --------------------------------------------------------------------------------
class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(6, 1, 3, padding=1)).double()

    def forward(self, x, t):
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return self.net(torch.cat([x, tt.expand(x.shape[0], 1, *x.shape[2:])], dim=1))


def dense_trace(field, x, t):
    """tr(du/dx) per sample from the full Jacobian of the batch (independent reference)."""
    jac = torch.autograd.functional.jacobian(lambda z: field(z, t), x)  # (B, *ev, B, *ev)
    b, d = x.shape[0], x[0].numel()
    jac = jac.reshape(b, d, b, d)
    return torch.stack([jac[i, :, i, :].diagonal().sum() for i in range(b)]), jac


@pytest.mark.parametrize("case", ["mlp d=2", "mlp d=5", "conv 1x4x4", "mixture d=3"])
def test_divergence_methods_agree_on_the_device(case):
    g = gen(22)
    if case.startswith("mlp"):
        d = int(case[-1])
        field, x = mlp(d, seed=2), torch.randn(6, d, generator=g, dtype=F64)
    elif case.startswith("conv"):
        field, x = Conv(), torch.randn(6, 1, 4, 4, generator=g, dtype=F64)
    else:
        data = mixture(3, 23)
        field, x = fs.analytic.marginal_velocity(data, PATH), data.sample(6, generator=g,
                                                                          dtype=F64)
    t = torch.rand(6, generator=g, dtype=F64)
    ref, jac = dense_trace(field, x, t)
    value = field(x, t).detach()
    field_dev = field.to(DEVICE) if isinstance(field, nn.Module) else field
    xd, td = x.to(DEVICE), t.to(DEVICE)
    assert auto_method(xd) == ("loop" if DEVICE.type == "cpu" else "batched-vjp")
    for method in ("auto", *EXACT_METHODS):
        res = value_and_divergence(field_dev, xd, td, method=method)
        assert on_device(res.divergence) and on_device(res.value), method
        close(res.divergence, ref)
        close(res.value, value)
    probes = make_probes(x.shape, 3, generator=gen(24), dtype=F64)  # CPU draw, as on the CPU
    hut = value_and_divergence(field_dev, xd, td, method="hutchinson", probes=probes.to(DEVICE))
    p = probes.reshape(3, 6, -1)
    want = torch.stack([torch.stack([p[j, i] @ jac[i, :, i, :] @ p[j, i] for i in range(6)])
                        for j in range(3)])
    assert on_device(hut.estimates)
    close(hut.estimates, want)
    close(hut.divergence, want.mean(0))


# -- couplings ---------------------------------------------------------------------------------
def batches(n: int, m: int, seed: int, d: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return two_clouds(seed, n, m, d)


@pytest.mark.parametrize("domain", ["auto", "log"])
def test_sinkhorn_keeps_the_plan_on_the_device(domain):
    x0, x1 = batches(128, 128, 25)
    coupling = fs.OTCoupling("sinkhorn", reg=0.1, tol=1e-9, max_iter=20_000, domain=domain)
    dev = coupling.plan(x0.to(DEVICE), x1.to(DEVICE), generator=torch.Generator(DEVICE))
    cpu = coupling.plan(x0, x1, generator=gen(0))
    for name in ("plan", "cost", "i0", "i1"):
        assert on_device(getattr(dev, name)), name
    assert dev.status == "converged" and dev.plan.dtype == F64
    assert dev.solver == ("sinkhorn_knopp" if domain == "auto" else "sinkhorn_log")
    assert float((dev.plan.cpu() - cpu.plan).abs().sum()) < 1e-7
    assert dev.cost.item() == pytest.approx(cpu.cost.item(), rel=1e-9)
    # independent: POT's numpy Sinkhorn on the mean-normalised cost
    c = torch.cdist(x0, x1).square().numpy()
    u = np.full(128, 1 / 128)
    ref = ot.sinkhorn(u, u, c / c.mean(), 0.1, numItermax=20_000, stopThr=1e-12)
    assert float(np.abs(dev.plan.cpu().numpy() - ref).sum()) < 1e-7
    x0c, x1c = coupling(x0.to(DEVICE), x1.to(DEVICE), generator=torch.Generator(DEVICE))
    assert on_device(x0c) and torch.equal(x1c.cpu(), x1)  # keep="x1": data kept in order


def test_unequal_batches_draw_pairs_on_the_device():
    x0, x1 = batches(96, 64, 26)
    coupling = fs.OTCoupling("sinkhorn", reg=0.2)
    res = coupling.plan(x0.to(DEVICE), x1.to(DEVICE),
                        generator=torch.Generator(DEVICE).manual_seed(1))
    assert on_device(res.i0) and res.i0.shape == (64,) and on_device(res.plan)
    assert int(res.i0.max()) < 96 and torch.equal(res.i1.cpu(), torch.arange(64))
    assert bool((res.plan[res.i0, res.i1] > 0).all())  # drawn where the plan has mass
    if DEVICE.type != "cpu":
        with pytest.raises(ValueError, match="generator must be on"):
            coupling.plan(x0.to(DEVICE), x1.to(DEVICE), generator=gen(1))


def test_exact_and_other_couplings_with_device_inputs():
    x0, x1 = batches(64, 64, 27)
    dev = fs.OTCoupling("exact").plan(x0.to(DEVICE), x1.to(DEVICE))
    cpu = fs.OTCoupling("exact").plan(x0, x1)
    assert on_device(dev.i0) and on_device(dev.cost) and dev.plan.device.type == "cpu"
    assert torch.equal(dev.i0.cpu(), cpu.i0) and dev.status == "optimal"
    c = torch.cdist(x0, x1).square().numpy()
    u = np.full(64, 1 / 64)
    assert dev.cost.item() == pytest.approx(ot.emd2(u, u, c), rel=1e-12)  # independent
    ind = fs.IndependentCoupling().plan(x0.to(DEVICE), x1.to(DEVICE),
                                        generator=torch.Generator(DEVICE).manual_seed(2))
    assert on_device(ind.i0) and torch.equal(ind.i0.sort().values.cpu(), torch.arange(64))
    y1 = (torch.arange(64) % 3).to(DEVICE)
    cc = fs.ClassConditionalOT("sinkhorn", reg=0.1)
    x0c, x1c, y1c = cc(x0.to(DEVICE), x1.to(DEVICE), y1,
                       generator=torch.Generator(DEVICE).manual_seed(3))
    res = cc.plan(x0.to(DEVICE), x1.to(DEVICE), y1, generator=torch.Generator(DEVICE))
    assert on_device(x0c) and on_device(res.plan) and torch.equal(y1c, y1)
    assert res.plan.sum().item() == pytest.approx(1.0, abs=1e-6)


# -- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", ["sinkhorn", "exact"])
def test_training_steps_on_the_device(coupling):
    model = fs.MLP(2, hidden=32, depth=2).to(DEVICE)
    cfg = fs.TrainConfig(steps=6, batch_size=64, log_every=3, progress=False, ema_decay=0.9,
                         couple_on_device=True)
    res = fs.train(model, "8gaussians", cfg, coupling=fs.OTCoupling(coupling, reg=0.1),
                   path=GaussianBridge(0.1), generator=gen(28))
    assert res.step == 6 and len(res.losses) == 2 and all(map(math.isfinite, res.losses))
    assert all(on_device(p) for p in res.model.parameters())
    assert all(on_device(p) for p in res.ema_model.parameters())
    with torch.no_grad():
        out = sample(res.ema_model, noise(16, 29).to(DEVICE).float(), "fast_euler", steps=4)
    assert on_device(out.x) and bool(torch.isfinite(out.x).all())
