r"""Training loop for velocity (CFM / OT-CFM / SB-CFM) and score / epsilon models.

One step ``k`` is: take batch ``k`` from the :class:`BatchProducer` (data ``x1`` with
optional labels ``y``, source ``x0``, then the coupling, which permutes the pairs), draw
``t`` (and the bridge noise), drop labels for classifier-free guidance, regress the model
on its conditional target, clip the gradient norm, take an AdamW step and update the EMA:

    theta_ema_n = beta_n theta_ema_{n-1} + (1 - beta_n) theta_n,   theta_ema_0 = theta_0,

with ``beta_n = min(beta, (1 + n) / (10 + n))`` (the warm-up of TensorFlow's and diffusers'
EMA; ``ema_warmup=False``: ``beta_n = beta``, and after n steps ``theta_ema_n = beta^n
theta_0 + (1 - beta) sum_k beta^(n-k) theta_k``, which at beta = 0.999 still weighs the
initial weights by 0.74 after 300 steps).

**The batch producer needs no model.** Batch ``k`` of rank ``r`` is a pure function of
``(seed, k, r)``: each batch draws from its own ``torch.Generator`` seeded by a splitmix64
hash of those numbers, and a finite data set is visited in epochs, epoch ``e`` being a
permutation drawn from ``(seed, e)`` (the remainder of an epoch that does not fill a global
batch is dropped). So the exact CPU OT solve can run in DataLoader workers
(``config.num_workers``), overlapping the step, with results identical to the main process;
and a checkpoint only needs the seed and the step to resume the data order exactly. The
step's own randomness (``t``, bridge noise, label dropout) comes from a generator on the
model's device seeded likewise by ``(seed, k, r)``.

**Checkpoints** (``checkpoint=path``) hold the model, EMA, optimizer, step, seed, the
loss history and each rank's running loss sum, as tensors and plain containers only: written
atomically (a temporary file, then ``os.replace``) by rank 0, read with
``torch.load(weights_only=True)``. Calling :func:`train` again with the same path resumes;
the losses logged after a resume equal those of a run that never stopped, bit for bit. So a
resume refuses any setting that would change that trajectory (lr, betas, EMA, clipping,
warm-up, time distribution, ...; the message names each difference), another data set or
source (a name, N(0, I) for ``source=None``, or a tensor / callable: these three differ),
another path (by its repr, which holds exact floats), another kind of coupling
(``coupling=None`` is one kind, distinct from ``IndependentCoupling()``) or another setting
of the coupling (``coupling.settings()``, those that decide its pairs: method, cost,
max_iter, keep of an ``OTCoupling``, and reg, normalize, tol, fallback, domain for Sinkhorn;
the public attributes of a coupling class without that method; a callable cost cannot be
compared, so a resume with one needs ``resume_same_cost=True``; checkpoints written before
the settings were recorded compare the kind only); only ``steps``,
the logging and checkpoint intervals and the workers may change, and so may the settings
the run never reads (``dsm_weighting`` unless ``prediction="score"``, ``label_dropout`` for a
model without ``num_classes``, ``ema_warmup`` without EMA). Data given as tensors or
callables, and the model, are not recorded: pass the same ones. Under DDP rank 0 decides
whether to resume and sends its checkpoint to the other ranks, and each rank takes back its
own running loss sum. Randomness inside the model (dropout layers) draws from torch's global
RNG and is outside that guarantee.

**torch.distributed**: when a process group is initialised, the model is wrapped in
``DistributedDataParallel``; every rank draws and couples its own batch of
``config.batch_size`` (the global batch is ``batch_size * world_size``); logged losses are
averaged over ranks; only rank 0 writes checkpoints. Under torchrun (``WORLD_SIZE > 1``)
with no process group running, :func:`train` initialises one (gloo on CPU, NCCL for CUDA
tensors; see :func:`flowsolve._core.distributed.ensure_process_group`), so a script needs no
``init_process_group`` call and never trains N independent copies.

Host synchronisation in the loop happens only every ``config.log_every`` steps (the loss
is read then) and at checkpoints.

**Non-finite values** are named by their cause: a batch drawn on the CPU is checked as it is
drawn (one reduction on the host: x1, the data, and x0, the source); a batch on another
device is checked only when the logged loss is non-finite, by drawing the interval's
batches again (they are pure functions of the seed and the step), then coupling them. The
ValueError names the batch, the step, the side and the count of non-finite entries (or the
coupling, when it made finite pairs non-finite); a non-finite loss on finite data is a
FloatingPointError that suggests a lower ``lr`` or ``grad_clip``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._core.distributed import ensure_process_group
from .._core.files import load_checked_file, save_checked
from .._core.progress import progress_bar
from .._core.threads import check_threads, intra_op_threads
from ..paths.affine import AffineGaussianPath
from ..paths.bridges import GaussianBridge
from ..paths.schedules import CondOTScheduler
from .checkpoint import FORMAT as _FORMAT
from .checkpoint import SETUP_VERSION as _SETUP_VERSION
from .checkpoint import load_checked, setup_record
from .config import TrainConfig
from .ema import EMA
from .losses import (
    bridge_matching_loss,
    clamp_bridge_time,
    denoising_score_matching_loss,
    label_dropout,
    regression_loss,
    sample_time,
)
from .pipeline import STEP_STREAM, Batch, BatchProducer, mix_seed, seeded_generator
from .score_flow import FlowAndScore, score_flow_matching_loss

__all__ = ["TrainLog", "TrainResult", "Batch", "BatchProducer", "train", "load_weights"]



# -- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainLog:
    """Passed to ``callback`` every ``log_every`` steps: the step reached, the mean loss over
    the interval (over ranks) and the seconds since this call of :func:`train` started."""

    step: int
    loss: float
    elapsed: float


@dataclass
class TrainResult:
    """``model`` (trained, unwrapped) and ``ema_model`` (None without EMA); ``log_steps`` /
    ``losses``: the logged history including resumed parts; ``step``: the final step;
    ``start_step``: where this call began (> 0 after a resume); ``wall_time``: seconds in
    this call's loop, ``data_wait`` of them spent waiting for batches; ``seed``: the run's
    seed (``BatchProducer(..., seed=seed)[k]`` is batch k); ``threads``: torch's intra-op
    threads during the loop (the ``threads=`` of :func:`train`, else torch's setting)."""

    model: nn.Module
    ema_model: nn.Module | None
    log_steps: list[int]
    losses: list[float]
    step: int
    start_step: int
    wall_time: float
    data_wait: float
    checkpoint: Path | None
    seed: int
    threads: int | None = None


# -- checkpoints (format and resume checks: _checkpoint.py) -----------------------------------
def load_weights(model: nn.Module, checkpoint: str | os.PathLike, *, ema: bool = True) -> nn.Module:
    """Load the EMA (``ema=True``, when the run kept one) or raw weights of a training
    checkpoint into ``model`` (``weights_only`` loading, checksum verified) and return it."""
    state = load_checked_file(checkpoint, "flowsolve training checkpoint")
    if state.get("format") != _FORMAT:
        raise ValueError(f"{checkpoint} is not a flowsolve training checkpoint ({_FORMAT})")
    model.load_state_dict(state["ema"] if ema and state["ema"] is not None else state["model"])
    return model


# -- the loop ----------------------------------------------------------------------------------
def _batches(producer: BatchProducer, steps: Iterable[int], cfg: TrainConfig,
             pin: bool) -> Iterator[Batch]:
    if cfg.num_workers == 0:
        return (producer.draw(k) if cfg.couple_on_device else producer[k] for k in steps)
    method = cfg.worker_start_method
    if method is None and "fork" in multiprocessing.get_all_start_methods():
        method = "fork"
    return iter(DataLoader(producer, batch_size=None, sampler=steps, num_workers=cfg.num_workers,
                           prefetch_factor=cfg.prefetch_factor, pin_memory=pin,
                           multiprocessing_context=method))


def _check_setup(model: Any, path: Any, cfg: TrainConfig, source: Any, coupling: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"model must have parameters to train; got a {type(model).__name__} "
                         "with none (model.parameters() is empty: give it trainable layers)")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"model must have trainable parameters; got a {type(model).__name__} "
                         f"whose {len(params)} parameters all have requires_grad=False "
                         "(unfreeze some, e.g. model.requires_grad_(True))")
    if not isinstance(path, (AffineGaussianPath, GaussianBridge)):
        raise TypeError("path must be an AffineGaussianPath or a GaussianBridge; got "
                        f"{type(path).__name__}")
    if isinstance(path, GaussianBridge) and cfg.prediction != "velocity":
        raise ValueError(f"a GaussianBridge trains velocity models; got prediction="
                         f"{cfg.prediction!r} (use an AffineGaussianPath for score / epsilon)")
    if isinstance(model, FlowAndScore) and not (isinstance(path, GaussianBridge)
                                                 and path.sigma > 0):
        raise ValueError(
            "a FlowAndScore model ([SF]2M) learns the velocity and the score of a bridge with "
            f"noise: pass path=GaussianBridge(sigma > 0, 'brownian'); got {path!r} (on an "
            "AffineGaussianPath velocity and score are conversions of one model: use one "
            "network and TrainConfig(prediction=...))")
    if cfg.prediction in ("score", "epsilon") and (source is not None or coupling is not None):
        raise ValueError(f"prediction={cfg.prediction!r} regresses on the noise x0, which must "
                         "be N(0, I) and independent of x1: pass source=None and coupling=None "
                         "(OT couplings train velocity models)")


