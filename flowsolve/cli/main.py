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
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .._core.errors import IntegrationError
from .._core.files import (
    UnreadableFileError,
    load_checked_file,
    save_atomically,
    save_checked,
    write_atomically,
)


def _import_the_library() -> None:
    """Import torch and the modules the handlers share, once a subcommand runs: they take
    seconds, and ``flowsolve --help`` and ``--version`` start without them (no torch-heavy
    import at the top of this file). The handlers find these names as module globals; the
    other imports of a handler are its own."""
    global torch, log_likelihood, ODE_SOLVERS, AffineGaussianPath, GaussianBridge
    global CondOTScheduler, IndependentCoupling, OTCoupling, sample_dataset, TrainConfig
    global train, MLP
    import torch

    from ..likelihood.cnf import log_likelihood
    from ..ode.solve import ODE_SOLVERS
    from ..paths.affine import AffineGaussianPath
    from ..paths.bridges import GaussianBridge
    from ..paths.schedules import CondOTScheduler
    from ..training.couplings import IndependentCoupling, OTCoupling
    from ..training.data import sample_dataset
    from ..training.loop import TrainConfig, train
    from ..training.nets import MLP


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
    """Under torchrun every process trains its share (DDP: each draws its own batch of
    ``--batch-size``), and rank 0 alone writes ``--out`` and reports."""
    import os

    from .._core.distributed import ensure_process_group

    out = _out_path(args.out, args.force)
    device = args.device
    if device == "cuda" and os.environ.get("LOCAL_RANK"):  # torchrun: one GPU a process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    rank, world = ensure_process_group(device)
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
    model = MLP(**arch).to(device)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      ema_decay=0.999 if args.steps >= 2000 else 0.99, progress=True,
                      log_every=max(1, args.steps // 10))
    source = None if args.source is None else args.source
    run = train(model, args.data, cfg, source=source, path=path, coupling=coupling,
                generator=_generator(args.seed))
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


def _solver_kwargs(args: argparse.Namespace) -> dict:
    if ODE_SOLVERS[args.solver].adaptive:
        return {"rtol": args.rtol, "atol": args.atol}
    return {"steps": args.steps}


def _source(saved: dict, n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    name = saved["trained"]["source"]
    if name == "normal":
        return torch.randn(n, 2, generator=gen).to(device)
    return sample_dataset(name, n, generator=gen).to(device)


def _beside(out: Path, suffix: str, force: bool) -> Path:
    """The file written beside ``--out`` with another suffix (samples.pt -> samples.csv),
    checked like ``--out`` before any work."""
    path = out.with_suffix(suffix)
    if path == out:
        raise CliError(f"--out {out}: give the name of the .pt file; the {suffix} file is "
                       f"written beside it ({out.with_suffix('.pt').name} -> {path.name})")
    if path.is_dir():
        raise CliError(f"{path} is a folder, and --out {out} writes a file there; choose "
                       "another --out")
    if path.exists() and not force:
        raise CliError(f"{path} exists (--out {out} writes it beside the .pt file); pass "
                       "--force to overwrite it, or choose another --out")
    return path


def _no_plot(png: Path, force: bool) -> str:
    """What to say when matplotlib is missing; with ``--force`` a plot of an earlier run must
    not stay beside the new results, so it is removed."""
    removed = ""
    if force and png.is_file():
        png.unlink()
        removed = f"; removed the earlier run's {png}"
    return f"(matplotlib not installed: no plot{removed}; pip install flowsolve[plot])"


def _sample(args: argparse.Namespace) -> int:
    """Samples to ``--out`` (a .pt file of ``{"x", "nfe"}``) and, beside it, a CSV of the
    points and, for 2-D points, a scatter plot of them next to the training data."""
    from ..ode.solve import sample
    from . import plots

    out = _out_path(args.out, args.force)
    if out is not None:
        csv, png = _beside(out, ".csv", args.force), _beside(out, ".png", args.force)
    model, saved = _load_model(args.model, args.device)
    x0 = _source(saved, args.n, _generator(args.seed), args.device)
    with torch.no_grad():
        res = sample(lambda x, t: model(x, t), x0, args.solver, **_solver_kwargs(args))
    print(f"{args.n} samples with {args.solver}: NFE {res.nfe}")
    if out is None:
        return 0
    x = res.x.detach().cpu()
    save_atomically({"x": x, "nfe": res.nfe}, out, overwrite=args.force)
    flat = x.reshape(len(x), -1)
    header = "x,y" if flat.shape[1] == 2 else ",".join(f"d{i}" for i in range(flat.shape[1]))
    text = "\n".join([header, *(",".join(f"{v:.9g}" for v in row) for row in flat.tolist())])
    write_atomically(csv, lambda file: file.write((text + "\n").encode()), overwrite=args.force)
    written = [out, csv]
    if x.shape[1:] == (2,):
        name = saved["trained"]["data"]
        data = sample_dataset(name, args.n, generator=_generator(args.seed + 1))
        try:
            plots.scatter_panels(png, [(f"{name} (training data)", data),
                                       (f"model: {args.solver}, NFE {res.nfe}", x)],
                                 overwrite=args.force)
            written.append(png)
        except ImportError:
            print(_no_plot(png, args.force))
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _likelihood(args: argparse.Namespace) -> int:
    """Under torchrun every process draws the same ``--n`` points and evaluates its contiguous
    slice of them; rank 0 gathers the whole, reports and alone writes ``--out``."""
    import os

    from .._core.distributed import ensure_process_group
    from ..likelihood.bits import continuous_bits_per_dim
    from ..likelihood.cnf import dataset_log_likelihood

    out = _out_path(args.out, args.force)
    device = args.device
    if device == "cuda" and os.environ.get("LOCAL_RANK"):  # torchrun: one GPU a process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model, saved = _load_model(args.model, device)
    if saved["trained"]["source"] != "normal":
        raise CliError("likelihood needs a model trained from the standard normal source")
    rank, world = ensure_process_group(device)
    gen = _generator(args.seed)
    data = args.data or saved["trained"]["data"]
    x = sample_dataset(data, args.n, generator=gen).to(device, torch.float64)
    net = model.double()
    if world == 1:
        res = log_likelihood(lambda z, t: net(z, t), x, solver=args.solver,
                             divergence=args.divergence, n_probes=args.probes, generator=gen,
                             **_solver_kwargs(args))
        log_prob, stderr, method, nfe = res.log_prob, res.stderr, res.divergence, f"{res.nfe}"
    else:  # one batch a process; Hutchinson probes seeded by --seed + the slice's first index
        got = dataset_log_likelihood(lambda z, t: net(z, t), x, batch_size=-(-args.n // world),
                                     seed=args.seed, progress=False, solver=args.solver,
                                     divergence=args.divergence, n_probes=args.probes,
                                     **_solver_kwargs(args))
        if rank != 0:  # every rank holds the gathered whole: one report, one file
            return 0
        log_prob, stderr = got["log_prob"], got.get("stderr")
        method = f"{args.divergence} sharded over {world} processes"
        nfe = f"{int(got['nfe'].max())} (the most of one process)"
    mean = log_prob.mean().item()
    spread = (f" +- {log_prob.std().item() / args.n**0.5:.4f} nats (mean +- s.e.)"
              if args.n > 1 else " nats (one point: no standard error)")
    print(f"log-likelihood of {args.n} {data} points: {mean:.4f}{spread}, {method}, "
          f"{args.solver}, NFE {nfe}")
    dims = x[0].numel()  # continuous data: bits/dim = -log p(x) / (D ln 2), no dequantisation
    bpd = continuous_bits_per_dim(mean, dims)
    print(f"= {bpd:.4f} bits/dim (D = {dims}, continuous density)")
    if stderr is not None:
        print(f"mean Hutchinson standard error per point: {stderr.mean().item():.4f}")
    if out is not None:
        rows = ["log_prob" + (",stderr" if stderr is not None else "")]
        for i in range(args.n):
            row = f"{log_prob[i].item():.10g}"
            if stderr is not None:
                row += f",{stderr[i].item():.10g}"
            rows.append(row)
        text = ("\n".join(rows) + "\n").encode()
        write_atomically(out, lambda file: file.write(text), overwrite=args.force)
        print(f"wrote {out}")
    return 0


def _on_condot_path(trained: dict) -> bool:
    """Whether the model of a training record is a velocity of the CondOT path ``x_t = t x1 +
    (1 - t) x0``: ``--method cfm``, or icfm / otcfm with ``--sigma 0`` (any coupling of the
    endpoints: ``x_t`` is still ``alpha_t x1 + sigma_t x0``, so the model's posterior means
    and the path's log-SNR are those of the affine path). Bridge noise makes another path."""
    method, sigma = trained["method"], float(trained.get("sigma", 0.0))
    return method == "cfm" or (method in ("icfm", "otcfm") and sigma == 0)


def _bridge_noise(trained: dict) -> str:
    method, sigma = trained["method"], float(trained.get("sigma", 0.0))
    return (f"a Brownian bridge, noise of std {sigma:g} sqrt(t (1 - t))" if method == "sbcfm"
            else f"a bridge with Gaussian noise of std {sigma:g} at every t")


def _check_transferable(path: str, trained: dict) -> None:
    """Scheduler transfer rescales the CondOT path ``x_t = t x1 + (1 - t) x0``; it is exact
    for a velocity of that path's marginals under any coupling of the endpoints (independent
    or OT pairs), and only without bridge noise."""
    if _on_condot_path(trained):
        return
    method, sigma = trained["method"], float(trained.get("sigma", 0.0))
    noise = _bridge_noise(trained)
    raise CliError(
        f"--model {path} was trained with --method {method} --sigma {sigma:g}: its path is "
        f"{noise} around the line between the pairs, not the CondOT path x_t = t x1 + "
        "(1 - t) x0 that scheduler transfer rescales (exact for any coupling of the "
        "endpoints, but only without bridge noise). Transfer a model trained with --method "
        "cfm, or --method icfm or otcfm with --sigma 0")


def _transfer(args: argparse.Namespace) -> int:
    """W2 to the data after a few steps under each scheduler, from the same source draws; with
    ``--out`` a figure of those samples beside the data."""
    from ..metrics import wasserstein2
    from ..ode.solve import sample
    from ..paths.schedules import get_scheduler
    from ..paths.transfer import transfer
    from . import plots

    out = _out_path(args.out, args.force)
    model, saved = _load_model(args.model, args.device)
    _check_transferable(args.model, saved["trained"])
    names = ["condot", *(t for t in dict.fromkeys(args.target) if t != "condot")]
    gen = _generator(args.seed)
    x0 = _source(saved, args.n, gen, args.device)
    data = saved["trained"]["data"]
    ref = sample_dataset(data, args.n, generator=gen).to(args.device)
    field = lambda x, t: model(x, t)  # noqa: E731
    print(f"W2 to {args.n} data points after {args.solver} with {args.steps} steps")
    panels = [(f"{data} (data)", ref)]
    with torch.no_grad():
        for name in names:
            v = transfer(field, source=CondOTScheduler(), target=get_scheduler(name))
            res = sample(v, x0, args.solver, steps=args.steps)
            w2 = float(wasserstein2(res.x, ref))
            print(f"  {name:<12} W2 {w2:.4f}   NFE {res.nfe}")
            panels.append((f"{name}: W2 {w2:.3f}", res.x))
    if out is not None:
        plots.scatter_panels(out, panels, overwrite=args.force,
                             title=f"{args.steps} {args.solver} steps from the same "
                                   f"{args.n} source draws")
        print(f"wrote {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import closed_form_tour, fresh_folder, run_demo

    if args.closed_form:
        print("\n".join(closed_form_tour(args.scheduler, args.seed)))
        return 0
    out = fresh_folder(args.out, args.force)
    summary = run_demo(out, steps=args.steps, seed=args.seed)
    print(f"\nreport: {summary}")
    return 0


_REFERENCE_TOL = 1e-10
"""compare: the tolerance of the float64 reference solve that every error is measured
against; the compared tolerances must be looser."""


def _model_path(args: argparse.Namespace, trained: dict):
    """The path of the model for ``compare``: the CondOT path where the training record says
    the model is a velocity of it (:func:`_on_condot_path`), else None; then the samplers
    and the grids spaced in the log-SNR (which read the path's alpha_t, sigma_t) are
    refused."""
    if _on_condot_path(trained):
        return AffineGaussianPath(CondOTScheduler())
    samplers = [s for s in args.solvers if ODE_SOLVERS[s].needs_path]
    grids = [label for label, g in args.grids if g.needs_path]
    if samplers or grids:
        what = " and ".join(
            part for part in (f"--solvers {' '.join(samplers)} (samplers that step in the "
                              "path's log-SNR)" if samplers else "",
                              f"--grid {' '.join(grids)} (spaced in its log-SNR)"
                              if grids else "") if part)
        raise CliError(
            f"--model {args.model} was trained with --method {trained['method']} --sigma "
            f"{float(trained.get('sigma', 0.0)):g}: its path is {_bridge_noise(trained)}, not "
            f"an affine Gaussian path x_t = alpha_t x1 + sigma_t x0, which {what} need. "
            "Compare a model trained with --method cfm, or --method icfm or otcfm with "
            "--sigma 0; or use the other solvers on the uniform grid, a shift or a grid file")
    return None


def _compare(args: argparse.Namespace) -> int:
    from ..studies.compare import compare_solvers
    from .demo import fresh_folder

    model, saved = _load_model(args.model, args.device)
    path = _model_path(args, saved["trained"])
    reused = args.force and Path(args.out).is_dir()
    out = fresh_folder(args.out, args.force)
    net = model.double()
    x0 = _source(saved, args.n, _generator(args.seed), args.device).double()
    try:
        with torch.no_grad():
            study = compare_solvers(lambda x, t: net(x, t), x0, solvers=args.solvers,
                                    steps=args.budget_steps, tolerances=args.tolerances,
                                    reference_tol=_REFERENCE_TOL, repeats=args.repeats,
                                    generator=_generator(args.seed), path=path,
                                    grids=dict(args.grids))
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


# -- checks of the options, before any work --------------------------------------------------
def _given(args: argparse.Namespace, name: str) -> bool:
    """Whether the option was on the command line (not left at its default)."""
    return name in getattr(args, "given", ())


def _check_solver(args: argparse.Namespace) -> None:
    """--steps is for fixed-step solvers, --rtol / --atol for adaptive ones: the other kind
    would ignore them."""
    adaptive = ODE_SOLVERS[args.solver].adaptive
    if adaptive and _given(args, "steps"):
        raise CliError(f"--steps sets the steps of a fixed-step solver; {args.solver} is "
                       "adaptive and chooses its steps by --rtol and --atol: drop --steps, or "
                       "choose a fixed-step --solver (e.g. rk4)")
    for flag in ("rtol", "atol"):
        if not adaptive and _given(args, flag):
            raise CliError(f"--{flag} is a tolerance of an adaptive solver; {args.solver} is "
                           f"fixed-step and takes --steps: drop --{flag}, or choose an "
                           "adaptive --solver (e.g. dopri5)")
        value = getattr(args, flag)
        if not (value > 0 and math.isfinite(value)) or (flag == "rtol" and value >= 1):
            raise CliError(f"--{flag} must be a number in (0, {'1' if flag == 'rtol' else 'inf'}"
                           f"); got {value}")


def _check_sample(args: argparse.Namespace) -> None:
    _check_solver(args)


def _check_likelihood(args: argparse.Namespace) -> None:
    _check_solver(args)
    if args.divergence != "hutchinson" and _given(args, "probes"):
        raise CliError(f"--probes sets the number of Hutchinson probes; --divergence "
                       f"{args.divergence} draws none: drop --probes, or pass --divergence "
                       "hutchinson")
    if args.divergence == "hutchinson" and args.probes < 2:
        raise CliError(f"--probes {args.probes}: the standard error of each point's Hutchinson "
                       "estimate needs two probes or more; pass --probes 2 or more")


def _check_train(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise CliError(f"--sigma must be a number >= 0; got {args.sigma}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be a number > 0; got {args.lr}")
    if args.method == "cfm":
        if args.sigma != 0 and _given(args, "sigma"):
            raise CliError("--sigma is the noise of the icfm, otcfm and sbcfm bridges; --method "
                           "cfm has none (it trains on the CondOT path, sigma = 0): drop "
                           "--sigma, or choose one of those methods")
        args.sigma = 0.0  # what the model file records: no bridge noise
    elif args.method == "sbcfm" and args.sigma == 0:
        raise CliError("--method sbcfm needs --sigma > 0: sigma sets both its Brownian bridge "
                       "noise and its entropic OT regularisation (2 sigma^2); for exact OT "
                       "pairs without noise use --method otcfm --sigma 0")


def _check_transfer(args: argparse.Namespace) -> None:
    from ..paths.schedules import get_scheduler
    from . import plots

    for name in args.target:
        std = get_scheduler(name).source_std
        if std != 1:
            raise CliError(f"--target {name}: {get_scheduler(name)!r} starts from "
                           f"N(0, {std:g}^2 I), the model from its own source; a transfer "
                           f"keeps the source draws, so {name} cannot be a target")
    if args.out is not None:
        if Path(args.out).suffix.lower() not in plots.FIGURE_SUFFIXES:
            raise CliError(f"--out {args.out}: the figure is written as "
                           f"{', '.join(plots.FIGURE_SUFFIXES)}, as the name's suffix says")
        if not plots.have_matplotlib():
            raise CliError("--out draws a figure, which needs matplotlib (pip install "
                           "flowsolve[plot]); without --out the W2 table is printed only")


_GRID_FILE = "a FILE of times written by the grid search (JSON)"


def _grid_option(value: str) -> tuple[str, object]:
    """``(label, TimeGrid)`` of one ``--grid``: a name of the grids (uniform, logsnr, edm),
    a number (the shift s > 0: label ``shift<s>``) or a grid file (label: its stem), loaded
    with ``flowsolve.studies.grid_search.load_grid`` and checked to run from t = 0 to 1."""
    from ..ode.grids import GRIDS, ShiftGrid, time_grid

    if value in GRIDS and value != "shift":
        return value, GRIDS[value]()
    try:
        shift = float(value)
    except ValueError:
        shift = None
    if shift is not None:
        if not (math.isfinite(shift) and shift > 0):
            raise CliError(f"--grid {value}: a number is the shift s of the rectified-flow "
                           "grid and must be a finite number > 0 (SD3 uses 3)")
        return f"shift{shift:g}", ShiftGrid(shift)
    file = Path(value)
    if not file.is_file():
        names = ", ".join(n for n in GRIDS if n != "shift")
        raise CliError(f"--grid {value}: not a grid name, a number or a file; accepted: "
                       f"{names}, a shift s > 0 (a number, e.g. 3), or {_GRID_FILE}"
                       + (f" (no such file: {file})" if file.suffix or file.parent != Path()
                          else ""))
    try:
        from ..studies.grid_search import load_grid
    except ImportError:
        raise CliError(f"--grid {value}: grid files need flowsolve.studies.grid_search, which "
                       "this installation lacks; use a grid name or a shift") from None
    try:
        grid = load_grid(file)
        time_grid(grid, t0=0.0, t1=1.0)  # compare solves from t = 0 (noise) to 1 (data)
    except UnreadableFileError as exc:
        raise CliError(f"--grid {exc}") from None
    except (ValueError, TypeError) as exc:
        raise CliError(f"--grid {value}: {exc}") from None
    return file.stem, grid


def _check_compare(args: argparse.Namespace) -> None:
    for flag, values in (("--solvers", args.solvers), ("--budget-steps", args.budget_steps),
                         ("--tolerances", args.tolerances), ("--grid", args.grid or [])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise CliError(f"{flag} names {', '.join(map(str, twice))} more than once")
    adaptive = [s for s in args.solvers if ODE_SOLVERS[s].adaptive]
    fixed = [s for s in args.solvers if s not in adaptive]
    args.grids = [_grid_option(v) for v in args.grid or ["uniform"]]
    labels = [label for label, _ in args.grids]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise CliError(f"--grid {' '.join(args.grid)}: two grids would be recorded as "
                       f"{twice[0]!r}: give each grid once (a grid file is recorded by its "
                       "name without the suffix: rename one)")
    if args.grid and not fixed:
        raise CliError(f"--grid places the steps of fixed-step solvers, and --solvers "
                       f"{' '.join(args.solvers)} has none (adaptive solvers choose their own): "
                       "drop --grid, or add a fixed-step solver (e.g. rk4)")
    if _given(args, "budget_steps") and all(g.steps is not None for _, g in args.grids):
        raise CliError("--budget-steps are the step counts of fixed-step solvers, and every "
                       "--grid is a file whose times fix the steps: drop --budget-steps, or "
                       "add a --grid such as uniform")
    if not fixed and _given(args, "budget_steps"):
        raise CliError(f"--budget-steps are the step counts of fixed-step solvers, and "
                       f"--solvers {' '.join(args.solvers)} has none: drop --budget-steps, or "
                       "add a fixed-step solver (e.g. rk4)")
    if not adaptive and _given(args, "tolerances"):
        raise CliError(f"--tolerances are those of adaptive solvers, and --solvers "
                       f"{' '.join(args.solvers)} has none: drop --tolerances, or add an "
                       "adaptive solver (e.g. dopri5)")
    bad = [t for t in args.tolerances if not _REFERENCE_TOL < t < 1]
    if adaptive and bad:
        raise CliError(f"--tolerances must lie in ({_REFERENCE_TOL:g}, 1): every error is "
                       f"measured against a reference solved at rtol = atol = "
                       f"{_REFERENCE_TOL:g}, which must be tighter; got "
                       f"{' '.join(map(str, bad))}")


def _check_demo(args: argparse.Namespace) -> None:
    if args.closed_form:
        ignored = [f"--{n}" for n in ("steps", "out", "seed") if _given(args, n)]
        ignored += ["--force"] if args.force else []
        if ignored:
            raise CliError(f"--closed-form only prints the closed-form tour: it trains "
                           f"nothing, writes nothing and draws nothing, so "
                           f"{', '.join(ignored)} would be ignored")
    elif _given(args, "scheduler"):
        raise CliError("--scheduler chooses the path of --closed-form; the full demo trains "
                       "on the CondOT path: drop --scheduler, or add --closed-form")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, an option the command would ignore or cannot honour, in the
    words of the command line (the library's messages name its Python arguments)."""
    if getattr(args, "force", False) and getattr(args, "out", "") is None:
        raise CliError("--force lets --out replace existing files, and no --out is given")
    args.check(args)


_ADVICE = {
    "max_steps": "the adaptive solver reached its step limit: loosen --rtol / --atol, or "
                 "choose a fixed-step --solver with --steps",
    "step_underflow": "its step size underflowed (the model is probably not smooth there): "
                      "loosen --rtol / --atol, or choose a fixed-step --solver",
    "failed": "choose another --solver, or loosen --rtol / --atol",
    "non_finite": "the model's velocity or the state became inf or NaN: check the model file "
                  "(retrain with a smaller --lr), or use more --steps or tighter --rtol / "
                  "--atol",
}


_FLAGS = {"rtol": "--rtol", "atol": "--atol", "n_probes": "--probes", "steps": "--steps"}


def _in_cli_words(message: str) -> str:
    """A library message with the Python arguments that are options here named as options
    (``rtol=1e-08`` -> ``--rtol 1e-08``; ``steps`` only as ``steps=``, a word of prose too)."""
    def flag(m: re.Match) -> str:
        return _FLAGS[m[1]] + (" " if m[2] else "")

    message = re.sub(r"(?<![\w-])(rtol|atol|n_probes)(?!\w)(=?)", flag, message)
    return re.sub(r"(?<![\w-])(steps)(=)", flag, message)


# -- the parser ----------------------------------------------------------------------------
DESCRIPTION = """\
flowsolve: the dynamics of flow-matching and diffusion models, on built-in 2-D data.

Train a small velocity model (CFM, I-CFM, OT-CFM or SB-CFM), sample it with any ODE
solver, evaluate its exact or Hutchinson CNF log-likelihood, compare solvers (error, NFE,
wall time, fitted orders) and sample it under other schedulers without retraining. Time
runs from t = 0 (noise) to t = 1 (data)."""

EPILOG = """\
Run "flowsolve COMMAND --help" for the options of a command and their defaults.

No command overwrites an existing file unless --force is given. demo and compare write a
report folder: when --out exists, they write into a fresh numbered folder beside it
(NAME-2, NAME-3, ...), or into --out itself with --force."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's help ends with its default where it has one
    (flags, required options and options whose default is "none" say in words what
    happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or action.required or "%(default)" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class _Store(argparse.Action):
    """argparse's plain ``store`` that also notes the option in ``args.given``: an option the
    command would ignore is refused when it was given, never for its default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class _Names:
    """Choices read from a library registry on first use (a command's help, a value to
    check): building the parser imports no torch."""

    def __init__(self, read: Callable[[], Iterable[str]]):
        self._read, self._names = read, None

    def _get(self) -> list[str]:
        if self._names is None:
            self._names = list(self._read())
        return self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __contains__(self, name: object) -> bool:
        return name in self._get()

    def __len__(self) -> int:
        return len(self._get())


def _solver_names(adaptive: bool | None = None) -> _Names:
    def read() -> list[str]:
        from ..ode.solve import ODE_SOLVERS

        return ODE_SOLVERS.names(adaptive=adaptive)

    return _Names(read)


def _sampler_names() -> _Names:
    def read() -> list[str]:
        from ..ode.solve import ODE_SOLVERS

        return [n for n, info in ODE_SOLVERS.items() if info.needs_path]

    return _Names(read)


def _grid_names() -> _Names:
    def read() -> list[str]:
        from ..ode.grids import GRIDS

        return [n for n in GRIDS if n != "shift"]  # a shift is given as its number

    return _Names(read)


class _CommaNames:
    """Choices that also accept names joined by commas (``dpmpp_2m,heun2``), each one of
    ``names``; iterated (the help's list) as ``names``."""

    def __init__(self, names: _Names):
        self._names = names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, value: object) -> bool:
        parts = value.split(",") if isinstance(value, str) else [value]
        return all(part in self._names for part in parts)


class _StoreNames(_Store):
    """``_Store`` of a list of names given separated by spaces or commas, as one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        values = [part for value in values for part in value.split(",")]
        super().__call__(parser, namespace, values, option_string)


class _Joined:
    """``names`` joined by ", " when a help text is formatted (read on first use)."""

    def __init__(self, names: _Names):
        self._names = names

    def __str__(self) -> str:
        return ", ".join(self._names)


def _dataset_names() -> _Names:
    def read() -> list[str]:
        from ..training.data import DATASETS

        return list(DATASETS)

    return _Names(read)


def _scheduler_names() -> _Names:
    def read() -> list[str]:
        from ..paths.schedules import SCHEDULERS

        return sorted(SCHEDULERS)

    return _Names(read)


def _subcommand(sub: argparse._SubParsersAction, name: str, summary: str,
                description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description,
                       formatter_class=_HelpFormatter)
    p.register("action", None, _Store)
    p.register("action", "store", _Store)
    return p


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE",
                   help="a model file written by flowsolve train")


def _solver_options(p: argparse.ArgumentParser, solver: str) -> None:
    p.add_argument("--solver", default=solver, choices=_solver_names(), metavar="NAME",
                   help="the ODE solver, fixed-step or adaptive: %(choices)s")
    p.add_argument("--steps", type=int, default=20,
                   help="steps of a fixed-step solver (refused with an adaptive one)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="relative tolerance of an adaptive solver (refused with a fixed-step "
                        "one)")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="absolute tolerance of an adaptive solver (refused with a fixed-step "
                        "one)")


def _common(p: argparse.ArgumentParser, out_help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    if out_help:
        p.add_argument("--out", metavar="FILE", help=out_help)
        p.add_argument("--force", action="store_true",
                       help="overwrite the files of --out if they exist")


_FOLDER = "if it exists, a fresh numbered folder beside it (NAME-2, NAME-3, ...) unless --force"


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "demo", "train, likelihood, solver study, transfer on built-in data",
                    "The main job on built-in data, in about a minute on a CPU: the exact path\n"
                    "of an 8-Gaussians mixture, a small OT-CFM model trained on it, its exact\n"
                    "likelihood against the true density, a solver study and scheduler\n"
                    "transfer. Writes a report folder (summary.md, CSV, JSON, plots) and\n"
                    "prints its path.")
    p.add_argument("--out", default="flowsolve-demo", metavar="FOLDER",
                   help=f"report folder; {_FOLDER}")
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it exists (files of the same names are "
                        "replaced)")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (one is fastest for small tensors on a shared "
                        "CPU)")
    p.add_argument("--closed-form", action="store_true",
                   help="only print the closed-form tour of a path (no training, nothing "
                        "written)")
    p.add_argument("--scheduler", default="condot", choices=_scheduler_names(),
                   metavar="NAME", help="the path of --closed-form: %(choices)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the training and every draw")
    p.set_defaults(run=_demo, check=_check_demo)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "compare", "solver comparison study on a trained model",
                    "Measure ODE solvers on a trained model: the error of every budget\n"
                    "against a tight float64 reference solve, its NFE and wall time, and\n"
                    "fitted orders of convergence. Writes study.csv, study.json and study.png\n"
                    "into a report folder.")
    _model_option(p)
    solvers = p.add_argument(
        "--solvers", nargs="+", default=["euler", "midpoint", "rk4", "dopri5"],
        choices=_CommaNames(_solver_names()), action=_StoreNames, metavar="NAME",
        help="the ODE solvers to compare (separated by spaces or commas): %(choices)s. Of "
             "these, the low-NFE samplers %(samplers)s step in the log-SNR of the model's "
             "path: they need a model trained with --method cfm, or icfm / otcfm with "
             "--sigma 0")
    solvers.samplers = _Joined(_sampler_names())
    p.add_argument("--budget-steps", nargs="+", type=int, default=[2, 4, 8, 16, 32],
                   metavar="N", help="step counts of the fixed-step solvers")
    grid = p.add_argument(
        "--grid", action="append", metavar="NAME|NUMBER|FILE",
        help="where the steps of the fixed-step solvers (samplers included) lie; repeat it "
             "to compare grids: %(names)s (uniform in t; uniform in log-SNR; EDM's rho = 7, "
             f"the last two on the CondOT path only), a number s > 0 (the rectified-flow "
             f"shift, SD3: 3) or {_GRID_FILE}, whose times fix the steps "
             "(default: uniform)")
    grid.names = _Joined(_grid_names())
    p.add_argument("--tolerances", nargs="+", type=float, default=[1e-3, 1e-5, 1e-7],
                   metavar="TOL",
                   help=f"tolerances (rtol = atol) of the adaptive solvers, in "
                        f"({_REFERENCE_TOL:g}, 1): the reference is solved at "
                        f"{_REFERENCE_TOL:g}")
    p.add_argument("--n", type=int, default=512, help="source points solved from")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each solve (min and median wall time)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while timing (recorded in study.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default="solver-study", metavar="FOLDER",
                   help=f"report folder; {_FOLDER}")
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it exists (files of the same names are "
                        "replaced)")
    p.set_defaults(run=_compare, check=_check_compare)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "train", "train a 2-D velocity model (CFM / I-CFM / OT-CFM / SB-CFM)",
                    "Train a small MLP velocity on a built-in 2-D data set by conditional flow\n"
                    "matching, and write it with how it was trained to one model file.")
    p.add_argument("--data", default="8gaussians", choices=_dataset_names(), metavar="NAME",
                   help="the data set: %(choices)s")
    p.add_argument("--source", default=None, choices=_dataset_names(), metavar="NAME",
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
    _common(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the model file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=_train, check=_check_train)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "sample", "sample a trained model with any ODE solver",
                    "Sample a trained model: integrate its velocity from source draws with any\n"
                    "ODE solver, and report the function evaluations (NFE).")
    _model_option(p)
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    _solver_options(p, "rk4")
    _common(p, "the samples as a .pt file (torch.save of x and nfe); a CSV of them and, for "
               "2-D data, a scatter plot beside the training data are written next to it "
               "(NAME.csv, NAME.png) (default: print the NFE only)")
    p.set_defaults(run=_sample, check=_check_sample)


def _add_likelihood(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "likelihood", "exact or Hutchinson CNF log-likelihood",
                    "The model's log-likelihood of data points by the change of variables\n"
                    "along its flow (a CNF), with the exact divergence or Hutchinson's\n"
                    "estimate and its standard errors. Needs a model trained from N(0, I).")
    _model_option(p)
    p.add_argument("--data", default=None, choices=_dataset_names(), metavar="NAME",
                   help="the points to evaluate: %(choices)s (default: the model's training "
                        "data)")
    p.add_argument("--n", type=int, default=500, help="number of points")
    p.add_argument("--divergence", default="exact", choices=["exact", "hutchinson"],
                   help="exact (one backward pass a dimension) or hutchinson (a random-probe "
                        "estimate with standard errors)")
    p.add_argument("--probes", type=int, default=8,
                   help="Hutchinson probes a point, 2 or more (only with --divergence "
                        "hutchinson)")
    _solver_options(p, "dopri5")
    _common(p, "a CSV file of the per-point log-likelihoods (default: print the mean only)")
    p.set_defaults(run=_likelihood, check=_check_likelihood)


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "transfer", "sample a CondOT-trained model under other schedulers",
                    "Sample a model trained on the CondOT path under other schedulers without\n"
                    "retraining: its velocity is re-expressed in the target's time and scale.\n"
                    "Exact for a velocity of the CondOT path under any coupling of the\n"
                    "endpoints: --method cfm, or icfm / otcfm with --sigma 0 (bridge noise\n"
                    "makes another path). Prints the W2 distance to the data after a few\n"
                    "fixed steps from the same source draws.")
    _model_option(p)
    p.add_argument("--target", nargs="+", default=["cosine", "linear_vp"],
                   choices=_scheduler_names(), metavar="NAME",
                   help="schedulers to sample under, after condot (the model's own): "
                        "%(choices)s; ve is refused (it starts from a wider Gaussian than the "
                        "model's source)")
    p.add_argument("--n", type=int, default=2000,
                   help="number of samples (and of data points for W2)")
    p.add_argument("--solver", default="euler", choices=_solver_names(adaptive=False),
                   metavar="NAME", help="a fixed-step ODE solver: %(choices)s")
    p.add_argument("--steps", type=int, default=4, help="steps of the solver")
    _common(p, "a figure of the samples under every scheduler beside the data (.png, .pdf "
               "or .svg) (default: print the W2 table only)")
    p.set_defaults(run=_transfer, check=_check_transfer)


# the subcommands in the order ``flowsolve --help`` lists them
_SUBCOMMANDS = (_add_demo, _add_compare, _add_train, _add_sample, _add_likelihood, _add_transfer)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``flowsolve`` command; building it imports no torch."""
    import flowsolve

    parser = argparse.ArgumentParser(prog="flowsolve", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {flowsolve.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
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
    _import_the_library()
    threads = torch.get_num_threads()
    try:
        if getattr(args, "device", None) is not None:
            args.device = _device(args.device)
        _check_options(args)
        if getattr(args, "threads", None) is not None:  # small tensors: one thread is fastest
            torch.set_num_threads(args.threads)         # on a shared CPU
        return args.run(args)
    except CliError as exc:
        parser.error(str(exc))
    except IntegrationError as exc:  # a solve that could not finish: what to change here
        where = "" if exc.t is None else f" at t={exc.t:.6g}"
        print(f"flowsolve {args.command}: solver {exc.solver} stopped{where} ({exc.status}): "
              f"{_ADVICE.get(exc.status, _ADVICE['failed'])}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"flowsolve {args.command}: {_in_cli_words(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command could not read or write
        print(f"flowsolve {args.command}: {exc}", file=sys.stderr)
        return 2
    finally:  # restored: main() may be called in-process (tests, notebooks)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser", "MODEL_FORMAT"]
