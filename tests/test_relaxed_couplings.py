"""Unbalanced, partial and conditional OT couplings: against POT's own solvers and an
assignment solver on small problems, their limits (reg_m -> inf: balanced Sinkhorn; m = 1:
exact OT; cost_weight 0: OTCoupling, large: ClassConditionalOT), the measured crossing of
conditions, the draw of pairs from a plan, and every refusal."""

import math
import pickle
import warnings

import numpy as np
import ot
import pytest
import torch
from _cases import batches
from scipy.optimize import linear_sum_assignment

from flowsolve.training.couplings import (
    ClassConditionalOT,
    ConditionalOT,
    CouplingError,
    CouplingWarning,
    OTCoupling,
    PartialOTCoupling,
    UnbalancedOTCoupling,
    get_coupling,
)
from flowsolve.training.pipeline import BatchProducer

F64 = torch.float64


def _normalised_cost(x0, x1):
    c = ((x0[:, None] - x1[None]) ** 2).sum(-1).numpy()
    return c, c / c.mean()


def _uniform(n):
    return np.full(n, 1.0 / n)


# -- unbalanced OT -------------------------------------------------------------------------
def test_unbalanced_plan_is_pots_and_the_optimum_of_the_relaxed_problem(gen):
    x0, x1 = batches(gen, 48, 40)
    c, cn = _normalised_cost(x0, x1)
    a, b = _uniform(48), _uniform(40)
    # POT's translation-invariant iterations, and its plain generalised Sinkhorn (another
    # algorithm, the same optimum), both run to 1e-13
    pot = ot.unbalanced.sinkhorn_unbalanced(a, b, cn, 0.05, 1.0,
                                            method="sinkhorn_translation_invariant",
                                            numItermax=10_000, stopThr=1e-13)
    plain = ot.unbalanced.sinkhorn_unbalanced(a, b, cn, 0.05, 1.0, method="sinkhorn",
                                              numItermax=100_000, stopThr=1e-13)
    tight = UnbalancedOTCoupling(0.05, 1.0, tol=1e-11).plan(x0, x1, generator=gen)
    assert np.abs(tight.plan.numpy() - pot).max() < 1e-10 * pot.max()  # tol is relative
    assert np.abs(tight.plan.numpy() - plain).sum() < 1e-9
    # at the default tol (1e-5, relative): within 1e-5 of the optimum's mass
    res = UnbalancedOTCoupling(0.05, 1.0).plan(x0, x1, generator=gen)
    assert np.abs(res.plan.numpy() - pot).sum() < 1e-5 * pot.sum()
    assert (res.status, res.method, res.kept) == ("converged", "unbalanced_sinkhorn", None)
    assert res.residual <= 1e-5 and 0 < res.n_iter < 100
    # what is reported is what the plan says: mass below 1, marginals off uniform
    plan = res.plan.numpy()
    assert res.mass == pytest.approx(plan.sum(), rel=1e-14) and 0.5 < res.mass < 0.8
    dev = (np.abs(plan.sum(1) - a).sum(), np.abs(plan.sum(0) - b).sum())
    assert res.marginal_deviation == pytest.approx(dev, rel=1e-12) and min(dev) > 0.2
    assert res.cost.item() == pytest.approx((plan * c).sum(), rel=1e-12)
    assert res.i0.shape == res.i1.shape == (40,)  # n_pairs: M by default


def test_unbalanced_tends_to_the_balanced_sinkhorn_plan_as_reg_m_grows(gen):
    """|pi(tau) - pi_balanced|_1 falls like 1/tau (0.49, 0.069, 7.2e-3, 7.2e-5 at tau = 1,
    10, 100, 1e4 on these batches) and vanishes at tau = inf."""
    x0, x1 = batches(gen, 64)
    balanced = OTCoupling("sinkhorn", reg=0.05, tol=1e-11, max_iter=10_000).plan(
        x0, x1, generator=gen).plan
    dist = {}
    for tau in (1.0, 10.0, 100.0, 1e4, math.inf):
        res = UnbalancedOTCoupling(0.05, tau, tol=1e-10).plan(x0, x1, generator=gen)
        dist[tau] = (res.plan - balanced).abs().sum().item()
    assert dist[math.inf] < 1e-9
    for lo, hi in ((1.0, 10.0), (10.0, 100.0), (100.0, 1e4)):
        rate = math.log(dist[lo] / dist[hi]) / math.log(hi / lo)
        assert 0.8 < rate < 1.2, (lo, hi, dist)


