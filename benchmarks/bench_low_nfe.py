"""Low-NFE sampling: the error of every sampler x time grid at 4-20 model evaluations.

Part 1, the closed-form mixture: the exact velocity of a ring of 8 Gaussians (radius 2,
std 0.5: smooth; std 0.05: sharp, as image data is at the noise levels that matter) on the
CondOT, cosine and linear-VP paths; the error is the RMS over 512 noise
points of ||x_hat(1) - x(1)||, x(1) from dopri8 at rtol = atol = 1e-12 in float64 (the
probability-flow endpoint to ~1e-11). Every deterministic sampler of ``fs.ODE_SOLVERS``
(``needs_path``) and the Runge-Kutta baselines (euler, heun2, midpoint, rk4) run on the
uniform, log-SNR, EDM and shift-3 grids at the largest step count whose counted NFE is at
most each budget.

Part 2 (``--unet``): the label-free velocity of the 8x8-digits U-Net of
``examples/cfg_digits.py`` (trained here, ~75 s), against a dopri5 solve at 1e-7, batch
128 (float32).

With ``--optimize`` the optimised grid of ``flowsolve.studies.grid_search.optimize_grid``
for heun2 and dpmpp_2m at 10 NFE is printed beside the best standard grid (held-out
error): on the mixtures (cosine path) and, with ``--unet``, on the U-Net.

Run: .venv/bin/python benchmarks/bench_low_nfe.py [--budgets 4 6 8 10 15 20] [--unet]
     [--optimize] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from pathlib import Path

import torch

import flowsolve as fs
from flowsolve.ode.solve import ODE_SOLVERS, sample
from flowsolve.studies.front import solve_within

BASELINES = ("euler", "midpoint", "heun2", "rk4")
GRIDS = {"uniform": "uniform", "logsnr": "logsnr", "edm": "edm", "shift3": 3.0}
PATHS = {"condot": fs.CondOTScheduler, "cosine": fs.CosineScheduler,
         "linear_vp": fs.LinearVPScheduler}


def samplers() -> list[str]:
    return [*BASELINES, *(n for n, i in ODE_SOLVERS.items() if i.needs_path)]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten(1).norm(dim=1).pow(2).mean().sqrt())


def solve_at_budget(field, x0, solver, budget, path, grid):
    """The solve with the most steps whose counted NFE is <= budget (None if even 1 step
    costs more, or the grid does not fit the budget)."""
    try:
        return solve_within(field, x0, solver, budget, path=path, grid=grid)
    except ValueError:
        return None


def table(field, x0, ref, path, budgets, label, rows):
    names = samplers()
    print(f"\n## {label}: RMS error at the budget (NFE used in brackets)\n")
    print("| solver | grid | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in budgets) + " |")
    best: dict[int, tuple[float, str]] = {}
    for solver in names:
        for gname, grid in GRIDS.items():
            cells = []
            for b in budgets:
                t = time.perf_counter()
                res = solve_at_budget(field, x0, solver, b, path, grid)
                secs = time.perf_counter() - t
                if res is None:
                    cells.append("-")
                    continue
                err = rms(res.x, ref)
                cells.append(f"{err:.3g} ({res.nfe})")
                rows.append({"case": label, "solver": solver, "grid": gname, "budget": b,
                             "nfe": res.nfe, "steps": res.steps, "error": err,
                             "seconds": secs})
                if math.isfinite(err) and err < best.get(b, (math.inf, ""))[0]:
                    best[b] = (err, f"{solver} on {gname}")
            print(f"| {solver} | {gname} | " + " | ".join(cells) + " |")
    print(f"\nbest per budget ({label}): " + "; ".join(
        f"NFE {b}: {best[b][1]} {best[b][0]:.3g}" for b in budgets if b in best))
    sys.stdout.flush()


def mixture(budgets, rows, batch, std):
    data = fs.GaussianMixture.ring(8, radius=2.0, std=std)
    x0 = torch.randn(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, make in PATHS.items():
        path = fs.AffineGaussianPath(make())
        u = fs.analytic.marginal_velocity(data, path)
        ref = sample(u, x0, "dopri8", rtol=1e-12, atol=1e-12).x
        table(u, x0, ref, path, budgets, f"mixture std {std:g}, {name}", rows)


def unet(budgets, rows, batch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import cfg_digits  # noqa: PLC0415

    train, _ = cfg_digits.split_digits(0, 0.2)
    model, _ = cfg_digits.train_model(train, cfg_digits.DEFAULT, 0, quiet=True)
    model.eval()
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    null = torch.tensor(10)  # the null label (0-d: any batch): unconditional

    @torch.no_grad()
    def u(x, t):
        return model(x, t.expand(x.shape[0]), null)

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 1, 8, 8, generator=gen)
    with torch.no_grad():
        ref = sample(u, x0, "dopri5", rtol=1e-7, atol=1e-7).x
        table(u, x0, ref, path, budgets, "digits U-Net, CondOT", rows)
    return u, path


def optimized(budget: int, cases) -> None:
    """The optimised grid beside the best standard one for heun2 and dpmpp_2m at ``budget``
    NFE; ``cases``: (label, field, path, calibration x0, held-out x0)."""
    from flowsolve.studies.grid_search import optimize_grid  # noqa: PLC0415

    print(f"\n## Optimised grids at {budget} NFE (held-out RMS error)\n")
    print("| case | solver | steps | best standard | its error | optimised | ratio | evaluations "
          "| seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, u, path, cal, held in cases:
        for solver, steps in (("heun2", budget // 2), ("dpmpp_2m", budget)):
            t = time.perf_counter()
            with torch.no_grad():
                res = optimize_grid(u, cal, solver, steps, path=path, held_out=held)
            secs = time.perf_counter() - t
            std = res.standard[res.best_standard]
            print(f"| {label} | {solver} | {steps} | {res.best_standard} | {std:.3g} | "
                  f"{res.held_out_error:.3g} | {std / res.held_out_error:.2f}x | "
                  f"{res.evaluations} | {secs:.1f} |")
            sys.stdout.flush()


def mixture_cases(stds):
    gen = torch.Generator().manual_seed(1)
    cal = torch.randn(256, 2, dtype=torch.float64, generator=gen)
    held = torch.randn(1024, 2, dtype=torch.float64, generator=gen)
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    for std in stds:
        data = fs.GaussianMixture.ring(8, radius=2.0, std=std)
        yield f"ring std {std:g}, cosine", fs.analytic.marginal_velocity(data, path), path, \
            cal, held


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 6, 8, 10, 15, 20])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--stds", type=float, nargs="*", default=[0.5, 0.05],
                   help="standard deviations of the ring's components (none: no mixture)")
    p.add_argument("--unet", action="store_true", help="also the 8x8-digits U-Net (~2 min)")
    p.add_argument("--optimize", action="store_true", help="optimised grids at 10 NFE")
    p.add_argument("--csv", help="write every row here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# low-NFE sampling: torch {torch.__version__}, {platform.processor() or 'cpu'}, "
          f"threads {torch.get_num_threads()}, flowsolve {fs.__version__}")
    rows: list[dict] = []
    for std in args.stds:
        mixture(args.budgets, rows, args.batch, std)
    cases = list(mixture_cases(args.stds)) if args.optimize else []
    if args.unet:
        u, path = unet(args.budgets, rows, min(args.batch, 256))
        gen = torch.Generator().manual_seed(1)
        cases.append(("digits U-Net, CondOT", u, path, torch.randn(64, 1, 8, 8, generator=gen),
                      torch.randn(256, 1, 8, 8, generator=gen)))
    if args.optimize:
        optimized(10, cases)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
