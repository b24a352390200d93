"""Progress of long work through tqdm: whole lines when stderr is not a terminal (a log
file, a pipe), nothing when switched off."""

import torch

import flowsolve as fs
from flowsolve._core.progress import progress_bar


def test_a_piped_bar_writes_whole_lines(capsys):
    with progress_bar(3, "work", unit="item") as bar:
        for _ in range(3):
            bar.update()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%")
    assert "3/3" in lines[-1]


def test_a_disabled_bar_prints_nothing(capsys):
    with progress_bar(3, "work", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_a_study_reports_its_runs(capsys):
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4), path)
    x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fs.compare_solvers(u, x0, solvers=["euler", "rk4"], steps=[2, 4], repeats=1, warmup=0,
                       progress=True)
    assert capsys.readouterr().err.splitlines()[-1].startswith("compare: 100%")
    fs.compare_solvers(u, x0, solvers=["euler"], steps=[2, 4], repeats=1, warmup=0)
    assert capsys.readouterr().err == ""


def test_training_and_dataset_likelihood_report_through_the_bar(capsys):
    net = fs.MLP(2, hidden=8, depth=1, generator=torch.Generator().manual_seed(0))
    cfg = fs.TrainConfig(steps=4, batch_size=8, log_every=2, ema_decay=None)
    fs.train(net, "moons", cfg, generator=torch.Generator().manual_seed(0))
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("train: 100%") and "4/4" in last and "loss=" in last
    u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4),
                                      fs.AffineGaussianPath(fs.CondOTScheduler()))
    x = fs.GaussianMixture.ring(4).sample(6, generator=torch.Generator().manual_seed(0))
    fs.dataset_log_likelihood(u, x, batch_size=3, solver="rk4", steps=2)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("log-likelihood: 100%")
    assert "6/6" in err.splitlines()[-1]
