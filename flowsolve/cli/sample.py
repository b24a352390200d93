"""``flowsolve sample``: samples of a trained model by any ODE solver, with the counted
function evaluations (NFE); with ``--out`` a .pt file of them and, beside it, a CSV and (for
2-D points) a scatter plot next to the training data.
"""

from __future__ import annotations

import argparse

from .._core.files import save_atomically, write_atomically
from .common import (
    CliError,
    beside,
    check_solver_options,
    load_model,
    no_plot_message,
    out_path,
    seeded_generator,
    solver_kwargs,
    source_points,
    was_given,
)
from .options import common_options, model_option, solver_options, subcommand

__all__ = ["add_parser", "check_args", "run_command"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``flowsolve sample`` and its options, added to ``sub``."""
    p = subcommand(sub, "sample", "sample a trained model with any ODE solver",
                   "Sample a trained model: integrate its velocity from source draws with any\n"
                   "ODE solver, and report the function evaluations (NFE).")
    model_option(p)
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--sde", action="store_true",
                   help="a model of --method sf2m: sample its bridge as the SDE dX = [v + "
                        "sigma^2/2 s] dt + sigma dW (Euler-Maruyama, --steps steps) instead of "
                        "its ODE")
    solver_options(p, "rk4")
    common_options(p, "the samples as a .pt file (torch.save of x and nfe); a CSV of them "
                      "and, for 2-D data, a scatter plot beside the training data are "
                      "written next to it (NAME.csv, NAME.png) (default: print the NFE only)")
    p.set_defaults(run=run_command, check=check_args)


def check_args(args: argparse.Namespace) -> None:
    """The solver options: ``--steps`` or ``--rtol`` / ``--atol``, as ``--solver`` takes;
    ``--sde`` takes ``--steps`` only."""
    if args.sde:
        given = [f"--{f.replace('_', '-')}" for f in ("solver", "rtol", "atol", "step_control")
                 if was_given(args, f)]
        if given:
            raise CliError(f"--sde integrates the SDE by Euler-Maruyama in --steps steps; "
                           f"{', '.join(given)} set an ODE solve: drop them, or drop --sde")
        return
    check_solver_options(args)


def run_command(args: argparse.Namespace) -> int:
    """Samples to ``--out`` (a .pt file of ``{"x", "nfe"}``) and, beside it, a CSV of the
    points and, for 2-D points, a scatter plot of them next to the training data."""
    import torch

    from ..ode.solve import sample
    from ..training.data import sample_dataset
    from . import plots

    out = out_path(args.out, args.force)
    if out is not None:
        csv, png = beside(out, ".csv", args.force), beside(out, ".png", args.force)
    model, saved = load_model(args.model, args.device)
    gen = seeded_generator(args.seed)
    x0 = source_points(saved, args.n, gen, args.device)
    with torch.no_grad():
        if args.sde:
            res = _sample_sde(model, saved, x0, args.steps, gen)
            method = f"the SDE (Euler-Maruyama, {args.steps} steps)"
        else:
            res = sample(lambda x, t: model(x, t), x0, args.solver, **solver_kwargs(args))
            method = args.solver
    print(f"{args.n} samples with {method}: NFE {res.nfe}")
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
        data = sample_dataset(name, args.n, generator=seeded_generator(args.seed + 1))
        try:
            label = "SDE" if args.sde else args.solver
            plots.scatter_panels(png, [(f"{name} (training data)", data),
                                       (f"model: {label}, NFE {res.nfe}", x)],
                                 overwrite=args.force)
            written.append(png)
        except ImportError:
            print(no_plot_message(png, args.force))
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _sample_sde(model, saved: dict, x0, steps: int, gen):
    """The learned bridge of an ``sf2m`` model as its SDE, noise ``sigma`` of the file."""
    import torch

    from ..sde.solve import sample_sde

    if saved["trained"].get("method") != "sf2m":
        raise CliError(f"--sde needs a model trained with --method sf2m (a score beside the "
                       f"velocity); {saved['trained'].get('method')!r} models have no score: "
                       "drop --sde")
    sigma = float(saved["trained"]["sigma"])
    noise = torch.Generator(device=x0.device).manual_seed(int(torch.randint(
        2**62, (), generator=gen)))
    return sample_sde(lambda x, t: model(x, t), x0, score=lambda x, t: model.score(x, t),
                      diffusion=sigma, steps=steps, generator=noise)