class _Run:
    """The state of one training run: model, DDP wrapper, optimizer, EMA, producer, seed,
    the running loss sum and the logged history; restored from / saved to a checkpoint."""

    def __init__(self, model: nn.Module, producer_args: tuple, cfg: TrainConfig, path: Any,
                 ckpt: Path | None, generator: torch.Generator | None, *,
                 same_cost: bool = False):
        self.same_cost = same_cost  # the caller states a callable cost is the checkpoint's
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # torchrun without a process group: one is initialised here (never N lone copies)
        self.rank, self.world = ensure_process_group(self.device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.model, self.cfg, self.path, self.ckpt = model, cfg, path, ckpt
        self.setup = setup_record(*producer_args[:2], path, producer_args[2])
        self.conditional = getattr(model, "num_classes", None) is not None
        state = self._resume_state(ckpt, cfg)
        if state is not None:  # the weights first: DDP broadcasts them and the EMA copies them
            model.load_state_dict(state["model"])
        self.seed = state["seed"] if state is not None else self._fresh_seed(generator)
        self.net = model
        if self.distributed:  # broadcasts rank 0's parameters
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)
        model.train()
        self.ema = (EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
                    if cfg.ema_decay is not None else None)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.running = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count, self.log_steps, self.losses, self.start = 0, [], [], 0
        if state is not None:
            self._resume(state)
        self.null_label = getattr(model, "null_label", None)
        if self.conditional and cfg.label_dropout > 0 and not isinstance(self.null_label, int):
            raise ValueError("label_dropout > 0 needs a model with an int attribute null_label")
        self.producer = BatchProducer(*producer_args, batch_size=cfg.batch_size, seed=self.seed,
                                      rank=self.rank, world_size=self.world, dtype=self.dtype)
        self.step_seed = mix_seed(self.seed, STEP_STREAM)

    def _fresh_seed(self, generator: torch.Generator | None) -> int:
        """A new run's seed: one draw from ``generator``; under DDP rank 0's, for all ranks."""
        g = generator if generator is not None else torch.Generator()
        seed = int(torch.randint(0, 1 << 62, (), generator=g, device=g.device))
        if self.distributed:  # one seed for all ranks: the epochs are shared
            box = [seed]
            dist.broadcast_object_list(box, src=0)
            seed = box[0]
        return seed

    def _resume(self, state: dict) -> None:
        """Restore the optimizer, EMA, step, loss history and this rank's running loss sum
        from a checkpoint's ``state`` (the model's weights are loaded before wrapping)."""
        self.opt.load_state_dict(state["optimizer"])
        self.start, self.count = state["step"], state["count"]
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict({"weights": state["ema"], "num_updates": self.start})
        self.log_steps = list(state["history"]["step"])
        self.losses = list(state["history"]["loss"])
        running = state["running"]  # one sum per rank; one for all in older checkpoints
        self.running.copy_(running[self.rank] if running.dim() else running)

    def _resume_state(self, ckpt: Path | None, cfg: TrainConfig) -> dict | None:
        """The checkpoint's state, or None to start afresh. Under DDP rank 0 decides and
        reads, and the other ranks receive its state: their disks need not hold the file,
        and no rank waits for a decision another rank did not make."""
        if ckpt is None:
            return None
        if not self.distributed:
            return (load_checked(ckpt, asdict(cfg), self.world, self.setup, self.conditional,
                                 self.same_cost) if ckpt.exists() else None)
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box = [("state", load_checked(ckpt, asdict(cfg), self.world, self.setup,
                                              self.conditional, self.same_cost)
                         if ckpt.exists() else None)]
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                box, error = [("error", f"{type(exc).__name__}: {exc}")], exc
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            if self.rank == 0:
                raise error
            raise ValueError(f"rank 0 could not resume from {ckpt}: {value}")
        return value

    def loss(self, batch: Batch, k: int) -> Tensor:
        cfg, path, net = self.cfg, self.path, self.net
        g = seeded_generator(mix_seed(self.step_seed, k, self.rank), self.device)
        kwargs = {}
        if self.conditional and batch.y is not None:
            y = batch.y
            if cfg.label_dropout > 0:
                y = label_dropout(y, cfg.label_dropout, self.null_label, generator=g)
            kwargs["y"] = y
        t = sample_time(batch.x1.shape[0], generator=g, dtype=self.dtype, device=self.device,
                        distribution=cfg.time_distribution)
        if isinstance(path, GaussianBridge):
            t = clamp_bridge_time(path, t)
            loss = (score_flow_matching_loss if isinstance(self.model, FlowAndScore)
                    else bridge_matching_loss)
            return loss(net, path, batch.x0, batch.x1, t, generator=g, **kwargs)
        if cfg.prediction == "score":
            return denoising_score_matching_loss(net, path, batch.x0, batch.x1, t,
                                                 weighting=cfg.dsm_weighting, **kwargs)
        return regression_loss(net, path, batch.x0, batch.x1, t, prediction=cfg.prediction,
                               **kwargs)

    def step(self, batch: Batch, k: int) -> None:
        """One optimizer step on batch ``k``; no host synchronisation."""
        cfg = self.cfg
        batch = batch.to(self.device, self.dtype)
        if cfg.couple_on_device:
            batch = self.producer.couple(batch, k)
        if cfg.warmup_steps:
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (k + 1) / cfg.warmup_steps)
        loss = self.loss(batch, k)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model, k + 1)
        self.running += loss.detach()
        self.count += 1

    def log(self, step: int) -> float:
        """Mean loss since the last log, averaged over ranks (synchronises)."""
        mean = self.running / self.count
        if self.distributed:
            dist.all_reduce(mean)
            mean = mean / self.world
        value = float(mean.item())
        first = step - self.count  # the interval's batches: first .. step - 1
        self.running.zero_()
        self.count = 0
        if not math.isfinite(value):
            self._refuse_non_finite(value, first, step)
        self.log_steps.append(step)
        self.losses.append(value)
        return value

    def _refuse_non_finite(self, value: float, first: int, step: int) -> None:
        """Raise for a non-finite loss over batches ``first .. step - 1``: the data first
        (batches drawn again and coupled, which only a failed run pays for: on the CPU they
        were checked as drawn, elsewhere not, to keep the loop free of host syncs), then the
        coupling's output, else the optimisation. Under DDP the ranks share their findings
        (one collective, at a step every rank logs)."""
        device = self.device if self.cfg.couple_on_device else None
        problem = self.producer.find_non_finite(range(first, step), device)
        others: list[int] = []
        if self.distributed:
            found = torch.zeros(self.world, device=self.device)
            found[self.rank] = problem is not None
            dist.all_reduce(found)
            others = [r for r, hit in enumerate(found.tolist()) if hit and r != self.rank]
        if problem is not None:
            raise ValueError(f"the training loss is {value} at step {step}: {problem}")
        if others:
            raise ValueError(f"the training loss is {value} at step {step}: rank(s) {others} "
                             f"found non-finite training data in steps {first + 1} to {step} "
                             "(their errors name it)")
        raise FloatingPointError(f"the training loss is {value} at step {step}: lower "
                                 "config.lr or set config.grad_clip (the training data of "
                                 f"steps {first + 1} to {step} is finite)")

    def save(self, step: int) -> None:
        """Write the checkpoint (rank 0). Every rank calls this at the same steps (the
        checkpoint steps and the end, which depend only on the config and the resumed step):
        under DDP the ranks' running loss sums are gathered first, each into its own slot
        (a sum with zeros, so exact), and a resume gives each rank its own back."""
        if self.ckpt is None:
            return
        running = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        running[self.rank] = self.running
        if self.distributed:
            dist.all_reduce(running)
        if self.rank != 0:
            return
        save_checked({
            "format": _FORMAT, "step": step, "seed": self.seed, "world_size": self.world,
            "setup": self.setup, "setup_version": _SETUP_VERSION, "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.model.state_dict(),
            "optimizer": self.opt.state_dict(), "count": self.count,
            "history": {"step": self.log_steps, "loss": self.losses},
            "running": running.cpu(),
        }, self.ckpt)


