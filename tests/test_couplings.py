"""couplings: optimality against POT and scipy, permutations, labels, failure paths."""

import copy
import math
import pickle
import warnings

import numpy as np
import ot
import pytest
import torch
from _cases import batches as _batches
from scipy.optimize import linear_sum_assignment

import flowsolve.training.ot_couplings as ot_module
from flowsolve.training.couplings import (
    COUPLINGS,
    ClassConditionalOT,
    CouplingError,
    CouplingResult,
    CouplingWarning,
    IndependentCoupling,
    OTCoupling,
    PairedCoupling,
    get_coupling,
)

F64 = torch.float64


def _sqcost(x0, x1):
    return ((x0.flatten(1)[:, None] - x1.flatten(1)[None]) ** 2).sum(-1).numpy()


def _emd2(x0, x1):
    c = _sqcost(x0, x1)
    return ot.emd2(np.full(len(c), 1 / len(c)), np.full(c.shape[1], 1 / c.shape[1]), c,
                   numItermax=10**8)


def _ring(gen, n, radius=5.0):
    """8 Gaussians at ``radius`` (std 0.5) and their component labels."""
    k = torch.randint(0, 8, (n,), generator=gen)
    ang = k.to(F64) * (2 * math.pi / 8)
    centre = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return centre + 0.5 * torch.randn(n, 2, generator=gen, dtype=F64), k


# -- exact OT ----------------------------------------------------------------------------
def test_exact_coupling_is_the_optimal_permutation(gen):
    x0, x1 = _batches(gen, 200)
    res = OTCoupling().plan(x0, x1)
    assert isinstance(res, CouplingResult) and res.status == "optimal"
    # a permutation: every x0 once, x1 kept in order
    assert torch.equal(res.i1, torch.arange(200))
    assert torch.equal(torch.sort(res.i0).values, torch.arange(200))
    assert res.marginal_error == 0.0
    pair_cost = (x0[res.i0] - x1[res.i1]).square().sum(1).mean().item()
    optimum = _emd2(x0, x1)
    assert pair_cost == pytest.approx(optimum, rel=1e-12)
    assert res.cost.item() == pytest.approx(optimum, rel=1e-12)
    identity = (x0 - x1).square().sum(1).mean().item()
    assert pair_cost < identity
    # the Hungarian algorithm finds the same assignment (unique optimum for continuous data)
    rows, cols = linear_sum_assignment(_sqcost(x0, x1))
    assert _sqcost(x0, x1)[rows, cols].mean() == pytest.approx(pair_cost, rel=1e-12)
    lsa_row_of_col = np.empty(200, dtype=np.int64)
    lsa_row_of_col[cols] = rows
    assert np.array_equal(res.i0.numpy(), lsa_row_of_col)


def test_exact_coupling_in_1d_is_the_sorted_matching(gen):
    x0, x1 = _batches(gen, 100, d=1)
    x0c, x1c = OTCoupling()(x0, x1)
    assert x1c is x1
    # monotone rearrangement: the k-th smallest x0 goes with the k-th smallest x1
    assert torch.equal(torch.argsort(x0c[:, 0]), torch.argsort(x1c[:, 0]))


def test_extras_travel_with_their_samples(gen):
    x0 = torch.randn(48, 1, 4, 4, generator=gen, dtype=F64)  # image-shaped events
    x1 = torch.randn(48, 1, 4, 4, generator=gen, dtype=F64) + 1
    y1, w1 = torch.arange(48), torch.rand(48, 3, generator=gen)
    for keep in ("x1", "x0"):
        x0c, x1c, y1c, w1c = OTCoupling(keep=keep)(x0, x1, y1, w1)
        assert torch.equal(x1c, x1[y1c]) and torch.equal(w1c, w1[y1c])
        if keep == "x0":
            assert torch.equal(x0c, x0) and not torch.equal(y1c, y1)
    res = OTCoupling(keep="x0").plan(x0, x1)
    cost = (res.take0(x0) - res.take1(x1)).flatten(1).square().sum(1).mean().item()
    assert cost == pytest.approx(_emd2(x0, x1), rel=1e-12)
    assert torch.equal(res.take0(torch.arange(48)), torch.arange(48))


