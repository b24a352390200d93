"""Cost of one exact divergence (value and trace of the Jacobian) by each method of
``flowsolve.likelihood.divergence`` against the per-dimension autograd loop, plus
Hutchinson for scale.

Cases: the MLP 3x256 of ``flowsolve.training.nets`` (SiLU, sinusoidal time embedding) at batch 256
for d = 2, 16, 64, 256, and a small conv net on 1x8x8 images (d = 64). Time is the
minimum wall time over rounds in which the methods are called in turn (CUDA: synchronised);
extra peak memory is reported on CUDA (``torch.cuda.max_memory_allocated``), not on CPU.
Ratios are loop time / method time from the same run.

Run: .venv/bin/python benchmarks/bench_divergence.py [--device cuda] [--batch 256]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch
from torch import nn

import flowsolve as fs
from flowsolve.likelihood.divergence import EXACT_METHODS, make_probes, value_and_divergence


class ConvField(nn.Module):
    """conv(C+1 -> w) - SiLU - conv(w -> w) - SiLU - conv(w -> C), 3x3, t as a channel."""

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tt = t.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.net(torch.cat([x, tt], dim=1))


def timed(calls: dict, device: torch.device, rounds: int, max_seconds: float,
          clock=time.perf_counter) -> dict:
    """{name: (min ms, median ms, extra peak MiB or nan)} of each call after a warm-up.

    Calls are interleaved round by round, so that load from other processes hits every
    method alike; the minimum is the least disturbed time and the one used for ratios."""
    cuda = device.type == "cuda"
    times: dict = {name: [] for name in calls}
    peaks: dict = {}
    for name, fn in calls.items():
        fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peaks[name] = float("nan")
    start_all = time.perf_counter()
    for r in range(rounds):
        for name, fn in calls.items():
            start = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(clock() - start)
        if r >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return {name: (1e3 * min(ts), 1e3 * statistics.median(ts), peaks[name])
            for name, ts in times.items()}


def case_calls(model, x, t, methods, probes, chunks, create_graph) -> dict:
    """{column: zero-argument call} for one case."""
    vd = functools.partial(value_and_divergence, model, x, t, create_graph=create_graph)
    calls = {"forward": functools.partial(model, x, t)}
    calls.update({m: functools.partial(vd, method=m) for m in methods})
    calls.update({f"bvjp/{c}": functools.partial(vd, method="batched-vjp", chunk_size=c)
                  for c in chunks})
    calls.update({f"hutch k={k}": functools.partial(vd, method="hutchinson", probes=p)
                  for k, p in probes.items()})
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64, 256])
    ap.add_argument("--chunks", type=int, nargs="*", default=[16],
                    help="extra batched-vjp columns with these chunk sizes")
    ap.add_argument("--create-graph", action="store_true", help="time create_graph=True")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process: CPU time of this process (with --threads 1, robust to "
                         "other processes on a shared machine)")
    ap.add_argument("--rounds", type=int, default=7, help="timed calls of each method")
    ap.add_argument("--seconds", type=float, default=20.0, help="stop after 3 rounds past this")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads, {args.clock} "
          f"clock, float32, batch {args.batch}, create_graph={args.create_graph}")

    cases = [(f"MLP 3x256, d={d}", fs.MLP(d, hidden=256, depth=3), (args.batch, d))
             for d in args.dims]
    cases.append(("conv 1x8x8 (d=64)", ConvField(1, 32), (args.batch, 1, 8, 8)))
    methods = ["loop", *(m for m in EXACT_METHODS if m != "loop")]
    fast = [*methods[1:], *(f"bvjp/{c}" for c in args.chunks)]
    cols = ["forward", *methods, *fast[len(methods) - 1:], "hutch k=1", "hutch k=8"]
    print(f"{'case':<20}" + "".join(f"{c:>13}" for c in cols) + "   (ms; CUDA: ms/MiB)")
    ratios = []
    for case, model, shape in cases:
        model = model.to(device).eval()
        x = torch.randn(shape, generator=gen).to(device)
        t = torch.rand(shape[0], generator=gen).to(device)
        probes = {k: make_probes(shape, k, generator=gen, device=device) for k in (1, 8)}
        calls = case_calls(model, x, t, methods, probes, args.chunks, args.create_graph)
        ref = value_and_divergence(model, x, t, method="loop").divergence
        worst = max((calls[m]().divergence - ref).abs().max().item() for m in fast)
        with torch.no_grad():
            row = timed(calls, device, args.rounds, args.seconds, clock)
        cells = [f"{ms:.2f}" if mb != mb else f"{ms:.1f}/{mb:.0f}"
                 for ms, _, mb in (row[c] for c in cols)]
        print(f"{case:<20}" + "".join(f"{c:>13}" for c in cells) + f"   max|diff| {worst:.1e}")
        ratios.append((case, {m: row["loop"][0] / row[m][0] for m in fast}))
        spread = max(row[c][1] / row[c][0] for c in cols)
        print(f"{'':<20}(median / min up to {spread:.2f}x over the row)")
    print("\nspeed-up over the loop (loop time / method time, same run):")
    print(f"{'case':<20}" + "".join(f"{m:>13}" for m in fast))
    for case, r in ratios:
        print(f"{case:<20}" + "".join(f"{r[m]:>12.2f}x" for m in fast))


if __name__ == "__main__":
    main()