def train(
    model: nn.Module,
    data: Any,
    config: TrainConfig | None = None,
    *,
    source: Any = None,
    path: AffineGaussianPath | GaussianBridge | None = None,
    coupling: Callable | None = None,
    checkpoint: str | os.PathLike | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[TrainLog], None] | None = None,
    resume_same_cost: bool = False,
    threads: int | None = None,
) -> TrainResult:
    """Train ``model(x, t, **kwargs)`` by regression along ``path`` on coupled pairs.

    Args:
        model: the network, called ``model(x_t, t)`` or ``model(x_t, t, y=labels)`` when it
            has ``num_classes`` set and the data carries labels (otherwise labels only reach
            the coupling, e.g. class-conditional OT).
        data, source, coupling: the batch producer's sides (see :class:`BatchProducer`).
        config: a :class:`TrainConfig`.
        path: an :class:`~flowsolve.paths.affine.AffineGaussianPath` (default CondOT: rectified
            flow / I-CFM with sigma = 0) or a :class:`~flowsolve.paths.bridges.GaussianBridge`
            (I-CFM / OT-CFM with constant sigma, SB-CFM with the Brownian bridge).
        checkpoint: a file to resume from if it exists, and to write.
        generator: seeds the run (one draw); a fresh default ``torch.Generator`` if None.
            Ignored on resume: the seed is in the checkpoint.
        callback: called with a :class:`TrainLog` at every logging step.
        resume_same_cost: states that the coupling's settings a checkpoint cannot compare
            -- a callable ``cost`` of an :class:`~flowsolve.training.couplings.OTCoupling`,
            or any setting of one's own coupling class that is not a plain value (a
            function, a tensor, a module) -- are the ones the checkpoint was written with.
            Without it a resume with such a setting is refused; its plain settings (method,
            reg, tol, ...) are compared either way. Ignored when nothing is resumed.
        threads: torch's intra-op threads for the run, restored afterwards (None: torch's
            setting). On a busy CPU one thread is often much faster for small models (a
            2-core machine ran a user's training ~10x slower with two); the CLI uses 1.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: a model without (trainable) parameters; a checkpoint written with other
            settings or inputs (every difference named); non-finite training data (the
            batch, the step, x1 or x0 and the count: checked as drawn on the CPU, and for
            data on another device once the loss is non-finite).
        FloatingPointError: a non-finite loss on finite data (lower ``config.lr`` or set
            ``config.grad_clip``).
    """
    check_threads(threads)
    if not isinstance(resume_same_cost, bool):
        raise TypeError(f"resume_same_cost must be True or False; got {resume_same_cost!r}")
    cfg = config or TrainConfig()
    path = path if path is not None else AffineGaussianPath(CondOTScheduler())
    _check_setup(model, path, cfg, source, coupling)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None:  # before the loop: a missing folder must not cost the run
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    with intra_op_threads(threads) as in_effect:
        run = _Run(model, (data, source, coupling), cfg, path, ckpt, generator,
                   same_cost=resume_same_cost)
        return _loop(run, model, cfg, ckpt, callback, in_effect)


