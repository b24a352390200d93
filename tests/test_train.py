"""The training loop: EMA in closed form, exact resumption, the batch producer (workers,
ranks), two-process DDP on gloo, convergence to the analytic marginal fields, CFG dropout."""

from __future__ import annotations

import datetime
import math
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flowsolve as fs
from flowsolve import analytic
from flowsolve.paths.bridges import GaussianBridge
from flowsolve.training import pipeline
from flowsolve.training.data import LabeledSamples, sample_labeled
from flowsolve.training.ema import EMA
from flowsolve.training.loop import BatchProducer, TrainConfig, load_weights, train

F64 = torch.float64


def mlp(seed=0, **kwargs) -> fs.MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fs.MLP(2, **{"hidden": 32, "depth": 2, "time_embedding_dim": 8, **kwargs})


def quiet(**kwargs) -> TrainConfig:
    return TrainConfig(**{"progress": False, "log_every": 1, **kwargs})


class RandomPairing:
    """A coupling that permutes x0 with its generator and checks the labels come along."""

    def __call__(self, x0, x1, *extras, generator=None):
        assert len(extras) == 1 and extras[0].shape == x1.shape[:1]
        perm = torch.randperm(x0.shape[0], generator=generator, device=x0.device)
        return x0[perm], x1, *extras


# -- EMA ---------------------------------------------------------------------------------------
def test_ema_is_the_closed_form_geometric_average(gen):
    net = nn.BatchNorm1d(3).double()  # a weight, a bias and running-stat buffers
    beta, n = 0.9, 25
    thetas = [torch.randn(2, 3, generator=gen, dtype=F64) for _ in range(n + 1)]
    with torch.no_grad():
        net.weight.copy_(thetas[0][0])
        net.bias.copy_(thetas[0][1])
    ema = EMA(net, beta)
    for k in range(1, n + 1):
        with torch.no_grad():
            net.weight.copy_(thetas[k][0])
            net.bias.copy_(thetas[k][1])
            net.running_mean.fill_(float(k))
        ema.update(net)
    # theta_ema_n = beta^n theta_0 + (1 - beta) sum_k beta^(n - k) theta_k
    expected = beta**n * thetas[0] + (1 - beta) * sum(beta ** (n - k) * thetas[k]
                                                      for k in range(1, n + 1))
    torch.testing.assert_close(torch.stack([ema.model.weight, ema.model.bias]), expected,
                               rtol=1e-13, atol=1e-13)
    assert ema.model.running_mean.tolist() == [float(n)] * 3  # buffers are copied
    assert not ema.model.training and not ema.model.weight.requires_grad


def test_warmed_up_ema_is_the_closed_form_with_step_dependent_decay(gen):
    net = nn.Linear(3, 2).double()
    beta, n = 0.999, 40
    thetas = [torch.randn(2, 3, generator=gen, dtype=F64) for _ in range(n + 1)]
    with torch.no_grad():
        net.weight.copy_(thetas[0])
    ema = EMA(net, beta, warmup=True)
    for k in range(1, n + 1):
        with torch.no_grad():
            net.weight.copy_(thetas[k])
        ema.update(net, k)
    betas = [min(beta, (1 + k) / (10 + k)) for k in range(1, n + 1)]  # 0.18, 0.25, ...
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10**5) == beta
    # theta_ema_n = prod_k beta_k theta_0 + sum_k (1 - beta_k) prod_{j > k} beta_j theta_k
    expected = math.prod(betas) * thetas[0] + sum(
        (1 - betas[k - 1]) * math.prod(betas[k:]) * thetas[k] for k in range(1, n + 1))
    torch.testing.assert_close(ema.model.weight, expected, rtol=1e-13, atol=1e-13)
    assert math.prod(betas) < 1e-8  # the initial weights are gone (no warm-up: 0.96)
    # numbered by default: the update after the last; bad numbers are refused
    counting = EMA(net, beta, warmup=True)
    counting.update(net)
    counting.update(net)
    assert counting.num_updates == 2 and ema.num_updates == n
    with pytest.raises(ValueError, match="an int >= 1; got 0"):
        counting.update(net, 0)
    # the state carries the update count: a restored EMA continues the warm-up at n + 1
    restored = EMA(nn.Linear(3, 2).double(), beta, warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == n
    restored.update(net), ema.update(net)
    torch.testing.assert_close(restored.model.weight, ema.model.weight, rtol=0, atol=0)


def test_training_passes_the_step_number_to_the_ema(gen):
    # after one step theta_ema_1 = beta_1 theta_0 + (1 - beta_1) theta_1; beta_1 = 2/11 with
    # the warm-up (a 0-based step would give 1/10), ema_decay without it
    for warmup, beta in ((True, 2 / 11), (False, 0.999)):
        torch.manual_seed(0)
        net = fs.MLP(2, hidden=8, depth=1, time_embedding_dim=4).double()
        start = [p.detach().clone() for p in net.parameters()]
        res = train(net, "moons", quiet(steps=1, batch_size=32, ema_warmup=warmup, lr=1e-2))
        for e, p0, p1 in zip(res.ema_model.parameters(), start, res.model.parameters(),
                             strict=True):
            assert (p1 - p0).abs().max() > 1e-4  # the step moved the weights
            torch.testing.assert_close(e, beta * p0 + (1 - beta) * p1, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="ema_warmup must be True or False"):
        TrainConfig(ema_warmup=1)


# -- exact resumption -------------------------------------------------------------------------
@pytest.mark.parametrize("kind, log_every", [("finite", 1), ("stream", 3)])
def test_a_checkpoint_resumes_bit_for_bit(tmp_path, kind, log_every):
    labeled = sample_labeled("8gaussians", 1000, generator=torch.Generator().manual_seed(3))
    data = labeled if kind == "finite" else (lambda n, generator: sample_labeled(
        "8gaussians", n, generator=generator))
    cfg = quiet(steps=24, batch_size=64, grad_clip=1.0, warmup_steps=5, ema_decay=0.9,
                label_dropout=0.3, checkpoint_every=8, log_every=log_every)
    kwargs = dict(coupling=RandomPairing(), path=GaussianBridge(0.1))

    def run(**extra):
        return train(mlp(num_classes=8), data, cfg, generator=torch.Generator().manual_seed(5),
                     **kwargs, **extra)

    whole = run()

    def stop_after_12(log):  # a crash between two checkpoints (at 8 and 16)
        if log.step > 12:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=ckpt, callback=stop_after_12)
    assert torch.load(ckpt, weights_only=True)["step"] == 8
    resumed = train(mlp(seed=99, num_classes=8), data, cfg, checkpoint=ckpt, **kwargs)
    assert resumed.start_step == 8 and resumed.step == 24
    assert resumed.losses == whole.losses
    assert resumed.log_steps == list(range(log_every, 25, log_every))
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema_model.parameters(), resumed.ema_model.parameters(), strict=True):
        assert torch.equal(a, b)
    # a finished run resumes to itself; the file holds tensors and plain containers only
    again = train(mlp(seed=7, num_classes=8), data, cfg, checkpoint=ckpt, **kwargs)
    assert again.start_step == 24 and again.losses == whole.losses
    assert_plain(torch.load(ckpt, weights_only=True))
    assert sorted(os.listdir(tmp_path)) == ["run.pt"]  # the temporary file was renamed
    net = load_weights(mlp(seed=1, num_classes=8), ckpt)
    for a, b in zip(net.parameters(), whole.ema_model.parameters(), strict=True):
        assert torch.equal(a, b)


