"""Divergence: every exact method against an independent autograd loop (float64), closed
forms (linear fields, the continuity equation of the analytic mixture flow), Hutchinson's
unbiasedness and reported error, gradients to parameters, and every failure path."""

import functools
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flowsolve as fs
from flowsolve import analytic
from flowsolve.likelihood.divergence import (
    DIVERGENCE_METHODS,
    EXACT_METHODS,
    PROBE_KINDS,
    auto_method,
    divergence,
    make_probes,
    value_and_divergence,
)
from flowsolve.training.nets import MLP
from flowsolve.training.unet import UNet

F64 = torch.float64
EXACT = list(EXACT_METHODS)


# ----------------------------------------------------------------------------- helpers
def reference_divergence(field, x, t, create_graph=False):
    """sum_i d u_i / d x_i, one autograd call per output entry (batch-sum trick)."""
    x = x.detach().requires_grad_(True) if not x.requires_grad else x
    u = field(x, t).reshape(x.shape[0], -1)
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(u.shape[1]):
        (g,) = torch.autograd.grad(u[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        total = total + g.reshape(x.shape[0], -1)[:, i]
    return total


def jacobians(field, x, t):
    """(B, d, d) per-sample Jacobians, each from a batch of one (for the variance formulas)."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
    return torch.stack([
        torch.autograd.functional.jacobian(lambda z, i=i: field(z[None], t[i : i + 1])[0], x[i])
        for i in range(x.shape[0])
    ])


def random_mixture(gen, k, d):
    means = 1.5 * torch.randn(k, d, generator=gen, dtype=F64)
    a = torch.randn(k, d, d, generator=gen, dtype=F64)
    covs = a @ a.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=F64)  # full covariances
    return fs.GaussianMixture(means, covs, 0.5 + torch.rand(k, generator=gen, dtype=F64))


class TimeMLP(nn.Module):
    """A small MLP on [x, t] (its own, independent of flowsolve.training.nets)."""

    def __init__(self, d, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, d))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.net(torch.cat([x, t[:, None]], dim=1))


class ConvField(nn.Module):
    def __init__(self, c=2, width=8, norm=None):
        super().__init__()
        layers = [nn.Conv2d(c + 1, width, 3, padding=1), nn.SiLU()]
        if norm is not None:
            layers.append(norm(width))
        layers += [nn.Conv2d(width, c, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        tt = t.expand(x.shape[0], 1, *x.shape[2:])
        return self.net(torch.cat([x, tt], dim=1))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return TimeMLP(6).double().eval()


def cond_ot():
    return fs.AffineGaussianPath(fs.CondOTScheduler())


# ------------------------------------------------------------------ exact == reference
@pytest.mark.parametrize("d", [2, 10])
@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_match_loop_on_mixture_velocity(method, d, gen):
    data = random_mixture(gen, k=3, d=d)
    for path in (cond_ot(), fs.AffineGaussianPath(fs.CosineScheduler())):
        u = analytic.marginal_velocity(data, path)
        x = 2 * torch.randn(16, d, generator=gen, dtype=F64)
        for t in (0.05, 0.5, 0.93):
            t = torch.tensor(t, dtype=F64)
            ref = reference_divergence(u, x, t)
            for chunk in (None, 3):
                res = value_and_divergence(u, x, t, method=method, chunk_size=chunk)
                assert (res.divergence - ref).abs().max() < 1e-10
                torch.testing.assert_close(res.value, u(x, t), rtol=1e-13, atol=1e-13)
                assert res.method == method and res.stderr is None and res.estimates is None


@pytest.mark.parametrize("method", ["batched-vjp", "loop"])
def test_batched_methods_take_per_sample_time_on_mixture(method, gen):
    data = random_mixture(gen, k=3, d=10)
    u = analytic.marginal_velocity(data, cond_ot())
    x = torch.randn(12, 10, generator=gen, dtype=F64)
    t = torch.rand(12, generator=gen, dtype=F64)
    got = value_and_divergence(u, x, t, method=method, chunk_size=4).divergence
    assert (got - reference_divergence(u, x, t)).abs().max() < 1e-10


@pytest.mark.parametrize("method", ["vmap-jacrev", "vmap-jacfwd"])
def test_vmap_methods_name_the_fallback_when_torch_func_fails(method, gen):
    def field(x, t):  # Python control flow on a value: torch.func cannot vmap it
        return x * 2 if bool(x.sum() > -1e9) else x

    x = torch.randn(4, 3, generator=gen, dtype=F64)
    with pytest.raises(RuntimeError, match="batched-vjp' or 'loop'"):
        value_and_divergence(field, x, 0.5, method=method)
    assert torch.equal(value_and_divergence(field, x, 0.5, method="loop").divergence,
                       torch.full((4,), 6.0, dtype=F64))


@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_match_loop_on_mlp(method, mlp, gen):
    x = torch.randn(9, 6, generator=gen, dtype=F64)
    for t in (torch.rand(9, generator=gen, dtype=F64), torch.tensor(0.3, dtype=F64), 0.7):
        ref = reference_divergence(mlp, x, torch.as_tensor(t, dtype=F64))
        for chunk in (None, 1, 4, 100):
            got = value_and_divergence(mlp, x, t, method=method, chunk_size=chunk)
            assert (got.divergence - ref).abs().max() < 1e-10


@pytest.mark.parametrize("method", EXACT)
def test_linear_field_divergence_is_trace(method, gen):
    for shape in [(5, 7), (3, 2, 3, 4)]:
        d = math.prod(shape[1:])
        a = torch.randn(d, d, generator=gen, dtype=F64)
        b = torch.randn(d, generator=gen, dtype=F64)

        def field(x, t, a=a, b=b):
            return ((x.reshape(x.shape[0], -1) @ a.T + b) * (1 + 0 * t)).reshape(x.shape)

        x = torch.randn(shape, generator=gen, dtype=F64)
        got = divergence(field, x, torch.tensor(0.2, dtype=F64), method=method, chunk_size=5)
        torch.testing.assert_close(got, torch.trace(a).expand(shape[0]), rtol=1e-14, atol=1e-13)


@pytest.mark.parametrize("method", EXACT)
def test_image_shaped_input(method, gen):
    torch.manual_seed(1)
    net = ConvField(c=2).double().eval()
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64)
    t = torch.rand(3, generator=gen, dtype=F64)
    ref = reference_divergence(net, x, t)
    res = value_and_divergence(net, x, t, method=method, chunk_size=7)
    assert res.value.shape == x.shape and res.divergence.shape == (3,)
    assert (res.divergence - ref).abs().max() < 1e-10


@pytest.mark.parametrize("method", [*EXACT, "hutchinson"])
def test_field_independent_of_x_has_zero_divergence(method, gen):
    x = torch.randn(4, 2, 3, generator=gen, dtype=F64)
    probes = make_probes(x.shape, 2, generator=gen, dtype=F64) if method == "hutchinson" else None
    for create_graph in (False, True):
        res = value_and_divergence(lambda x, t: torch.ones_like(x) * t, x, 0.5, method=method,
                                   probes=probes, create_graph=create_graph)
        assert torch.equal(res.divergence, torch.zeros(4, dtype=F64))
        assert torch.equal(res.value, torch.full_like(x, 0.5))


@pytest.mark.parametrize("method", [*EXACT, "hutchinson"])
def test_field_of_parameters_only_has_zero_divergence(method, gen):
    """u = t w depends on a parameter w but not on x: the divergence is 0 (batched-vjp used
    to crash reshaping the materialised x-shaped zeros), the value keeps its graph to w."""
    w = torch.randn(2, 3, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(4, 2, 3, generator=gen, dtype=F64)
    probes = [make_probes(x.shape, k, generator=gen, dtype=F64) for k in (1, 3)]
    settings = ([dict(probes=p) for p in probes] if method == "hutchinson"
                else [dict(chunk_size=c) for c in (None, 1, 4)])
    for kwargs in settings:
        for create_graph in (False, True):
            res = value_and_divergence(lambda x, t: w.expand_as(x) * t, x, 0.5, method=method,
                                       create_graph=create_graph, **kwargs)
            assert torch.equal(res.divergence, torch.zeros(4, dtype=F64))
            assert torch.equal(res.value, 0.5 * w.detach().expand_as(x))
            if create_graph:  # d(sum value)/dw = B t per entry
                (gw,) = torch.autograd.grad(res.value.sum(), w)
                assert torch.equal(gw, torch.full_like(w, 2.0))


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) behind any tensor an op returns, the
    backward passes and torch.func transforms included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("method", ["batched-vjp", "vmap-jacrev", "vmap-jacfwd"])
def test_memory_is_bounded_by_the_chunk(method, gen):
    """No tensor larger than chunk * B * d (the cotangents of one chunk) is ever allocated:
    in particular not the d x d identity (d = 256 here: 65,536 entries against 2,048)."""
    x = torch.randn(2, 1, 16, 16, generator=gen, dtype=F64)
    b, d, chunk = 2, 256, 4
    for create_graph in (False, True):
        with _LargestTensor() as mode:
            res = value_and_divergence(lambda x, t: torch.tanh(x) * t, x, 0.5, method=method,
                                       chunk_size=chunk, create_graph=create_graph)
        assert mode.largest <= chunk * b * d, mode.largest
        want = 0.5 * (1 - torch.tanh(x) ** 2).sum((1, 2, 3))  # closed form
        torch.testing.assert_close(res.divergence.detach(), want, rtol=1e-13, atol=1e-13)


# ------------------------------------------------- GroupNorm (the U-Net) with a graph
def _group_norm_cases():
    unet = UNet(channels=4, embedding_dim=8, groups=2,
                generator=torch.Generator().manual_seed(0)).double().eval()
    with torch.random.fork_rng():
        torch.manual_seed(4)
        norm = nn.GroupNorm(2, 4).double()
        with torch.no_grad():  # affine parameters away from (1, 0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(5)
    return {
        "unet": (unet, torch.randn(2, 1, 8, 8, generator=g, dtype=F64),
                 torch.rand(2, generator=g, dtype=F64)),
        "group_norm": (lambda x, t, n=norm: torch.tanh(n(x)) * (1 + t[:, None, None]),
                       torch.randn(3, 4, 5, generator=g, dtype=F64),
                       torch.rand(3, generator=g, dtype=F64)),
    }, {"unet": list(unet.parameters()), "group_norm": list(norm.parameters())}


@pytest.mark.parametrize("case", ["unet", "group_norm"])
@pytest.mark.parametrize("method", ["auto", "batched-vjp", "hutchinson"])
def test_create_graph_through_group_norm_equals_the_loop(method, case):
    """torch's is_grads_batched double backward fails for nn.GroupNorm ("The size of tensor
    a (2) must match ..."), and method='auto' picks batched-vjp with create_graph: the
    divergence and its parameter gradients must equal the loop's (float64)."""
    fields, params = _group_norm_cases()
    field, x, t = fields[case]
    params = params[case]
    probes = None
    if method == "hutchinson":
        probes = make_probes(x.shape, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
        xr = x.clone().requires_grad_(True)
        ur = field(xr, t)  # e^T (J e) by an independent loop of VJPs
        target = sum((torch.autograd.grad(ur, xr, p, create_graph=True)[0] * p)
                     .reshape(x.shape[0], -1).sum(1) for p in probes) / 3
    else:
        target = reference_divergence(field, x, t, create_graph=True)
    expected = torch.autograd.grad(target.sum(), params, allow_unused=True)
    for chunk in ((None,) if method == "hutchinson" else (None, 7)):
        res = value_and_divergence(field, x, t, method=method, probes=probes,
                                   chunk_size=chunk, create_graph=True)
        assert res.method == ("batched-vjp" if method == "auto" else method)
        torch.testing.assert_close(res.divergence, target, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(res.divergence.sum(), params, allow_unused=True)
        for g, e in zip(got, expected, strict=True):
            if e is None:  # e.g. the U-Net's read-out bias does not enter the Jacobian
                assert g is None or g.abs().max() == 0
            else:
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        assert any(e is not None and e.abs().max() > 0 for e in expected)


@pytest.mark.parametrize("method", ["vmap-jacrev", "vmap-jacfwd"])
def test_vmap_methods_refuse_per_sample_labels_bound_by_partial(method, gen):
    """vmap calls the field on one sample, so labels y (B,) bound by functools.partial no
    longer match: the error names the bound tensor and the methods that work."""
    net = MLP(6, hidden=16, depth=2, time_embedding_dim=8, num_classes=3,
              generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(4, 6, generator=gen, dtype=F64)
    field = functools.partial(net, y=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"keyword 'y' of shape \(4,\).*'batched-vjp' or 'loop'"):
        value_and_divergence(field, x, 0.5, method=method)
    ref = reference_divergence(field, x, torch.tensor(0.5, dtype=F64))
    for ok in ("batched-vjp", "loop"):
        got = value_and_divergence(field, x, 0.5, method=ok).divergence
        assert (got - ref).abs().max() < 1e-10


def test_scalar_events_and_auto_rule(gen):
    x = torch.randn(5, generator=gen, dtype=F64)  # (B,): event shape ()
    res = value_and_divergence(lambda x, t: torch.sin(x) * t, x, 0.5)
    torch.testing.assert_close(res.divergence, 0.5 * torch.cos(x))
    assert res.method == auto_method(x) == "loop"  # CPU, no graph
    res = value_and_divergence(lambda x, t: x, torch.zeros(4, 3), 0.1, create_graph=True)
    assert res.method == auto_method(x, create_graph=True) == "batched-vjp"
    if torch.cuda.is_available():
        assert auto_method(x.cuda()) == "batched-vjp"


# ----------------------------------------------------------------- closed forms: flow
@pytest.mark.parametrize("d", [2, 10])
@pytest.mark.parametrize("sched", [fs.CondOTScheduler(), fs.CosineScheduler()], ids=repr)
def test_continuity_equation(sched, d, gen):
    """d/dt log p_t + div u_t + u_t . grad log p_t = 0 with div u from this module."""
    data = random_mixture(gen, k=3, d=d)
    path = fs.AffineGaussianPath(sched)
    u, score = analytic.marginal_velocity(data, path), analytic.marginal_score(data, path)
    log_p = analytic.marginal_log_prob(data, path)
    x = 2 * torch.randn(32, d, generator=gen, dtype=F64)
    t = (0.05 + 0.9 * torch.rand(32, generator=gen, dtype=F64)).requires_grad_(True)
    (dlogp_dt,) = torch.autograd.grad(log_p(x, t).sum(), t)
    res = value_and_divergence(u, x, t.detach())
    residual = dlogp_dt + res.divergence + (res.value * score(x, t.detach())).sum(1)
    scale = dlogp_dt.abs() + res.divergence.abs() + 1
    assert (residual.abs() / scale).max() < 1e-11


# ------------------------------------------------------------------------- Hutchinson
def test_make_probes(gen):
    r = make_probes((4, 3), 1000, generator=gen, dtype=F64)
    assert r.shape == (1000, 4, 3) and r.dtype == F64
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    g = make_probes((4, 3), 1000, "gaussian", generator=gen)
    assert g.dtype == torch.get_default_dtype() and (g.abs() != 1).all()
    second = (g.reshape(1000, -1).T @ g.reshape(1000, -1)) / 1000  # E[e e^T] ~= I
    assert (second - torch.eye(12)).abs().max() < 0.2
    a = make_probes((2, 2), 3, generator=torch.Generator().manual_seed(7))
    b = make_probes((2, 2), 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", list(PROBE_KINDS))
def test_hutchinson_unbiased_and_stderr_matches_spread(kind, gen):
    data = random_mixture(gen, k=3, d=10)
    u = analytic.marginal_velocity(data, cond_ot())
    x, t = torch.randn(6, 10, generator=gen, dtype=F64), torch.tensor(0.6, dtype=F64)
    exact = divergence(u, x, t)
    # many probes: the mean lies within 3 reported standard errors of the exact trace
    big = value_and_divergence(u, x, t, method="hutchinson",
                               probes=make_probes(x.shape, 4000, kind, generator=gen, dtype=F64))
    assert big.estimates.shape == (4000, 6)
    assert ((big.divergence - exact).abs() / big.stderr).max() < 3
    # the reported standard error of a k=8 estimate matches the spread of repeated estimates
    reps = [value_and_divergence(u, x, t, method="hutchinson",
                                 probes=make_probes(x.shape, 8, kind, generator=gen, dtype=F64))
            for _ in range(400)]
    means = torch.stack([r.divergence for r in reps])  # (400, B)
    reported = torch.stack([r.stderr for r in reps]).pow(2).mean(0).sqrt()
    empirical = means.std(0)
    assert ((reported / empirical) - 1).abs().max() < 0.15
    assert ((means.mean(0) - exact).abs() / (empirical / 20)).max() < 3.5


def test_rademacher_exact_for_multiple_of_identity_and_diagonal(gen):
    x = torch.randn(5, 3, 4, generator=gen, dtype=F64)
    diag = torch.randn(3, 4, generator=gen, dtype=F64)
    for k in (1, 4):
        p = make_probes(x.shape, k, generator=gen, dtype=F64)
        res = value_and_divergence(lambda x, t: -2.5 * x, x, 0.3, method="hutchinson", probes=p)
        assert torch.equal(res.divergence, torch.full((5,), -30.0, dtype=F64))
        res = value_and_divergence(lambda x, t: diag * x, x, 0.3, method="hutchinson", probes=p)
        torch.testing.assert_close(res.divergence, diag.sum().expand(5), rtol=1e-14, atol=1e-14)
        if k > 1:
            assert torch.equal(res.stderr, torch.zeros(5, dtype=F64))
        else:
            assert torch.isnan(res.stderr).all()  # one probe: no spread to report


@pytest.mark.parametrize("case", ["full covariances, t=0.5", "isotropic std 0.1, t=0.3"])
def test_rademacher_variance_below_gaussian_and_matches_theory(case):
    """Var(e^T J e): Rademacher 2 sum_{i!=j} S_ij^2, Gaussian 2 ||S||_F^2, S = (J + J^T)/2,
    on the mixture velocity in d = 10 at points drawn from p_t."""
    gen = torch.Generator().manual_seed(3)
    d, path = 10, cond_ot()
    if case.startswith("full"):
        data, t = random_mixture(gen, k=4, d=d), 0.5
    else:  # the note's case: well separated, tight isotropic components
        data = fs.GaussianMixture(2 * torch.randn(8, d, generator=gen, dtype=F64),
                                  torch.full((8, d), 0.01, dtype=F64))
        t = 0.3
    u = analytic.marginal_velocity(data, path)
    x = t * data.sample(6, generator=gen, dtype=F64) + (1 - t) * torch.randn(
        6, d, generator=gen, dtype=F64)
    t = torch.tensor(t, dtype=F64)
    s = jacobians(u, x, t)
    s = (s + s.transpose(1, 2)) / 2
    theory = {"gaussian": 2 * s.pow(2).sum((1, 2)),
              "rademacher": 2 * (s.pow(2).sum((1, 2)) - s.diagonal(dim1=1, dim2=2).pow(2).sum(1))}
    var = {}
    for kind in PROBE_KINDS:
        p = make_probes(x.shape, 20000, kind, generator=gen, dtype=F64)
        var[kind] = value_and_divergence(u, x, t, method="hutchinson", probes=p).estimates.var(0)
        torch.testing.assert_close(var[kind], theory[kind], rtol=0.08,
                                   atol=1e-9 * theory["gaussian"].max().item())
    ratio = var["gaussian"] / var["rademacher"]
    print(f"{case}: Gaussian / Rademacher variance per sample "
          f"{[float(f'{r:.3g}') for r in ratio.tolist()]}")
    assert (ratio > 1).all()


# ---------------------------------------------------------------- gradients to params
@pytest.mark.parametrize("method", [*EXACT, "hutchinson"])
def test_create_graph_gradients_reach_parameters(method, mlp, gen):
    x = torch.randn(7, 6, generator=gen, dtype=F64)
    t = torch.rand(7, generator=gen, dtype=F64)
    params = list(mlp.parameters())
    probes = make_probes(x.shape, 3, generator=gen, dtype=F64) if method == "hutchinson" else None
    if probes is None:
        target = reference_divergence(mlp, x, t, create_graph=True)
    else:  # the same probes through an independent e^T (J e) by a loop of VJPs
        xr = x.clone().requires_grad_(True)
        ur = mlp(xr, t)
        target = sum((torch.autograd.grad(ur, xr, p, create_graph=True)[0] * p).sum(1)
                     for p in probes) / 3
    expected = torch.autograd.grad(target.sum(), params, allow_unused=True)
    res = value_and_divergence(mlp, x, t, method=method, probes=probes, create_graph=True)
    got = torch.autograd.grad(res.divergence.sum(), params, allow_unused=True,
                              retain_graph=True)
    for g, e in zip(got, expected, strict=True):
        if e is None:  # the read-out bias does not enter the Jacobian
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    (gv,) = torch.autograd.grad(res.value.sum(), params[0])
    (ev,) = torch.autograd.grad(mlp(x, t).sum(), params[0])
    torch.testing.assert_close(gv, ev, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", EXACT)
def test_create_graph_gradients_reach_x(method, gen):
    """x produced upstream (requires grad) keeps its graph: d(sum div)/d x0 matches."""
    x0 = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)

    def field(x, t):
        return torch.tanh(x) * x.sum(1, keepdim=True)

    res = value_and_divergence(field, 2 * x0, 0.5, method=method, create_graph=True)
    (got,) = torch.autograd.grad(res.divergence.sum(), x0)
    (want,) = torch.autograd.grad(reference_divergence(field, 2 * x0, 0.5, True).sum(), x0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", EXACT)
def test_no_graph_by_default_and_works_under_no_grad(method, mlp, gen):
    x = torch.randn(5, 6, generator=gen, dtype=torch.float32)
    net = TimeMLP(6).eval()
    with torch.no_grad():
        res = value_and_divergence(net, x, 0.5, method=method)
    assert not res.value.requires_grad and not res.divergence.requires_grad
    assert res.value.dtype == res.divergence.dtype == torch.float32
    torch.testing.assert_close(res.divergence, reference_divergence(net, x, 0.5),
                               rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------- failure paths
def test_train_mode_batchnorm_is_refused(gen):
    torch.manual_seed(2)
    net = ConvField(c=1, norm=nn.BatchNorm2d).double()
    x = torch.randn(4, 1, 3, 3, generator=gen, dtype=F64)
    for field in (net, net.forward, functools.partial(net.forward)):
        for method in [*EXACT, "hutchinson"]:
            probes = make_probes(x.shape, 2, generator=gen, dtype=F64)
            with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
                value_and_divergence(field, x, 0.5, method=method,
                                     probes=probes if method == "hutchinson" else None)
    net.eval()
    ref = reference_divergence(net, x, torch.tensor(0.5, dtype=F64))
    for method in EXACT:
        assert (divergence(net, x, 0.5, method=method) - ref).abs().max() < 1e-10


def test_bad_arguments_raise_naming_what_is_accepted(mlp, gen):
    x = torch.randn(3, 6, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="method must be one of.*'vmap-jacrev'.*'hutchinson'"):
        value_and_divergence(mlp, x, 0.5, method="jacobian")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
            value_and_divergence(mlp, x, 0.5, chunk_size=bad)
    with pytest.raises(ValueError, match="needs probes.*make_probes"):
        value_and_divergence(mlp, x, 0.5, method="hutchinson")
    with pytest.raises(ValueError, match=r"probes must be shaped \(k, \*x.shape\)"):
        value_and_divergence(mlp, x, 0.5, method="hutchinson", probes=torch.ones(2, 3, 5))
    with pytest.raises(TypeError, match="probes must be a torch.Tensor"):
        value_and_divergence(mlp, x, 0.5, method="hutchinson", probes=[1.0])
    with pytest.raises(ValueError, match="only by method='hutchinson'"):
        value_and_divergence(mlp, x, 0.5, method="loop", probes=torch.ones(1, 3, 6))
    with pytest.raises(ValueError, match=r"t must be 0-d or shaped \(B,\) = \(3,\)"):
        value_and_divergence(mlp, x, torch.zeros(4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        value_and_divergence(mlp, x.tolist(), 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        value_and_divergence(mlp, torch.ones(3, 6, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match=r"B >= 1"):
        value_and_divergence(mlp, torch.ones(0, 6), 0.5)
    with pytest.raises(TypeError, match="field must be callable"):
        value_and_divergence("velocity", x, 0.5)
    for method in DIVERGENCE_METHODS:
        probes = torch.ones(1, 3, 6, dtype=F64) if method == "hutchinson" else None
        # the vmap methods check one sample at a time: (1, 6), not (3, 6)
        rows = 1 if method.startswith("vmap") else 3
        with pytest.raises(ValueError, match=rf"shaped like x \({rows}, 6\); got \({rows}, 5\)"):
            value_and_divergence(lambda x, t: x[..., :5], x, 0.5, method=method, probes=probes)
    with pytest.raises(ValueError, match="kind must be one of.*'gaussian', 'rademacher'"):
        make_probes((3, 6), 2, "uniform")
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match="n_probes must be an int >= 1"):
            make_probes((3, 6), bad)
    with pytest.raises(ValueError, match="shape must be a tuple of ints"):
        make_probes(3, 2)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        make_probes((3, 6), 2, generator=1234)


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("kind", list(PROBE_KINDS))
def test_hutchinson_stderr_is_the_sample_std_of_the_exact_per_probe_traces(kind, create_graph,
                                                                           gen):
    """For f(x) = A x the per-probe estimate e^T J e = e^T A e is exact, so the reported
    estimates, mean and standard error must equal those of the hand-computed values:
    stderr = sqrt(sum_j (e_j^T A e_j - mean)^2 / (k - 1)) / sqrt(k) (unbiased sample std).
    With k = 2 that is |e_1^T A e_1 - e_2^T A e_2| / 2 (the biased std gives / (2 sqrt 2))."""
    d = 6
    a = torch.randn(d, d, generator=gen, dtype=F64)  # not symmetric, off-diagonal mass
    x = torch.randn(5, d, generator=gen, dtype=F64)
    for k in (2, 8):
        p = make_probes(x.shape, k, kind, generator=gen, dtype=F64)
        res = value_and_divergence(lambda x, t: x @ a.T, x, 0.4, method="hutchinson", probes=p,
                                   create_graph=create_graph)
        e, m = p.tolist(), a.tolist()  # e_j^T A e_j, (k, B), by hand in Python floats
        quad = torch.tensor([[sum(e[j][b][r] * m[r][c] * e[j][b][c]
                                  for r in range(d) for c in range(d)) for b in range(5)]
                             for j in range(k)], dtype=F64)
        mean = quad.sum(0) / k
        stderr = ((quad - mean).square().sum(0) / (k - 1)).sqrt() / math.sqrt(k)
        torch.testing.assert_close(res.estimates, quad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.divergence, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.stderr, stderr, rtol=1e-12, atol=0)
        torch.testing.assert_close(res.stderr, quad.std(0, correction=1) / math.sqrt(k),
                                   rtol=1e-12, atol=0)
        if k == 2:
            torch.testing.assert_close(res.stderr, (quad[0] - quad[1]).abs() / 2,
                                       rtol=1e-12, atol=0)
        assert (stderr > 0).all()  # the comparison has something to compare
