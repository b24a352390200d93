"""Networks: the time embedding's closed forms, the t / y conventions, transform-friendliness."""

from __future__ import annotations

import pytest
import torch

from flowsolve.training.nets import MLP, SinusoidalTimeEmbedding

F64 = torch.float64


def make_mlp(**kwargs) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLP(2, hidden=32, depth=2, time_embedding_dim=16, **kwargs).double()


# -- time embedding -------------------------------------------------------------------------------
def test_embedding_closed_forms():
    emb = SinusoidalTimeEmbedding(16, max_frequency=1000.0)
    t = torch.linspace(0, 1, 101, dtype=F64)
    e = emb(t)
    assert e.shape == (101, 16) and e.dtype == F64
    # sin^2 + cos^2 = 1 for each of the 8 frequencies
    torch.testing.assert_close(e.pow(2).sum(1), torch.full((101,), 8.0, dtype=F64))
    # e(0) = [0, ..., 0, 1, ..., 1]
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(8), torch.ones(8)]).double())
    # frequencies from 1 to max_frequency with a constant ratio (log-spaced)
    omega = emb.omega
    torch.testing.assert_close(omega[[0, -1]], torch.tensor([1.0, 1000.0], dtype=F64))
    ratio = omega[1:] / omega[:-1]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1000.0 ** (1 / 7)))


def test_embedding_separates_distinct_times():
    emb = SinusoidalTimeEmbedding(64)
    t = torch.linspace(0, 1, 1001, dtype=F64)  # spacing 1e-3
    e = emb(t)
    dist = torch.cdist(e, e) + torch.eye(1001, dtype=F64) * 1e9
    assert dist.min().item() > 0.5  # times 1e-3 apart are far apart in the embedding


def test_embedding_keeps_the_shape_of_t():
    emb = SinusoidalTimeEmbedding(8)
    assert emb(torch.tensor(0.3)).shape == (8,)
    torch.testing.assert_close(emb(torch.tensor(0.3)), emb(torch.tensor([0.3]))[0])
    assert emb(torch.tensor([0.1, 0.2], dtype=torch.float32)).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dim": 7}, "dim must be even"), ({"dim": 0}, "dim must be an int >= 2"),
     ({"dim": 8, "max_frequency": 0.5}, "max_frequency must be")],
)
def test_embedding_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidalTimeEmbedding(**kwargs)


def test_embedding_rejects_a_non_number_max_frequency():
    for bad in ("30", None, True):
        with pytest.raises(ValueError, match="max_frequency must be a finite number >= 1"):
            SinusoidalTimeEmbedding(8, max_frequency=bad)


def test_embedding_rejects_non_tensor_time():
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        SinusoidalTimeEmbedding(8)(0.5)


# -- MLP --------------------------------------------------------------------------------
def test_scalar_time_is_broadcast_to_the_batch(gen):
    net = make_mlp()
    x = torch.randn(7, 2, generator=gen, dtype=F64)
    out = net(x, torch.tensor(0.4, dtype=F64))
    assert out.shape == (7, 2)
    assert torch.equal(out, net(x, torch.full((7,), 0.4, dtype=F64)))
    assert torch.equal(out, net(x, 0.4))


def test_samples_do_not_interact_and_time_matters(gen):
    net = make_mlp()
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    t = torch.rand(5, generator=gen, dtype=F64)
    batch = net(x, t)
    rows = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, rows, rtol=1e-12, atol=1e-14)
    later = net(x, (t + 0.1).clamp(max=1))
    assert (later - batch).abs().min() > 0


def test_null_label_is_the_extra_class_and_the_default(gen):
    net = make_mlp(num_classes=3)
    assert net.null_label == 3
    assert net.label_embedding.num_embeddings == 4
    x = torch.randn(4, 2, generator=gen, dtype=F64)
    t = torch.full((4,), 0.5, dtype=F64)
    uncond = net(x, t)
    assert torch.equal(uncond, net(x, t, y=torch.full((4,), 3)))
    assert torch.equal(uncond, net(x, t, y=torch.tensor(3)))
    cond = [net(x, t, y=torch.full((4,), k)) for k in range(3)]
    for k in range(3):
        assert (cond[k] - uncond).abs().min() > 0
        for j in range(k):
            assert (cond[k] - cond[j]).abs().min() > 0
    assert make_mlp().null_label is None