def assert_plain(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int))
            assert_plain(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            assert_plain(v)
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool)), type(obj)


def test_a_checkpoint_of_another_setup_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(mlp(), "moons", quiet(steps=2, batch_size=8), checkpoint=ckpt)
    refused = {"batch_size": 16, "ema_warmup": False, "lr": 0.1, "weight_decay": 0.0,
               "warmup_steps": 1, "ema_decay": None, "grad_clip": 1.0,
               "time_distribution": "logit_normal", "betas": (0.8, 0.99)}
    for key, value in refused.items():
        written = repr(getattr(quiet(steps=2, batch_size=8), key))
        with pytest.raises(ValueError, match=re.escape(f"{key}={written} (this call: {value!r})")):
            train(mlp(), "moons", quiet(steps=4, **{"batch_size": 8, key: value}),
                  checkpoint=ckpt)
    # two changes are both named
    with pytest.raises(ValueError, match=r"lr=0.001 \(this call: 0.1\), .*grad_clip=None"):
        train(mlp(), "moons", quiet(steps=4, batch_size=8, lr=0.1, grad_clip=2.0),
              checkpoint=ckpt)
    # what does not change the trajectory may change: more steps, logging, checkpoints, workers
    res = train(mlp(), "moons", quiet(steps=4, batch_size=8, log_every=2, checkpoint_every=1,
                                      num_workers=0, prefetch_factor=3), checkpoint=ckpt)
    assert (res.start_step, res.step) == (2, 4)
    # a checkpoint from before the warm-up existed (no such config key) ran without it
    state = torch.load(ckpt, weights_only=True)
    del state["checksum"]  # written before checksums: none to verify
    del state["config"]["ema_warmup"]
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=re.escape("ema_warmup=False (this call: True)")):
        train(mlp(), "moons", quiet(steps=6, batch_size=8), checkpoint=ckpt)
    train(mlp(), "moons", quiet(steps=6, batch_size=8, ema_warmup=False), checkpoint=ckpt)


