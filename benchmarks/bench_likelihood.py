"""Exact CNF log-likelihood: flowsolve against a reference that loops over dimensions.

The reference is facebookresearch's flow_matching (``ODESolver.compute_likelihood`` with
``exact_divergence=True``; install it separately: ``pip install flow-matching``, licence
CC BY-NC, used here only to measure). Same MLP (3x256), batch, Euler with 100 steps from
t = 1 to t = 0; reports time per likelihood, the ratio, and the largest difference.

Times are the best of ``--repeats`` calls after one warm-up (CUDA: synchronised).

Run: .venv/bin/python benchmarks/bench_likelihood.py [--dims 2 16 64] [--batch 256]
     [--device cuda] [--steps 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import flowsolve as fs
from flowsolve.likelihood.cnf import standard_normal_log_prob


def timed(fn, repeats: int, device: str = "cpu") -> tuple[float, object]:
    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from flow_matching.solver import ODESolver
    except ImportError:
        ODESolver = None
        print("flow_matching not installed: timing flowsolve only (pip install flow-matching)")
    device = args.device
    where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device
    print(f"torch {torch.__version__}, {where}, threads {torch.get_num_threads()}, batch "
          f"{args.batch}, Euler {args.steps} steps, float32")
    print(f"{'d':>5} {'flowsolve (s)':>14} {'reference (s)':>14} {'ratio':>7} {'max |diff|':>11}")
    for d in args.dims:
        gen = torch.Generator().manual_seed(d)
        with torch.random.fork_rng():
            torch.manual_seed(d)
            model = fs.MLP(d, hidden=256, depth=3).to(device).eval()
        x = torch.randn(args.batch, d, generator=gen).to(device)

        def ours(model=model, x=x):
            return fs.log_likelihood(model, x, solver="euler", steps=args.steps).log_prob

        t_ours, ll_ours = timed(ours, args.repeats, device)
        if ODESolver is None:
            print(f"{d:>5} {t_ours:14.3f}")
            continue

        def reference(model=model, x=x):
            solver = ODESolver(velocity_model=model)
            grid = torch.tensor([1.0, 0.0], device=device)
            _, ll = solver.compute_likelihood(x, standard_normal_log_prob, 1.0 / args.steps,
                                              method="euler", time_grid=grid,
                                              exact_divergence=True)
            return ll

        t_ref, ll_ref = timed(reference, args.repeats, device)
        diff = (ll_ours - ll_ref).abs().max().item()
        print(f"{d:>5} {t_ours:14.3f} {t_ref:14.3f} {t_ref / t_ours:7.2f} {diff:11.2e}")


if __name__ == "__main__":
    main()
