"""The ``flowsolve`` command: ``demo | train | sample | likelihood | compare | transfer``.

Models are saved by ``flowsolve train`` as one file holding the MLP's shape, its (EMA)
weights and how it was trained, loaded with ``torch.load(weights_only=True)``. No command
overwrites an existing output unless ``--force`` is given: ``--out`` and ``--device`` are
checked before any work, outputs are written through a private temporary file and renamed
into place, and a file that appears at ``--out`` during a long run is left as it is (the
result is then kept beside it, and the message says where).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .._core.files import (
    UnreadableFileError,
    load_checked_file,
    save_atomically,
    save_checked,
    write_atomically,
)
from ..likelihood.cnf import log_likelihood
from ..metrics import wasserstein2
from ..ode.solve import ODE_SOLVERS, sample
from ..paths.affine import AffineGaussianPath
from ..paths.bridges import GaussianBridge
from ..paths.schedules import SCHEDULERS, CondOTScheduler, get_scheduler
from ..paths.transfer import transfer
from ..studies.compare import compare_solvers
from ..training.couplings import IndependentCoupling, OTCoupling
from ..training.data import DATASETS, sample_dataset
from ..training.loop import TrainConfig, train
from ..training.nets import MLP
from .demo import closed_form_tour, fresh_folder, run_demo

MODEL_FORMAT = "flowsolve.cli.main-model/1"
METHODS = {
    "cfm": "CondOT path, independent pairs (rectified flow, sigma = 0)",
    "icfm": "constant-sigma bridge, independent pairs (Tong et al. I-CFM)",
    "otcfm": "constant-sigma bridge, exact minibatch OT pairs (OT-CFM)",
    "sbcfm": "Brownian bridge, entropic OT with reg = 2 sigma^2 (SB-CFM)",
}


class CliError(Exception):
    """A bad option or file: printed as ``flowsolve: error: ...`` with exit status 2."""


def _out_path(path: str | None, force: bool) -> Path | None:
    """Check ``--out`` before any work: free (or ``--force``), not a folder, and in a folder
    that can be written, so that a long run is never lost at the end."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file name")
    if out.exists() and not force:
        raise CliError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise CliError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") \
            from None
    return out


