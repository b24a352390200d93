"""Field adapters: parameterisation round trips and closed-form reproductions (float64), and
classifier-free guidance."""

import pytest
import torch

import flowsolve as fs
from flowsolve.paths.fields import ConvertedField, as_score, as_velocity, convert_field, guided

F64 = torch.float64
DATA = fs.GaussianMixture(
    torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
    torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[0.3, 0.0], [0.0, 0.8]], [[1.0, -0.3], [-0.3, 0.2]]]),
    torch.tensor([0.5, 0.3, 0.2]),
)
SCHEDULERS = [fs.CondOTScheduler(), fs.CosineScheduler(), fs.LinearVPScheduler(),
              fs.PolynomialScheduler(2.0), fs.VEScheduler()]
KINDS = ["score", "epsilon", "x1", "v"]


def points(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, 2, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=F64)  # inside (0, 1): all regular
    return x, t


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("kind", KINDS)
def test_velocity_to_any_kind_and_back_is_the_identity(scheduler, kind):
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(DATA, path)
    there_and_back = as_velocity(convert_field(u, path, "velocity", kind), path, kind)
    x, t = points()
    assert close(there_and_back(x, t), u(x, t))
    assert close(there_and_back(x, t[3]), u(x, t[3]))  # a 0-d time too


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
def test_velocity_score_velocity_round_trip(scheduler):
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(DATA, path)
    x, t = points(seed=1)
    assert close(as_velocity(as_score(u, path), path, "score")(x, t), u(x, t))


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
def test_adapters_of_the_analytic_posterior_mean_and_score_give_the_analytic_velocity(
        scheduler):
    """Three independent closed forms of analytic.py (E[x1 | x], grad log p_t and u_t)
    agree through the adapters; epsilon is reached from x1 and compared with the score's."""
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(DATA, path)
    x1_hat = fs.analytic.posterior_mean(DATA, path)
    score = fs.analytic.marginal_score(DATA, path)
    x, t = points(seed=2)
    want = u(x, t)
    assert close(as_velocity(x1_hat, path, "x1")(x, t), want)
    assert close(as_velocity(score, path, "score")(x, t), want)
    eps_from_x1 = convert_field(x1_hat, path, "x1", "epsilon")
    assert close(eps_from_x1(x, t), convert_field(score, path, "score", "epsilon")(x, t))
    assert close(as_velocity(eps_from_x1, path, "epsilon")(x, t), want)
    assert close(as_score(u, path)(x, t), score(x, t))


