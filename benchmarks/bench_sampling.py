"""Overhead of the ODE front door: ``sample`` against a hand-written Euler loop with the same
small MLP field (3 x 256, SiLU), 100 steps at batch 1024, d = 2, fp32; and flowsolve's
synchronisation-free fixed-step loop (``fast_*``, optionally replayed from a CUDA graph)
against both. Every row is timed round-robin (one call of each per round, so a drift in the
machine's load hits all rows alike); medians, minima and their ratios come from one run (on a
shared, loaded machine the minimum is the steadier estimate of intrinsic cost; on the CPU
the default clock is the process's CPU time, which does not count the time the process
waits for a core while other jobs run). A second
table repeats the paths with a field that costs almost nothing (``u = -x``), which exposes
the per-step overhead of each driver in microseconds.

On CUDA, ``CapturedSampler`` (the ``fast_euler`` loop replayed from a CUDA graph) is a row of
both tables, and the last lines give eager / captured.

Run: .venv/bin/python benchmarks/bench_sampling.py [--device cuda] [--repeats 15] [--threads 1]
     [--clock wall|cpu] [--batch 1024] [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchdiffeq
from torch import nn

from flowsolve.ode.solve import CapturedSampler, sample

STEPS, BATCH, DIM = 100, 1024, 2


class MLP(nn.Module):
    """u(x, t) = W_4 SiLU(W_3 SiLU(W_2 SiLU(W_1 [x, t]))): three hidden layers of 256."""

    def __init__(self, dim: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, dim))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.net(torch.cat([x, t[:, None]], dim=1))


def round_robin(rows: dict, device: torch.device, repeats: int, clock=time.perf_counter
                ) -> dict[str, tuple[float, float]]:
    """(median, minimum) time in ms of each row by ``clock``, after two warm-up rounds."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(repeats + 2):
        for name, fn in rows.items():
            sync()
            start = clock()
            fn()
            sync()
            if round_ >= 2:
                times[name].append(clock() - start)
    return {name: (1e3 * statistics.median(ts), 1e3 * min(ts)) for name, ts in times.items()}


def paths(u, x0: torch.Tensor, grid: torch.Tensor) -> dict:
    """The sampling paths compared, each a zero-argument callable."""
    steps = grid.shape[0] - 1
    h, grid32, quarter = 1.0 / steps, grid.to(x0.dtype), max(1, steps // 4)

    def hand_loop():
        x = x0
        for k in range(steps):
            x = x + h * u(x, grid32[k])
        return x

    return {
        "hand-written Euler loop": hand_loop,
        "torchdiffeq.odeint euler, explicit grid": lambda: torchdiffeq.odeint(
            lambda t, x: u(x, t.to(x.dtype)), x0, grid[[0, -1]], method="euler",
            options={"grid_constructor": lambda f, y, t: grid})[-1],
        "sample(solver='euler')  [torchdiffeq]": lambda: sample(u, x0, "euler", steps=steps),
        "sample(solver='fast_euler')": lambda: sample(u, x0, "fast_euler", steps=steps),
        "sample(solver='fast_euler', check_finite=False)": lambda: sample(
            u, x0, "fast_euler", steps=steps, check_finite=False),
        f"sample(solver='rk4', steps={quarter})  [torchdiffeq]": lambda: sample(
            u, x0, "rk4", steps=quarter),
        f"sample(solver='fast_rk4', steps={quarter})": lambda: sample(
            u, x0, "fast_rk4", steps=quarter),
    }


CAPTURED = "CapturedSampler fast_euler (CUDA graph replay)"


def add_captured(rows: dict, u, x0: torch.Tensor, steps: int) -> None:
    """On CUDA: the fast_euler loop captured once, replayed per call (checked against eager)."""
    if x0.device.type != "cuda":
        return
    try:
        graphed = CapturedSampler(u, x0, "fast_euler", steps=steps)
        got = graphed(x0).x
    except Exception as err:  # report and go on: the other rows are still worth having
        print(f"CapturedSampler failed, row left out: {type(err).__name__}: {err}")
        return
    eager = sample(u, x0, "fast_euler", steps=steps).x
    print(f"CapturedSampler: max |replay - eager| = {(got - eager).abs().max().item():.2e}")
    rows[CAPTURED] = lambda: graphed(x0)


def report(title: str, results: dict[str, tuple[float, float]], steps: int = STEPS) -> None:
    hand_med, hand_min = results["hand-written Euler loop"]
    print(f"\n{title:<50} {'median ms':>10} {'min ms':>9} {'med/hand':>9} {'min/hand':>9} "
          f"{'us/step':>8}")
    for name, (med, low) in results.items():
        per_step = 1e3 * (low - hand_min) / steps
        print(f"{name:<50} {med:10.2f} {low:9.2f} {med / hand_med:9.3f} {low / hand_min:9.3f} "
              f"{per_step:+8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--steps", type=int, default=STEPS, help="Euler steps (rk4: a quarter)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="wall time or process CPU time (default: cpu on the CPU, wall on "
                             "CUDA, where GPU time is not CPU time)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock_name = args.clock or ("cpu" if device.type == "cpu" else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    torch.manual_seed(0)  # network initialisation only
    u = MLP(DIM).to(device)
    steps = args.steps
    x0 = torch.randn(args.batch, DIM, device=device,
                     generator=torch.Generator(device).manual_seed(1))
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).to(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, {dev_name}, "
          f"threads {torch.get_num_threads()}; Euler {steps} steps, B={args.batch}, d={DIM}, "
          f"fp32, {args.repeats} rounds (round-robin), {clock_name} clock; "
          f"us/step = (min - hand min) / {steps}")
    rows = paths(u, x0, grid)
    with torch.no_grad():
        add_captured(rows, u, x0, steps)
        same = sample(u, x0, "euler", steps=steps).x
        assert torch.allclose(sample(u, x0, "fast_euler", steps=steps).x, same, atol=1e-5)
        assert torch.allclose(rows["hand-written Euler loop"](), same, atol=1e-5)
        results = round_robin(rows, device, args.repeats, clock)
        report("MLP 3x256 SiLU field", results, steps)
        light_rows = paths(lambda x, t: -x, x0, grid)
        add_captured(light_rows, lambda x, t: -x, x0, steps)
        light = round_robin(light_rows, device, args.repeats, clock)
        report("near-free field u = -x", light, steps)

    (hand, hand_min), (front, front_min) = (results["hand-written Euler loop"],
                                            results["sample(solver='euler')  [torchdiffeq]"])
    fast, fast_min = results["sample(solver='fast_euler')"]
    print(f"\nMLP: front-door overhead (sample euler / hand loop): median "
          f"{100 * (front / hand - 1):+.1f}%, min {100 * (front_min / hand_min - 1):+.1f}%")
    print(f"MLP: fast loop / hand loop: median {fast / hand:.3f}x, min {fast_min / hand_min:.3f}x;"
          f" fast loop / sample euler: median {fast / front:.3f}x, min {fast_min / front_min:.3f}x")
    for name, res in (("MLP", results), ("u = -x", light)):
        if CAPTURED in res:
            (cap, cap_min), (eager, eager_min) = res[CAPTURED], res["sample(solver='fast_euler')"]
            print(f"{name}: CUDA graph: eager fast_euler / captured: median {eager / cap:.2f}x, "
                  f"min {eager_min / cap_min:.2f}x ({eager:.2f} ms -> {cap:.2f} ms; hand loop / "
                  f"captured {res['hand-written Euler loop'][0] / cap:.2f}x)")


if __name__ == "__main__":
    main()