def _device(name: str) -> str:
    """``--device``: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CliError(f"--device {name!r} is not a device; accepted: cpu, cuda, cuda:N, mps") \
            from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CliError(f"--device {name}: this machine (or this torch build) has no CUDA "
                           "device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise CliError(f"--device {name}: only {count} CUDA device(s), cuda:0 to "
                           f"cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {name}: accepted: cpu, cuda, cuda:N, mps")
    return name


def _load_model(path: str, device: str) -> tuple[torch.nn.Module, dict]:
    if not Path(path).is_file():
        raise CliError(f"--model {path}: no such file (make one with `flowsolve train`)")
    try:
        saved = load_checked_file(path, "flowsolve model file", map_location=device)
    except UnreadableFileError as exc:
        raise CliError(f"--model {exc}") from None
    if saved.get("format") != MODEL_FORMAT:
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
        # reg = 2 sigma^2 on the unnormalised cost: small regularisations need thousands of
        # iterations (moons, sigma 0.1: about 1200), cheap on the kernel (0.1 s a batch)
        coupling = OTCoupling("sinkhorn", reg=2 * args.sigma**2, normalize=None,
                              max_iter=20_000)
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
    save_checked({"format": MODEL_FORMAT, "arch": arch, "state_dict": net.state_dict(),
                  "trained": {"data": args.data, "source": args.source or "normal",
                              "method": args.method, "sigma": args.sigma,
                              "steps": args.steps, "seed": args.seed}}, out,
                 overwrite=args.force)
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
        save_atomically({"x": res.x.cpu(), "nfe": res.nfe}, out, overwrite=args.force)
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
    mean = res.log_prob.mean().item()
    spread = (f" +- {res.log_prob.std().item() / args.n**0.5:.4f} nats (mean +- s.e.)"
              if args.n > 1 else " nats (one point: no standard error)")
    print(f"log-likelihood of {args.n} {data} points: {mean:.4f}{spread}, {res.divergence}, "
          f"{args.solver}, NFE {res.nfe}")
    dims = x[0].numel()  # continuous data: bits/dim = -log p(x) / (D ln 2), no dequantisation
    print(f"= {-mean / (dims * math.log(2)):.4f} bits/dim (D = {dims}, continuous density)")
    if res.stderr is not None:
        print(f"mean Hutchinson standard error per point: {res.stderr.mean().item():.4f}")
    if out is not None:
        rows = ["log_prob" + (",stderr" if res.stderr is not None else "")]
        for i in range(args.n):
            row = f"{res.log_prob[i].item():.10g}"
            if res.stderr is not None:
                row += f",{res.stderr[i].item():.10g}"
            rows.append(row)
        text = ("\n".join(rows) + "\n").encode()
        write_atomically(out, lambda file: file.write(text), overwrite=args.force)
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
    if args.closed_form:
        print("\n".join(closed_form_tour(args.scheduler, args.seed)))
        return 0
    out = fresh_folder(args.out, args.force)
    summary = run_demo(out, steps=args.steps, seed=args.seed)
    print(f"\nreport: {summary}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    model, saved = _load_model(args.model, args.device)
    reused = args.force and Path(args.out).is_dir()
    out = fresh_folder(args.out, args.force)
    net = model.double()
    x0 = _source(saved, args.n, _generator(args.seed), args.device).double()
    try:
        with torch.no_grad():
            study = compare_solvers(lambda x, t: net(x, t), x0, solvers=args.solvers,
                                    steps=args.budget_steps, tolerances=args.tolerances,
                                    repeats=args.repeats, generator=_generator(args.seed))
    except BaseException:
        if not reused and not any(out.iterdir()):
            out.rmdir()  # a failed study leaves no empty report folder behind
        raise
    print(study.table())
    for name, o in study.orders.items():
        fitted = "-" if o["fitted"] is None else f"{o['fitted']:.2f}"
        print(f"{name:<16} order: declared {o['declared']}, fitted {fitted}")
    study.to_csv(out / "study.csv")
    study.to_json(out / "study.json")
    png = out / "study.png"
    removed = ""
    if reused and png.is_file():  # an earlier run's plot must not sit beside these results
        png.unlink()
        removed = f"; removed the earlier run's {png}"
    try:
        study.plot(png)
    except ImportError:
        print(f"(matplotlib not installed: no plot{removed}; pip install flowsolve[plot])")
    print(f"wrote {out}")
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, likelihood, solver study, transfer on built-in data")
    p.add_argument("--out", default="flowsolve-demo",
                   help="report folder (a numbered sibling if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="write into --out even if it exists")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--closed-form", action="store_true",
                   help="only print the closed-form tour of a path (no training)")
    p.add_argument("--scheduler", default="condot", choices=sorted(SCHEDULERS),
                   help="with --closed-form")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_demo)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="solver comparison study on a trained model")
    p.add_argument("--model", required=True)
    p.add_argument("--solvers", nargs="+", default=["euler", "midpoint", "rk4", "dopri5"])
    p.add_argument("--budget-steps", nargs="+", type=int, default=[2, 4, 8, 16, 32],
                   help="step counts of the fixed-step solvers")
    p.add_argument("--tolerances", nargs="+", type=float, default=[1e-3, 1e-5, 1e-7],
                   help="tolerances of the adaptive solvers")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while timing (recorded in study.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="solver-study", help="report folder")
    p.add_argument("--force", action="store_true", help="write into --out even if it exists")
    p.set_defaults(run=_compare)


def _add_train(sub: argparse._SubParsersAction) -> None:
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


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a trained model with any ODE solver")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=1000)
    _solver_options(p, "rk4")
    _common(p, "file for the samples (torch.save)")
    p.set_defaults(run=_sample)


def _add_likelihood(sub: argparse._SubParsersAction) -> None:
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


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="sample a CondOT-trained model under other schedulers")
    p.add_argument("--model", required=True)
    p.add_argument("--target", nargs="+", default=["cosine", "linear_vp"],
                   choices=sorted(SCHEDULERS))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--solver", default="euler", choices=list(ODE_SOLVERS.names(adaptive=False)))
    p.add_argument("--steps", type=int, default=4)
    _common(p)
    p.set_defaults(run=_transfer)


# the subcommands in the order ``flowsolve --help`` lists them
_SUBCOMMANDS = (_add_demo, _add_compare, _add_train, _add_sample, _add_likelihood, _add_transfer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowsolve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts >= 1 and tolerances > 0, refused through ``parser.error`` before any work."""
    for name in ("n", "steps", "batch_size", "probes", "hidden", "depth", "threads",
                 "repeats"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if any(v < 1 for v in getattr(args, "budget_steps", None) or ()):
        parser.error(f"--budget-steps must all be >= 1; got {args.budget_steps}")
    if any(not v > 0 for v in getattr(args, "tolerances", None) or ()):
        parser.error(f"--tolerances must all be > 0; got {args.tolerances}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_counts(parser, args)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "device", None) is not None:
            args.device = _device(args.device)
        if getattr(args, "threads", None) is not None:  # small tensors: one thread is fastest
            torch.set_num_threads(args.threads)         # on a shared CPU
        return args.run(args)
    except CliError as exc:
        parser.error(str(exc))
    except (ValueError, TypeError) as exc:
        print(f"flowsolve {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command could not read or write
        print(f"flowsolve {args.command}: {exc}", file=sys.stderr)
        return 2
    finally:  # restored: main() may be called in-process (tests, notebooks)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser", "MODEL_FORMAT"]