def test_unbalanced_leaves_an_outlier_out_of_the_pairs(gen):
    x0, x1 = batches(gen, 64)
    x1[7] = torch.tensor([30.0, 30.0], dtype=F64)  # far from every x0
    res = UnbalancedOTCoupling(0.05, 0.5).plan(x0, x1, generator=gen)
    column = res.plan.sum(0) * 64  # 1: the uniform share
    assert column[7] < 1e-3 and column.median() > 0.3
    assert 7 not in res.i1.tolist()
    # balanced OT must transport it; a semi-relaxed plan keeps x0's marginal exact
    assert 7 in OTCoupling("sinkhorn").plan(x0, x1, generator=gen).i1.tolist()
    semi = UnbalancedOTCoupling(0.05, (math.inf, 0.5)).plan(x0, x1, generator=gen)
    assert (semi.plan.sum(1) - 1 / 64).abs().max() < 1e-5 / 64
    assert semi.marginal_deviation[1] > 0.05


def test_pairs_are_a_systematic_draw_from_the_normalised_plan(gen):
    """Entry e of normalised mass p_e is drawn floor(K p_e) or ceil(K p_e) times: the pairs
    are distinct where every K p_e <= 1, and a seed gives the same pairs."""
    x0, x1 = batches(gen, 8, 6)
    for k in (6, 37, 5000):
        res = UnbalancedOTCoupling(0.1, 1.0, n_pairs=k).plan(x0, x1, generator=gen)
        p = (res.plan / res.plan.sum()).flatten()
        counts = torch.bincount(res.i0 * 6 + res.i1, minlength=48).to(F64)
        assert counts.sum() == k
        assert bool(((counts >= torch.floor(k * p)) & (counts <= torch.ceil(k * p))).all())
    few = UnbalancedOTCoupling(0.1, 1.0, n_pairs=6).plan(x0, x1, generator=gen)
    assert len(set(zip(few.i0.tolist(), few.i1.tolist(), strict=True))) == 6
    draws = [UnbalancedOTCoupling(0.1, 1.0).plan(x0, x1, generator=torch.Generator()
                                                 .manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0].i0, draws[1].i0) and torch.equal(draws[0].i1, draws[1].i1)
    assert not (torch.equal(draws[0].i0, draws[2].i0) and torch.equal(draws[0].i1, draws[2].i1))


def test_unbalanced_failures_name_the_setting_to_change(gen):
    x0, x1 = batches(gen, 40)
    with pytest.raises(CouplingError, match=r"residual is .* > tol=1e-05 after 2 iterations "
                                            r"\(max_iter=2\).*increase max_iter or reg"):
        UnbalancedOTCoupling(max_iter=2).plan(x0, x1)
    # a kernel exp(-C / reg) below float64's normal range: POT's iterates overflow
    with pytest.raises(CouplingError, match=r"numerical-error check.*below float64's smallest "
                                            r"normal number: increase reg"):
        UnbalancedOTCoupling(reg=1e-3).plan(10 * x0, 10 * x1)
    bad = x1.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"1 non-finite entry in x1 \(none in x0\)"):
        UnbalancedOTCoupling().plan(x0, bad)
    for kwargs, msg in ((dict(reg=0), "reg must be a positive"),
                        (dict(reg_m=0.0), "reg_m must be a positive number"),
                        (dict(reg_m=(1.0, -1.0)), "reg_m must be"),
                        (dict(reg_m=(1.0, 2.0, 3.0)), "reg_m must be"),
                        (dict(tol=-1), "tol must be"), (dict(n_pairs=0), "n_pairs must be"),
                        (dict(max_iter=1.5), "max_iter must be"),
                        (dict(normalize="median"), "normalize must be one of"),
                        (dict(cost="cosine"), "cost must be one of")):
        with pytest.raises(ValueError, match=msg):
            UnbalancedOTCoupling(**kwargs)


# -- partial OT ----------------------------------------------------------------------------
def _k_matching_cost(c: np.ndarray, k: int) -> float:
    """The cheapest k-pair matching of a square cost (scipy's assignment solver on the matrix
    extended by n - k free dummy rows and columns that cannot meet)."""
    n = len(c)
    big = 10 * c.max() + 1
    ext = np.block([[c, np.zeros((n, n - k))], [np.zeros((n - k, n)), np.full((n - k,) * 2, big)]])
    rows, cols = linear_sum_assignment(ext)
    return float(ext[rows, cols].sum())


