"""The ``flowsolve`` command: ``demo | train | sample | likelihood | transfer``.

Models are saved by ``flowsolve train`` as one file holding the MLP's shape, its (EMA)
weights and how it was trained, loaded with ``torch.load(weights_only=True)``. No command
overwrites an existing output unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import analytic
from .bridges import GaussianBridge
from .couplings import IndependentCoupling, OTCoupling
from .data import DATASETS, sample_dataset
from .likelihood import log_likelihood
from .metrics import wasserstein2
from .nets import MLP
from .paths import AffineGaussianPath
from .schedules import SCHEDULERS, CondOTScheduler, get_scheduler
from .solve import ODE_SOLVERS, sample
from .train import TrainConfig, train
from .transfer import transfer

MODEL_FORMAT = "flowsolve.cli-model/1"
METHODS = {
    "cfm": "CondOT path, independent pairs (rectified flow, sigma = 0)",
    "icfm": "constant-sigma bridge, independent pairs (Tong et al. I-CFM)",
    "otcfm": "constant-sigma bridge, exact minibatch OT pairs (OT-CFM)",
    "sbcfm": "Brownian bridge, entropic OT with reg = 2 sigma^2 (SB-CFM)",
}


class CliError(Exception):
    """A bad option or file: printed as ``flowsolve: error: ...`` with exit status 2."""


def _out_path(path: str | None, force: bool) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.exists() and not force:
        raise CliError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_model(path: str, device: str) -> tuple[torch.nn.Module, dict]:
    if not Path(path).is_file():
        raise CliError(f"--model {path}: no such file (make one with `flowsolve train`)")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise CliError(f"--model {path}: not a flowsolve model file ({exc})") from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise CliError(f"--model {path}: not a {MODEL_FORMAT} file written by `flowsolve train`")
    model = MLP(**saved["arch"]).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- subcommands ---------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    out = _out_path(args.out, args.force)
    if args.method == "cfm":
        path, coupling = AffineGaussianPath(CondOTScheduler()), IndependentCoupling()
    elif args.method == "sbcfm":
        path = GaussianBridge(args.sigma, "brownian")
        coupling = OTCoupling("sinkhorn", reg=2 * args.sigma**2, normalize=None)
    else:
        path = GaussianBridge(args.sigma, "constant")
        coupling = OTCoupling("exact") if args.method == "otcfm" else IndependentCoupling()
    arch = {"dim": 2, "hidden": args.hidden, "depth": args.depth}
    model = MLP(**arch).to(args.device)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      ema_decay=0.999 if args.steps >= 2000 else 0.99, progress=True,
                      log_every=max(1, args.steps // 10))
    source = None if args.source is None else args.source
    run = train(model, args.data, cfg, source=source, path=path, coupling=coupling,
                generator=_generator(args.seed))
    net = run.ema_model if run.ema_model is not None else run.model
    _save_atomically({"format": MODEL_FORMAT, "arch": arch, "state_dict": net.state_dict(),
                      "trained": {"data": args.data, "source": args.source or "normal",
                                  "method": args.method, "sigma": args.sigma,
                                  "steps": args.steps, "seed": args.seed}}, out)
    print(f"trained {args.method} on {args.data}: loss {run.losses[0]:.4f} -> "
          f"{run.losses[-1]:.4f} in {run.wall_time:.1f}s; wrote {out}")
    return 0


def _solver_kwargs(args: argparse.Namespace) -> dict:
    if ODE_SOLVERS[args.solver].adaptive:
        return {"rtol": args.rtol, "atol": args.atol}
    return {"steps": args.steps}


def _source(saved: dict, n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    name = saved["trained"]["source"]
    if name == "normal":
        return torch.randn(n, 2, generator=gen).to(device)
    return sample_dataset(name, n, generator=gen).to(device)


def _sample(args: argparse.Namespace) -> int:
    out = _out_path(args.out, args.force)
    model, saved = _load_model(args.model, args.device)
    x0 = _source(saved, args.n, _generator(args.seed), args.device)
    with torch.no_grad():
        res = sample(lambda x, t: model(x, t), x0, args.solver, **_solver_kwargs(args))
    print(f"{args.n} samples with {args.solver}: NFE {res.nfe}")
    if out is not None:
        _save_atomically({"x": res.x.cpu(), "nfe": res.nfe}, out)
        print(f"wrote {out}")
    return 0


def _likelihood(args: argparse.Namespace) -> int:
    out = _out_path(args.out, args.force)
    model, saved = _load_model(args.model, args.device)
    if saved["trained"]["source"] != "normal":
        raise CliError("likelihood needs a model trained from the standard normal source")
    gen = _generator(args.seed)
    data = args.data or saved["trained"]["data"]
    x = sample_dataset(data, args.n, generator=gen).to(args.device, torch.float64)
    net = model.double()
    res = log_likelihood(lambda z, t: net(z, t), x, solver=args.solver,
                         divergence=args.divergence, n_probes=args.probes, generator=gen,
                         **_solver_kwargs(args))
    mean, se = res.log_prob.mean().item(), res.log_prob.std().item() / args.n**0.5
    print(f"log-likelihood of {args.n} {data} points: {mean:.4f} +- {se:.4f} nats "
          f"(mean +- s.e.), {res.divergence}, {args.solver}, NFE {res.nfe}")
    if res.stderr is not None:
        print(f"mean Hutchinson standard error per point: {res.stderr.mean().item():.4f}")
    if out is not None:
        rows = ["log_prob" + (",stderr" if res.stderr is not None else "")]
        for i in range(args.n):
            row = f"{res.log_prob[i].item():.10g}"
            if res.stderr is not None:
                row += f",{res.stderr[i].item():.10g}"
            rows.append(row)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    model, saved = _load_model(args.model, args.device)
    if saved["trained"]["method"] != "cfm":
        raise CliError("transfer needs a model trained on the CondOT path (--method cfm)")
    gen = _generator(args.seed)
    x0 = torch.randn(args.n, 2, generator=gen).to(args.device)
    ref = sample_dataset(saved["trained"]["data"], args.n, generator=gen).to(args.device)
    field = lambda x, t: model(x, t)  # noqa: E731
    print(f"W2 to {args.n} data points after {args.solver} with {args.steps} steps")
    with torch.no_grad():
        for name in ["condot", *args.target]:
            v = transfer(field, source=CondOTScheduler(), target=get_scheduler(name))
            res = sample(v, x0, args.solver, steps=args.steps)
            print(f"  {name:<12} W2 {float(wasserstein2(res.x, ref)):.4f}   NFE {res.nfe}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Closed-form tour of a path on the built-in 8-Gaussians mixture."""
    data = analytic.GaussianMixture.ring(n_components=8, radius=4.0, std=0.5)
    path = AffineGaussianPath(get_scheduler(args.scheduler))
    log_p = analytic.marginal_log_prob(data, path)
    u = analytic.marginal_velocity(data, path)
    score = analytic.marginal_score(data, path)
    points = torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 2.0], [0.0, -3.0]], dtype=torch.float64)
    times = [0.0, 0.25, 0.5, 0.75, 1.0]
    print(f"data:  {data!r}  (8 Gaussians, radius 4, std 0.5)")
    print(f"path:  {path!r}   x_t = alpha_t x1 + sigma_t x0, t: 0 = noise -> 1 = data\n")
    heads = ("t", "alpha_t", "sigma_t", "d_alpha_t", "d_sigma_t")
    print(f"{heads[0]:>6} " + " ".join(f"{h:>10}" for h in heads[1:]))
    for t in times:
        v = path.scheduler(torch.tensor(t, dtype=torch.float64))
        row = [v.alpha_t, v.sigma_t, v.d_alpha_t, v.d_sigma_t]
        print(f"{t:6.2f} " + " ".join(f"{float(c):10.4f}" for c in row))
    print("\nexact marginal log-density log p_t(x)")
    print(f"{'x':>14} " + " ".join(f"{'t=' + format(t, '.2f'):>10}" for t in times))
    for x in points:
        vals = [float(log_p(x[None], t)) for t in times]
        print(f"{str(tuple(x.tolist())):>14} " + " ".join(f"{v:10.4f}" for v in vals))
    print("\nexact marginal velocity u_t(x) and score at t = 0.5")
    for x in points:
        ux, sx = u(x[None], 0.5)[0].tolist(), score(x[None], 0.5)[0].tolist()
        print(f"{str(tuple(x.tolist())):>14}  u = ({ux[0]:8.4f}, {ux[1]:8.4f})"
              f"   score = ({sx[0]:8.4f}, {sx[1]:8.4f})")
    x1 = data.sample(4096, generator=_generator(args.seed), dtype=torch.float64)
    print(f"\nmean log p_1 over 4096 data samples: {float(data.log_prob(x1).mean()):.4f} nats")
    return 0