def _loop(run: _Run, model: nn.Module, cfg: TrainConfig, ckpt: Path | None,
          callback: Callable[[TrainLog], None] | None, threads: int) -> TrainResult:
    """Steps ``run.start`` to ``cfg.steps``: a batch, a step, a log line on the progress bar
    every ``log_every`` steps, a checkpoint every ``checkpoint_every`` and at the end."""
    start, begin, wait = run.start, time.perf_counter(), 0.0
    batches = iter(()) if start >= cfg.steps else _batches(
        run.producer, range(start, cfg.steps), cfg, pin=run.device.type == "cuda")
    show = cfg.progress and run.rank == 0 and start < cfg.steps
    with progress_bar(cfg.steps, "train", enabled=show, unit="step", initial=start) as bar:
        for k in range(start, cfg.steps):
            tick = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - tick
            run.step(batch, k)
            step = k + 1
            if step % cfg.log_every == 0:
                value, elapsed = run.log(step), time.perf_counter() - begin
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                if callback is not None:
                    callback(TrainLog(step, value, elapsed))
            bar.update()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                run.save(step)
        wall = time.perf_counter() - begin
        if start < cfg.steps:
            run.save(cfg.steps)
    if run.distributed and ckpt is not None:
        dist.barrier()
    ema_model = None if run.ema is None else run.ema.model
    return TrainResult(model, ema_model, run.log_steps, run.losses,
                       max(start, cfg.steps), start, wall, wait, ckpt, run.seed, threads)