def test_a_run_without_ema_does_not_resume_with_one(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(mlp(), "moons", quiet(steps=2, batch_size=8, ema_decay=None), checkpoint=ckpt)
    with pytest.raises(ValueError, match=re.escape("ema_decay=None (this call: 0.999)")):
        train(mlp(), "moons", quiet(steps=4, batch_size=8), checkpoint=ckpt)
    # without an EMA on either side its warm-up flag is irrelevant
    res = train(mlp(), "moons", quiet(steps=4, batch_size=8, ema_decay=None, ema_warmup=False),
                checkpoint=ckpt)
    assert res.start_step == 2 and res.ema_model is None


def test_the_checkpoint_folder_is_made_before_training(tmp_path):
    ckpt = tmp_path / "new" / "folder" / "run.pt"
    train(mlp(), "moons", quiet(steps=2, batch_size=8), checkpoint=ckpt)
    assert ckpt.is_file() and [p.name for p in ckpt.parent.iterdir()] == ["run.pt"]
    blocked = tmp_path / "a_file"
    blocked.write_text("mine")
    calls = []
    with pytest.raises(OSError):
        train(mlp(), "moons", quiet(steps=2, batch_size=8), checkpoint=blocked / "run.pt",
              callback=calls.append)
    assert calls == [] and blocked.read_text() == "mine"  # refused before the first step


# -- the batch producer --------------------------------------------------------------------------
def test_dataloader_workers_produce_the_main_process_batches():
    data = lambda n, generator: sample_labeled("moons", n, generator=generator)  # noqa: E731
    settings = [dict(num_workers=0), dict(num_workers=2), dict(couple_on_device=True)]
    runs = [train(mlp(num_classes=2), data, quiet(steps=6, batch_size=32, **s),
                  coupling=RandomPairing()) for s in settings]
    assert runs[0].losses == runs[1].losses == runs[2].losses


def test_ranks_split_each_epoch_of_a_finite_set():
    data = torch.arange(100, dtype=F64)[:, None]
    producers = [BatchProducer(data, batch_size=8, seed=11, rank=r, world_size=2)
                 for r in range(2)]
    per_epoch = 100 // 16
    seen = [torch.cat([p[k].x1 for k in range(per_epoch)]).flatten() for p in producers]
    everything = torch.cat(seen)
    assert everything.unique().numel() == per_epoch * 16  # disjoint, no repeats in an epoch
    nxt = torch.cat([p[per_epoch].x1 for p in producers]).flatten()
    assert not torch.equal(nxt, torch.cat([p[0].x1 for p in producers]).flatten())  # reshuffled
    # the source is N(0, I) shaped like x1 and depends on the rank
    assert producers[0][0].x0.shape == (8, 1)
    assert not torch.equal(producers[0][0].x0, producers[1][0].x0)


def test_batch_producer_checks_its_seed_and_its_labels():
    x = torch.arange(40, dtype=F64)[:, None]
    for seed in (None, 1.5, "a", True):
        with pytest.raises(TypeError, match="seed must be an int"):
            BatchProducer(x, batch_size=8, seed=seed)
    # any integral type: the same batches as the Python int
    assert torch.equal(BatchProducer(x, batch_size=8, seed=np.int64(3))[0].x0,
                       BatchProducer(x, batch_size=8, seed=3)[0].x0)
    for n_labels in (39, 41):  # shorter: IndexError later; longer: silently accepted
        with pytest.raises(ValueError, match=r"len\(x\) == len\(y\); got x \(40, 1\) and y "
                                             rf"\({n_labels},\)"):
            BatchProducer((x, torch.arange(n_labels)), batch_size=8, seed=0)
    batch = BatchProducer((x, 10 * torch.arange(40)), batch_size=8, seed=0)[1]
    assert torch.equal(batch.y, 10 * batch.x1.flatten().long())  # labels travel with x


def _labelled_source_and_data():
    """A labelled source and labelled data, 3 classes each; every source point is told apart
    by its first coordinate (its index) and the source classes sit in an order unrelated to
    the data's, so pairing without the source labels crosses classes."""
    g = torch.Generator().manual_seed(7)
    n = 384
    y0 = torch.randint(0, 3, (n,), generator=g)
    x0 = torch.stack([torch.arange(n, dtype=torch.float32) / n,
                      torch.randn(n, generator=g)], 1)
    data = sample_labeled("8gaussians", n, generator=g)
    return LabeledSamples(x0, y0), LabeledSamples(data.x, data.y % 3)


def _source_labels(batch, source):
    """The source label of each x0 of a coupled batch (found by its first coordinate)."""
    idx = torch.round(batch.x0[:, 0].double() * source.x.shape[0]).long()
    assert torch.equal(batch.x0, source.x[idx])
    return source.y[idx]


def test_a_labelled_source_is_paired_within_its_labels_by_class_conditional_ot():
    source, data = _labelled_source_and_data()
    producer = BatchProducer(data, source, fs.ClassConditionalOT("exact"), batch_size=64,
                             seed=3)
    steps = range(8)  # more than one epoch (384 // 64 = 6 batches)
    batches = [producer[k] for k in steps]
    for b in batches:
        assert torch.equal(_source_labels(b, source), b.y)  # y0 == y1 for every pair
        assert b.y0 is None  # a coupled batch holds no (unordered) source labels
    drawn = producer.draw(0)
    assert drawn.y0 is not None and torch.equal(_source_labels(drawn, source), drawn.y0)
    # the same batches from two DataLoader workers and when coupled after the move
    loader = torch.utils.data.DataLoader(producer, batch_size=None, sampler=steps,
                                         num_workers=2, multiprocessing_context="fork")
    on_device = [producer.couple(producer.draw(k).to("cpu", torch.float32), k) for k in steps]
    for ours in (list(loader), on_device):
        for a, b in zip(batches, ours, strict=True):
            assert torch.equal(a.x0, b.x0) and torch.equal(a.x1, b.x1)
            assert torch.equal(a.y, b.y)
    # without the source labels (the same source points, unlabelled) classes are crossed
    blind = BatchProducer(data, source.x, fs.ClassConditionalOT("exact"), batch_size=64,
                          seed=3)[0]
    assert torch.equal(blind.y, batches[0].y)
    assert (_source_labels(blind, source) != blind.y).float().mean() > 0.3


def test_a_label_free_coupling_ignores_the_source_labels():
    source, data = _labelled_source_and_data()
    labelled = BatchProducer(data, source, fs.OTCoupling("exact"), batch_size=64, seed=3)
    plain = BatchProducer(data, source.x, fs.OTCoupling("exact"), batch_size=64, seed=3)
    for k in range(3):
        a, b = labelled[k], plain[k]
        assert torch.equal(a.x0, b.x0) and torch.equal(a.x1, b.x1) and torch.equal(a.y, b.y)
    # training with the labelled source and class-conditional OT: workers or not, the same
    settings = [dict(num_workers=0), dict(num_workers=2), dict(couple_on_device=True)]
    runs = [train(mlp(num_classes=3), data, quiet(steps=4, batch_size=32, **s), source=src,
                  coupling=fs.ClassConditionalOT("exact"), path=GaussianBridge(0.1))
            for s in settings for src in (source, source.x)]
    with_labels, without = runs[0::2], runs[1::2]
    assert with_labels[0].losses == with_labels[1].losses == with_labels[2].losses
    assert without[0].losses == without[1].losses == without[2].losses
    # the source labels reach the coupling in every mode: label-matched pairs train otherwise
    assert with_labels[0].losses != without[0].losses


# -- torch.distributed ----------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        data = sample_labeled("8gaussians", 4096, generator=torch.Generator().manual_seed(0)).x
        cfg = TrainConfig(steps=80, batch_size=128, log_every=20, progress=False,
                          checkpoint_every=40, num_workers=rank)  # workers or not: same batches
        res = train(mlp(seed=rank), data, cfg, checkpoint=os.path.join(out_dir, "c.pt"),
                    generator=torch.Generator().manual_seed(rank))
        flat = torch.cat([p.detach().flatten() for p in res.model.parameters()])
        ema = torch.cat([p.flatten() for p in res.ema_model.parameters()])
        producer = BatchProducer(data, batch_size=128, seed=res.seed, rank=rank, world_size=2)
        # resume to 100 steps where only rank 0's disk holds the checkpoint: rank 0 decides
        # and sends its state (a rank that decided alone would wait for ever)
        own = os.path.join(out_dir, "c.pt") if rank == 0 else os.path.join(out_dir, "r1", "c.pt")
        more = train(mlp(seed=rank), data, TrainConfig(**{**asdict(cfg), "steps": 100}),
                     checkpoint=own, generator=torch.Generator().manual_seed(rank))
        torch.save({"params": flat, "ema": ema, "losses": torch.tensor(res.losses),
                    "seed": res.seed, "x1": torch.cat([producer[k].x1 for k in range(16)]),
                    "resumed": (more.start_step, more.step, more.seed),
                    "resumed_params": torch.cat([p.detach().flatten()
                                                 for p in more.model.parameters()])},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_train_identical_replicas(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(out[0]["params"], out[1]["params"])  # DDP kept the replicas equal
    assert torch.equal(out[0]["ema"], out[1]["ema"])
    assert torch.equal(out[0]["losses"], out[1]["losses"])  # logged losses: mean over ranks
    losses = out[0]["losses"]
    assert losses[-1] < 0.8 * losses[0]
    # the logged loss is the mean over ranks, not the sum: one process on the global batch of
    # 256 logs the same first-interval loss up to sampling noise (a sum would be 2x)
    data = sample_labeled("8gaussians", 4096, generator=torch.Generator().manual_seed(0)).x
    single = train(mlp(seed=0), data, TrainConfig(steps=20, batch_size=256, log_every=20,
                                                  progress=False),
                   generator=torch.Generator().manual_seed(0))
    assert 0.8 < losses[0] / single.losses[0] < 1.25
    assert out[0]["resumed"] == out[1]["resumed"] == (80, 100, out[0]["seed"])
    assert torch.equal(out[0]["resumed_params"], out[1]["resumed_params"])
    # rank 0's seed is broadcast, so the ranks split one epoch (16 x 2 x 128 = 4096 samples)
    # into disjoint halves, although each rank passed its own generator
    assert out[0]["seed"] == out[1]["seed"]
    both = torch.cat([out[0]["x1"], out[1]["x1"]])
    assert both.unique(dim=0).shape[0] == 4096
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 100
    assert torch.equal(torch.cat([p.flatten() for p in state["model"].values()]),
                       out[0]["resumed_params"])
    assert not (tmp_path / "r1" / "c.pt").exists()  # only rank 0 writes
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


# -- what the loop learns --------------------------------------------------------------------------
DATA = fs.GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.tensor([[0.3, 0.3],
                                                                                [0.2, 0.5]]))


def excess_error(model, path, target, gen) -> float:
    """E_{t, x_t ~ p_t} ||f_theta(x_t, t) - f*(x_t, t)||^2, t in [0.02, 0.98]."""
    x1 = DATA.sample(4096, generator=gen)
    x0 = torch.randn(4096, 2, generator=gen)
    t = 0.02 + 0.96 * torch.rand(4096, generator=gen)
    xt = path.sample(x0, x1, t).x_t
    with torch.no_grad():
        return (model(xt, t) - target(xt.double(), t.double()).float()).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("setup", ["affine-velocity", "bridge-velocity", "epsilon", "score"])
def test_training_approaches_the_analytic_marginal_field(setup, gen):
    scheduler = fs.CosineScheduler() if setup in ("epsilon", "score") else fs.CondOTScheduler()
    path = fs.AffineGaussianPath(scheduler)
    if setup == "epsilon":
        score = analytic.marginal_score(DATA, path)
        target = lambda x, t: -scheduler.sigma(t)[:, None] * score(x, t)  # noqa: E731
    elif setup == "score":
        score = analytic.marginal_score(DATA, path)
        # compare sigma_t s: the score itself is unbounded as sigma_t -> 0
        target = lambda x, t: scheduler.sigma(t)[:, None] * score(x, t)  # noqa: E731
    else:
        target = analytic.marginal_velocity(DATA, path)
    model = mlp(hidden=64, depth=3, time_embedding_dim=16)
    if setup == "score":
        class SigmaScore(nn.Module):  # evaluate sigma_t s_theta
            def forward(self, x, t):
                return scheduler.sigma(t)[:, None] * model(x, t)
        probe = SigmaScore()
    else:
        probe = model
    before = excess_error(probe, path, target, torch.Generator().manual_seed(0))
    prediction = "velocity" if "velocity" in setup else setup
    res = train(model, DATA, quiet(steps=800, log_every=100, prediction=prediction, lr=3e-3,
                                   ema_decay=None),
                path=GaussianBridge(0.0) if setup == "bridge-velocity" else path)
    after = excess_error(probe, path, target, torch.Generator().manual_seed(0))
    assert after < 0.1 * before, (before, after)
    assert res.losses[-1] < res.losses[0]


# -- classifier-free guidance ----------------------------------------------------------------------
class Spy(nn.Module):
    """A conditional model that records the labels it is fed."""

    def __init__(self):
        super().__init__()
        self.net = mlp(num_classes=8)
        self.num_classes, self.null_label, self.seen = 8, 8, []

    def forward(self, x, t, y=None):
        self.seen.append(y.clone())
        return self.net(x, t, y=y)


@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_cfg_dropout_feeds_the_null_label_at_rate_p(p):
    data = sample_labeled("8gaussians", 2048, generator=torch.Generator().manual_seed(1))
    spy = Spy()
    cfg = quiet(steps=40, batch_size=256, label_dropout=p, log_every=40)
    train(spy, data, cfg, generator=torch.Generator().manual_seed(2))
    producer = BatchProducer(data, batch_size=256, seed=_seed_of(torch.Generator().manual_seed(2)))
    fed = torch.cat(spy.seen)
    true = torch.cat([producer[k].y for k in range(40)])
    dropped = fed == 8
    assert torch.equal(fed[~dropped], true[~dropped])  # the others keep their own label
    rate, n = dropped.double().mean().item(), fed.numel()
    assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n)


def _seed_of(g: torch.Generator) -> int:
    return int(torch.randint(0, 1 << 62, (), generator=g))


# -- failures -------------------------------------------------------------------------------------
def test_bad_setups_raise_with_what_to_change():
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="prediction='logits' is not a parameterisation"):
        TrainConfig(prediction="logits")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="couple_on_device=True needs num_workers=0"):
        TrainConfig(couple_on_device=True, num_workers=2)
    with pytest.raises(ValueError, match="source=None and coupling=None"):
        train(mlp(), "moons", quiet(prediction="epsilon"), coupling=RandomPairing())
    with pytest.raises(ValueError, match="a GaussianBridge trains velocity models"):
        train(mlp(), "moons", quiet(prediction="score"), path=GaussianBridge(0.1))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(mlp(), torch.zeros(10, 2), quiet(batch_size=16))
    with pytest.raises(TypeError, match="data must be a tensor"):
        train(mlp(), 3.0, quiet())
    with pytest.raises(TypeError, match="must return"):
        train(mlp(), "moons", quiet(steps=1), coupling=lambda x0, x1: x0)


