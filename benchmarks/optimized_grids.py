"""Optimised time grids (``flowsolve.studies.grid_search.optimize_grid``) against the
standard grids: the closed-form ring of 8 Gaussians (radius 2, ``--std``) on the cosine
path, float64, a calibration batch (``--batch``, default 256) and a held-out batch
(``--held-out``, default 1024) with DOP853 references at 1e-10; for each solver and budget
the held-out RMS error of every standard grid and of the optimised grid, the ratio to the
best standard grid, the search's calibration solves and its seconds.

Target (issue 15): at 10 NFE (heun2 with 5 steps, dpmpp_2m with 10) the optimised grid's
held-out error at least 2x below the best standard grid's.

``--unet`` adds the cost of a search on a randomly initialised 8x8 U-Net (float32, batch
64, 10 steps of dpmpp_2m on the cosine path): seconds only, its errors mean nothing.

Run: .venv/bin/python benchmarks/optimized_grids.py [--std 0.2 0.5] [--max-evals 300]
     [--batch 256] [--held-out 1024] [--threads 1] [--unet]
"""

from __future__ import annotations

import argparse
import time

import torch

import flowsolve as fs
from flowsolve.ode.solve import sample
from flowsolve.studies.grid_search import optimize_grid

CASES = (("heun2", 5), ("dpmpp_2m", 10), ("fast_rk4", 3), ("ddim", 10))


def ring_rows(std: float, batch: int, held_out: int, max_evals: int) -> list[str]:
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(8, radius=2.0, std=std), path)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 2, dtype=torch.float64, generator=g)
    xh = torch.randn(held_out, 2, dtype=torch.float64, generator=g)
    ref, refh = (sample(u, x, "DOP853", rtol=1e-10, atol=1e-10).x for x in (x0, xh))
    rows = []
    for solver, steps in CASES:
        res = optimize_grid(u, x0, solver, steps, path=path, reference=ref,
                            held_out=(xh, refh), max_evals=max_evals)
        std_cells = " | ".join(f"{res.standard[n]:.4g}" for n in
                               ("uniform", "logsnr", "edm", "shift3"))
        rows.append(f"| {std} | {solver} | {steps} | {res.nfe} | {std_cells} | "
                    f"{res.held_out_error:.4g} | {res.best_standard} | "
                    f"{res.improvement:.2f}x | {res.calibration_error:.4g} | "
                    f"{res.evaluations} | {res.seconds:.1f} |")
        print(rows[-1], flush=True)
        print(f"|  | grid: {', '.join(f'{t:.4f}' for t in res.grid)} |", flush=True)
    return rows


def unet_row(max_evals: int) -> None:
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    net = fs.UNet(1, channels=24, generator=torch.Generator().manual_seed(0)).eval()
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    res = optimize_grid(lambda x, t: net(x, t), x0, "dpmpp_2m", 10, path=path,
                        max_evals=max_evals)
    print(f"U-Net 8x8 (random weights, float32, batch 64), dpmpp_2m 10 steps: "
          f"{res.evaluations} calibration solves in {time.perf_counter() - start:.1f} s "
          f"(reference included)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--std", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=1024)
    ap.add_argument("--max-evals", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s); ring(8, "
          f"radius=2, std), cosine path, batch {args.batch}, held-out {args.held_out}, "
          f"max_evals {args.max_evals}; held-out RMS error at t = 1")
    print("| std | solver | steps | NFE | uniform | logsnr | edm | shift 3 | optimised | "
          "best standard | gain | calibration | solves | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for std in args.std:
        ring_rows(std, args.batch, args.held_out, args.max_evals)
    if args.unet:
        unet_row(min(args.max_evals, 100))


if __name__ == "__main__":
    main()
