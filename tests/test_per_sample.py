"""Per-sample step control (``step_control="per_sample"``, flowsolve/ode/per_sample.py): every
sample takes the steps torchdiffeq takes for it alone, its answer does not depend on its
batch, orders and tolerances hold per sample, and NFE is counted per sample."""

import math

import pytest
import torch

import flowsolve as fs
from flowsolve._core.errors import IntegrationError, NonFiniteStateError
from flowsolve.likelihood.divergence import make_probes
from flowsolve.ode.backends import EMBEDDED_TABLEAUS
from tests._cases import F64, gen, noise, slope

PS = "per_sample"
PATH = fs.AffineGaussianPath(fs.CondOTScheduler())
RING = fs.GaussianMixture.ring(8, radius=4.0, std=0.2)
U_RING = fs.analytic.marginal_velocity(RING, PATH)


def stiff(x, t):
    """``u = (0, -(1 + x_0^2) x_1)``: ``x_0`` stays, ``x_1`` decays at the rate ``1 + x_0^2``;
    a large ``x_0`` makes the sample stiff (its steps are limited by stability)."""
    return torch.cat([torch.zeros_like(x[:, :1]), -(1.0 + x[:, :1] ** 2) * x[:, 1:]], 1)


def test_the_pairs_offered_are_torchdiffeqs_fsal_ones():
    assert set(EMBEDDED_TABLEAUS) == {"dopri5", "dopri8", "bosh3"}
    assert {n: t.order for n, t in EMBEDDED_TABLEAUS.items()} == {
        "dopri5": 5, "dopri8": 8, "bosh3": 3}


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "dopri8"])
@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, 0.0), (0.2, 0.9)])
def test_each_sample_takes_the_steps_of_torchdiffeq_alone(solver, t0, t1):
    # from noise forwards; backwards from the data (noise is off the data at t = 1)
    x0 = noise(10, 3) if t0 < t1 else RING.sample(10, generator=gen(3)).to(F64)
    kw = dict(t0=t0, t1=t1, rtol=1e-6, atol=1e-7)
    calls = []  # (rows, time dims) of every call the solve makes

    def recorded(x, t):
        calls.append((x.shape[0], t.dim()))
        return U_RING(x, t)

    ps = fs.sample(recorded, x0, solver, step_control=PS, **kw)
    alone = [fs.sample(U_RING, x0[i:i + 1], solver, **kw) for i in range(10)]
    x_alone = torch.cat([a.x for a in alone])
    assert (ps.x - x_alone).abs().max() < 1e-11  # round-off of the stage sums (|x| ~ 4)
    assert ps.nfe_per_sample.tolist() == [a.nfe for a in alone]
    assert ps.steps_per_sample.tolist() == [a.steps for a in alone]
    assert ps.rejected_per_sample.tolist() == [a.rejected for a in alone]
    # lockstep: as many batched calls as the longest sample's NFE, plus one single-row
    # check of the field's handling of a (b,) time for each batch of live rows (each has
    # its own size: finished samples only leave); nfe counts them all
    batched = [b for b, dims in calls if dims == 1]
    checks = [b for b, dims in calls if dims == 0]
    assert len(batched) == max(a.nfe for a in alone) and ps.nfe == len(calls)
    assert checks == [1] * len({b for b in batched if b > 1}) and len(checks) >= 2
    assert (ps.steps, ps.rejected) == (int(ps.steps_per_sample.max()),
                                       int(ps.rejected_per_sample.max()))
    assert ps.step_control == PS and ps.solver == solver
    # shared stepping is the batch's: it differs from the samples alone at this tolerance
    shared = fs.sample(U_RING, x0, solver, **kw)
    assert shared.nfe_per_sample is None and shared.step_control == "shared"
    assert (shared.x - x_alone).abs().max() > 1e-9


def _points(n, seed):
    return RING.sample(n, generator=gen(seed)).to(F64)


