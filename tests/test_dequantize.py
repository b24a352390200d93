"""Dequantisation and bits/dim against exact discrete probabilities."""

import math

import pytest
import torch

import flowsolve as fs
from flowsolve.likelihood.bits import (
    bits_per_dim,
    continuous_bits_per_dim,
    dequantize,
    discrete_bits_per_dim,
)

F64 = torch.float64


def test_uniform_density_gives_exactly_8_bits(gen):
    k = torch.randint(0, 256, (5, 3, 4, 4), generator=gen)
    uniform = lambda y: torch.full((y.shape[0],), -y[0].numel() * math.log(2.0), dtype=F64)  # noqa: E731
    for iw in (False, True):
        res = discrete_bits_per_dim(uniform, k, draws=3, importance_weighted=iw, generator=gen,
                                    dtype=F64)
        torch.testing.assert_close(res.bpd, torch.full((5,), 8.0, dtype=F64))
    # the "+7" convention for 8-bit data in [-1, 1]
    lp = torch.tensor([-100.0, 20.0], dtype=F64)
    torch.testing.assert_close(bits_per_dim(lp, 48), -lp / (48 * math.log(2)) + 7)


def test_bounds_bracket_the_exact_discrete_probability(gen):
    """Gaussian model on [-1, 1] with coarse bins: P(k) is a product of CDF differences.
    The K=1 mean is below log P (Jensen), the importance-weighted bound rises towards it."""
    s, n_bins, dim = 0.3, 8, 2
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(s, dtype=F64))
    log_p_y = lambda y: normal.log_prob(y).sum(1)  # noqa: E731
    k = torch.tensor([[3, 4], [2, 5], [4, 4]])
    edges = -1 + 2 * torch.arange(n_bins + 1, dtype=F64) / n_bins
    cdf = normal.cdf(edges)
    exact = torch.log(cdf[k + 1] - cdf[k]).sum(1)  # log P(k): mass of the cell in y-space
    single = discrete_bits_per_dim(log_p_y, k, draws=4000, n_bins=n_bins, generator=gen, dtype=F64)
    iw = discrete_bits_per_dim(log_p_y, k, draws=4000, importance_weighted=True, n_bins=n_bins,
                               generator=gen, dtype=F64)
    assert (-single.nll_nats < exact).all()
    torch.testing.assert_close(-iw.nll_nats, exact, rtol=0, atol=5e-3)
    assert (iw.bpd < single.bpd).all()
    assert "importance-weighted K=4000" in iw.estimator and "K=1" in single.estimator
    torch.testing.assert_close(iw.bpd, iw.nll_nats / (dim * math.log(2)))


def test_dequantize_maps_cells_and_rejects_non_integers(gen):
    k = torch.arange(256).reshape(256, 1)
    y = dequantize(k, generator=gen, dtype=F64)
    lo = -1 + 2 * k.to(F64) / 256
    assert ((y >= lo) & (y < lo + 2 / 256)).all()
    with pytest.raises(ValueError, match=r"integers in \[0, 256\)"):
        dequantize(torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"integers in \[0, 256\)"):
        dequantize(torch.tensor([256]))
    with pytest.raises(ValueError, match="draws"):
        discrete_bits_per_dim(lambda y: y.sum(1), k, draws=0)


def test_uint8_images_are_accepted_in_every_cell():
    """uint8, the usual image dtype: all 256 levels are valid (256 must not wrap to 0 in the
    range check) and land in their cells, with the same draws as int64 data."""
    k8 = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    y8 = dequantize(k8, generator=torch.Generator().manual_seed(0), dtype=F64)
    y64 = dequantize(k8.long(), generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(y8, y64, rtol=0, atol=0)
    lo = -1 + 2 * k8.to(F64) / 256
    assert ((y8 >= lo) & (y8 < lo + 2 / 256)).all()
    uniform = lambda y: torch.full((y.shape[0],), -y[0].numel() * math.log(2.0), dtype=F64)  # noqa: E731
    res = discrete_bits_per_dim(uniform, k8, dtype=F64)
    torch.testing.assert_close(res.bpd, torch.full((4,), 8.0, dtype=F64))
    with pytest.raises(ValueError, match=r"integers in \[0, 16\).*16"):
        dequantize(torch.tensor([3, 16], dtype=torch.uint8), n_bins=16)


@pytest.mark.parametrize("bad", [lambda y: y, lambda y: y.sum(1, keepdim=True)],
                         ids=["per-element", "(B, 1)"])
def test_log_prob_fn_must_return_one_value_per_sample(bad):
    k = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"must return \(3,\) log-densities.*got \(3, (4|1)\)"):
        discrete_bits_per_dim(bad, k, dtype=F64)


@pytest.mark.parametrize("dim", [0, -3, 2.0, True, None], ids=repr)
def test_a_dimension_that_is_not_a_positive_int_is_refused(dim):
    """bits/dim of D = 0 entries was NaN (0 / 0) or inf; a float or bool D is no count."""
    lp = torch.tensor([-3.0, 1.0], dtype=F64)
    for fn in (bits_per_dim, continuous_bits_per_dim):
        with pytest.raises(ValueError, match=rf"dim must be a positive int.*got {dim!r}"):
            fn(lp, dim)
    with pytest.raises(ValueError, match=r"at least one sample of at least one entry; got "
                       r"\(3, 0\)"):
        discrete_bits_per_dim(lambda y: y.sum(1), torch.zeros(3, 0, dtype=torch.long))


def test_continuous_bits_per_dim_is_the_density_in_bits():
    """-log p(x) / (D ln 2): for N(0, I) in D dims at x = 0, log p = -(D/2) log(2 pi), so
    bits/dim = log2(2 pi) / 2 whatever D; no cell volume is added, unlike the dequantised
    bits/dim of the same log-density (+7 for 8-bit data in [-1, 1]); a float in, a float
    out; the flat name fs.continuous_bits_per_dim is the same function."""
    for d in (1, 2, 48):
        lp = fs.StandardNormal(d).log_prob(torch.zeros(3, d, dtype=F64))
        torch.testing.assert_close(continuous_bits_per_dim(lp, d),
                                   torch.full((3,), 0.5 * math.log2(2 * math.pi), dtype=F64),
                                   rtol=0, atol=1e-14)
        torch.testing.assert_close(bits_per_dim(lp, d) - continuous_bits_per_dim(lp, d),
                                   torch.full((3,), 7.0, dtype=F64), rtol=0, atol=1e-12)
    assert continuous_bits_per_dim(-10 * math.log(2), 5) == 2.0
    assert fs.continuous_bits_per_dim is continuous_bits_per_dim
