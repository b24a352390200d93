"""The small U-Net: the t / y conventions, the null label, size, translation of the
receptive field, and that it learns (a denoiser on two fixed images)."""

from __future__ import annotations

import pytest
import torch

from flowsolve.training.unet import UNet

F64 = torch.float64


def make(**kwargs) -> UNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet(**{"channels": 8, "embedding_dim": 16, **kwargs}).double()


def test_shape_and_time_as_scalar_or_per_sample_agree(gen):
    net = make(num_classes=10)
    x = torch.randn(5, 1, 8, 8, generator=gen, dtype=F64)
    y = torch.tensor([0, 3, 9, 10, 2])
    out = net(x, torch.tensor(0.3, dtype=F64), y=y)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, net(x, torch.full((5,), 0.3, dtype=F64), y=y))
    torch.testing.assert_close(out, net(x, 0.3, y=y))
    # per-sample times are per-sample: sample i sees t_i only
    t = torch.rand(5, generator=gen, dtype=F64)
    rows = torch.cat([net(x[i:i + 1], t[i], y=y[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(net(x, t, y=y), rows)


def test_labels_and_time_change_the_output_and_none_is_the_null_label(gen):
    net = make(num_classes=10)
    assert net.null_label == 10 and net.label_embedding.num_embeddings == 11
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=F64)
    a = net(x, 0.5, y=torch.full((4,), 1))
    b = net(x, 0.5, y=torch.full((4,), 7))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-6
    assert (a - net(x, 0.9, y=torch.full((4,), 1))).abs().max() > 1e-6
    torch.testing.assert_close(net(x, 0.5), net(x, 0.5, y=torch.full((4,), 10)))
    torch.testing.assert_close(net(x, 0.5, y=torch.tensor(3)), net(x, 0.5, y=torch.full((4,), 3)))


def unet_parameter_count(c: int, e: int, classes: int | None, channels: int = 1) -> int:
    """The architecture of the module docstring, counted by hand."""
    def conv(i, o, k=3):
        return i * o * k * k + o

    def norm(ch):
        return 2 * ch

    def block(i, o):
        skip = 0 if i == o else conv(i, o, 1)
        return norm(i) + conv(i, o) + (e * o + o) + norm(o) + conv(o, o) + skip

    f = c + c % 2
    time = (f * e + e) + (e * e + e)
    labels = 0 if classes is None else (classes + 1) * e
    return (time + labels + conv(channels, c) + block(c, c) + conv(c, c) + block(c, 2 * c)
            + block(2 * c, 2 * c) + block(4 * c, 2 * c) + conv(2 * c, c) + block(2 * c, c)
            + norm(c) + conv(c, channels))


def test_parameter_counts_are_the_documented_ones():
    def count(**kwargs):
        return sum(p.numel() for p in UNet(**kwargs).parameters())

    assert count(num_classes=10) == unet_parameter_count(24, 96, 10) == 216_481
    assert count(channels=16, embedding_dim=64, num_classes=10) == 96_961
    assert unet_parameter_count(16, 64, 10) == 96_961
    assert count(channels=16, embedding_dim=64) == unet_parameter_count(16, 64, None)
    assert count(channels=5, embedding_dim=6, num_classes=2, in_channels=3) == \
        unet_parameter_count(5, 6, 2, channels=3)


def test_max_frequency_sets_the_time_embedding_only(gen):
    """Default 1000 (the documented digits results); other values change the frequencies
    omega_k = max_frequency^(k / (h - 1)) and nothing else (same weights from a generator)."""
    default = UNet(channels=8, embedding_dim=16, generator=torch.Generator().manual_seed(2))
    low = UNet(channels=8, embedding_dim=16, generator=torch.Generator().manual_seed(2),
               max_frequency=30.0)
    for net, top in ((default, 1000.0), (low, 30.0)):
        omega = net.time_embedding[0].omega
        torch.testing.assert_close(omega, top ** (torch.arange(4, dtype=F64) / 3))
    assert all(torch.equal(p, q) for p, q in zip(default.parameters(), low.parameters(),
                                                 strict=True))
    x = torch.randn(2, 1, 8, 8, generator=gen)
    assert not torch.equal(default(x, 0.7), low(x, 0.7))
    torch.testing.assert_close(default(x, 0.0), low(x, 0.0))  # e(0) = [0.., 1..] for both
    with pytest.raises(ValueError, match="max_frequency must be"):
        UNet(max_frequency=0.5)


def test_runs_under_torch_func_over_labels(gen):
    """vmap / jacrev over (x, y): the CPU label-range check must step aside in transforms."""
    net = make(num_classes=3)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=F64)
    y = torch.tensor([0, 2, 3])

    def single(xi, yi):
        return net(xi[None], 0.3, y=yi[None])[0]

    torch.testing.assert_close(torch.func.vmap(single)(x, y), net(x, 0.3, y=y),
                               rtol=1e-12, atol=1e-13)
    jac = torch.func.vmap(torch.func.jacrev(single))(x, y)  # (3, 1, 8, 8, 1, 8, 8)
    want = torch.autograd.functional.jacobian(lambda xi: single(xi, y[1]), x[1])
    torch.testing.assert_close(jac[1], want, rtol=1e-11, atol=1e-13)


def test_an_output_pixel_sees_the_whole_8x8_image(gen):
    # two 3x3 convolutions per block, a stride-2 level: the receptive field covers 8x8,
    # so d out[0, 0] / d x is non-zero at the opposite corner
    net = make()
    x = torch.randn(1, 1, 8, 8, generator=gen, dtype=F64, requires_grad=True)
    net(x, 0.5)[0, 0, 0, 0].backward()
    assert x.grad[0, 0, 7, 7].abs() > 0


def test_bad_inputs_raise():
    net = make(num_classes=3)
    x = torch.zeros(2, 1, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.zeros(2, 8, 8, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="t must be 0-d or shaped"):
        net(x, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="null label 3"):
        net(x, 0.5, y=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integer tensor"):
        net(x, 0.5, y=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        make()(x, 0.5, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="channels"):
        UNet(channels=0)


def test_it_learns_a_conditional_denoiser(gen):
    # two fixed images, one per label: the optimal x1-predictor given the label is the
    # image itself, so the loss can go to ~0; it must fall well below its start
    net = make(num_classes=2).float()
    images = torch.stack([torch.linspace(-1, 1, 64).reshape(1, 8, 8),
                          torch.linspace(1, -1, 64).reshape(8, 8).T[None]])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        y = torch.randint(0, 2, (32,), generator=gen)
        t = torch.rand(32, generator=gen)
        x1 = images[y]
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * torch.randn(
            x1.shape, generator=gen)
        loss = (net(xt, t, y=y) - x1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.1 * sum(losses[:10]) / 10
