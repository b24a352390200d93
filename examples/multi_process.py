"""Multi-process training and data-set likelihood: the same script on 1 or N processes.

Trains a small velocity on the two-moons data with flowsolve's training loop, then evaluates
the exact log-likelihood of held-out points with the data-set evaluator. Under torchrun
there is no ``torch.distributed.init_process_group`` call to make: ``fs.train`` finds the
torchrun environment and initialises the process group itself (gloo on the CPU), wraps the
model in DistributedDataParallel, and the evaluator splits the points between the processes.

Each process (rank r) writes ``<out>/rank<r>.pt``: what it holds at the end (its weights,
the logged losses, the gathered log-likelihoods), so that the ranks can be compared. Rank 0
alone writes the training checkpoint ``<out>/checkpoint.pt`` and ``<out>/summary.json``,
and prints.

Run: .venv/bin/torchrun --standalone --nproc_per_node=2 examples/multi_process.py
 or: .venv/bin/python examples/multi_process.py                   (one process)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

import flowsolve as fs
from flowsolve.training.data import sample_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/multi_process", help="folder of the results")
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step per rank")
    parser.add_argument("--points", type=int, default=64, help="held-out points to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is fastest on a shared CPU
    out = Path(args.out)
    begin = time.perf_counter()

    # -- training: every rank runs this same call --------------------------------------------
    # Each rank draws and couples its own batch of --batch-size pairs (batch k of rank r is
    # a function of (seed, k, r)), DDP averages the gradients, so every rank takes the same
    # step; the logged losses are averaged over the ranks; rank 0 writes the checkpoint.
    model = fs.MLP(2, hidden=64, depth=2, generator=torch.Generator().manual_seed(args.seed))
    cfg = fs.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3,
                         ema_decay=0.99, log_every=max(1, args.steps // 5), progress=False)
    run = fs.train(model, "moons", cfg, checkpoint=out / "checkpoint.pt",
                   generator=torch.Generator().manual_seed(args.seed))

    # fs.train initialised the process group under torchrun; one process has none
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    # -- sharded data-set likelihood: every rank runs this same call too -----------------------
    # Every rank draws the same held-out points; rank r evaluates its contiguous slice of
    # them, in batches of batch_size, and every rank gets the whole result back, in data order.
    held_out = torch.Generator().manual_seed(args.seed + 1)
    x = sample_dataset("moons", args.points, generator=held_out, dtype=torch.float64)
    net = run.ema_model.eval().double()  # float64: the log-density channel accumulates
    ll = fs.dataset_log_likelihood(net, x, batch_size=16, solver="rk4", steps=8,
                                   progress=False)

    # -- what each rank writes -----------------------------------------------------------------
    torch.save({"rank": rank, "world_size": world, "model": run.model.state_dict(),
                "ema": run.ema_model.state_dict(), "log_steps": run.log_steps,
                "losses": run.losses, "x": x, "log_prob": ll["log_prob"]},
               out / f"rank{rank}.pt")
    if rank == 0:
        mean = ll["log_prob"].mean().item()
        summary = {"world_size": world, "steps": run.step, "global_batch": world * args.batch_size,
                   "losses": run.losses, "mean_log_prob": mean, "points": args.points,
                   "seconds": time.perf_counter() - begin}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{world} process(es), global batch {world * args.batch_size}: loss "
              f"{run.losses[0]:.3f} -> {run.losses[-1]:.3f} in {run.step} steps; mean "
              f"log-likelihood of {args.points} held-out points {mean:.3f} nats")
        print(f"wrote {out / 'checkpoint.pt'}, {out / 'summary.json'} and rank<r>.pt for "
              f"each of the {world} rank(s)")

if __name__ == "__main__":
    main()