def test_partial_plan_is_pots_moves_m_and_is_the_cheapest_partial_matching(gen):
    x0, x1 = batches(gen, 40)
    res = PartialOTCoupling(0.5, n_pairs=20).plan(x0, x1, generator=gen)
    c, _ = _normalised_cost(x0, x1)
    pot = ot.partial.partial_wasserstein(_uniform(40), _uniform(40), c, m=0.5)
    assert np.array_equal(res.plan.numpy(), pot)
    assert res.mass == pytest.approx(0.5, abs=1e-12) and res.marginal_error < 1e-12
    assert (res.status, res.method, res.solver) == ("optimal", "partial_exact", "network_simplex")
    assert bool((res.plan.sum(1) <= 1 / 40 + 1e-15).all() and (res.plan.sum(0) <= 1 / 40
                                                                   + 1e-15).all())
    # the optimum: 20 pairs of mass 1/40, the cheapest 20-pair matching (scipy)
    assert res.cost.item() * 40 == pytest.approx(_k_matching_cost(c, 20), rel=1e-12)
    # n_pairs = m N: each transported pair exactly once, a partial permutation
    pairs = set(zip(res.i0.tolist(), res.i1.tolist(), strict=True))
    support = np.argwhere(pot > 1e-9 / 40)  # beyond the network simplex's rounding (1e-16)
    assert pairs == {tuple(ij) for ij in support.tolist()} and len(pairs) == 20
    # the points left out are those of no pair
    assert sorted(res.unmatched0.tolist()) == sorted(set(range(40)) - set(res.i0.tolist()))
    assert sorted(res.unmatched1.tolist()) == sorted(set(range(40)) - set(res.i1.tolist()))
    assert len(res.unmatched0) == len(res.unmatched1) == 20
    # the default n_pairs = M keeps the batch: each transported pair twice
    full = PartialOTCoupling(0.5).plan(x0, x1, generator=gen)
    counts = torch.unique(torch.stack([full.i0, full.i1]), dim=1, return_counts=True)[1]
    assert full.i0.shape == (40,) and counts.tolist() == [2] * 20


def test_partial_leaves_the_outlier_unmatched_and_m_1_is_exact_ot(gen):
    x0, x1 = batches(gen, 32)
    x1[5] = torch.tensor([-40.0, 25.0], dtype=F64)
    res = PartialOTCoupling(31 / 32).plan(x0, x1, generator=gen)
    assert res.unmatched1.tolist() == [5] and 5 not in res.i1.tolist()
    assert res.unmatched0.numel() == 1
    # m = 1 (unequal batches, whose uniform weights may not sum to 1 exactly)
    x0, x1 = batches(gen, 30, 21)
    full = PartialOTCoupling(1.0).plan(x0, x1, generator=gen)
    exact = OTCoupling("exact").plan(x0, x1, generator=gen)
    assert full.cost.item() == pytest.approx(exact.cost.item(), rel=1e-12)
    assert full.unmatched0.numel() == full.unmatched1.numel() == 0


def test_partial_retries_at_its_iteration_limit_then_raises(gen):
    x0, x1 = batches(gen, 40)
    best = PartialOTCoupling(0.5).plan(x0, x1).cost.item()
    coupling = PartialOTCoupling(0.5, max_iter=10)
    with pytest.warns(CouplingWarning, match=r"stopped at max_iter=10 before optimality on a "
                                             r"40x40 batch; re-solving with max_iter=1000"):
        res = coupling.plan(x0, x1, generator=gen)
    assert res.status == "optimal_after_retry" and res.cost.item() == pytest.approx(best)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per coupling object
        coupling.plan(x0, x1, generator=gen)
    with pytest.warns(CouplingWarning), pytest.raises(
            CouplingError, match=r"max_iter=100, mass_fraction=0.5: the network simplex stopped "
                                 r"before optimality \(POT: numItermax reached\)"):
        PartialOTCoupling(0.5, max_iter=1).plan(x0, x1)
    for kwargs, msg in ((dict(mass_fraction=0.0), "mass_fraction must be a number in"),
                        (dict(mass_fraction=1.5), "mass_fraction must be"),
                        (dict(mass_fraction=True), "mass_fraction must be"),
                        (dict(nb_dummies=0), "nb_dummies must be"),
                        (dict(n_pairs=2.0), "n_pairs must be")):
        with pytest.raises(ValueError, match=msg):
            PartialOTCoupling(**kwargs)
    with pytest.raises(ValueError, match="4 non-finite entries in x0"):
        PartialOTCoupling().plan(torch.full_like(x0[:2], math.inf), x1[:2])