def test_a_points_log_likelihood_does_not_depend_on_its_batch():
    """Permuted, shrunk, or filled with other (harder) points: the same log p to round-off
    per sample; with shared stepping it moves by far more than that."""
    x = _points(12, 0)
    others = torch.cat([_points(20, 1), noise(6, 2) * 6.0])  # points off the data too
    kw = dict(rtol=1e-7, atol=1e-7)
    perm = torch.randperm(12, generator=gen(3))
    variants = {
        "permuted": (x[perm], perm),
        "shrunk": (x[[2, 7, 9]], torch.tensor([2, 7, 9])),
        "filled": (torch.cat([others[:13], x, others[13:]]), None),
    }
    for control, bound in ((PS, 1e-12), ("shared", None)):
        base = fs.log_likelihood(U_RING, x, step_control=control, **kw).log_prob
        moved = []
        for name, (batch, idx) in variants.items():
            lp = fs.log_likelihood(U_RING, batch, step_control=control, **kw).log_prob
            got = lp[13:25] if name == "filled" else lp
            want = base if idx is None else base[idx]
            moved.append(float((got - want).abs().max()))
        if bound is not None:
            assert max(moved) <= bound, moved
            assert (base - RING.log_prob(x)).abs().max() < 1e-4  # and it is the mixture's
        else:
            assert max(moved) > 1e-9, moved  # the batch effect the per-sample solve removes


def test_generated_samples_and_their_log_density_do_not_depend_on_the_batch():
    z = noise(8, 4)
    kw = dict(rtol=1e-7, atol=1e-7, step_control=PS)
    whole = fs.sample_log_likelihood(U_RING, z, **kw)
    part = fs.sample_log_likelihood(U_RING, z[3:6], **kw)
    assert (whole.x[3:6] - part.x).abs().max() <= 1e-12
    assert (whole.log_prob[3:6] - part.log_prob).abs().max() <= 1e-12
    assert (whole.log_prob - RING.log_prob(whole.x)).abs().max() < 1e-4
    assert whole.nfe_per_sample[3:6].tolist() == part.nfe_per_sample.tolist()


def _gaussian_flow():
    """One Gaussian N(m, diag(s^2)) on CondOT: the flow is ``x_t = t m + sqrt((1-t)^2 +
    t^2 s^2) x_0`` per coordinate."""
    m, s = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
    data = fs.GaussianMixture(m[None], (s ** 2)[None], torch.ones(1, dtype=F64))
    return fs.analytic.marginal_velocity(data, PATH), lambda x0: m + s * x0


@pytest.mark.parametrize("solver,order,ns", [("bosh3", 3, (8, 16, 32, 64)),
                                             ("dopri5", 5, (8, 16, 32)),
                                             ("dopri8", 8, (2, 4, 8))])
def test_every_sample_converges_at_the_methods_order(solver, order, ns):
    """With every step accepted and capped at h (huge tolerances, max_step = first_step = h),
    each sample's error at t = 1 falls as h^order (fits: bosh3 2.98-3.01, dopri5 4.84-5.3,
    dopri8 7.73-7.85)."""
    u, exact = _gaussian_flow()
    x0 = noise(5, 6)
    errs = []
    for n in ns:
        h = 1.0 / n
        res = fs.sample(u, x0, solver, rtol=1e6, atol=1e6, step_control=PS,
                        options={"first_step": h, "max_step": h})
        assert res.steps_per_sample.tolist() == [n] * 5
        errs.append((res.x - exact(x0)).norm(dim=1))
    errs = torch.stack(errs)  # (len(ns), samples)
    for i in range(5):
        fitted = slope([1.0 / n for n in ns], errs[:, i].tolist())
        assert order - 0.3 < fitted < order + 0.8, (i, fitted)


def test_every_sample_meets_the_tolerance():
    """Each sample's error stays within a small multiple of the tolerance and falls with it;
    with the batch's RMS error (shared), an outlying sample's error is 17x the tolerance
    at 1e-8 (measured), because the well-behaved ones average it down."""
    u, exact = _gaussian_flow()
    x0 = torch.cat([noise(15, 7) * 0.2, noise(1, 8) * 6])  # one sample far out
    prev = None
    for tol in (1e-8, 1e-10):
        res = fs.sample(u, x0, "dopri5", rtol=tol, atol=tol, step_control=PS)
        err = (res.x - exact(x0)).abs().amax(1)
        assert err.max() < 3 * tol, (tol, float(err.max() / tol))
        if prev is not None:
            assert bool((err < prev).all())
        prev = err
    shared = fs.sample(u, x0, "dopri5", rtol=1e-8, atol=1e-8)
    assert (shared.x - exact(x0)).abs().max() > 5e-8


