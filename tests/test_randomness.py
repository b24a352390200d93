"""Randomness comes in through arguments, never global state.

Every public function that draws takes ``generator=``. Called with ``generator=None`` it
draws from a fresh, nondeterministically seeded generator (``_checks.generator_or_fresh``):
torch's (and numpy's) global RNG is neither read nor advanced. Called twice with equal
explicit generators it gives equal results.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import flowsolve as fs
from flowsolve.likelihood.bits import discrete_bits_per_dim
from flowsolve.likelihood.divergence import make_probes
from flowsolve.training.data import DATASETS, make_circles, make_moons, make_s_curve, sample_labeled

F64 = torch.float64
PATH = fs.AffineGaussianPath(fs.CondOTScheduler())


def _data(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


X1 = _data(6, 2)
X0 = _data(6, 2, seed=1)
K = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(2))
LABELS = torch.tensor([0, 1, 0, 1, 2, 2])


def linear(x, t):
    t = torch.as_tensor(t, dtype=x.dtype)
    return -0.5 * x + 0.1 * t.reshape(-1, *[1] * (x.dim() - 1))


def _train(g):
    net = fs.MLP(2, hidden=8, depth=1, time_embedding_dim=4,
                 generator=torch.Generator().manual_seed(0)).double()
    cfg = fs.TrainConfig(steps=2, batch_size=8, progress=False, log_every=1)
    res = fs.train(net, "moons", cfg, generator=g)
    return torch.tensor(res.losses), *res.model.parameters()


def _study(g):
    u = fs.analytic.marginal_velocity(fs.Gaussian(torch.zeros(2), torch.ones(2)), PATH)
    sde = dict(score=fs.analytic.marginal_score(fs.Gaussian(torch.zeros(2), torch.ones(2)),
                                                PATH),
               path=PATH, diffusion=0.5, reference_steps=8)
    study = fs.compare_solvers(u, _data(4, 2), solvers=["sde:euler"], steps=[2, 4], sde=sde,
                               reference=None, repeats=1, warmup=0, generator=g)
    return torch.tensor([r["error"] for r in study.records])


# name -> f(generator) -> a tensor or a tuple of tensors; sizes kept tiny
CASES = {
    "sample_time": lambda g: fs.sample_time(8, generator=g, dtype=F64),
    "sample_time_logit_normal": lambda g: fs.sample_time(8, generator=g,
                                                         distribution="logit_normal"),
    "flow_matching_loss": lambda g: fs.flow_matching_loss(linear, PATH, None, X1, generator=g,
                                                          reduction="none"),
    "regression_loss": lambda g: fs.regression_loss(linear, PATH, None, X1, prediction="x1",
                                                    generator=g, reduction="none"),
    "denoising_score_matching_loss": lambda g: fs.denoising_score_matching_loss(
        linear, PATH, None, X1, generator=g, reduction="none"),
    "epsilon_loss": lambda g: fs.epsilon_loss(linear, PATH, None, X1, generator=g,
                                              reduction="none"),
    "flow_matching_loss_given_x0": lambda g: fs.flow_matching_loss(linear, PATH, X0, X1,
                                                                   generator=g,
                                                                   reduction="none"),
    "bridge_sample": lambda g: fs.GaussianBridge(0.5).sample(X0, X1, 0.3, generator=g).x_t,
    "bridge_matching_loss": lambda g: fs.bridge_matching_loss(
        linear, fs.GaussianBridge(0.5, "brownian"), X0, X1, generator=g, reduction="none"),
    "label_dropout": lambda g: fs.label_dropout(torch.arange(16), 0.5, 99, generator=g),
    "make_probes_rademacher": lambda g: make_probes((3, 2), 2, generator=g),
    "make_probes_gaussian": lambda g: make_probes((3, 2), 2, "gaussian", generator=g),
    "log_likelihood_hutchinson": lambda g: fs.log_likelihood(
        linear, X1, divergence="hutchinson", n_probes=2, solver="euler", steps=2,
        generator=g).log_prob,
    "dequantize": lambda g: fs.dequantize(K, generator=g),
    "discrete_bits_per_dim": lambda g: discrete_bits_per_dim(
        lambda y: -y.pow(2).flatten(1).sum(1), K, draws=2, generator=g).bpd,
    # takes seed= (one generator per batch, seeded seed + offset), never generator=
    "dataset_bits_per_dim": lambda g: fs.dataset_bits_per_dim(
        linear, K, divergence="hutchinson", solver="euler", steps=2, batch_size=2,
        seed=0 if g is None else g.initial_seed(), progress=False).bpd,
    "wasserstein2_subsampled": lambda g: fs.wasserstein2(_data(12, 2), _data(10, 2, seed=3),
                                                         max_samples=5, generator=g),
    "ot_exact_unequal_batches": lambda g: fs.OTCoupling("exact")(_data(8, 2), X1,
                                                                 generator=g),
    "ot_sinkhorn": lambda g: fs.OTCoupling("sinkhorn", reg=0.5)(X0, X1, generator=g),
    "ot_sinkhorn_keep_x0": lambda g: fs.OTCoupling("sinkhorn", reg=0.5, keep="x0")(
        X0, X1, generator=g),
    "independent_coupling": lambda g: fs.IndependentCoupling()(_data(8, 2), X1, generator=g),
    "class_conditional_ot": lambda g: fs.ClassConditionalOT()(X0, X1, LABELS, generator=g),
    "grid_brownian": lambda g: fs.GridBrownian((3, 2), steps=4, generator=g)(0.0, 1.0),
    "sample_sde": lambda g: fs.sample_sde(linear, X0, score=linear, diffusion=0.5, steps=4,
                                          generator=g).x,
    "langevin": lambda g: fs.langevin(linear, X0, dt=0.1, steps=4, generator=g).x,
    "compare_solvers_sde": _study,
    "gaussian_mixture_sample": lambda g: fs.GaussianMixture.ring(4).sample(8, generator=g),
    "make_moons": lambda g: make_moons(8, noise=0.1, generator=g),
    "make_moons_unshuffled": lambda g: make_moons(8, noise=0.1, shuffle=False, generator=g),
    "make_s_curve": lambda g: make_s_curve(8, noise=0.1, generator=g),
    "make_circles": lambda g: make_circles(8, noise=0.1, generator=g),
    **{f"dataset_{name}": (lambda g, name=name: sample_labeled(name, 8, generator=g))
       for name in DATASETS},
    "train": _train,
}


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    return [t for part in out for t in _tensors(part)]


def _global_state():
    # numpy's legacy global RNG is exactly the state that must not move
    return torch.get_rng_state(), pickle.dumps(np.random.get_state())  # noqa: NPY002


@pytest.mark.parametrize("name", list(CASES))
def test_generator_none_leaves_the_global_rngs_alone(name):
    torch_state, numpy_state = _global_state()
    CASES[name](None)
    after_torch, after_numpy = _global_state()
    assert torch.equal(after_torch, torch_state), f"{name} drew from torch's global RNG"
    assert after_numpy == numpy_state, f"{name} drew from numpy's global RNG"


@pytest.mark.parametrize("name", list(CASES))
def test_equal_generators_give_equal_results(name):
    torch_state, numpy_state = _global_state()
    a = _tensors(CASES[name](torch.Generator().manual_seed(11)))
    b = _tensors(CASES[name](torch.Generator().manual_seed(11)))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    after_torch, after_numpy = _global_state()
    assert torch.equal(after_torch, torch_state) and after_numpy == numpy_state


def test_the_fresh_generator_is_seeded_nondeterministically_on_the_device():
    from flowsolve._core.checks import generator_or_fresh

    g = torch.Generator().manual_seed(0)
    assert generator_or_fresh(g) is g and generator_or_fresh(g, "meta") is g
    state = torch.get_rng_state()
    a, b = generator_or_fresh(None), generator_or_fresh(None, torch.device("cpu"))
    assert a.device == b.device == torch.device("cpu")
    assert a.initial_seed() != b.initial_seed()  # not the fixed default seed of Generator()
    assert not torch.equal(torch.rand(64, generator=a), torch.rand(64, generator=b))
    assert torch.equal(torch.get_rng_state(), state)
    if torch.cuda.is_available():
        assert generator_or_fresh(None, "cuda").device.type == "cuda"