# -- conditional OT ------------------------------------------------------------------------
def _two_classes(gen, n=64):
    """x1: class 0 near (-2, 0), class 1 near (2, 0), alternating; x0 ~ N(0, I); y0: the
    labels of y1 in a random order (the same class counts)."""
    y1 = torch.arange(n) % 2
    x1 = 0.5 * torch.randn(n, 2, generator=gen, dtype=F64)
    x1[:, 0] += 4 * y1.to(F64) - 2
    x0 = torch.randn(n, 2, generator=gen, dtype=F64)
    return x0, x1, y1, y1[torch.randperm(n, generator=gen)]


def test_conditional_ot_without_weight_is_ot_coupling(gen):
    x0, x1, y1, y0 = _two_classes(gen)
    res = ConditionalOT(0.0).plan(x0, x1, y1, y0=y0)
    ref = OTCoupling().plan(x0, x1)
    assert torch.equal(res.i0, ref.i0) and torch.equal(res.i1, ref.i1)
    assert res.cost.item() == pytest.approx(ref.cost.item(), rel=1e-14)
    assert res.point_cost.item() == pytest.approx(ref.cost.item(), rel=1e-14)
    # Sinkhorn on unequal batches: the same plan and, from one seed, the same draws
    c0, c1 = torch.rand(64, 3, generator=gen, dtype=F64), torch.rand(40, 3, generator=gen,
                                                                     dtype=F64)
    res = ConditionalOT(0.0, "sinkhorn").plan(x0, x1[:40], c1, y0=c0,
                                              generator=gen.manual_seed(5))
    ref = OTCoupling("sinkhorn").plan(x0, x1[:40], generator=gen.manual_seed(5))
    assert torch.equal(res.plan, ref.plan) and torch.equal(res.i0, ref.i0)


def test_conditional_ot_with_a_large_weight_is_class_conditional_ot(gen):
    x0, x1, y1, y0 = _two_classes(gen)
    ref = ClassConditionalOT().plan(x0, x1, y1, y0=y0)
    c, _ = _normalised_cost(x0, x1)
    enough = 64 * (c.max() - c.min()) / 2  # a crossing permutation crosses twice
    for weight in (enough, 40.0):  # far less is enough here
        res = ConditionalOT(weight).plan(x0, x1, y1, y0=y0)
        assert torch.equal(res.i0, ref.i0) and torch.equal(res.i1, ref.i1)
        assert res.crossing == res.condition_distance == 0.0
        assert res.cost.item() == pytest.approx(ref.cost.item(), rel=1e-12)


def test_the_crossing_fraction_is_measured_and_falls_with_the_weight(gen):
    """Two classes, source labels assigned at random: plain OT crosses in 59% of the pairs
    here; the fraction falls with cost_weight to 0 while the point cost rises."""
    x0, x1, y1, y0 = _two_classes(gen)
    crossing, point_cost = [], []
    for weight in (0.0, 0.5, 2.0, 8.0, 16.0, 40.0):
        res = ConditionalOT(weight).plan(x0, x1, y1, y0=y0)
        measured = (y0[res.i0] != y1[res.i1]).to(F64).mean().item()
        assert res.crossing == measured == res.condition_distance
        # a permutation plan: <pi, C + w D> = <pi, C> + w * (fraction of crossing pairs)
        assert res.cost.item() == pytest.approx(res.point_cost.item() + weight * measured,
                                                rel=1e-12)
        crossing.append(measured)
        point_cost.append(res.point_cost.item())
    assert crossing[0] > 0.4 and crossing[-1] == 0.0
    assert crossing == sorted(crossing, reverse=True) and len(set(crossing)) >= 4
    assert point_cost == sorted(point_cost)


def test_continuous_conditions_trade_condition_distance_for_point_cost(gen):
    x0, x1 = batches(gen, 48)
    c1 = torch.rand(48, 2, generator=gen, dtype=F64)
    distance = []
    for weight in (0.0, 1.0, 10.0, 100.0):
        g = torch.Generator().manual_seed(3)
        res = ConditionalOT(weight).plan(x0, x1, c1, generator=g)
        # without y0 the source gets y1 in a random order, drawn first from the generator
        c0 = c1[torch.randperm(48, generator=torch.Generator().manual_seed(3))]
        measured = (c0[res.i0] - c1[res.i1]).norm(dim=1).mean().item()
        assert res.crossing is None
        assert res.condition_distance == pytest.approx(measured, rel=1e-12)
        distance.append(measured)
    assert distance == sorted(distance, reverse=True) and distance[-1] < 0.3 * distance[0]
    # a weight that dominates pairs each x0 with the x1 whose condition it was given
    res = ConditionalOT(1e6).plan(x0, x1, c1, generator=torch.Generator().manual_seed(3))
    assert res.condition_distance < 1e-12