def test_a_diverging_loss_stops_the_run():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(float("inf")))

        def forward(self, x, t):
            return self.w * x

    with pytest.raises(FloatingPointError, match="at step 2: lower config.lr or set "
                       r"config.grad_clip \(the training data of steps 1 to 2 is finite\)"):
        train(Exploding(), "moons", quiet(steps=5, log_every=2, ema_decay=None))


def test_a_model_without_trainable_parameters_is_refused_up_front():
    """A parameterless model crashed with a bare StopIteration; a frozen one deep in
    backward()."""
    with pytest.raises(ValueError, match="model must have parameters to train; got a "
                                         r"Sequential with none \(model.parameters\(\) is empty"):
        train(nn.Sequential(), "moons", quiet(steps=1))
    with pytest.raises(ValueError, match="got a MLP whose 4 parameters all have "
                                         "requires_grad=False"):
        train(small().requires_grad_(False), "moons", quiet(steps=1))


def _first_batch_holding(row, x, seed, side="x1"):
    """The first batch of a run of seed ``seed`` on data (side x1) or source (x0) ``x``
    that holds x[row]."""
    producer = BatchProducer(x, source=x, batch_size=16, seed=seed)
    return next(k for k in range(100)
                if (getattr(producer.draw(k), side) == x[row]).all(1).any())


@pytest.mark.parametrize("coupling, workers", [(None, 0), ("ot", 0), ("ot", 1)],
                         ids=["no-coupling", "ot", "ot-in-a-worker"])
def test_non_finite_training_data_is_named_with_its_batch(coupling, workers):
    """A NaN in the data was reported as a diverging run ("lower config.lr"), or by the
    OT coupling as "x0 and x1 must be finite" without saying which batch. The batch is
    checked as drawn: the error names the batch, the step, the side and the count."""
    coupling = fs.OTCoupling("exact") if coupling else None
    cfg = quiet(steps=12, batch_size=16, log_every=6, num_workers=workers)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    seed = train(small(), x, quiet(steps=1, batch_size=16), generator=g()).seed
    bad = x.clone()
    bad[37] = torch.tensor([float("nan"), float("inf")])
    k = _first_batch_holding(37, x, seed)
    with pytest.raises(ValueError, match=re.escape(
            f"non-finite training data in batch {k} (training step {k + 1}): x1 (the data) "
            "has 2 non-finite entries. Training needs finite data: clean or filter")):
        train(small(), bad, cfg, coupling=coupling, generator=g())
    # the source side
    k = _first_batch_holding(37, x, seed, "x0")
    with pytest.raises(ValueError, match=re.escape(
            f"batch {k} (training step {k + 1}): x0 (the source) has 2 non-finite entries")):
        train(small(), x, cfg, source=bad, coupling=coupling, generator=g())


