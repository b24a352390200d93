"""Cost of the closed-form ground truth as a test field: the marginal velocity, score and
log-density of a Gaussian mixture for a batch of 10^4 points (median of repeats).

Run: .venv/bin/python benchmarks/bench_analytic.py
"""

from __future__ import annotations

import statistics
import time

import torch

import flowsolve as fs
from flowsolve import analytic


def median_ms(fn, repeats: int = 30) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is fastest for these sizes
    gen = torch.Generator().manual_seed(0)
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'data':<28} {'dtype':<8} {'velocity':>9} {'score':>9} {'log p_t':>9}"
          "  (ms, B=10^4, per-sample t)")
    cases = [
        ("8 gaussians, d=2, diag", fs.GaussianMixture.ring(8)),
        ("16 comps, d=10, full", None),
        ("4 comps, d=64, full", None),
    ]
    for name, data in cases:
        if data is None:
            k, d = (16, 10) if "d=10" in name else (4, 64)
            a = torch.randn(k, d, d, generator=gen, dtype=torch.float64)
            data = fs.GaussianMixture(torch.randn(k, d, generator=gen, dtype=torch.float64),
                                      a @ a.transpose(1, 2) / d + torch.eye(d, dtype=torch.float64))
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(10_000, data.dim, generator=gen, dtype=dtype)
            t = torch.rand(10_000, generator=gen, dtype=dtype)
            row = [median_ms(lambda f=f, data=data, x=x, t=t: f(data, path)(x, t))
                   for f in (analytic.marginal_velocity, analytic.marginal_score,
                             analytic.marginal_log_prob)]
            print(f"{name:<28} {str(dtype)[6:]:<8} " + " ".join(f"{r:9.2f}" for r in row))


if __name__ == "__main__":
    main()