def test_conditional_ot_refusals(gen):
    x0, x1, y1, y0 = _two_classes(gen, 16)
    coupling = ConditionalOT(1.0)
    with pytest.raises(TypeError, match=r"needs the conditions of x1: coupling\(x0, x1, y1\)"):
        coupling(x0, x1)
    with pytest.raises(ValueError, match=r"labels y1 must be shaped \(M,\) = \(16,\)"):
        coupling(x0, x1, y1[:, None])
    with pytest.raises(ValueError, match=r"y0 must be a tensor of integer or bool labels "
                                         r"conditions shaped \(16,\)"):
        coupling(x0, x1, y1, y0=y0.to(F64))
    with pytest.raises(ValueError, match=r"y0 must be a tensor of floating conditions shaped "
                                         r"\(16, 2\)"):
        coupling(x0, x1, torch.rand(16, 2, dtype=F64), y0=torch.rand(16, 3, dtype=F64))
    with pytest.raises(ValueError, match="x0 and x1 need one batch size; got N=16, M=8"):
        coupling(x0, x1[:8], y1[:8])
    cond = torch.rand(16, dtype=F64)
    cond[2] = math.nan
    with pytest.raises(ValueError, match="1 non-finite entries in y0 and 1 in y1"):
        coupling(x0, x1, cond)
    with pytest.raises(ValueError, match=r"cost_weight=1e\+300 times condition costs up to "
                                         r".*Reduce cost_weight or rescale the conditions"):
        ConditionalOT(1e300)(x0, x1, 1e10 * torch.rand(16, dtype=F64))
    for weight in (-1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="cost_weight must be a finite number >= 0"):
            ConditionalOT(weight)


# -- all three ------------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", [
    UnbalancedOTCoupling(0.1, (math.inf, 2.0), n_pairs=16), PartialOTCoupling(0.75),
    ConditionalOT(3.0, "sinkhorn", reg=0.2)], ids=lambda c: type(c).__name__)
def test_settings_pickle_registry_and_the_batch_producer(coupling):
    again = pickle.loads(pickle.dumps(coupling))
    assert repr(again) == repr(coupling) and again.settings() == coupling.settings()
    name = {UnbalancedOTCoupling: "unbalanced_ot", PartialOTCoupling: "partial_ot",
            ConditionalOT: "conditional_ot"}[type(coupling)]
    assert repr(get_coupling(name, **coupling.settings())) == repr(coupling)
    data = (torch.randn(64, 2, generator=torch.Generator().manual_seed(0)),
            torch.arange(64) % 4)
    producer = BatchProducer(data, coupling=coupling, batch_size=16, seed=0)
    batch = producer[0]  # the producer checks the shapes of the coupled batch
    assert batch.x0.shape == batch.x1.shape == (16, 2) and batch.y.shape == (16,)
    assert torch.equal(producer[0].x0, batch.x0)  # a pure function of (seed, k)
    # the labels travel with their x1
    raw = producer.draw(0)
    where = {tuple(x.tolist()): int(y) for x, y in zip(raw.x1, raw.y, strict=True)}
    assert all(where[tuple(x.tolist())] == int(y) for x, y in zip(batch.x1, batch.y,
                                                                  strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_relaxed_and_conditional_couplings_on_the_gpu():
    """Plans and pairs on the inputs' device, drawn with a generator there; the plans equal
    the CPU ones."""
    x0, x1 = batches(0, 64)
    y1 = torch.arange(64) % 3
    cuda = torch.device("cuda")
    y0 = y1.flip(0)  # given: a source permutation would differ between the devices' RNGs
    for coupling, extras, kw in ((UnbalancedOTCoupling(0.05, 1.0), (), {}),
                                 (PartialOTCoupling(0.5), (), {}),
                                 (ConditionalOT(2.0), (y1,), {"y0": y0})):
        cpu = coupling.plan(x0, x1, *extras, generator=torch.Generator().manual_seed(0), **kw)
        gpu = coupling.plan(x0.to(cuda), x1.to(cuda), *(e.to(cuda) for e in extras),
                            generator=torch.Generator(device=cuda).manual_seed(0),
                            **{k: v.to(cuda) for k, v in kw.items()})
        assert gpu.i0.device.type == gpu.i1.device.type == "cuda"
        assert (gpu.plan.cpu() - cpu.plan.cpu()).abs().max().item() < 1e-12
        assert gpu.cost.item() == pytest.approx(cpu.cost.item(), rel=1e-10)