def test_data_that_overflows_the_models_dtype_is_named(tmp_path):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.raises(ValueError, match=r"batch 0 \(training step 1\): x1 \(the data\) has 32 "
                                         r"non-finite entries, finite as drawn in float64 "
                                         r"\(largest magnitude .*e\+300\) but beyond the range "
                                         r"of float32, the batches' dtype \(the model's in "
                                         r"training\)\. .*rescale the data"):
        train(small(), 1e300 * x, quiet(steps=2, batch_size=16))


def test_non_finite_data_off_the_cpu_is_named_once_the_loss_is_not_finite(monkeypatch):
    """Batches on a GPU are not checked as drawn (a sync per step): when the logged loss is
    non-finite, the loop draws the interval's batches again and names the first bad one;
    an OT coupling that refuses one names it too. Simulated on the CPU by turning the
    check at draw time off."""
    monkeypatch.setattr(pipeline, "_CHECKED_AT_DRAW", ())
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    seed = train(small(), x, quiet(steps=1, batch_size=16), generator=g()).seed
    bad = x.clone()
    bad[37, 1] = float("nan")
    k = _first_batch_holding(37, x, seed)
    says = f"non-finite training data in batch {k} (training step {k + 1}): x1 (the data) has 1"
    with pytest.raises(ValueError, match=re.escape(f"at step 4: {says}")):
        train(small(), bad, quiet(steps=8, batch_size=16, log_every=4), generator=g())
    with pytest.raises(ValueError, match=re.escape(says)):
        train(small(), bad, quiet(steps=8, batch_size=16, log_every=4), generator=g(),
              coupling=fs.OTCoupling("exact"))


def test_a_coupling_that_returns_non_finite_pairs_is_named():
    def poisoned(x0, x1, *extras):
        return x0 * float("nan"), x1, *extras

    with pytest.raises(ValueError, match=re.escape(
            "the training loss is nan at step 2: the coupling <function") + ".*" + re.escape(
            "returned non-finite pairs for batch 0 (training step 1) from finite inputs: x0 "
            "(the source) has 32 non-finite entries")):
        train(small(), "moons", quiet(steps=4, batch_size=16, log_every=2), coupling=poisoned)


def test_ot_coupling_plugs_in():
    couplings = pytest.importorskip("flowsolve.training.couplings")
    ot = couplings.OTCoupling(method="exact")
    coupled = BatchProducer("8gaussians", coupling=ot, batch_size=256, seed=0)[0]
    plain = BatchProducer("8gaussians", batch_size=256, seed=0)[0]
    # the coupling only re-pairs: the same x1, a permutation of the same x0
    assert torch.equal(coupled.x1, plain.x1)
    assert torch.equal(coupled.x0[torch.argsort(coupled.x0[:, 0])],
                       plain.x0[torch.argsort(plain.x0[:, 0])])
    # independent pairs cost E|x0 - x1|^2 = 2 + 2 (5^2 / 2 + 1) = 29; OT pairs about 16
    cost = lambda b: (b.x0 - b.x1).pow(2).sum(1).mean().item()  # noqa: E731
    assert abs(cost(plain) - 29) < 3 and cost(coupled) < 0.6 * cost(plain)
    res = train(mlp(), "8gaussians", quiet(steps=20, batch_size=128, log_every=10), coupling=ot,
                path=GaussianBridge(0.1))
    assert res.losses[-1] < res.losses[0]


def test_ot_cfm_paths_are_straighter_than_i_cfm():
    """Tong et al. (2024): with the same data, seed and steps, minibatch-OT pairs give a flow
    whose path energy is lower and closer to W2^2(q0, q1) (here 15.1) than I-CFM's."""
    couplings = pytest.importorskip("flowsolve.training.couplings")
    metrics = pytest.importorskip("flowsolve.metrics")
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(9))
    x1 = sample_labeled("8gaussians", 2000, generator=torch.Generator().manual_seed(10)).x
    w2sq = metrics.wasserstein2(x0, x1).item() ** 2
    cfg = quiet(steps=300, batch_size=256, log_every=100, lr=3e-3, ema_decay=None)
    energy = {}
    for name, coupling in (("icfm", None), ("ot", couplings.OTCoupling(method="exact"))):
        model = train(mlp(hidden=64, depth=3, time_embedding_dim=16), "8gaussians", cfg,
                      coupling=coupling, path=GaussianBridge(0.1),
                      generator=torch.Generator().manual_seed(1)).model
        xs = [x0]
        with torch.no_grad():
            for k in range(100):  # Euler, 100 steps, as in the paper
                xs.append(xs[-1] + model(xs[-1], torch.tensor(k / 100)) / 100)
        energy[name] = metrics.path_energy(torch.stack(xs)).mean().item()
    assert energy["ot"] < energy["icfm"] - 2
    assert abs(energy["ot"] - w2sq) < abs(energy["icfm"] - w2sq)


def test_a_checkpoint_of_other_data_path_or_coupling_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    bridge = GaussianBridge(0.1, "constant")
    common = dict(path=bridge, coupling=fs.OTCoupling("exact"), checkpoint=ckpt)
    train(mlp(), "moons", quiet(steps=2, batch_size=8), **common)
    changes = [("data", dict(data="8gaussians"), "data=moons (this call: 8gaussians)"),
               ("source", dict(source="moons"), "source=N(0, I) (this call: moons)"),
               ("path", dict(path=GaussianBridge(0.5, "constant")), "sigma=0.5"),
               ("coupling", dict(coupling=fs.OTCoupling("sinkhorn")),
                "coupling=OTCoupling('exact') (this call: OTCoupling('sinkhorn'))"),
               ("no coupling", dict(coupling=fs.IndependentCoupling()), "IndependentCoupling")]
    for _, change, says in changes:
        args = {"data": "moons", **common, **change}
        with pytest.raises(ValueError, match=re.escape(says)):
            train(mlp(), args.pop("data"), quiet(steps=4, batch_size=8), **args)
    # a checkpoint from before the setup was recorded is not refused for it
    state = torch.load(ckpt, weights_only=True)
    del state["checksum"]  # written before checksums: none to verify
    del state["setup"]
    torch.save(state, ckpt)
    res = train(mlp(), "8gaussians", quiet(steps=4, batch_size=8), **common)
    assert res.start_step == 2


def small(seed=0, **kwargs) -> fs.MLP:
    return mlp(seed, **{"hidden": 16, "depth": 1, "time_embedding_dim": 4, **kwargs})


