"""``threads=`` on long work: torch's intra-op thread count is set for the call only and
restored afterwards (also after an error), and recorded with the timings."""

import pytest
import torch

import flowsolve as fs
from flowsolve._core.threads import intra_op_threads


@pytest.fixture
def two_threads():
    """The thread count a user left: 2 (restored to the suite's 1 afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def recording_field():
    """An exact mixture velocity that records torch's thread count at each call."""
    u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4),
                                      fs.AffineGaussianPath(fs.CondOTScheduler()))
    seen: list[int] = []

    def field(x, t):
        seen.append(torch.get_num_threads())
        return u(x, t)

    return field, seen


def test_the_block_runs_with_the_count_and_restores_it(two_threads):
    with intra_op_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), intra_op_threads(1):
        raise KeyError("an error inside")
    assert torch.get_num_threads() == 2
    with intra_op_threads(None) as n:
        assert n == 2
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="threads must be None"), intra_op_threads(bad):
            pass


def test_a_study_times_with_its_threads_and_restores_the_users(two_threads):
    field, seen = recording_field()

    x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    study = fs.compare_solvers(field, x0, solvers=["euler"], steps=[2, 4], repeats=1, warmup=0,
                               threads=1)
    assert set(seen) == {1} and study.meta["threads"] == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads must be None"):
        fs.compare_solvers(field, x0, solvers=["euler"], steps=[2, 4], threads=0)


def test_training_runs_with_its_threads_and_records_them(two_threads):
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, t):
            seen.append(torch.get_num_threads())
            return self.lin(torch.cat([x, t.expand(x.shape[0])[:, None]], 1))

    cfg = fs.TrainConfig(steps=3, batch_size=8, log_every=1, ema_decay=None, progress=False)
    res = fs.train(Net(), "moons", cfg, threads=1, generator=torch.Generator().manual_seed(0))
    assert set(seen) == {1} and res.threads == 1
    assert torch.get_num_threads() == 2
    res = fs.train(Net(), "moons", cfg, generator=torch.Generator().manual_seed(0))
    assert res.threads == 2  # torch's own setting, recorded
    with pytest.raises(ValueError, match="threads must be None"):
        fs.train(Net(), "moons", cfg, threads=0)


def test_a_dataset_likelihood_runs_with_its_threads(two_threads):
    field, seen = recording_field()

    x = fs.GaussianMixture.ring(4).sample(6, generator=torch.Generator().manual_seed(0))
    fs.dataset_log_likelihood(field, x, batch_size=3, solver="rk4", steps=2, progress=False,
                              threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == 2
