"""``flowsolve train``: a small MLP velocity trained on a built-in 2-D data set by
conditional flow matching (CFM, I-CFM, OT-CFM, SB-CFM; [SF]2M adds a score network),
written with how it was trained to
one model file (``flowsolve.cli-model/1``). Under torchrun every process trains its share
(DDP) and rank 0 alone writes the file.
"""

from __future__ import annotations

import argparse
import math

from .._core.files import save_checked
from .common import MODEL_FORMAT, CliError, build_model, out_path, seeded_generator, was_given
from .options import common_options, dataset_names, subcommand

__all__ = ["METHODS", "add_parser", "check_args", "run_command"]


METHODS = {
    "cfm": "CondOT path, independent pairs (rectified flow, sigma = 0)",
    "icfm": "constant-sigma bridge, independent pairs (Tong et al. I-CFM)",
    "otcfm": "constant-sigma bridge, exact minibatch OT pairs (OT-CFM)",
    "sbcfm": "Brownian bridge, entropic OT with reg = 2 sigma^2 (SB-CFM)",
    "sf2m": "as sbcfm, with a score network beside the velocity: the Schrodinger bridge as "
            "an SDE ([SF]2M; sample it with flowsolve sample --sde)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``flowsolve train`` and its options, added to ``sub``."""
    p = subcommand(sub, "train", "train a 2-D velocity model (CFM / I-CFM / OT-CFM / SB-CFM)",
                   "Train a small MLP velocity on a built-in 2-D data set by conditional flow\n"
                   "matching, and write it with how it was trained to one model file.")
    p.add_argument("--data", default="8gaussians", choices=dataset_names(), metavar="NAME",
                   help="the data set: %(choices)s")
    p.add_argument("--source", default=None, choices=dataset_names(), metavar="NAME",
                   help="a data set as the source (one of --data's) instead of N(0, I) "
                        "(default: N(0, I))")
    p.add_argument("--method", default="otcfm", choices=list(METHODS),
                   help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    p.add_argument("--sigma", type=float, default=0.1,
                   help="noise of the icfm / otcfm / sbcfm bridges (cfm has none; with 0, "
                        "icfm and otcfm train on the CondOT path)")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch-size", type=int, default=256, help="pairs a step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW)")
    p.add_argument("--hidden", type=int, default=128, help="width of the hidden layers")
    p.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    common_options(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the model file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=run_command, check=check_args)


def check_args(args: argparse.Namespace) -> None:
    """Refuse a bad ``--sigma`` or ``--lr``, and a ``--sigma`` that ``--method cfm``
    would ignore (its model file records sigma 0)."""
    if not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise CliError(f"--sigma must be a number >= 0; got {args.sigma}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be a number > 0; got {args.lr}")
    if args.method == "cfm":
        if args.sigma != 0 and was_given(args, "sigma"):
            raise CliError("--sigma is the noise of the icfm, otcfm and sbcfm bridges; --method "
                           "cfm has none (it trains on the CondOT path, sigma = 0): drop "
                           "--sigma, or choose one of those methods")
        args.sigma = 0.0  # what the model file records: no bridge noise
    elif args.method in ("sbcfm", "sf2m") and args.sigma == 0:
        raise CliError(f"--method {args.method} needs --sigma > 0: sigma sets both its "
                       "Brownian bridge noise and its entropic OT regularisation (2 sigma^2); "
                       "for exact OT pairs without noise use --method otcfm --sigma 0")


def run_command(args: argparse.Namespace) -> int:
    """Under torchrun every process trains its share (DDP: each draws its own batch of
    ``--batch-size``), and rank 0 alone writes ``--out`` and reports."""
    import os

    import torch

    from .._core.distributed import ensure_process_group
    from ..paths.affine import AffineGaussianPath
    from ..paths.bridges import GaussianBridge
    from ..paths.schedules import CondOTScheduler
    from ..training.couplings import IndependentCoupling, OTCoupling
    from ..training.loop import TrainConfig, train

    out = out_path(args.out, args.force)
    device = args.device
    if device == "cuda" and os.environ.get("LOCAL_RANK"):  # torchrun: one GPU a process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    rank, world = ensure_process_group(device)
    if args.method == "cfm":
        path, coupling = AffineGaussianPath(CondOTScheduler()), IndependentCoupling()
    elif args.method in ("sbcfm", "sf2m"):
        path = GaussianBridge(args.sigma, "brownian")
        # reg = 2 sigma^2 on the unnormalised cost: small regularisations need thousands of
        # iterations (moons, sigma 0.1: about 1200), cheap on the kernel (0.1 s a batch)
        coupling = OTCoupling("sinkhorn", reg=2 * args.sigma**2, normalize=None,
                              max_iter=20_000)
    else:
        path = GaussianBridge(args.sigma, "constant")
        coupling = OTCoupling("exact") if args.method == "otcfm" else IndependentCoupling()
    arch = {"dim": 2, "hidden": args.hidden, "depth": args.depth}
    model = build_model(args.method, arch).to(device)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      ema_decay=0.999 if args.steps >= 2000 else 0.99, progress=True,
                      log_every=max(1, args.steps // 10))
    source = None if args.source is None else args.source
    run = train(model, args.data, cfg, source=source, path=path, coupling=coupling,
                generator=seeded_generator(args.seed))
    if rank == 0:  # the weights are the same on every rank (DDP): one file, one report
        net = run.ema_model if run.ema_model is not None else run.model
        save_checked({"format": MODEL_FORMAT, "arch": arch, "state_dict": net.state_dict(),
                      "trained": {"data": args.data, "source": args.source or "normal",
                                  "method": args.method, "sigma": args.sigma,
                                  "steps": args.steps, "seed": args.seed,
                                  "world_size": world}}, out,
                     overwrite=args.force)
        where = (f" on {world} processes (global batch {world} x {args.batch_size})"
                 if world > 1 else "")
        print(f"trained {args.method} on {args.data}: loss {run.losses[0]:.4f} -> "
              f"{run.losses[-1]:.4f} in {run.wall_time:.1f}s{where}; wrote {out}")
    if world > 1:  # no rank returns before the file is there
        torch.distributed.barrier()
    return 0