def refusal(says):
    return pytest.raises(ValueError, match=re.escape(f"was written with {says}"))


def test_no_coupling_and_an_unnamed_source_are_recorded_and_checked(tmp_path):
    """coupling=None, IndependentCoupling() and an OT coupling train three different
    trajectories, and a tensor source is not N(0, I) nor a named one: a resume refuses each
    switch, both ways, and writes the recorded names back."""
    cfg = lambda steps: quiet(steps=steps, batch_size=16)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(4))
    plain = train(small(), "moons", cfg(4), generator=g())
    independent = train(small(), "moons", cfg(4), coupling=fs.IndependentCoupling(),
                        generator=g())
    assert plain.losses != independent.losses  # not the same run
    cases = [  # (first run, resumed with, message)
        (dict(coupling=fs.OTCoupling("exact")), dict(coupling=None),
         "coupling=OTCoupling('exact') (this call: None)"),
        (dict(coupling=None), dict(coupling=fs.OTCoupling("exact")),
         "coupling=None (this call: OTCoupling('exact'))"),
        (dict(coupling=None), dict(coupling=fs.IndependentCoupling()),
         "coupling=None (this call: IndependentCoupling)"),
        (dict(coupling=fs.IndependentCoupling()), dict(coupling=None),
         "coupling=IndependentCoupling (this call: None)"),
        (dict(source=None), dict(source=x0),
         "source=N(0, I) (this call: a tensor or callable (not recorded))"),
        (dict(source=x0), dict(source=None),
         "source=a tensor or callable (not recorded) (this call: N(0, I))"),
        (dict(source="8gaussians"), dict(source=x0),
         "source=8gaussians (this call: a tensor or callable (not recorded))"),
        (dict(source=x0), dict(source="8gaussians"),
         "source=a tensor or callable (not recorded) (this call: 8gaussians)"),
    ]
    for i, (first, then, says) in enumerate(cases):
        ckpt = tmp_path / f"run{i}.pt"
        train(small(), "moons", cfg(2), checkpoint=ckpt, generator=g(), **first)
        with refusal(says):
            train(small(), "moons", cfg(4), checkpoint=ckpt, **then)
        # the same inputs resume, bit for bit, and the record keeps its names
        resumed = train(small(), "moons", cfg(4), checkpoint=ckpt, **first)
        whole = train(small(), "moons", cfg(4), generator=g(), **first)
        assert resumed.start_step == 2 and resumed.losses == whole.losses
        with refusal(says):
            train(small(), "moons", cfg(6), checkpoint=ckpt, **then)
    assert torch.load(tmp_path / "run1.pt", weights_only=True)["setup"]["coupling"] == "None"
    # a checkpoint of the first setup record (None for coupling=None) resumes as before
    # and is checked the same way
    ckpt = tmp_path / "run1.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["checksum"]  # written before checksums: none to verify
    state["setup"]["coupling"] = None
    del state["setup_version"]
    torch.save(state, ckpt)
    with refusal("coupling=None (this call: OTCoupling('exact'))"):
        train(small(), "moons", cfg(6), checkpoint=ckpt, coupling=fs.OTCoupling("exact"))
    resumed = train(small(), "moons", cfg(6), checkpoint=ckpt)
    assert resumed.start_step == 4
    assert resumed.losses == train(small(), "moons", cfg(6), generator=g()).losses


def test_paths_that_differ_beyond_six_digits_are_refused(tmp_path):
    cfg = lambda steps: quiet(steps=steps, batch_size=16)  # noqa: E731
    pairs = [(GaussianBridge(0.1), GaussianBridge(0.1000004)),
             (fs.AffineGaussianPath(fs.PolynomialScheduler(2.0)),
              fs.AffineGaussianPath(fs.PolynomialScheduler(2.000001)))]
    for i, (old, new) in enumerate(pairs):
        ckpt = tmp_path / f"run{i}.pt"
        train(small(), "moons", cfg(2), path=old, checkpoint=ckpt)
        with refusal(f"path={old!r} (this call: {new!r})"):
            train(small(), "moons", cfg(4), path=new, checkpoint=ckpt)
    # a checkpoint of the first setup record, whose reprs rounded floats to 6 digits
    # (GaussianBridge(sigma=1, ...)), resumes with the same path
    ckpt = tmp_path / "brownian.pt"
    bridge = GaussianBridge(1.0, "brownian")
    train(small(), "moons", cfg(2), path=bridge, checkpoint=ckpt,
          generator=torch.Generator().manual_seed(0))
    state = torch.load(ckpt, weights_only=True)
    del state["checksum"]  # written before checksums: none to verify
    state["setup"]["path"] = "GaussianBridge(sigma=1, schedule='brownian')"
    del state["setup_version"]
    torch.save(state, ckpt)
    with refusal("path=GaussianBridge(sigma=1, schedule='brownian') (this call: "
                 "GaussianBridge(sigma=1.5, schedule='brownian'))"):
        train(small(), "moons", cfg(4), path=GaussianBridge(1.5, "brownian"), checkpoint=ckpt)
    resumed = train(small(), "moons", cfg(4), path=bridge, checkpoint=ckpt)
    whole = train(small(), "moons", cfg(4), path=bridge,
                  generator=torch.Generator().manual_seed(0))
    assert resumed.start_step == 2 and resumed.losses == whole.losses


def sinkhorn(**kwargs):
    return fs.OTCoupling("sinkhorn", **{"reg": 0.5, **kwargs})


class RepeatedPairing(RandomPairing):
    """A coupling of one's own with a plain setting: the permutation is applied ``rounds``
    times."""

    def __init__(self, rounds):
        self.rounds = rounds

    def __call__(self, x0, x1, *extras, generator=None):
        for _ in range(self.rounds):
            x0 = x0[torch.randperm(x0.shape[0], generator=generator, device=x0.device)]
        return x0, x1, *extras


