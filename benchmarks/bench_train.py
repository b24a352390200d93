"""Training-step time: independent vs exact-OT coupling, the coupling in the main process
vs in DataLoader workers (overlapping the step), at batch 256, 1024, 4096.

MLP 3x256 (SiLU, sinusoidal time embedding), d = 2, N(0, I) -> 8gaussians, I-CFM / OT-CFM
bridge with sigma = 0.1, AdamW. Time per step is the steady state: from the end of the
warm-up (the first fifth of the steps, at least 2) to the last (the DataLoader's start-up
and the pipeline fill are excluded). Ratios are from one run. The exact OT is
flowsolve.training.couplings.OTCoupling when it is importable, else a stand-in with POT's ``ot.emd``
(say which in the output).

On a GPU (``--device cuda``) the model trains there; ``--couplings independent sinkhorn
--couple-on-device --workers 0`` couples each batch in the main process on the model's device
(``TrainConfig.couple_on_device``: a GPU Sinkhorn, ``OTCoupling("sinkhorn", reg=--reg)``),
the set-up of the target "OT-CFM step within 2x of the independent step at B = 4096".
``--quick`` times a quarter of the steps (at least 6).

Run: .venv/bin/python benchmarks/bench_train.py [--batches 256 1024 4096] [--workers 2]
     [--device cuda] [--couplings independent exact sinkhorn] [--reg 0.05]
     [--couple-on-device] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import flowsolve as fs
from flowsolve.paths.bridges import GaussianBridge
from flowsolve.training.loop import TrainConfig, train

try:
    from flowsolve.training.couplings import OTCoupling

    def exact_ot():
        return OTCoupling(method="exact")

    OT_NAME = "flowsolve.training.couplings.OTCoupling('exact')"
except ImportError:  # couplings.py not there yet: the same solve, by hand
    import ot

    class _ExactOT:
        def __call__(self, x0, x1, *extras):
            n = x0.shape[0]
            cost = torch.cdist(x0, x1).square().double().numpy()
            plan = ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), cost, numItermax=max(10**5, n * n))
            return (x0[torch.from_numpy(plan.argmax(0))], x1, *extras)

    def exact_ot():
        return _ExactOT()

    OT_NAME = "stand-in ot.emd permutation (flowsolve.training.couplings not importable)"

LABELS = {"independent": "independent", "exact": "exact OT", "sinkhorn": "sinkhorn OT"}


def sinkhorn_ot(reg: float):
    """Entropic OT (log-domain fallback, exact fallback with a warning): on the batch's
    device, so on the GPU with ``--couple-on-device``."""
    from flowsolve.training.couplings import OTCoupling

    return OTCoupling(method="sinkhorn", reg=reg)


def step_ms(batch: int, coupling, workers: int, steps: int, warmup: int, device: str = "cpu",
            on_device: bool = False) -> tuple[float, float]:
    """(ms per steady-state step, ms per step spent waiting for batches over the run); the
    model on ``device``, the coupling there too when ``on_device`` (main process only)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = fs.MLP(2, hidden=256, depth=3, time_embedding_dim=64).to(device)
    stamps: dict[int, float] = {}
    cfg = TrainConfig(steps=steps, batch_size=batch, log_every=1, progress=False,
                      num_workers=workers, prefetch_factor=2, ema_decay=0.999,
                      couple_on_device=on_device and workers == 0)
    res = train(model, "8gaussians", cfg, coupling=coupling, path=GaussianBridge(0.1),
                generator=torch.Generator().manual_seed(0),
                callback=lambda log: stamps.__setitem__(log.step, time.perf_counter()))
    per_step = (stamps[steps] - stamps[warmup]) / (steps - warmup)
    return 1e3 * per_step, 1e3 * res.data_wait / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers of the second column (0: leave it out)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, main process")
    parser.add_argument("--device", default="cpu", help="where the model trains")
    parser.add_argument("--couplings", nargs="+", default=["independent", "exact"],
                        choices=list(LABELS))
    parser.add_argument("--reg", type=float, default=0.05, help="Sinkhorn's reg")
    parser.add_argument("--couple-on-device", action="store_true",
                        help="main column: couple on the model's device (couple_on_device)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = "CPU" if device.type == "cpu" else (
        torch.cuda.get_device_name(device) if device.type == "cuda" else str(device))
    extra = ""
    if "sinkhorn" in args.couplings:
        extra += f"; Sinkhorn: OTCoupling('sinkhorn', reg={args.reg:g})"
    if args.couple_on_device:
        extra += f"; main column couples on {device}"
    print(f"torch {torch.__version__}, {args.threads} main thread(s), {where}; OT: {OT_NAME}"
          + extra)
    print(f"{'B':>5} {'coupling':<12} {'main ms':>9} {'wait':>7} {'workers ms':>11} {'wait':>7}"
          f" {'workers/main':>13}")
    makers = {"independent": lambda: None, "exact": exact_ot, "sinkhorn": lambda: sinkhorn_ot(
        args.reg)}
    rows = {}
    for b in args.batches:
        for name in args.couplings:
            make = makers[name]
            heavy = name != "independent"
            steps = {256: 40, 1024: 20}.get(b, 8) if heavy else 60
            if args.quick:
                steps = max(6, steps // 4)
            warmup = max(2, steps // 5)
            main_ms, main_wait = step_ms(b, make(), 0, steps, warmup, args.device,
                                         args.couple_on_device)
            work_ms = work_wait = float("nan")
            if args.workers:
                work_ms, work_wait = step_ms(b, make(), args.workers, steps + 2 * args.workers,
                                             warmup + 2 * args.workers, args.device)
            rows[b, name] = (main_ms, work_ms)
            print(f"{b:>5} {LABELS[name]:<12} {main_ms:9.2f} {main_wait:7.2f} {work_ms:11.2f} "
                  f"{work_wait:7.2f} {work_ms / main_ms:13.2f}")
    ot_names = [n for n in args.couplings if n != "independent"]
    if "independent" not in args.couplings or not ot_names:
        return
    print("\nOT step / independent step (same mode):")
    for b in args.batches:
        for name in ot_names:
            (im, iw), (om, ow) = rows[b, "independent"], rows[b, name]
            label = "" if ot_names == ["exact"] else f"{LABELS[name]:<12} "
            print(f"  B={b:>5}: {label}main process {om / im:7.1f}x   {args.workers} workers "
                  f"{ow / iw:7.1f}x")


if __name__ == "__main__":
    main()