def test_a_stiff_sample_no_longer_sets_everyones_step():
    x0 = torch.cat([noise(7, 8) * 0.3, torch.tensor([[30.0, 1.0]], dtype=F64)])
    kw = dict(t0=0.0, t1=1.0, rtol=1e-6, atol=1e-6)
    ps = fs.sample(stiff, x0, "dopri5", step_control=PS, **kw)
    shared = fs.sample(stiff, x0, "dopri5", **kw)
    easy, hard = ps.nfe_per_sample[:7], int(ps.nfe_per_sample[7])
    assert int(easy.max()) * 5 < hard  # the stiff point needs many more evaluations
    assert shared.nfe >= hard / 2  # shared: everyone takes the stiff point's steps
    assert int(ps.nfe_per_sample.sum()) * 3 < shared.nfe * 8
    alone = fs.sample(stiff, x0[:1], "dopri5", **kw)
    assert int(ps.nfe_per_sample[0]) == alone.nfe


@pytest.mark.parametrize("times", [[0.0, 0.25, 0.6, 1.0], [1.0, 0.7, 0.3, 0.0]])
def test_times_are_landed_on_as_torchdiffeq_does_with_step_t(times):
    """Forwards from noise and backwards from the data: the trajectory and the NFE of each
    sample equal torchdiffeq's for it alone with ``step_t`` at the output times."""
    t0, t1 = times[0], times[-1]
    x0 = noise(6, 9) if t0 < t1 else RING.sample(6, generator=gen(9)).to(F64)
    kw = dict(t0=t0, t1=t1, rtol=1e-6, atol=1e-6, times=times)
    ps = fs.sample(U_RING, x0, "dopri5", step_control=PS, **kw)
    step_t = torch.tensor(times[1:], dtype=F64)
    for i in range(6):
        alone = fs.sample(U_RING, x0[i:i + 1], "dopri5", options={"step_t": step_t}, **kw)
        assert (ps.trajectory[:, i] - alone.trajectory[:, 0]).abs().max() < 1e-12
        assert int(ps.nfe_per_sample[i]) == alone.nfe
    assert ps.trajectory.shape == (4, 6, 2) and torch.equal(ps.trajectory[0], x0)
    assert torch.equal(ps.trajectory[-1], ps.x)


def test_labels_follow_the_samples_still_running():
    """A guided field holds per-sample labels: as samples finish and leave the batch, the
    labels of those still running go with them (GuidedField.rows)."""
    def model(x, t, y):
        return -(1.0 + y[:, None] * x ** 2) * x

    y = torch.tensor([0.0, 9.0, 1.0, 25.0, 4.0], dtype=F64)
    x0 = noise(5, 10)
    field = fs.guided(model, y, w=1.0, null_label=0.0)
    ps = fs.sample(field, x0, "dopri5", rtol=1e-7, atol=1e-7, step_control=PS)
    assert len(set(ps.nfe_per_sample.tolist())) > 2  # samples finished at different calls
    for i in range(5):
        alone = fs.sample(fs.guided(model, y[i:i + 1], w=1.0, null_label=0.0), x0[i:i + 1],
                          "dopri5", rtol=1e-7, atol=1e-7)
        assert (ps.x[i] - alone.x[0]).abs().max() < 1e-12


def test_hutchinson_probes_follow_the_samples_still_running():
    """u = c_i A x, A not diagonal: channel k of sample i integrates e_ki^T (c_i A) e_ki, so a
    probe handed to the wrong sample shows; c_i differs so samples finish apart."""
    a = torch.tensor([[0.3, 1.2], [-0.7, -0.4]], dtype=F64)
    c = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0, 0.2], dtype=F64)

    class Scaled:
        def __init__(self, c):
            self.c = c

        def __call__(self, x, t):
            return self.c[:, None] * (x @ a.T)

        def rows(self, index):
            return Scaled(self.c[index])

    x = noise(6, 11)
    res = fs.log_likelihood(Scaled(c), x, divergence="hutchinson", n_probes=3,
                            generator=gen(5), rtol=1e-9, atol=1e-9, step_control=PS)
    assert len(set(res.nfe_per_sample.tolist())) > 2
    probes = make_probes(x.shape, 3, kind="rademacher", generator=gen(5), dtype=F64)
    quad = torch.einsum("kbi,ij,kbj->kb", probes, a, probes) * c  # (k, B)
    x0 = torch.stack([torch.linalg.matrix_exp(-ci * a) @ xi for ci, xi in zip(c, x, strict=True)])
    prior = -0.5 * (x0 ** 2).sum(1) - math.log(2 * math.pi)
    assert (res.x0 - x0).abs().max() < 1e-7
    assert (res.log_prob - (prior - quad.mean(0))).abs().max() < 1e-7