def test_a_resume_refuses_a_coupling_with_other_settings(tmp_path):
    """Only the coupling's kind was recorded: another reg, cost, tolerance... resumed
    silently on another trajectory. Every setting is recorded and compared now, and each
    difference is named."""
    cfg = lambda steps: quiet(steps=steps, batch_size=16)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ckpt = tmp_path / "run.pt"
    train(small(), "moons", cfg(2), coupling=sinkhorn(), checkpoint=ckpt, generator=g())
    whole = train(small(), "moons", cfg(4), coupling=sinkhorn(), generator=g())
    # another reg is another trajectory
    assert train(small(), "moons", cfg(4), coupling=sinkhorn(reg=0.05),
                 generator=g()).losses != whole.losses
    changes = [(dict(reg=0.05), "coupling.reg=0.5 (this call: 0.05)"),
               (dict(cost="euclidean"), "coupling.cost='sqeuclidean' (this call: 'euclidean')"),
               (dict(normalize=None), "coupling.normalize='mean' (this call: None)"),
               (dict(max_iter=50), "coupling.max_iter=None (this call: 50)"),
               (dict(tol=1e-3), "coupling.tol=0.0001 (this call: 0.001)"),
               (dict(keep="x0"), "coupling.keep='x1' (this call: 'x0')"),
               (dict(fallback=None), "coupling.fallback='exact' (this call: None)"),
               (dict(domain="log"), "coupling.domain='auto' (this call: 'log')")]
    for change, says in changes:
        with refusal(says):
            train(small(), "moons", cfg(4), coupling=sinkhorn(**change), checkpoint=ckpt)
    with refusal("coupling.reg=0.5 (this call: 0.05), coupling.tol=0.0001 (this call: 0.001)"):
        train(small(), "moons", cfg(4), coupling=sinkhorn(reg=0.05, tol=1e-3), checkpoint=ckpt)
    # another kind is named as the kind, not setting by setting
    with refusal("coupling=OTCoupling('sinkhorn') (this call: OTCoupling('exact')). A"):
        train(small(), "moons", cfg(4), coupling=fs.OTCoupling("exact"), checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["setup"]["coupling_settings"] == {
        "method": "sinkhorn", "cost": "sqeuclidean", "reg": 0.5, "normalize": "mean",
        "max_iter": None, "tol": 1e-4, "keep": "x1", "fallback": "exact", "domain": "auto"}
    # the same settings (reg given as a numpy number) resume bit for bit
    resumed = train(small(), "moons", cfg(4), coupling=sinkhorn(reg=np.float64(0.5)),
                    checkpoint=ckpt)
    assert resumed.start_step == 2 and resumed.losses == whole.losses
    # settings a coupling never reads may change, as in TrainConfig: Sinkhorn's for exact OT
    ckpt = tmp_path / "exact.pt"
    train(small(), "moons", cfg(2), coupling=fs.OTCoupling("exact"), checkpoint=ckpt,
          generator=g())
    assert torch.load(ckpt, weights_only=True)["setup"]["coupling_settings"] == {
        "method": "exact", "cost": "sqeuclidean", "max_iter": None, "keep": "x1"}
    resumed = train(small(), "moons", cfg(4), checkpoint=ckpt, coupling=fs.OTCoupling(
        "exact", reg=0.1, normalize=None, tol=1e-2, fallback=None, domain="log"))
    whole = train(small(), "moons", cfg(4), coupling=fs.OTCoupling("exact"), generator=g())
    assert resumed.start_step == 2 and resumed.losses == whole.losses
    with refusal("coupling.keep='x1' (this call: 'x0')"):
        train(small(), "moons", cfg(4), coupling=fs.OTCoupling("exact", keep="x0"),
              checkpoint=ckpt)
    # a coupling of one's own: its public attributes, numpy numbers stored as Python ones
    ckpt = tmp_path / "own.pt"
    train(small(), "moons", cfg(2), coupling=RepeatedPairing(np.int64(2)), checkpoint=ckpt)
    setup = torch.load(ckpt, weights_only=True)["setup"]
    assert setup["coupling_settings"] == {"rounds": 2} and type(setup["coupling_settings"]
                                                               ["rounds"]) is int
    with refusal("coupling.rounds=2 (this call: 3)"):
        train(small(), "moons", cfg(4), coupling=RepeatedPairing(3), checkpoint=ckpt)
    assert train(small(), "moons", cfg(4), coupling=RepeatedPairing(2),
                 checkpoint=ckpt).start_step == 2


def l1_cost(a, b):
    return torch.cdist(a, b, p=1)


def test_a_callable_cost_resumes_only_when_stated_to_be_the_same(tmp_path):
    """A callable cost cannot be compared across processes: a resume with one is refused
    unless resume_same_cost=True says it is the same; a named cost against a callable one
    is refused even then."""
    cfg = lambda steps: quiet(steps=steps, batch_size=16)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    exact = lambda cost: fs.OTCoupling("exact", cost=cost)  # noqa: E731
    ckpt = tmp_path / "run.pt"
    train(small(), "moons", cfg(2), coupling=exact(l1_cost), checkpoint=ckpt, generator=g())
    name = f"function {l1_cost.__module__}.l1_cost"
    with refusal(f"coupling.cost={name} (this call: {name}; it cannot be compared with the "
                 "checkpoint's: pass resume_same_cost=True to train() if it is the same)"):
        train(small(), "moons", cfg(4), coupling=exact(l1_cost), checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["setup"]["coupling_settings"]["cost"] == {
        "unrecorded": name}
    with refusal(f"coupling.cost={name} (this call: 'sqeuclidean')"):
        train(small(), "moons", cfg(4), coupling=exact("sqeuclidean"), checkpoint=ckpt,
              resume_same_cost=True)
    with refusal("coupling.max_iter=None (this call: 1000)"):  # plain settings: compared still
        train(small(), "moons", cfg(4), coupling=fs.OTCoupling("exact", cost=l1_cost,
                                                               max_iter=1000),
              checkpoint=ckpt, resume_same_cost=True)
    with pytest.raises(TypeError, match="resume_same_cost must be True or False; got 1"):
        train(small(), "moons", cfg(4), coupling=exact(l1_cost), checkpoint=ckpt,
              resume_same_cost=1)
    resumed = train(small(), "moons", cfg(4), coupling=exact(l1_cost), checkpoint=ckpt,
                    resume_same_cost=True)
    whole = train(small(), "moons", cfg(4), coupling=exact(l1_cost), generator=g())
    assert resumed.start_step == 2 and resumed.losses == whole.losses


def test_a_checkpoint_that_recorded_only_the_coupling_kind_resumes_as_before(tmp_path):
    """Setup records of version 2 hold the coupling's kind only: the kind is checked, the
    settings (not recorded) are not, and a callable cost needs no flag; the checkpoint
    written on resume records the settings."""
    cfg = lambda steps: quiet(steps=steps, batch_size=16)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    old = tmp_path / "old.pt"
    train(small(), "moons", cfg(2), coupling=sinkhorn(), checkpoint=old, generator=g())
    state = torch.load(old, weights_only=True)
    assert state["setup_version"] == 3
    del state["checksum"]  # written before checksums: none to verify
    del state["setup"]["coupling_settings"]
    state["setup_version"] = 2
    for name in ("a", "b", "c"):
        torch.save(state, tmp_path / f"{name}.pt")
    with refusal("coupling=OTCoupling('sinkhorn') (this call: OTCoupling('exact'))"):
        train(small(), "moons", cfg(4), coupling=fs.OTCoupling("exact"),
              checkpoint=tmp_path / "a.pt")
    resumed = train(small(), "moons", cfg(4), coupling=sinkhorn(), checkpoint=tmp_path / "a.pt")
    whole = train(small(), "moons", cfg(4), coupling=sinkhorn(), generator=g())
    assert resumed.start_step == 2 and resumed.losses == whole.losses
    for name, coupling in (("b", sinkhorn(reg=0.05)), ("c", sinkhorn(cost=l1_cost))):
        res = train(small(), "moons", cfg(4), coupling=coupling, checkpoint=tmp_path / f"{name}.pt")
        assert res.start_step == 2
    written = torch.load(tmp_path / "b.pt", weights_only=True)
    assert written["setup_version"] == 3 and written["setup"]["coupling_settings"]["reg"] == 0.05
    with refusal("coupling.reg=0.05 (this call: 0.5)"):
        train(small(), "moons", cfg(6), coupling=sinkhorn(), checkpoint=tmp_path / "b.pt")


def test_settings_the_run_never_reads_may_change_on_resume(tmp_path):
    """dsm_weighting only weighs the score loss, label_dropout only reaches a conditional
    model: elsewhere a change is accepted and the losses are those of the run that never
    stopped. Where they are read, a change is refused."""
    labeled = sample_labeled("moons", 512, generator=torch.Generator().manual_seed(1))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cfg = lambda steps, **kw: quiet(steps=steps, batch_size=16, **kw)  # noqa: E731
    for i, (net, change) in enumerate([(small, dict(dsm_weighting="likelihood")),
                                       (small, dict(label_dropout=0.3))]):
        ckpt = tmp_path / f"run{i}.pt"
        train(net(), labeled, cfg(2), checkpoint=ckpt, generator=g())
        resumed = train(net(), labeled, cfg(4, **change), checkpoint=ckpt)
        whole = train(net(), labeled, cfg(4), generator=g())
        assert resumed.start_step == 2 and resumed.losses == whole.losses
    ckpt = tmp_path / "score.pt"
    train(small(), "moons", cfg(2, prediction="score"), checkpoint=ckpt)
    with refusal("dsm_weighting='sigma_squared' (this call: 'likelihood')"):
        train(small(), "moons", cfg(4, prediction="score", dsm_weighting="likelihood"),
              checkpoint=ckpt)
    ckpt = tmp_path / "conditional.pt"
    train(small(num_classes=2), labeled, cfg(2), checkpoint=ckpt)
    with refusal("label_dropout=0.0 (this call: 0.3)"):
        train(small(num_classes=2), labeled, cfg(4, label_dropout=0.3), checkpoint=ckpt)


def test_numpy_scalars_in_the_config_become_python_numbers(tmp_path):
    """A config of numpy scalars equals the built-in one, and its checkpoint (read with
    weights_only=True) resumes; bools stay refused where numbers are due."""
    cfg = lambda steps: quiet(steps=np.int64(steps), batch_size=np.int32(16),  # noqa: E731
                              lr=np.float64(2e-3), weight_decay=np.float32(0.0),
                              betas=(np.float64(0.9), np.float64(0.99)),
                              ema_decay=np.float64(0.9), log_every=np.int64(1),
                              checkpoint_every=np.uint8(1), time_distribution=np.str_("uniform"))
    plain = quiet(steps=4, batch_size=16, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.99),
                  ema_decay=0.9, checkpoint_every=1)
    assert cfg(4) == plain
    for key, value in asdict(cfg(4)).items():
        assert type(value) is type(asdict(plain)[key]), key
    ckpt = tmp_path / "run.pt"
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    train(small(), "moons", cfg(2), checkpoint=ckpt, generator=g())
    resumed = train(small(), "moons", cfg(4), checkpoint=ckpt)
    assert resumed.start_step == 2
    assert resumed.losses == train(small(), "moons", plain, generator=g()).losses
    for key, value in [("steps", True), ("steps", np.bool_(True)), ("steps", np.float64(2.0)),
                       ("lr", np.bool_(True)), ("lr", np.float64("nan")),
                       ("label_dropout", np.float32(1.5))]:
        with pytest.raises(ValueError, match=f"{key} must be"):
            TrainConfig(**{key: value})


def _ddp_running_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        data = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
        cfg = lambda steps: TrainConfig(steps=steps, batch_size=32, log_every=4,  # noqa: E731
                                        progress=False, ema_decay=None)
        g = torch.Generator().manual_seed(1)
        whole = train(small(), data, cfg(4), generator=g)
        ckpt = os.path.join(out_dir, "c.pt")  # written at step 2, between two logs
        train(small(), data, cfg(2), checkpoint=ckpt, generator=torch.Generator().manual_seed(1))
        if rank == 0:
            torch.save(torch.load(ckpt, weights_only=True)["running"],
                       os.path.join(out_dir, "running.pt"))
        resumed = train(small(), data, cfg(4), checkpoint=ckpt)
        torch.save({"whole": whole.losses, "resumed": resumed.losses,
                    "start": resumed.start_step}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_resume_between_log_steps_bit_for_bit(tmp_path):
    """Each rank's running loss sum is saved and restored: a resume between two log steps
    logs the mean over ranks of an uninterrupted run, not one built on rank 0's sum."""
    mp.spawn(_ddp_running_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for o in out:
        assert o["start"] == 2 and len(o["whole"]) == 1
        assert o["resumed"] == o["whole"] == out[0]["whole"]
    running = torch.load(tmp_path / "running.pt", weights_only=True)  # at step 2
    assert running.shape == (2,) and running.min() > 0 and running[0] != running[1]


class _NanOnRank:
    """A sampler of N(0, I) pairs whose batches hold one NaN on rank ``bad``."""

    def __init__(self, rank, bad):
        self.poisoned = rank == bad

    def __call__(self, n, generator):
        x = torch.randn(n, 2, generator=generator)
        if self.poisoned:
            x[3, 0] = float("nan")
        return x


def _ddp_nan_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    pipeline._CHECKED_AT_DRAW = ()  # as for data on a GPU: checked once the loss is nan
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        try:
            train(small(), _NanOnRank(rank, bad=1), quiet(steps=4, batch_size=16, log_every=2))
            said = "no error"
        except Exception as err:  # noqa: BLE001 - reported to the test
            said = f"{type(err).__name__}: {err}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(said)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_name_the_rank_whose_data_is_not_finite(tmp_path):
    """The loss is averaged over ranks, so every rank sees it non-finite: the ranks share
    what they found, and rank 0 points at rank 1 instead of suggesting a lower lr."""
    mp.spawn(_ddp_nan_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert said[0] == ("ValueError: the training loss is nan at step 2: rank(s) [1] found "
                       "non-finite training data in steps 1 to 2 (their errors name it)")
    assert said[1].startswith("ValueError: the training loss is nan at step 2: non-finite "
                              "training data in batch 0 (training step 1, rank 1): x1 (the "
                              "data) has 1 non-finite entry"), said[1]