@pytest.mark.parametrize("keep,n,m", [("x1", 80, 50), ("x0", 50, 80)])
def test_unequal_batches_draw_pairs_from_the_optimal_plan(keep, n, m):
    gen = torch.Generator().manual_seed(7)
    x0, x1 = _batches(gen, n, m)
    coupling = OTCoupling(keep=keep)
    res = coupling.plan(x0, x1, generator=torch.Generator().manual_seed(3))
    assert res.cost.item() == pytest.approx(_emd2(x0, x1), rel=1e-12)
    kept = res.i1 if keep == "x1" else res.i0
    assert torch.equal(kept, torch.arange(len(kept)))
    assert bool((res.plan[res.i0, res.i1] > 0).all())  # every pair in the plan's support
    again = coupling.plan(x0, x1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(res.i0, again.i0) and torch.equal(res.i1, again.i1)


def test_exact_iteration_limit_warns_once_and_recovers(gen):
    x0, x1 = _batches(gen, 64)
    coupling = OTCoupling(max_iter=50)
    with pytest.warns(CouplingWarning, match=r"max_iter=50 .*64x64.*max_iter=5000"):
        res = coupling.plan(x0, x1)
    assert res.status == "optimal_after_retry"
    assert res.cost.item() == pytest.approx(_emd2(x0, x1), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per coupling object
        assert coupling.plan(x0, x1).status == "optimal_after_retry"


def test_exact_iteration_limit_raises_when_the_retry_fails_too(gen):
    x0, x1 = _batches(gen, 300)
    with pytest.warns(CouplingWarning), pytest.raises(
            CouplingError, match=r"300x300 batch: result code 3 \(max_iter_reached\) with "
                                 r"max_iter=100; marginal error"):
        OTCoupling(max_iter=1).plan(x0, x1)


@pytest.mark.slow
def test_exact_coupling_is_optimal_where_pots_default_limit_stops_early():
    gen = torch.Generator().manual_seed(0)
    x0, x1 = _batches(gen, 3072)
    c = _sqcost(x0, x1)
    u = np.full(3072, 1 / 3072)
    with pytest.warns(UserWarning, match="numItermax reached"):
        _, log = ot.emd(u, u, c, log=True)  # POT's default numItermax = 1e5
    assert log["result_code"] == 3
    res = OTCoupling().plan(x0, x1)
    assert res.status == "optimal"
    assert res.cost.item() == pytest.approx(ot.emd2(u, u, c, numItermax=10**8), rel=1e-12)
    assert res.cost.item() < log["cost"]


# -- entropic OT -------------------------------------------------------------------------
def test_sinkhorn_cost_tends_to_exact_as_reg_shrinks_and_to_independent_as_it_grows(gen):
    x0, x1 = _batches(gen, 32)
    exact = _emd2(x0, x1)
    independent = _sqcost(x0, x1).mean()
    costs = []
    for reg in (1.0, 0.1, 0.01, 0.002):
        res = OTCoupling("sinkhorn", reg=reg, max_iter=20_000).plan(x0, x1, generator=gen)
        assert res.status == "converged" and res.marginal_error <= 1e-4
        costs.append(res.cost.item())
    assert all(a > b for a, b in zip(costs, costs[1:], strict=False))
    assert costs[-1] == pytest.approx(exact, rel=5e-3)
    wide = OTCoupling("sinkhorn", reg=1e4).plan(x0, x1, generator=gen)
    assert torch.allclose(wide.plan, torch.full((32, 32), 1 / 32**2, dtype=F64), rtol=1e-3)
    assert wide.cost.item() == pytest.approx(independent, rel=1e-3)


def test_sinkhorn_does_not_underflow_where_plain_sinkhorn_does(gen):
    # torchcfm's regime: 8 Gaussians (radius 5) vs N(0, I), unnormalised cost, reg 0.02:
    # plain Sinkhorn's kernel exp(-C / reg) underflows (POT warns of numerical errors).
    x1, _ = _ring(gen, 128)
    x0 = torch.randn(128, 2, generator=gen, dtype=F64)
    c, u = _sqcost(x0, x1), np.full(128, 1 / 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ot.sinkhorn(u, u, c, 0.02)
    assert caught  # POT's plain Sinkhorn is in trouble here
    res = OTCoupling("sinkhorn", reg=0.02, normalize=None, max_iter=5000).plan(
        x0, x1, generator=gen)
    assert res.status == "converged"
    assert res.cost.item() == pytest.approx(_emd2(x0, x1), rel=1e-3)
    assert res.cost.item() < 0.6 * c.mean()  # independent pairing costs c.mean()


def test_kernel_and_log_domain_sinkhorn_give_the_same_plan(gen):
    # SB-CFM's regime (reg = 2 sigma^2 = 2 on the unnormalised cost, pair costs ~30): the
    # kernel does not underflow, so "auto" iterates on it; the fixed point is the log domain's.
    x1, _ = _ring(gen, 96)
    x0 = torch.randn(96, 2, generator=gen, dtype=F64)
    kw = dict(reg=2.0, normalize=None, tol=1e-9, max_iter=20_000)
    fast = OTCoupling("sinkhorn", **kw).plan(x0, x1, generator=gen)
    slow = OTCoupling("sinkhorn", domain="log", **kw).plan(x0, x1, generator=gen)
    assert (fast.solver, slow.solver) == ("sinkhorn_knopp", "sinkhorn_log")
    assert fast.marginal_error <= 1e-9 and slow.marginal_error <= 1e-9
    assert torch.allclose(fast.plan, slow.plan, rtol=0, atol=1e-9 / 96)
    # and it is POT's entropic optimum: the plan of ot.sinkhorn on the same problem
    ref = ot.sinkhorn(np.full(96, 1 / 96), np.full(96, 1 / 96), _sqcost(x0, x1), 2.0,
                      numItermax=20_000, stopThr=1e-12)
    assert np.abs(fast.plan.numpy() - ref).max() < 1e-9 / 96


def test_auto_domain_uses_the_log_domain_where_the_kernel_underflows(gen):
    x1, _ = _ring(gen, 128)
    x0 = torch.randn(128, 2, generator=gen, dtype=F64)
    c = _sqcost(x0, x1)
    # reg 0.02 on costs of ~30: some rows of exp(-C / reg) are below sqrt(tiny) everywhere
    assert (c.min(1) / 0.02).max() > -0.5 * np.log(np.finfo(np.float64).tiny)
    res = OTCoupling("sinkhorn", reg=0.02, normalize=None, max_iter=5000).plan(
        x0, x1, generator=gen)
    assert res.solver == "sinkhorn_log" and res.status == "converged"
    assert np.isfinite(res.plan.numpy()).all()


def test_a_kernel_that_underflows_mid_solve_hands_over_to_the_log_domain():
    # every row and column has a zero-cost partner, so the kernel passes the entry check, but
    # the optimum moves x0[0], x0[1] -> x1[1], x1[2] at cost 1, whose kernel entries
    # exp(-800) underflow
    x0 = torch.tensor([[0.0], [0.0], [1.0]], dtype=F64)
    x1 = torch.tensor([[0.0], [1.0], [1.0]], dtype=F64)
    res = OTCoupling("sinkhorn", reg=1 / 800, normalize=None, max_iter=5000).plan(x0, x1)
    assert res.solver == "sinkhorn_log" and res.status == "converged"
    ref = ot.sinkhorn(np.full(3, 1 / 3), np.full(3, 1 / 3), _sqcost(x0, x1), 1 / 800,
                      method="sinkhorn_log", numItermax=5000, stopThr=1e-10)
    assert np.abs(res.plan.numpy() - ref).max() < 1e-4


# x0 = (0, 0, 1), x1 = (0, 1, 1), reg 1/800: every row and column has a zero-cost partner, but
# the kernel entries of cost 1, exp(-800), are 0 in float64, and the optimum needs one of them
_X0_3 = torch.tensor([[0.0], [0.0], [1.0]], dtype=F64)
_X1_3 = torch.tensor([[0.0], [1.0], [1.0]], dtype=F64)
_U3 = torch.full((3,), 1 / 3, dtype=F64)


def test_pots_numerical_error_exit_is_read_from_its_warning_on_the_last_iteration_too():
    c = torch.cdist(_X0_3, _X1_3).square()
    # the kernel's iterates break down at iteration 1024 (POT's "numerical errors at
    # iteration 1023", counted from 0): a limit of 1024 ends there with n_iter == max_iter,
    # which could not be told from running out of iterations by the count
    plan, n_iter, err, numerical = ot_module._sinkhorn_pot(
        _U3, _U3, c, 1 / 800, "sinkhorn", 1024, 1e-4)
    assert (n_iter, numerical) == (1024, True) and err > 1
    plan, n_iter, err, numerical = ot_module._sinkhorn_pot(
        _U3, _U3, c, 1 / 800, "sinkhorn", 1000, 1e-4)
    assert (n_iter, numerical) == (1000, False) and err > 0.5  # merely out of iterations


@pytest.mark.parametrize("max_iter", [None, 1023, 1024])
def test_a_kernel_with_underflowed_entries_hands_over_when_it_runs_out_of_iterations(max_iter):
    """The kernel with entries that underflowed to 0 solves another problem (here an
    infeasible one: its marginal error stays 0.67) and runs out of iterations (default
    1000, 1023) or breaks down on the last one (1024); the log domain, not the same
    iterates there, converges in 591. Before, both ended in the exact fallback."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        res = OTCoupling("sinkhorn", reg=1 / 800, normalize=None, max_iter=max_iter).plan(
            _X0_3, _X1_3)
    assert res.status == "converged" and res.solver == "sinkhorn_log"
    assert res.n_iter == 591 and res.marginal_error <= 1e-4
    ref = ot.sinkhorn(np.full(3, 1 / 3), np.full(3, 1 / 3), _sqcost(_X0_3, _X1_3), 1 / 800,
                      method="sinkhorn_log", numItermax=5000, stopThr=1e-10)
    assert np.abs(res.plan.numpy() - ref).max() < 1e-4
    # a third of the mass on the entries of cost 1, where the kernel is 0
    assert res.plan[:2, 1:].sum().item() == pytest.approx(1 / 3, abs=1e-4)


def test_a_kernel_that_merely_runs_out_of_iterations_is_not_retried_in_the_log_domain(
        monkeypatch):
    # no entry of the kernel underflows (cn / reg <= 342 < -log(tiny) = 708): the log domain
    # would repeat the kernel's iterates, so the fallback follows the kernel at once
    gen = torch.Generator().manual_seed(0)
    x0, x1 = _batches(gen, 256)
    c = torch.cdist(x0, x1).square()
    assert (c / c.mean()).max() / 0.01 < -math.log(torch.finfo(F64).tiny)
    calls = []

    def counted(*args):
        calls.append(args[4])
        return solve(*args)

    solve = ot_module._sinkhorn_pot
    monkeypatch.setattr(ot_module, "_sinkhorn_pot", counted)
    with pytest.warns(CouplingWarning, match=r"Sinkhorn \(sinkhorn_knopp\) did not converge .* "
                                             r"after 10 iterations \(max_iter=10\)"):
        res = OTCoupling("sinkhorn", reg=0.01, max_iter=10).plan(x0, x1, generator=gen)
    assert calls == ["sinkhorn"]  # no log-domain solve
    assert res.status == "fallback_exact"
    assert res.cost.item() == pytest.approx(_emd2(x0, x1), rel=1e-12)
    # which would have been spent for nothing: it does not converge either
    calls.clear()
    with pytest.raises(CouplingError, match=r"sinkhorn_log\) did not converge"):
        OTCoupling("sinkhorn", reg=0.01, max_iter=10, domain="log", fallback=None).plan(x0, x1)
    assert calls == ["sinkhorn_log"]


def _fallback_that_needs_the_emd_retry(monkeypatch, device):
    """Sinkhorn fails (20 log-domain iterations at reg 1e-3 on the raw cost), the exact
    fallback's first ot.emd reports its iteration limit (result code 3, faked once) and the
    100x retry succeeds."""
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(128, 2, generator=gen, device=device, dtype=F64)
    x1 = torch.randn(100, 2, generator=gen, device=device, dtype=F64) + 3
    emd, limits = ot_module._emd, []

    def once_at_its_limit(a, b, c, limit):
        limits.append(limit)
        plan, code = emd(a, b, c, limit)
        return plan, (3 if len(limits) == 1 else code)

    monkeypatch.setattr(ot_module, "_emd", once_at_its_limit)
    coupling = OTCoupling("sinkhorn", reg=1e-3, normalize=None, max_iter=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = coupling.plan(x0, x1, generator=torch.Generator(device=device).manual_seed(1))
    assert limits == [100_000, 10_000_000]
    # still the Sinkhorn fallback (not "optimal_after_retry"), its plan where an entropic
    # plan would be, and pairs drawn from it
    assert (res.status, res.method, res.solver) == ("fallback_exact", "sinkhorn",
                                                    "network_simplex")
    assert res.plan.device == x0.device and res.plan.dtype == F64
    # the warnings tell both: Sinkhorn failed, and the fallback's solve was repeated
    messages = [str(w.message) for w in caught if issubclass(w.category, CouplingWarning)]
    assert len(messages) == 2 and messages[0].startswith("Sinkhorn (sinkhorn_log) did not")
    assert messages[1].startswith("ot.emd (the exact fallback of Sinkhorn) stopped at "
                                  "max_iter=100000 before optimality (result code 3) on a "
                                  "128x100 batch; re-solving with max_iter=10000000.")
    assert res.i0.device == x0.device and torch.equal(res.i1.cpu(), torch.arange(100))
    assert bool((res.plan[res.i0, res.i1] > 0).all())
    best = _emd2(x0.cpu(), x1.cpu())
    assert res.cost.item() == pytest.approx(best, rel=1e-12)
    return res


def test_a_sinkhorn_fallback_whose_exact_solve_is_retried_stays_a_fallback(monkeypatch):
    _fallback_that_needs_the_emd_retry(monkeypatch, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_retried_sinkhorn_fallback_stays_on_the_gpu(monkeypatch):
    res = _fallback_that_needs_the_emd_retry(monkeypatch, "cuda")
    assert res.plan.device.type == "cuda" and res.i0.device.type == "cuda"


def test_sinkhorn_on_float32_inputs_solves_in_float64_and_costs_in_float32(gen):
    x0, x1 = _batches(gen, 24, dtype=torch.float32)
    res = OTCoupling("sinkhorn", reg=0.1).plan(x0, x1, generator=gen)
    assert res.plan.dtype == F64 and res.cost.dtype == torch.float32
    ref = OTCoupling("sinkhorn", reg=0.1).plan(x0.double(), x1.double(), generator=gen)
    assert res.cost.item() == pytest.approx(ref.cost.item(), rel=1e-5)
    # out of iterations on the kernel: straight to the fallback (the log domain would repeat
    # the same iterates), the message naming the kernel solver
    with pytest.warns(CouplingWarning, match=r"Sinkhorn \(sinkhorn_knopp\) did not converge"):
        fell = OTCoupling("sinkhorn", reg=0.05, max_iter=2).plan(x0, x1, generator=gen)
    assert fell.status == "fallback_exact" and fell.cost.dtype == torch.float32
    assert fell.plan.dtype == F64 and fell.cost.item() == pytest.approx(_emd2(x0, x1),
                                                                         rel=1e-5)


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_float32_batches_far_from_the_origin_are_coupled_as_in_float64(method, gen):
    """Both batches offset by 300 in float32: a float32 cost matrix (cdist's |a|^2 + |b|^2 -
    2 a.b) cancels to ~1e-2: the exact pairing came out above the optimum (here by 2e-4,
    on other draws by 1%), with a reported cost below it (here by 1e-4). The cost is now
    computed in float64 on the float32 points: the pairing is POT's optimum to 1e-12, and
    the reported cost (float32) is the plan's float64 cost to float32 round-off, never below
    the optimum beyond it."""
    x0, x1 = _batches(gen, 256, dtype=torch.float32)
    x0, x1 = x0 + 300, x1 + 300
    c = _sqcost(x0.double(), x1.double())  # exact differences of the float32 points
    optimum = _emd2(x0.double(), x1.double())
    res = OTCoupling(method, reg=0.01).plan(x0, x1, generator=gen)
    assert res.cost.dtype == torch.float32
    plan_cost = float((res.plan.double().numpy() * c).sum())
    assert res.cost.item() == pytest.approx(plan_cost, rel=1e-6)
    assert res.cost.item() >= optimum * (1 - 1e-6)
    if method == "exact":
        pairs = (x0[res.i0].double() - x1[res.i1].double()).square().sum(1).mean().item()
        assert pairs == pytest.approx(optimum, rel=1e-12)
    else:
        assert res.status == "converged" and plan_cost > optimum


def test_exact_and_class_conditional_results_name_their_solver(gen):
    x0, x1 = _batches(gen, 12)
    assert OTCoupling("exact").plan(x0, x1).solver == "network_simplex"
    y = torch.arange(12) % 3
    res = ClassConditionalOT("sinkhorn", reg=0.5).plan(x0, x1, y, y0=y, generator=gen)
    assert res.solver == "sinkhorn_knopp"


def test_non_converging_sinkhorn_warns_and_falls_back_to_the_exact_plan(gen):
    x0, x1 = _batches(gen, 40)
    coupling = OTCoupling("sinkhorn", reg=1e-3, max_iter=20)
    with pytest.warns(CouplingWarning, match=r"40x40 batch: marginal error .* > tol=0.0001 "
                                             r"after 20 iterations .* reg=0.001"):
        res = coupling.plan(x0, x1, generator=gen)
    assert res.status == "fallback_exact" and res.method == "sinkhorn"
    assert res.cost.item() == pytest.approx(_emd2(x0, x1), rel=1e-12)
    assert torch.equal(torch.sort(res.i0).values, torch.arange(40))
    with pytest.raises(CouplingError, match="did not converge"):
        OTCoupling("sinkhorn", reg=1e-3, max_iter=20, fallback=None).plan(x0, x1)


def test_sinkhorn_pairs_are_reproducible_with_a_seeded_generator(gen):
    x0, x1 = _batches(gen, 64, d=3)
    coupling = OTCoupling("sinkhorn", reg=0.5)
    a = coupling(x0, x1, generator=torch.Generator().manual_seed(11))[0]
    b = coupling(x0, x1, generator=torch.Generator().manual_seed(11))[0]
    c = coupling(x0, x1, generator=torch.Generator().manual_seed(12))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sinkhorn_pairs_follow_the_plan(gen):
    # each x1[j] gets x0[i] with probability plan[i, j] / sum_i plan[i, j]; 2000 draws
    x0, x1 = _batches(gen, 5)
    coupling = OTCoupling("sinkhorn", reg=0.5)
    plan = coupling.plan(x0, x1, generator=gen).plan
    draws = torch.stack([coupling.plan(x0, x1, generator=gen).i0 for _ in range(2000)])
    freq = torch.stack([(draws == i).double().mean(0) for i in range(5)])  # (i, j)
    p = plan / plan.sum(0, keepdim=True)
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / 2000).sqrt() + 1e-12).all())
    assert p.min() > 0.01  # a diffuse plan, so every entry is exercised


# -- class-conditional OT ----------------------------------------------------------------
def test_class_conditional_never_crosses_labels_and_is_optimal_per_class(gen):
    x1, y1 = _ring(gen, 96)
    x0 = torch.randn(96, 2, generator=gen, dtype=F64)
    res = ClassConditionalOT().plan(x0, x1, y1, generator=gen)
    assert torch.equal(res.i1, torch.arange(96))
    assert torch.equal(torch.sort(res.i0).values, torch.arange(96))
    total = 0.0
    for k in y1.unique():
        cols = torch.nonzero(y1 == k).squeeze(1)
        rows = res.i0[cols]
        mine = (x0[rows] - x1[cols]).square().sum(1).mean().item()
        assert mine == pytest.approx(_emd2(x0[rows], x1[cols]), rel=1e-12)
        assert res.plan[:, cols][rows].sum().item() == pytest.approx(len(cols) / 96)
        total += len(cols) / 96 * mine
    assert res.cost.item() == pytest.approx(total, rel=1e-12)
    assert res.cost.item() >= _emd2(x0, x1)  # a constraint can only cost more


def test_class_conditional_with_source_labels(gen):
    x1, y1 = _ring(gen, 60)
    x0, y0 = _ring(gen, 75, radius=1.0)
    for method in ("exact", "sinkhorn"):
        x0c, x1c, y1c = ClassConditionalOT(method)(x0, x1, y1, y0=y0, generator=gen)
        res = ClassConditionalOT(method).plan(x0, x1, y1, y0=y0, generator=gen)
        assert torch.equal(y0[res.i0], y1[res.i1]) and torch.equal(y1c, y1)
    with pytest.raises(ValueError, match="same labels"):
        ClassConditionalOT()(x0, x1, y1, y0=torch.zeros(75, dtype=torch.long))
    with pytest.raises(ValueError, match="one batch size"):
        ClassConditionalOT()(x0, x1, y1)
    with pytest.raises(TypeError, match="labels of x1"):
        ClassConditionalOT()(x0, x1)


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_class_conditional_marginals_when_the_class_proportions_differ(method, gen):
    """y0 with class proportions (1/3, 2/3), y1 with (2/3, 1/3): the block plan's row
    marginal is (M_c / M) / N_c = 2/3 on the one x0 of class 0 and 1/6 on each of the two of
    class 1, not uniform (L1 distance 2/3); marginal_error is measured against these targets
    and the uniform column marginal, recomputed here from the plan."""
    x0, x1 = _batches(gen, 3)
    y0, y1 = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    res = ClassConditionalOT(method, reg=0.5).plan(x0, x1, y1, y0=y0, generator=gen)
    rows, cols = res.plan.sum(1), res.plan.sum(0)
    target = torch.tensor([2 / 3, 1 / 6, 1 / 6], dtype=F64)
    assert torch.allclose(rows, target, atol=1e-4, rtol=0)
    assert torch.allclose(cols, torch.full((3,), 1 / 3, dtype=F64), atol=1e-4, rtol=0)
    assert (rows - 1 / 3).abs().sum().item() == pytest.approx(2 / 3, abs=1e-4)
    err = ((rows - target).abs().sum() + (cols - 1 / 3).abs().sum()).item()
    assert res.marginal_error == pytest.approx(err, rel=1e-9, abs=1e-15)
    assert res.marginal_error <= 1e-4


# -- independent, paired, registry, pickling ---------------------------------------------
def test_independent_and_paired(gen):
    x0, x1 = _batches(gen, 20)
    assert torch.equal(IndependentCoupling()(x0, x1)[0], x0)
    shuffled = IndependentCoupling()(x0, x1, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(torch.sort(shuffled[:, 0]).values, torch.sort(x0[:, 0]).values)
    assert not torch.equal(shuffled, x0)
    x0c, x1c = PairedCoupling()(x0, x1)
    assert x0c is x0 or torch.equal(x0c, x0)
    with pytest.raises(ValueError, match="one batch size"):
        PairedCoupling()(x0[:5], x1)
    with pytest.raises(ValueError, match="N=5 < M=20"):
        IndependentCoupling()(x0[:5], x1)


def test_registry_and_argument_errors(gen):
    assert set(COUPLINGS) == {"independent", "paired", "ot", "class_ot", "conditional_ot",
                              "unbalanced_ot", "partial_ot"}
    assert get_coupling("ot", method="sinkhorn", reg=0.1).reg == 0.1
    with pytest.raises(ValueError, match="unknown coupling 'emd'; accepted: independent"):
        get_coupling("emd")
    with pytest.raises(ValueError, match=r"method must be one of \('exact', 'sinkhorn'\)"):
        OTCoupling("hungarian")
    with pytest.raises(ValueError, match="reg must be a positive"):
        OTCoupling("sinkhorn", reg=0)
    x0, x1 = _batches(gen, 10)
    with pytest.raises(ValueError, match="same number of entries"):
        OTCoupling()(x0, torch.randn(10, 3, generator=gen))
    with pytest.raises(ValueError, match=r"extras\[0\] must be a per-sample tensor of x1"):
        OTCoupling()(x0, x1, torch.arange(9))
    with pytest.raises(ValueError, match="finite"):
        OTCoupling()(x0, torch.full((10, 2), float("nan"), dtype=F64))


def test_one_dimensional_batches_are_batches_of_scalar_samples(gen):
    """``(B,)`` is ``(B, *event_shape)`` with ``event_shape = ()``, as in the bridges, losses
    and metrics: B points on the line, coupled as ``(B, 1)`` would be, returned as ``(B,)``
    (this raised an IndexError from ``flatten(1)``)."""
    x0 = torch.randn(9, generator=gen, dtype=F64)
    x1 = torch.randn(9, generator=gen, dtype=F64) + 2
    for coupling in (OTCoupling("exact"), OTCoupling("sinkhorn", reg=0.1),
                     IndependentCoupling(), PairedCoupling()):
        flat = coupling.plan(x0, x1, generator=torch.Generator().manual_seed(5))
        col = coupling.plan(x0[:, None], x1[:, None], generator=torch.Generator().manual_seed(5))
        assert torch.equal(flat.i0, col.i0) and torch.equal(flat.i1, col.i1)
        assert flat.status == col.status != "fallback_exact"
        x0c, x1c = coupling(x0, x1, generator=torch.Generator().manual_seed(5))
        assert x0c.shape == x1c.shape == (9,) and torch.equal(x0c, x0[flat.i0])
    # exact OT on the line is the sorted matching (squared cost)
    x0c, x1c = OTCoupling("exact")(x0, x1)
    assert torch.equal(torch.argsort(x0c), torch.argsort(x1c))
    y = torch.arange(9) % 2
    x0c, x1c, yc = ClassConditionalOT("exact")(x0, x1, y, y0=y.flip(0))
    assert x0c.shape == (9,) and torch.equal(yc, y)
    src = torch.nonzero(x0c[:, None] == x0[None])[:, 1]  # x0's index of each pair
    assert torch.equal(y.flip(0)[src], y)  # labels matched
    for bad in (torch.tensor(1.0), torch.empty(0), torch.empty(0, 2)):
        with pytest.raises(TypeError, match=r"shaped \(B, \*event_shape\) with B >= 1"):
            OTCoupling()(bad, bad)


def test_custom_cost_and_float32(gen):
    x0, x1 = _batches(gen, 30, dtype=torch.float32)
    res = OTCoupling(cost="euclidean").plan(x0, x1)
    c = torch.cdist(x0.double(), x1.double()).numpy()
    u = np.full(30, 1 / 30)
    assert res.cost.dtype == torch.float32
    assert res.cost.item() == pytest.approx(ot.emd2(u, u, c), rel=1e-5)
    l1 = OTCoupling(cost=lambda a, b: torch.cdist(a, b, p=1)).plan(x0, x1)
    assert l1.cost.item() == pytest.approx(ot.emd2(u, u, torch.cdist(x0, x1, p=1).double()
                                                   .numpy()), rel=1e-5)


def test_a_callable_cost_gets_the_inputs_dtype_and_is_solved_in_float64(gen):
    """A learned cost holds a float32 model: it is called with the float32 batches (not
    float64, which a float32 nn.Linear refuses), and the exact pairing is optimal for it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        feat = torch.nn.Linear(2, 4)  # float32, parameters requiring grad
    seen = []

    def cost(a, b, feat=feat):
        seen.append((a.dtype, b.dtype))
        return torch.cdist(feat(a), feat(b)).square()

    x0, x1 = _batches(gen, 16, dtype=torch.float32)
    with torch.no_grad():
        c = cost(x0, x1).double()
    u = np.full(16, 1 / 16)
    best = ot.emd2(u, u, c.numpy())
    seen.clear()
    res = OTCoupling("exact", cost=cost).plan(x0, x1)
    assert seen == [(torch.float32, torch.float32)]
    assert res.cost.dtype == torch.float32 and not res.cost.requires_grad
    assert res.cost.item() == pytest.approx(best, rel=1e-6)
    assert sorted(res.i0.tolist()) == list(range(16))  # a permutation ...
    assert c[res.i0, res.i1].mean().item() == pytest.approx(best, rel=1e-12)  # ... optimal
    x0c, x1c = OTCoupling("exact", cost=cost)(x0, x1)
    assert torch.equal(x0c, x0[res.i0]) and torch.equal(x1c, x1)
    ent = OTCoupling("sinkhorn", cost=cost, reg=0.01).plan(x0, x1, generator=gen)
    assert ent.status == "converged" and ent.plan.dtype == F64
    assert ent.marginal_error <= 1e-4
    assert best - 1e-6 <= ent.cost.item() <= 1.1 * best  # near the optimum, not below it
    # float16 batches come as float32; float64 ones reach a float64 feature map in float64
    seen.clear()
    OTCoupling(cost=cost).plan(x0.half(), x1.half())
    feat64 = copy.deepcopy(feat).double()
    OTCoupling(cost=lambda a, b: cost(a, b, feat64)).plan(x0.double(), x1.double())
    assert seen == [(torch.float32, torch.float32), (F64, F64)]


def test_couplings_pickle_for_dataloader_workers(gen):
    x0, x1 = _batches(gen, 40)
    coupling = pickle.loads(pickle.dumps(OTCoupling("sinkhorn", reg=0.2)))
    a = coupling(x0, x1, generator=torch.Generator().manual_seed(1))
    b = OTCoupling("sinkhorn", reg=0.2)(x0, x1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sinkhorn_stays_on_the_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(512, 2, generator=gen, device="cuda")
    x1 = 0.5 * torch.randn(512, 2, generator=gen, device="cuda") + 3
    res = OTCoupling("sinkhorn").plan(x0, x1, generator=gen)
    assert res.plan.device.type == "cuda" and res.i0.device.type == "cuda"
    exact = OTCoupling().plan(x0, x1)
    assert exact.i0.device.type == "cuda" and exact.plan.device.type == "cpu"
    assert res.cost.item() == pytest.approx(exact.cost.item(), rel=0.1)
    with pytest.raises(ValueError, match="generator must be on cuda"):
        OTCoupling("sinkhorn").plan(x0, x1, generator=torch.Generator())


@pytest.mark.parametrize("coupling", [IndependentCoupling(), PairedCoupling(),
                                      OTCoupling("exact"), OTCoupling("sinkhorn", reg=0.5),
                                      ClassConditionalOT()],
                         ids=["independent", "paired", "exact", "sinkhorn", "class"])
@pytest.mark.parametrize("generator", [7, "seed", np.random.default_rng(0)],
                         ids=["int", "str", "numpy"])
def test_a_generator_that_is_not_a_torch_generator_is_refused(coupling, generator):
    """An int seed (or a NumPy generator) was an AttributeError deep inside the draw."""
    x0, x1 = torch.randn(6, 2, dtype=F64), torch.randn(6, 2, dtype=F64)
    extras = (torch.arange(6) % 2,) if isinstance(coupling, ClassConditionalOT) else ()
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got"):
        coupling(x0, x1, *extras, generator=generator)


_OVERFLOWING = [OTCoupling("exact"), OTCoupling("sinkhorn", reg=0.1),
                OTCoupling("sinkhorn", fallback=None), OTCoupling("sinkhorn", normalize=None),
                OTCoupling("exact", cost="euclidean"), ClassConditionalOT("exact")]


@pytest.mark.parametrize("coupling", _OVERFLOWING,
                         ids=["exact", "sinkhorn", "no-fallback", "unnormalised", "euclidean",
                              "class"])
def test_a_cost_that_overflows_is_named_an_overflow_not_non_finite_data(coupling, gen):
    """Finite points near 1e200 have squared distances beyond float64's range: the cost
    matrix overflows. That was reported as "x0 and x1 must be finite" (exact, and Sinkhorn
    through its exact fallback) or as a Sinkhorn that "did not converge" after 2000
    iterations (fallback=None)."""
    x0, x1 = _batches(gen, 10)
    extras = (torch.arange(10) % 2,) if isinstance(coupling, ClassConditionalOT) else ()
    for a, b, k in ((1e200 * x0, 1e200 * x1, 100), (x0, torch.cat([x1[:9], 1e200 * x1[9:]]), 10)):
        with pytest.raises(ValueError) as info:
            coupling.plan(a, b, *extras)
        says = str(info.value)
        assert "cost matrix overflowed" in says and "Rescale the data" in says, says
        assert "x0 and x1 are finite" in says and "float64" in says, says
        if not extras:
            assert f"{k} of the 10x10" in says, says
    # non-finite points are named as such, per side, with their count
    bad = x1.clone()
    bad[2, 1], bad[5, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"x0 and x1 must be finite; got 2 non-finite "
                                         r"entries in x1 \(none in x0\)"):
        coupling.plan(x0, bad, *extras)


def test_a_callable_cost_that_returns_non_finite_values_is_named(gen):
    x0, x1 = _batches(gen, 8)
    cost = lambda a, b: torch.cdist(a, b).square() * torch.inf  # noqa: E731
    with pytest.raises(ValueError, match=r"cost returned 64 non-finite entries \(of 8x8\) on "
                                         r"finite x0 and x1"):
        OTCoupling("exact", cost=cost).plan(x0, x1)


def test_settings_are_those_that_decide_the_pairs():
    """What a training checkpoint records of a coupling: Sinkhorn's settings only where
    Sinkhorn runs."""
    full = {"method": "sinkhorn", "cost": "euclidean", "reg": 0.1, "normalize": "mean",
            "max_iter": None, "tol": 1e-4, "keep": "x1", "fallback": "exact", "domain": "auto"}
    for cls in (OTCoupling, ClassConditionalOT):
        assert cls("sinkhorn", cost="euclidean", reg=0.1).settings() == full
        assert cls("exact", reg=0.1, max_iter=7).settings() == {
            "method": "exact", "cost": "sqeuclidean", "max_iter": 7, "keep": "x1"}
    assert IndependentCoupling().settings() == PairedCoupling().settings() == {}
