"""``flowsolve likelihood``: the model's CNF log-likelihood of data points (the change of
variables along its flow) with the exact divergence or Hutchinson's estimate and its
standard errors, and the bits/dim of the continuous density, ``-log p(x) / (D ln 2)``.
Under torchrun every process evaluates its slice of the points and rank 0 reports.
"""

from __future__ import annotations

import argparse

from .._core.files import write_atomically
from .common import (
    CliError,
    check_solver_options,
    load_model,
    out_path,
    seeded_generator,
    solver_kwargs,
    was_given,
)
from .options import common_options, dataset_names, model_option, solver_options, subcommand

__all__ = ["add_parser", "check_args", "run_command"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``flowsolve likelihood`` and its options, added to ``sub``."""
    p = subcommand(sub, "likelihood", "exact or Hutchinson CNF log-likelihood",
                   "The model's log-likelihood of data points by the change of variables\n"
                   "along its flow (a CNF), with the exact divergence or Hutchinson's\n"
                   "estimate and its standard errors. Needs a model trained from N(0, I).")
    model_option(p)
    p.add_argument("--data", default=None, choices=dataset_names(), metavar="NAME",
                   help="the points to evaluate: %(choices)s (default: the model's training "
                        "data)")
    p.add_argument("--n", type=int, default=500, help="number of points")
    p.add_argument("--divergence", default="exact", choices=["exact", "hutchinson"],
                   help="exact (one backward pass a dimension) or hutchinson (a random-probe "
                        "estimate with standard errors)")
    p.add_argument("--probes", type=int, default=8,
                   help="Hutchinson probes a point, 2 or more (only with --divergence "
                        "hutchinson)")
    solver_options(p, "dopri5")
    common_options(p, "a CSV file of the per-point log-likelihoods (default: print the mean only)")
    p.set_defaults(run=run_command, check=check_args)


def check_args(args: argparse.Namespace) -> None:
    """The solver options, and ``--probes`` (2 or more) only with Hutchinson's
    divergence."""
    check_solver_options(args)
    if args.divergence != "hutchinson" and was_given(args, "probes"):
        raise CliError(f"--probes sets the number of Hutchinson probes; --divergence "
                       f"{args.divergence} draws none: drop --probes, or pass --divergence "
                       "hutchinson")
    if args.divergence == "hutchinson" and args.probes < 2:
        raise CliError(f"--probes {args.probes}: the standard error of each point's Hutchinson "
                       "estimate needs two probes or more; pass --probes 2 or more")


def run_command(args: argparse.Namespace) -> int:
    """Under torchrun every process draws the same ``--n`` points and evaluates its contiguous
    slice of them; rank 0 gathers the whole, reports and alone writes ``--out``."""
    import os

    import torch

    from .._core.distributed import ensure_process_group
    from ..likelihood.bits import continuous_bits_per_dim
    from ..likelihood.cnf import log_likelihood
    from ..likelihood.dataset_likelihood import dataset_log_likelihood
    from ..training.data import sample_dataset

    out = out_path(args.out, args.force)
    device = args.device
    if device == "cuda" and os.environ.get("LOCAL_RANK"):  # torchrun: one GPU a process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model, saved = load_model(args.model, device)
    if saved["trained"]["source"] != "normal":
        raise CliError("likelihood needs a model trained from the standard normal source")
    rank, world = ensure_process_group(device)
    gen = seeded_generator(args.seed)
    data = args.data or saved["trained"]["data"]
    x = sample_dataset(data, args.n, generator=gen).to(device, torch.float64)
    net = model.double()
    if world == 1:
        res = log_likelihood(lambda z, t: net(z, t), x, solver=args.solver,
                             divergence=args.divergence, n_probes=args.probes, generator=gen,
                             **solver_kwargs(args))
        log_prob, stderr, method, nfe = res.log_prob, res.stderr, res.divergence, f"{res.nfe}"
        per_point = res.nfe_per_sample
    else:  # one batch a process; Hutchinson probes seeded by --seed + the slice's first index
        got = dataset_log_likelihood(lambda z, t: net(z, t), x, batch_size=-(-args.n // world),
                                     seed=args.seed, progress=False, solver=args.solver,
                                     divergence=args.divergence, n_probes=args.probes,
                                     **solver_kwargs(args))
        if rank != 0:  # every rank holds the gathered whole: one report, one file
            return 0
        log_prob, stderr = got["log_prob"], got.get("stderr")
        method = f"{args.divergence} sharded over {world} processes"
        nfe = f"{int(got['nfe'].max())} (the most of one process)"
        per_point = got["nfe"] if args.step_control == "per_sample" else None
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
    if per_point is not None:
        nfe_f = per_point.double()
        print(f"NFE per point (step size a point): median {nfe_f.median().item():.0f}, "
              f"max {nfe_f.max().item():.0f}, total {nfe_f.sum().item():.0f}")
    if out is not None:
        rows = ["log_prob" + (",stderr" if stderr is not None else "")
                + (",nfe" if per_point is not None else "")]
        for i in range(args.n):
            row = f"{log_prob[i].item():.10g}"
            if stderr is not None:
                row += f",{stderr[i].item():.10g}"
            if per_point is not None:
                row += f",{int(per_point[i])}"
            rows.append(row)
        text = ("\n".join(rows) + "\n").encode()
        write_atomically(out, lambda file: file.write(text), overwrite=args.force)
        print(f"wrote {out}")
    return 0