def test_singular_conversions_raise_per_call_or_once_on_an_interval():
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    score = fs.analytic.marginal_score(DATA, path)
    x = torch.zeros(4, 2, dtype=F64)
    per_call = as_velocity(score, path, "score")
    with pytest.raises(ValueError, match="singular at t=0.0"):
        per_call(x, 0.0)  # alpha_0 = 0
    with pytest.raises(ValueError, match=r"singular at t=0.0, inside interval=\[0.0, 1.0\]"):
        as_velocity(score, path, "score", interval=(0.0, 1.0))
    checked = per_call.on_interval(1e-3, 1.0)
    assert checked.interval == (1e-3, 1.0) and per_call.interval is None
    assert close(checked(x, 0.5), per_call(x, 0.5))
    with pytest.raises(ValueError, match="outside the interval"):
        checked(x, 1e-4)
    # the x1 -> velocity conversion is singular at sigma_1 = 0 instead
    with pytest.raises(ValueError, match="singular at t=1.0"):
        as_velocity(fs.analytic.posterior_mean(DATA, path), path, "x1", interval=(0.5, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_an_interval_end_that_rounds_onto_a_singularity_raises_in_that_dtype(dtype):
    """1 - 1e-8 is regular in float64 but rounds to 1 in float32 (and below), where x1 ->
    velocity divides by sigma_1 = 0: the first call in that dtype raises instead of
    returning NaN; an end that stays below 1 in that dtype gives the closed form."""
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    x1_hat = fs.analytic.posterior_mean(DATA, path)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    field = as_velocity(x1_hat, path, "x1", interval=(0.5, 1 - 1e-8))  # fine in float64
    assert torch.isfinite(field(x.double(), 1 - 1e-8)).all()
    for t in (1 - 1e-8, 0.75):  # the check runs on the first call in a dtype, at any t
        with pytest.raises(ValueError, match=rf"singular at t=1.0 \(an end rounded to {dtype}"):
            field(x, t)
    hi = 1 - torch.finfo(dtype).eps  # representable, below 1
    ok = as_velocity(lambda x, t: torch.ones_like(x), path, "x1", interval=(0.5, hi))
    # CondOT: u = (x1_hat - x) / (1 - t) = 1 / eps at x = 0, x1_hat = 1, t = 1 - eps
    out = ok(torch.zeros_like(x), hi)
    assert torch.equal(out, torch.full_like(x, 1 / torch.finfo(dtype).eps))


def test_adapter_arguments_are_checked():
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(DATA, path)
    with pytest.raises(ValueError, match="from_kind='logits'"):
        ConvertedField(u, path, "logits")
    with pytest.raises(TypeError, match="AffineGaussianPath"):
        as_velocity(u, fs.CondOTScheduler(), "score")
    with pytest.raises(TypeError, match="callable"):
        as_velocity(3.0, path, "score")
    with pytest.raises(ValueError, match="interval must lie in"):
        as_velocity(u, path, "velocity", interval=(-0.1, 0.5))


# -- guidance ----------------------------------------------------------------------------------
class CountingModel:
    """Conditional 'model' f(x, t | y) = y * x + t (null label 0 -> t), counting calls."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        t = torch.as_tensor(t, dtype=x.dtype)
        return y.to(x.dtype).reshape(-1, 1) * x + (t if t.dim() == 0 else t.reshape(-1, 1))


@pytest.mark.parametrize("t", [torch.tensor(0.25, dtype=F64),
                               torch.tensor([0.1, 0.2, 0.3], dtype=F64)], ids=["0-d", "(B,)"])
def test_guidance_is_one_batched_call_with_exact_endpoints(t):
    model = CountingModel()
    labels = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    cond, uncond = model(x, t, labels), model(x, t, torch.zeros(3, dtype=F64))
    model.batch_sizes.clear()
    for w, want in ((1.0, cond), (0.0, uncond), (3.0, 3 * cond - 2 * uncond)):
        got = guided(model, labels, w, null_label=0.0)(x, t)
        assert torch.equal(got, want) if w in (0.0, 1.0) else close(got, want, 1e-14)
    # w = 1 and w = 0: one half alone; otherwise both halves in one call
    assert model.batch_sizes == [3, 3, 6]
    # the "(1 + w') cond - w' uncond" convention is w = 1 + w'
    w_prime = 2.0
    assert close(guided(model, labels, 1 + w_prime, null_label=0.0)(x, t),
                 (1 + w_prime) * cond - w_prime * uncond, 1e-14)


def test_guidance_commutes_with_conversion():
    """Guiding score models and converting equals converting and guiding (the conversion
    is affine with the same B_t for both halves)."""
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    other = fs.GaussianMixture.ring(3)
    s_c, s_u = (fs.analytic.marginal_score(d, path) for d in (DATA, other))
    u_c, u_u = (fs.analytic.marginal_velocity(d, path) for d in (DATA, other))

    def conditional(cond, uncond):
        return lambda x, t, y: torch.where((y == 0).reshape(-1, 1), uncond(x, t), cond(x, t))

    labels = torch.ones(16, dtype=torch.long)
    x, _ = points(16, seed=3)
    for w in (0.0, 1.0, 2.5):
        via_score = as_velocity(guided(conditional(s_c, s_u), labels, w, null_label=0), path,
                                "score")
        direct = guided(conditional(u_c, u_u), labels, w, null_label=0)
        assert close(via_score(x, 0.4), direct(x, 0.4))


def test_guidance_takes_the_null_label_from_the_model():
    torch.manual_seed(0)  # the network's initial weights only
    net = fs.MLP(2, hidden=16, depth=2, time_embedding_dim=8, num_classes=3).double()
    labels = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.5, dtype=F64)
    with torch.no_grad():
        assert torch.equal(guided(net, labels, 0.0)(x, t), net(x, t, torch.full((4,), 3)))
        assert close(guided(net, labels, 1.0)(x, t), net(x, t, labels), 1e-12)


def test_guidance_arguments_are_checked():
    model = CountingModel()
    labels = torch.ones(3)
    with pytest.raises(ValueError, match="null_label is required"):
        guided(model, labels, 1.0)
    for w in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="w must be a finite number"):
            guided(model, labels, w, null_label=0.0)
    with pytest.raises(TypeError, match="w must be a finite number"):
        guided(model, labels, "2", null_label=0.0)
    # a fractional null label would be truncated to a real class of integer labels
    int_labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="null_label must be an integer.*got 2.5"):
        guided(model, int_labels, 1.5, null_label=2.5)
    with pytest.raises(ValueError, match="null_label must be an integer"):
        guided(model, int_labels, 1.5, null_label=torch.tensor(float("nan")))
    assert guided(model, int_labels, 1.5, null_label=3.0)._both[3:].tolist() == [3, 3, 3]
    assert guided(model, labels, 1.5, null_label=0.5)._both[3:].tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="one sample per label"):
        guided(model, labels, 1.0, null_label=0.0)(torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        guided(model, labels, 1.0, null_label=torch.zeros(2))
