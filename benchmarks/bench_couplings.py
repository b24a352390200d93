"""Cost of a minibatch coupling: exact OT (POT's network simplex, CPU) and Sinkhorn (POT,
``domain="auto"``: its kernel-domain iterations where the kernel cannot underflow, else the
log domain) against the independent coupling, at B = 256, 1024, 2048.

Data as in the couplings note: x0 ~ N(0, I), x1 ~ 0.5 N(0, I) + 3, float32. Times are the
median of repeats of a whole call ``coupling(x0, x1)`` (cost matrix, solve, pairing);
ratios are to the independent coupling from the same run. The OT solve needs no model, so
in training it can run in DataLoader workers and overlap the step (see
flowsolve/training/couplings.py).

``--assignment`` adds scipy's ``linear_sum_assignment`` (a shortest-augmenting-path
Jonker-Volgenant solver) on the same squared-distance cost: for equal uniform batches the
optimal plan is a permutation, so it is the other exact solver a library could call. The
column checks that both reach the same optimum and shows why flowsolve calls POT's network
simplex instead.

Run: .venv/bin/python benchmarks/bench_couplings.py [--threads 1] [--device cuda] [--dim 2]
     [--sizes 256 1024 2048] [--repeats N] [--assignment]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ot
import scipy.optimize
import torch

import flowsolve.training.couplings as fc


def median_ms(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: see tests/test_couplings.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls of the OT solves (default: 20 / 5 / 3 by size)")
    parser.add_argument("--assignment", action="store_true",
                        help="also time scipy's linear_sum_assignment on the same cost (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, POT {ot.__version__}, threads {torch.get_num_threads()}, "
          f"device {device}, d={args.dim}, float32")
    print(f"{'B':>5} {'indep ms':>9} {'exact ms':>9} {'x indep':>8} {'sinkhorn ms':>12} "
          f"{'x indep':>8} {'iters':>6} {'cost/exact':>10}")
    gen = torch.Generator(device=device).manual_seed(0)
    independent = fc.IndependentCoupling()
    exact = fc.OTCoupling("exact")
    sinkhorn = fc.OTCoupling("sinkhorn", reg=0.05)
    for b in args.sizes:
        x0 = torch.randn(b, args.dim, generator=gen, device=device)
        x1 = 0.5 * torch.randn(b, args.dim, generator=gen, device=device) + 3
        reps = args.repeats or (20 if b <= 256 else 5 if b <= 1024 else 3)
        t_ind = median_ms(lambda x0=x0, x1=x1: independent(x0, x1, generator=gen), 50, sync)
        t_ex = median_ms(lambda x0=x0, x1=x1: exact(x0, x1), reps, sync)
        t_sk = median_ms(lambda x0=x0, x1=x1: sinkhorn(x0, x1, generator=gen), reps, sync)
        r_ex, r_sk = exact.plan(x0, x1), sinkhorn.plan(x0, x1, generator=gen)
        print(f"{b:>5} {t_ind:9.3f} {t_ex:9.1f} {t_ex / t_ind:8.0f} {t_sk:12.1f} "
              f"{t_sk / t_ind:8.0f} {r_sk.n_iter if r_sk.n_iter is not None else '-':>6} "
              f"{r_sk.cost.item() / r_ex.cost.item():10.4f}")
        if args.assignment:
            cost = torch.cdist(x0.double(), x1.double()).square().cpu().numpy()
            start = time.perf_counter()
            rows, cols = scipy.optimize.linear_sum_assignment(cost)
            t_lsa = 1e3 * (time.perf_counter() - start)
            # the plan's cost is the mean pair cost (uniform 1/B weights)
            gap = cost[rows, cols].mean() / r_ex.cost.item() - 1
            print(f"      scipy linear_sum_assignment {t_lsa:.1f} ms ({t_lsa / t_ex:.1f}x the "
                  f"exact call above), cost / exact - 1 = {gap:.1e}")


if __name__ == "__main__":
    main()
