"""Toy data sets: sample moments against the closed forms of their definitions, supports,
labels, reproducibility from the generator, the scikit-learn definitions, the digits."""

from __future__ import annotations

import builtins
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.training.data import (
    DATASETS,
    LabeledSamples,
    get_dataset,
    load_digits,
    make_circles,
    make_moons,
    make_s_curve,
    sample_dataset,
    sample_labeled,
)

F64 = torch.float64
N = 200_000
PI = math.pi


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def assert_moments(x, mean, cov, z=5.0):
    """Sample mean and covariance within ``z`` standard errors of the closed forms (the
    standard errors estimated from the sample itself)."""
    n = x.shape[0]
    m, c = moments(x)
    mean, cov = torch.as_tensor(mean, dtype=F64), torch.as_tensor(cov, dtype=F64)
    se_mean = (c.diagonal() / n).sqrt()
    assert ((m - mean).abs() <= z * se_mean).all(), (m, mean, se_mean)
    centred = x - m
    prods = centred[:, :, None] * centred[:, None, :]
    se_cov = prods.reshape(n, -1).std(0).reshape(c.shape) / math.sqrt(n)
    assert ((c - cov).abs() <= z * se_cov + 1e-12).all(), (c, cov, se_cov)


def draw(name, n=N, seed=0):
    return sample_labeled(name, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- the Gaussian mixtures ---------------------------------------------------------------------
@pytest.mark.parametrize("name, radius, var", [("8gaussians", 5.0, 1.0),
                                               ("8gaussians_torchcfm", 5.0, 0.1**0.5),
                                               ("8gaussians_dsb", 12.0, 1.5**2)])
def test_ring_mixtures_have_mean_zero_and_covariance_r2_over_2_plus_var(name, radius, var):
    s = draw(name)
    # equal weights on angles 2 pi k / 8: E[mu mu^T] = r^2 / 2 I
    assert_moments(s.x, [0.0, 0.0], (radius**2 / 2 + var) * torch.eye(2, dtype=F64))
    # each point's label is its component: distance to its centre ~ chi(2) * std
    ds = get_dataset(name)
    centre = ds.distribution.means[s.y]
    r2 = ((s.x - centre) ** 2).sum(1) / var  # ~ chi^2(2): mean 2
    assert abs(r2.mean().item() - 2) < 5 * 2 / math.sqrt(N)
    # the exact density is the analytic mixture's
    mix = fs.GaussianMixture.ring(8, radius=radius, std=var**0.5)
    torch.testing.assert_close(ds.log_prob(s.x[:100]), mix.log_prob(s.x[:100]))


# -- scikit-learn's generators, by their definitions ------------------------------------------
def test_moons_moments_and_support():
    s = draw("moons")
    # make_moons before scaling: mean (1/2, 1/4), Var x = 3/4, Var y = 9/16 - 1/pi,
    # Cov = 1/8 - 1/pi; times 2, x - 1; noise 0.05 * 2 = 0.1
    cov = 4 * torch.tensor([[3 / 4, 1 / 8 - 1 / PI], [1 / 8 - 1 / PI, 9 / 16 - 1 / PI]]) \
        + 0.01 * torch.eye(2)
    assert_moments(s.x, [0.0, 0.5], cov)
    clean, y = make_moons(1000, generator=torch.Generator().manual_seed(1))
    x = 2 * clean - torch.tensor([1.0, 0.0], dtype=F64)
    # outer moon: the upper unit half circle doubled, centred at (-1, 0); inner one at (1, 0.5)
    centre = torch.where(y[:, None] == 0, torch.tensor([-1.0, 0.0], dtype=F64),
                         torch.tensor([1.0, 1.0], dtype=F64))
    torch.testing.assert_close((x - centre).norm(dim=1), torch.full((1000,), 2.0, dtype=F64))
    assert (x[y == 0, 1] >= -1e-12).all() and (x[y == 1, 1] <= 1 + 1e-12).all()
    assert x[:, 0].min() >= -3 - 1e-12 and x[:, 0].max() <= 3 + 1e-12
    # n // 2 outer points, evenly spaced: the exact mean of sin over linspace(0, pi, m)
    m = 500
    exact = 1 / math.tan(PI / (2 * (m - 1))) / m
    assert abs(clean[y == 0, 1].mean().item() - exact) < 1e-12


def test_scurve_moments_and_support():
    s = draw("scurve")
    # t ~ U[-3pi/2, 3pi/2): E sin^2 = 1/2, E z^2 = 3/2 + 4/(3pi), E[x z] = -1/(3pi); x1.5
    cov = 2.25 * (torch.tensor([[0.5, -1 / (3 * PI)], [-1 / (3 * PI), 1.5 + 4 / (3 * PI)]])
                  + 0.05**2 * torch.eye(2))
    assert_moments(s.x, [0.0, 0.0], cov)
    x, t = make_s_curve(1000, generator=torch.Generator().manual_seed(2))
    assert t.abs().max() <= 3 * PI / 2
    assert x[:, 1].min() >= 0 and x[:, 1].max() <= 2  # the height coordinate, dropped
    torch.testing.assert_close(x[:, 0], t.sin())
    assert (x[:, 2] * torch.sign(t) <= 1e-12).all()  # z = sign(t)(cos t - 1)


def test_circles_radii_and_checkerboard_cells():
    s = draw("circles", 20_000)
    r = s.x.norm(dim=1)
    for label, radius in ((0, 3.5), (1, 1.75)):
        assert abs(r[s.y == label].mean().item() - radius) < 0.01
    # E|x|^2 = 3.5^2 (1 + 0.5^2) / 2, shared by two coordinates, plus the noise (0.05 x 3.5)^2
    assert_moments(s.x, [0.0, 0.0], (3.5**2 * (1 + 0.25) / 4 + 0.175**2) * torch.eye(2))
    c = draw("checkerboard")
    # uniform on the 8 cells of side 2 of [-4, 4]^2 with floor(x/2) + floor(y/2) even
    assert c.x.abs().max() <= 4
    cells = torch.floor(c.x / 2).long()
    assert ((cells.sum(1) % 2) == 0).all()
    # marginals U[-4, 4] (variance 16/3); E[xy] = 1 (columns alternate the row pair)
    assert_moments(c.x, [0.0, 0.0], [[16 / 3, 1.0], [1.0, 16 / 3]])
    counts = torch.bincount(c.y, minlength=8).double() / N
    assert (counts - 1 / 8).abs().max() < 5 * math.sqrt(1 / 8 * 7 / 8 / N)


def test_two_spirals_are_point_symmetric():
    s = draw("2spirals", 100_000)
    r = s.x.norm(dim=1)
    assert r.max() < (3 * PI + 0.5 * 2**0.5) / 3 + 0.6  # |arm| <= r_max + 0.5 sqrt 2, /3, noise
    assert (s.y == 0).sum() == 50_000
    # arm 1 is arm 0 negated: equal and opposite means (each far from 0), equal covariances
    a, b = s.x[s.y == 0], s.x[s.y == 1]
    se = (torch.cov(a.T).diagonal() / a.shape[0]).sqrt()
    assert ((a.mean(0) + b.mean(0)).abs() < 5 * se * 2**0.5).all()
    assert (a.mean(0).abs() > 10 * se).any()
    assert_moments(-b, a.mean(0), torch.cov(a.T), z=6.0)


def test_moons_dsb_is_standardised_to_scale_seven():
    x = draw("moons_dsb").x.flatten()
    assert abs(x.mean().item()) < 5 * 7 / math.sqrt(x.numel())
    assert abs(x.std().item() - 7) < 0.05


# -- reproducibility and the registry ----------------------------------------------------------
@pytest.mark.parametrize("name", list(DATASETS))
def test_the_generator_is_the_only_randomness(name):
    state = torch.random.get_rng_state()
    a = sample_dataset(name, 64, generator=torch.Generator().manual_seed(7))
    b = sample_dataset(name, 64, generator=torch.Generator().manual_seed(7))
    c = sample_dataset(name, 64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (64, 2) and a.dtype == torch.get_default_dtype()


@pytest.mark.parametrize("name", list(DATASETS))
def test_no_samples_is_an_empty_draw(name):
    """n = 0 is accepted by every data set (the mixtures' torch.multinomial refused it)."""
    for dtype in (None, F64):
        s = sample_labeled(name, 0, generator=torch.Generator().manual_seed(0), dtype=dtype)
        assert s.x.shape == (0, 2) and s.y.shape == (0,) and len(s) == 0
        assert s.x.dtype == (dtype or torch.get_default_dtype()) and s.y.dtype == torch.long
        assert sample_dataset(name, 0).shape == (0, 2)
    # n = 0 leaves the draws of a later call as they were
    g = torch.Generator().manual_seed(3)
    sample_dataset(name, 0, generator=g)
    assert torch.equal(sample_dataset(name, 5, generator=g),
                       sample_dataset(name, 5, generator=torch.Generator().manual_seed(3)))


def test_unknown_names_and_bad_arguments_list_what_is_accepted():
    with pytest.raises(ValueError, match="accepted: 8gaussians, .*moons.*2spirals"):
        sample_dataset("swissroll", 4)
    with pytest.raises(ValueError, match="n must be"):
        sample_dataset("moons", -1)
    with pytest.raises(ValueError, match="noise"):
        make_moons(4, noise=-0.1)
    with pytest.raises(ValueError, match="no closed-form density; those with one: 8gaussians"):
        get_dataset("moons").log_prob(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="same number of samples"):
        LabeledSamples(torch.zeros(3, 2), torch.zeros(2))


def test_noise_free_generators_equal_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    for n in (7, 100, 1001):
        a, ya = datasets.make_moons(n, shuffle=False)
        b, yb = make_moons(n, shuffle=False)
        torch.testing.assert_close(b, torch.from_numpy(a), rtol=0, atol=1e-14)
        assert yb.tolist() == ya.tolist()
        a, ya = datasets.make_circles(n, shuffle=False, factor=0.5)
        b, yb = make_circles(n, shuffle=False, factor=0.5)
        torch.testing.assert_close(b, torch.from_numpy(a), rtol=0, atol=1e-14)
        assert yb.tolist() == ya.tolist()


# -- digits -----------------------------------------------------------------------------------
def test_digits_without_scikit_learn_say_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"pip install flowsolve\[data\]"):
        load_digits()


def test_digits_are_scaled_to_minus_one_one():
    pytest.importorskip("sklearn")
    d = load_digits()
    assert d.x.shape == (1797, 1, 8, 8) and d.y.shape == (1797,)
    assert d.x.min() == -1 and d.x.max() == 1
    levels = torch.unique((d.x + 1) * 8)  # the 17 grey levels 0..16
    torch.testing.assert_close(levels, levels.round())
    assert sorted(torch.unique(d.y).tolist()) == list(range(10))
