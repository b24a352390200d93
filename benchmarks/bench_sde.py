"""Cost of SDE sampling: Brownian-motion choices and torchsde solvers, 100 steps at batch 1024
with a small MLP field (3 x 256, SiLU), d = 2. Reports medians and ratios from one run.

Run: .venv/bin/python benchmarks/bench_sde.py [--device cuda] [--repeats 5] [--warmups 2]
     [--batch 1024] [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchsde
from torch import nn

from flowsolve.sde.solve import SDE_SOLVERS, GridBrownian, sample_sde

STEPS, BATCH, DIM = 100, 1024, 2


class MLP(nn.Module):
    def __init__(self, dim: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, dim))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.net(torch.cat([x, t[:, None]], dim=1))


class TorchsdeSystem(nn.Module):
    """The same SDE handed straight to torchsde.sdeint (drift u + g^2/2 s, g = 1)."""

    noise_type, sde_type = "additive", "ito"

    def __init__(self, u, s):
        super().__init__()
        self.u, self.s = u, s

    def f(self, t, y):
        return self.u(y, t) + 0.5 * self.s(y, t)

    def g_prod(self, t, y, v):
        return v


def timed(fn, device: torch.device, repeats: int, warmups: int = 2) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmups):  # two by default
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmups", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: tiny ops on a shared CPU; see "
                             "benchmarks/README.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, steps, warm = args.batch, args.steps, args.warmups
    device = torch.device(args.device)
    torch.manual_seed(0)  # network initialisation only; sampling noise uses generators
    u, s = MLP(DIM).to(device), MLP(DIM).to(device)
    x0 = torch.randn(batch, DIM, device=device)
    h = 1.0 / steps
    shape = (batch, DIM)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, torchsde {torchsde.__version__}, {dev_name}, "
          f"threads {torch.get_num_threads()}; {steps} steps, B={batch}, d={DIM}, fp32, "
          f"median of {args.repeats}")

    def interval(**kw):
        return torchsde.BrownianInterval(0.0, 1.0, size=shape, device=device, entropy=0, **kw)

    def gen():
        return torch.Generator(device=device).manual_seed(0)

    system = TorchsdeSystem(u, s)
    ts = torch.tensor([0.0, 1.0], device=device)

    def hand_loop():
        x, g = x0, gen()
        for k in range(steps):
            t = torch.full((), k * h, device=device)
            x = x + h * (u(x, t) + 0.5 * s(x, t)) + h**0.5 * torch.randn(
                x.shape, generator=g, device=device)
        return x

    with torch.no_grad():
        rows = {
            "hand-written EM loop, randn per step": hand_loop,
            "sdeint, default BrownianInterval": lambda: torchsde.sdeint(
                system, x0, ts, dt=h, method="euler", bm=interval()),
            "sdeint, BrownianInterval(dt, cache_size=None)": lambda: torchsde.sdeint(
                system, x0, ts, dt=h, method="euler", bm=interval(dt=h, cache_size=None)),
            "sample_sde, default BrownianInterval": lambda: sample_sde(
                u, x0, score=s, steps=steps, bm=interval()),
            "sample_sde, BrownianInterval(dt, cache_size=None)": lambda: sample_sde(
                u, x0, score=s, steps=steps, bm=interval(dt=h, cache_size=None)),
            "sample_sde, GridBrownian (default)": lambda: sample_sde(
                u, x0, score=s, steps=steps, generator=gen()),
            "GridBrownian construction alone": lambda: GridBrownian(
                shape, steps=steps, generator=gen(), device=device),
        }
        results = {name: timed(fn, device, args.repeats, warm) for name, fn in rows.items()}
        base = results["sample_sde, GridBrownian (default)"]
        print(f"\n{'Brownian motion / driver (euler)':<52} {'ms':>9} {'/ GridBrownian':>14}")
        for name, ms in results.items():
            print(f"{name:<52} {ms:9.1f} {ms / base:14.2f}")

        print(f"\n{'solver (GridBrownian)':<20} {'nfe':>5} {'ms':>9} {'/ euler':>8} {'ms/nfe':>8}")
        euler_ms = 1.0
        for name in ["euler"] + [n for n in SDE_SOLVERS if n != "euler"]:
            res = sample_sde(u, x0, score=s, steps=steps, solver=name, generator=gen())
            ms = timed(lambda name=name: sample_sde(u, x0, score=s, steps=steps, solver=name,
                                                    generator=gen()), device, args.repeats,
                       warm)
            euler_ms = ms if name == "euler" else euler_ms
            print(f"{name:<20} {res.nfe:5d} {ms:9.1f} {ms / euler_ms:8.2f} {ms / res.nfe:8.3f}")


if __name__ == "__main__":
    main()