def test_mlp_rejects_bad_inputs(gen):
    net = make_mlp(num_classes=3)
    x = torch.randn(4, 2, generator=gen, dtype=F64)
    t = torch.full((4,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"x must be shaped \(B, 2\); got \(4, 3\)"):
        net(torch.randn(4, 3, dtype=F64), t)
    with pytest.raises(ValueError, match=r"x must be shaped \(B, 2\); got \(2,\)"):
        net(torch.randn(2, dtype=F64), t)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        net([[0.0, 0.0]], t)
    with pytest.raises(ValueError, match=r"t must be 0-d or shaped \(B,\) = \(4,\)"):
        net(x, torch.full((3,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match=r"labels in 0..2 or the null label 3; got values \[4\]"):
        net(x, t, y=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="got values"):
        net(x, t, y=torch.tensor([-1, 0, 0, 0]))
    with pytest.raises(TypeError, match="y must be an integer tensor"):
        net(x, t, y=torch.zeros(4))
    with pytest.raises(ValueError, match=r"y must be 0-d or shaped \(B,\)"):
        net(x, t, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        make_mlp()(x, t, y=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dim": 0}, "dim must be an int >= 1"), ({"dim": 2, "depth": 0}, "depth must be"),
     ({"dim": 2, "hidden": 2.5}, "hidden must be"), ({"dim": 2, "num_classes": 0},
     "num_classes must be"),
     ({"dim": 2, "time_embedding_dim": 5}, r"time_embedding_dim=5: dim must be even \(sin and "
      r"cos pairs\); got dim=5 \(or None for the raw time\)"),
     ({"dim": 2, "time_embedding_dim": 0}, r"time_embedding_dim=0: dim must be an int >= 2; "
      r"got 0 \(or None"),
     ({"dim": 2, "activation": "swish"}, r"activation must be one of \['elu', 'gelu'"),
     ({"dim": 2, "activation": ["selu"]}, r"activation must be one of .*; got \['selu'\]"),
     ({"dim": 2, "label_embedding_dim": 8}, "label_embedding_dim=8 needs num_classes"),
     ({"dim": 2, "num_classes": 3, "label_embedding_dim": 0}, "label_embedding_dim must")],
)
def test_mlp_rejects_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_mlp_depth_and_gradients(gen):
    net = MLP(3, hidden=8, depth=4, time_embedding_dim=4, num_classes=2)
    linears = [m for m in net.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5 and linears[0].in_features == 3 + 4 + 4
    x = torch.randn(6, 3, generator=gen)
    net(x, torch.rand(6, generator=gen), y=torch.tensor([0, 1, 2, 0, 1, 2])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_mlp_runs_under_torch_func_jacobians(gen):
    """The divergence code takes per-sample Jacobians with vmap(jacrev): the forward must not
    read tensor values (no host sync) and must accept a 0-d t per sample."""
    net = make_mlp()
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    t = torch.rand(5, generator=gen, dtype=F64)

    def single(xi, ti):
        return net(xi[None], ti)[0]

    jac = torch.func.vmap(torch.func.jacrev(single))(x, t)
    for i in range(5):
        want = torch.autograd.functional.jacobian(lambda xi, i=i: single(xi, t[i]), x[i])
        torch.testing.assert_close(jac[i], want, rtol=1e-12, atol=1e-14)


def test_mlp_runs_under_torch_func_over_labels(gen):
    """vmap / jacrev over (x, y) together: the label-range check (a host read on CPU) must
    step aside inside transforms; results equal the batched call and autograd's Jacobian."""
    net = make_mlp(num_classes=3)
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1])  # 3 = the null label

    def single(xi, yi):
        return net(xi[None], 0.4, y=yi[None])[0]

    out = torch.func.vmap(single)(x, y)
    torch.testing.assert_close(out, net(x, 0.4, y=y), rtol=1e-13, atol=1e-14)
    jac = torch.func.vmap(torch.func.jacrev(single))(x, y)
    for i in range(5):
        want = torch.autograd.functional.jacobian(lambda xi, i=i: single(xi, y[i]), x[i])
        torch.testing.assert_close(jac[i], want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="got values"):  # still checked outside transforms
        net(x, 0.4, y=torch.tensor([0, 1, 2, 4, 1]))


def test_raw_time_selu_mlp_is_the_ot_cfm_papers_network(gen):
    """``[x, t]`` -> 3 x (Linear(64), SELU) -> Linear(2), written out by hand."""
    net = MLP(2, hidden=64, depth=3, time_embedding_dim=None, activation="selu").double()
    x = torch.randn(7, 2, generator=gen, dtype=F64)
    t = torch.rand(7, generator=gen, dtype=F64)
    lin = [m for m in net.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(3, 64), (64, 64), (64, 64),
                                                              (64, 2)]
    h = torch.cat([x, t[:, None]], 1)
    for m in lin[:-1]:
        h = torch.nn.functional.selu(h @ m.weight.T + m.bias)
    torch.testing.assert_close(net(x, t), h @ lin[-1].weight.T + lin[-1].bias, rtol=0,
                               atol=1e-14)
    torch.testing.assert_close(net(x, t[0]), net(x, t[0].expand(7)), rtol=0, atol=0)


def test_raw_time_mlp_with_labels_has_a_label_embedding(gen):
    net = MLP(2, hidden=8, depth=1, time_embedding_dim=None, num_classes=3)
    assert net.label_embedding.embedding_dim == 16 and net.net[0].in_features == 2 + 1 + 16
    x = torch.randn(4, 2, generator=gen)
    assert not torch.equal(net(x, 0.5, y=torch.tensor([0, 0, 0, 0])), net(x, 0.5))


def test_initial_weights_come_from_the_generator_and_leave_the_global_rng_alone():
    from flowsolve.training.nets import initial_weights_from
    from flowsolve.training.unet import UNet

    state = torch.random.get_rng_state()
    a = MLP(2, hidden=8, depth=2, num_classes=3, generator=torch.Generator().manual_seed(5))
    b = MLP(2, hidden=8, depth=2, num_classes=3, generator=torch.Generator().manual_seed(5))
    c = MLP(2, hidden=8, depth=2, num_classes=3, generator=torch.Generator().manual_seed(6))
    u1 = UNet(channels=8, embedding_dim=16, generator=torch.Generator().manual_seed(5))
    u2 = UNet(channels=8, embedding_dim=16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG did not move
    for x, y in ((a, b), (u1, u2)):
        assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters(),
                                                     strict=True))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
    # without a generator: the global RNG, exactly as before (same draws in the same order)
    torch.manual_seed(3)
    d = MLP(2, hidden=8, depth=2, num_classes=3)
    torch.manual_seed(3)
    e = torch.nn.Embedding(4, 64), torch.nn.Linear(2 + 64 + 64, 8)
    assert torch.equal(d.label_embedding.weight, e[0].weight)
    assert torch.equal(d.net[0].weight, e[1].weight)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        with initial_weights_from(5):
            pass