def test_gradients_flow_through_the_per_sample_steps():
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    x0 = noise(4, 12)
    res = fs.sample(lambda x, t: a * x, x0, "dopri5", rtol=1e-10, atol=1e-10, step_control=PS)
    (grad,) = torch.autograd.grad(res.x.sum(), a)  # x1 = e^a x0: d/da sum x1 = sum x1
    assert abs(float(grad) - float((math.exp(0.7) * x0).sum())) < 1e-7


def test_dataset_nfe_is_per_sample():
    x = _points(10, 13)
    d = fs.dataset_log_likelihood(U_RING, x, batch_size=4, progress=False, rtol=1e-6,
                                  atol=1e-6, step_control=PS)
    whole = fs.log_likelihood(U_RING, x, rtol=1e-6, atol=1e-6, step_control=PS)
    assert (d.log_prob - whole.log_prob).abs().max() <= 1e-12
    assert d.nfe.tolist() == whole.nfe_per_sample.tolist()


def test_refusals_say_what_is_accepted():
    x0 = noise(3, 14)
    with pytest.raises(ValueError, match=r"step_control='bogus'.*shared, per_sample"):
        fs.sample(U_RING, x0, "dopri5", step_control="bogus")
    for solver in ("fehlberg2", "adaptive_heun", "RK45", "rk4"):
        steps = 4 if solver == "rk4" else None
        with pytest.raises(ValueError, match=r"FSAL.*dopri8, dopri5, bosh3|FSAL.*Accepted"):
            fs.sample(U_RING, x0, solver, steps=steps, step_control=PS)
    with pytest.raises(ValueError, match="no adjoint"):
        fs.sample(torch.nn.Linear(2, 2).double(), x0, "dopri5", step_control=PS, adjoint=True)
    with pytest.raises(ValueError, match=r"\['step_t'\].*safety, ifactor"):
        fs.sample(U_RING, x0, "dopri5", step_control=PS, options={"step_t": [0.5]})


def test_failures_name_the_sample():
    x0 = torch.cat([noise(3, 15) * 0.1, torch.tensor([[30.0, 1.0]], dtype=F64)])
    with pytest.raises(IntegrationError, match=r"sample 3 of 4.*max_steps=20") as info:
        fs.sample(stiff, x0, "dopri5", step_control=PS, max_steps=20)
    assert info.value.status == "max_steps"

    def nan_far(x, t):
        return torch.where(x.abs() > 2.0, torch.nan, -x)

    x0 = torch.tensor([[0.1, 0.0], [0.5, 0.2], [3.0, 0.0]], dtype=F64)
    with pytest.raises(NonFiniteStateError, match="sample 2 of 3"):
        fs.sample(nan_far, x0, "dopri5", step_control=PS)


def test_a_field_written_for_one_time_is_refused_not_silently_wrong():
    """``t * x`` with x (b, 2) and a (b,) time broadcasts over the wrong axis when b = 2: the
    solve refuses it (the first row is checked against its own 0-d time) instead of
    returning a wrong answer; with b != 2 it fails on the shape, with the same advice."""
    x0 = noise(2, 16)
    with pytest.raises(ValueError, match=r"another value.*t.reshape\(-1, 1\) \* x"):
        fs.sample(lambda x, t: -t * x, x0, "dopri5", step_control=PS)
    with pytest.raises(RuntimeError) as info:
        fs.sample(lambda x, t: -t * x, noise(5, 16), "dopri5", step_control=PS)
    assert "one per sample" in "".join(getattr(info.value, "__notes__", []))
    # written for a (b,) time, the same field is solved exactly: x_1 = e^{-1/2} x_0
    res = fs.sample(lambda x, t: -t.reshape(-1, 1) * x, x0, "dopri5", rtol=1e-10,
                    atol=1e-10, step_control=PS)
    assert (res.x - math.exp(-0.5) * x0).abs().max() < 1e-9