# -- the parser ----------------------------------------------------------------------------
def _solver_options(p: argparse.ArgumentParser, solver: str) -> None:
    p.add_argument("--solver", default=solver, choices=list(ODE_SOLVERS),
                   metavar="{" + ",".join(ODE_SOLVERS) + "}")
    p.add_argument("--steps", type=int, default=20, help="fixed-step solvers")
    p.add_argument("--rtol", type=float, default=1e-5, help="adaptive solvers")
    p.add_argument("--atol", type=float, default=1e-5, help="adaptive solvers")


def _common(p: argparse.ArgumentParser, out_help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    if out_help:
        p.add_argument("--out", help=out_help)
        p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowsolve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="closed-form tour of a path on built-in data")
    p.add_argument("--scheduler", default="condot", choices=sorted(SCHEDULERS))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_demo)

    p = sub.add_parser("train", help="train a 2-D velocity model (CFM / I-CFM / OT-CFM / SB-CFM)")
    p.add_argument("--data", default="8gaussians", choices=list(DATASETS))
    p.add_argument("--source", default=None, choices=list(DATASETS),
                   help="a data set as the source instead of N(0, I)")
    p.add_argument("--method", default="otcfm", choices=list(METHODS),
                   help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    _common(p)
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=_train)

    p = sub.add_parser("sample", help="sample a trained model with any ODE solver")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=1000)
    _solver_options(p, "rk4")
    _common(p, "file for the samples (torch.save)")
    p.set_defaults(run=_sample)

    p = sub.add_parser("likelihood", help="exact or Hutchinson CNF log-likelihood")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None, choices=list(DATASETS),
                   help="points to evaluate (default: the training data set)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--divergence", default="exact", choices=["exact", "hutchinson"])
    p.add_argument("--probes", type=int, default=8)
    _solver_options(p, "dopri5")
    _common(p, "CSV file of per-point log-likelihoods")
    p.set_defaults(run=_likelihood)

    p = sub.add_parser("transfer", help="sample a CondOT-trained model under other schedulers")
    p.add_argument("--model", required=True)
    p.add_argument("--target", nargs="+", default=["cosine", "linear_vp"],
                   choices=sorted(SCHEDULERS))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--solver", default="euler", choices=list(ODE_SOLVERS.names(adaptive=False)))
    p.add_argument("--steps", type=int, default=4)
    _common(p)
    p.set_defaults(run=_transfer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("n", "steps", "batch_size", "probes", "hidden", "depth"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    try:
        return args.run(args)
    except CliError as exc:
        parser.error(str(exc))
    except (ValueError, TypeError) as exc:
        print(f"flowsolve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser", "MODEL_FORMAT"]
