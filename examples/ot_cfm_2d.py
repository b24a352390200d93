r"""The 2-D experiments of OT-CFM (Tong et al., TMLR 2024) as re-run in [SF]2M (Table 2).

I-CFM, OT-CFM, SB-CFM and [SF]2M on N->8gaussians, moons->8gaussians, N->moons and
N->scurve. For every (method, task, seed) a velocity network is trained with flowsolve's
training loop ([SF]2M: a velocity and a score network together, SB-CFM's bridge and plan)
and evaluated on fresh test sets:

* **W2**: exact 2-Wasserstein distance (POT's network simplex) between the samples of the
  learned ODE (Euler, 100 steps, from the test source points) and the test target points;
* **NPE** = ``|PE - W2^2(q0, q1)| / W2^2(q0, q1)``, ``PE`` the mean over the test source
  points of ``int_0^1 |v(x_t, t)|^2 dt`` along the learned ODE (the Euler left Riemann sum,
  :func:`flowsolve.metrics.path_energy`), ``W2^2(q0, q1)`` between the test source and
  target sets: 0 for the dynamic optimal transport;
* **W2 at low NFE**: W2 of the samples of 1, 2, 4 and 8 Euler steps;
* **W2 (SDE)**, [SF]2M only: W2 of the samples of the learned bridge's SDE
  ``dX = [v(X, t) + sigma^2/2 s(X, t)] dt + sigma dW`` (Euler-Maruyama, 100 steps, from the
  same test source points, the noise from its own seeded generator).

The paper's setup (``--protocol paper``): an MLP of three 64-wide SELU layers on ``[x, t]``
(torchcfm's ``MLP(dim, w=64, time_varying=True)``; flowsolve's ``MLP`` with the raw time and
SELU); AdamW, lr 1e-3, weight decay 1e-5, no EMA; batch 512,
which is also the OT batch; 1000 epochs over 10,000 training points (19 batches of 512 per
epoch, the remainder dropped: 19,000 steps); sigma = 0.1 (constant) for I-CFM and OT-CFM,
exact minibatch OT for OT-CFM; SB-CFM: the Brownian bridge ``sigma sqrt(t (1 - t))`` with
sigma = 1 and the entropic plan of regularisation ``2 sigma^2`` on the unnormalised squared
distance; [SF]2M: SB-CFM's bridge and plan, a second network of the same MLP for the
score (its loss weighted by ``sigma_t^2``; flowsolve's score_flow_matching_loss); Euler with
100 steps (and Euler-Maruyama with 100 steps for [SF]2M's SDE); 10,000-point test sets;
seeds 42-46. The N sources are fresh N(0, I) draws at every step; the moons source is a
10,000-point training set like the target.

Each run writes ``OUT/runs/<task>__<method>__seed<k>.json`` atomically, and trains with a
checkpoint ``OUT/checkpoints/...pt`` (:func:`flowsolve.training.loop.train` resumes from it, bit for
bit). A second invocation skips finished runs and resumes unfinished ones. At the end the
table of all selected runs (mean and sample standard deviation over seeds) is written to
``OUT/results.md`` and ``OUT/results.csv``; ``--report`` writes that table for every finished
run in ``OUT`` and trains nothing (so several processes can each run a seed).

Usage::

    python examples/ot_cfm_2d.py                      # the quick protocol (about two minutes)
    python examples/ot_cfm_2d.py --protocol reduced    # what docs/ot_cfm_2d.md reports
    python examples/ot_cfm_2d.py --protocol paper --out runs/ot_cfm_2d/paper   # hours
    python examples/ot_cfm_2d.py --tasks N-8gaussians --methods icfm otcfm --epochs 50
    python examples/ot_cfm_2d.py --protocol paper --out runs/ot_cfm_2d/paper --report

With no option the script runs the quick protocol (the example tests run every example
bare; the paper's protocol takes hours on a CPU and must be asked for).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from flowsolve.metrics import normalized_path_energy, path_energy, wasserstein2
from flowsolve.ode.solve import sample
from flowsolve.paths.bridges import GaussianBridge
from flowsolve.sde.solve import sample_sde
from flowsolve.training.couplings import Coupling, OTCoupling
from flowsolve.training.data import sample_dataset
from flowsolve.training.loop import TrainConfig, train
from flowsolve.training.nets import MLP
from flowsolve.training.score_flow import FlowAndScore

# -- what is compared --------------------------------------------------------------------------
#: task name -> (source data set or None for N(0, I), target data set),
#: flowsolve.training.data names
TASKS: dict[str, tuple[str | None, str]] = {
    "N-8gaussians": (None, "8gaussians"),
    "moons-8gaussians": ("moons_dsb", "8gaussians_dsb"),
    "N-moons": (None, "moons"),
    "N-scurve": (None, "scurve"),
}


@dataclass(frozen=True)
class Method:
    """A conditional flow-matching variant: bridge ``sigma`` / schedule and its coupling;
    ``score``: a score network is trained beside the velocity ([SF]2M) and the learned
    bridge is also sampled as an SDE of diffusion ``sigma``."""

    label: str
    sigma: float
    schedule: str  # GaussianBridge schedule: "constant" or "brownian"
    coupling: str  # "independent", "exact" (minibatch OT) or "entropic" (reg = 2 sigma^2)
    score: bool = False


METHODS: dict[str, Method] = {
    "icfm": Method("I-CFM", 0.1, "constant", "independent"),
    "otcfm": Method("OT-CFM", 0.1, "constant", "exact"),
    "sbcfm": Method("SB-CFM", 1.0, "brownian", "entropic"),
    # [SF]2M: SB-CFM's bridge and plan, a velocity and a score network learned together
    "sf2m": Method("[SF]2M", 1.0, "brownian", "entropic", score=True),
}


@dataclass(frozen=True)
class Protocol:
    """Training and evaluation sizes; ``steps`` (if set) overrides ``epochs``."""

    epochs: int = 1000
    steps: int | None = None
    train_size: int = 10_000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    test_size: int = 10_000
    w2_size: int = 10_000  # points of each cloud in every W2 (the first of the test sets)
    euler_steps: int = 100
    low_nfe: tuple[int, ...] = (1, 2, 4, 8)

    @property
    def total_steps(self) -> int:
        return self.steps or self.epochs * (self.train_size // self.batch_size)


PROTOCOLS: dict[str, tuple[Protocol, list[int]]] = {
    "paper": (Protocol(), [42, 43, 44, 45, 46]),
    # what docs/ot_cfm_2d.md reports: 100 epochs, W2 on 2,000-point subsets, 2 seeds
    "reduced": (Protocol(epochs=100, w2_size=2000), [42, 43]),
    # a short smoke run: 300 steps of batch 256, 1,000-point test sets
    "quick": (Protocol(steps=300, train_size=4096, batch_size=256, test_size=1000,
                       w2_size=1000), [42]),
}


# -- the paper's network and couplings -----------------------------------------------------------
def make_model() -> nn.Module:
    """``[x, t]`` -> 3 x (Linear(64), SELU) -> Linear(2): torchcfm's ``MLP(2, w=64,
    time_varying=True)``, the network of both papers' 2-D experiments."""
    return MLP(2, hidden=64, depth=3, time_embedding_dim=None, activation="selu")


def make_method_model(method: Method, seed: int) -> nn.Module:
    """The velocity network, initialised from ``seed`` (the same weights for every method
    of a seed); with ``method.score`` a :class:`FlowAndScore` whose score network, the same
    MLP, takes the next weights of the same stream."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_model()
        return FlowAndScore(model, make_model()) if method.score else model


def make_coupling(method: Method) -> Coupling | None:
    if method.coupling == "independent":
        return None  # the batch producer's independent draws
    if method.coupling == "exact":
        return OTCoupling("exact")
    # SB-CFM's plan: reg = 2 sigma^2 on the unnormalised squared distance (as torchcfm's
    # ot.sinkhorn(a, b, M, reg=2 sigma^2)), solved to a marginal error <= 1e-4 (torchcfm
    # stops after 1000 iterations whatever the error; moons->8gaussians needs about 700).
    return OTCoupling("sinkhorn", reg=2 * method.sigma**2, normalize=None, max_iter=20_000)


# -- data ------------------------------------------------------------------------------------------
def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + stream)


def task_data(task: str, seed: int, proto: Protocol) -> dict[str, Tensor | None]:
    """Training sets (x0 only for a data source), test sets and a second target draw (for
    the W2 noise floor), each from its own seeded generator; independent of the method."""
    src, tgt = TASKS[task]

    def draw(name: str | None, n: int, stream: int) -> Tensor:
        g = _generator(seed, stream)
        return torch.randn(n, 2, generator=g) if name is None else sample_dataset(name, n,
                                                                                    generator=g)

    return {
        "x1_train": draw(tgt, proto.train_size, 1),
        "x0_train": None if src is None else draw(src, proto.train_size, 2),
        "x1_test": draw(tgt, proto.test_size, 3),
        "x0_test": draw(src, proto.test_size, 4),
        "x1_other": draw(tgt, proto.w2_size, 5),
    }


#: the generator stream of the SDE samples' Brownian increments (after task_data's 1-5)
SDE_NOISE_STREAM = 6


# -- files -------------------------------------------------------------------------------------
def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel invocations
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _check_protocol(out: Path, proto: Protocol) -> None:
    """One protocol per output folder: a rerun with other settings must not mix results."""
    path, mine = out / "protocol.json", json.loads(json.dumps(asdict(proto)))
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            raise SystemExit(f"{out} holds runs of another protocol (theirs, this call's): "
                             f"{diff}; use another --out")
    else:
        _write_json(path, mine)


# -- one run -----------------------------------------------------------------------------------
def reference(task: str, seed: int, proto: Protocol, data: dict, out: Path) -> dict:
    """``W2^2(q0, q1)`` between the test sets and the W2 between two target draws (the
    finite-sample floor of every W2 in the table), cached per (task, seed)."""
    path = out / "reference" / f"{task}__seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    n = proto.w2_size
    ref = {"w2sq_q0_q1": float(wasserstein2(data["x0_test"][:n], data["x1_test"][:n])) ** 2,
           "w2_floor": float(wasserstein2(data["x1_test"][:n], data["x1_other"]))}
    _write_json(path, ref)
    return ref


@torch.no_grad()
def evaluate(model: nn.Module, data: dict, proto: Protocol, ref: dict, *,
             diffusion: float | None = None, generator: torch.Generator | None = None) -> dict:
    """The ODE metrics of the velocity ``model(x, t)``; with ``diffusion`` (a
    :class:`FlowAndScore` model) also ``w2_sde``, the W2 of ``dX = [v + g^2/2 s] dt + g dW``
    (g = ``diffusion``, Euler-Maruyama, ``proto.euler_steps`` steps, noise from
    ``generator``) from the first ``w2_size`` test source points."""
    model.eval()
    x0, x1, n = data["x0_test"], data["x1_test"], proto.w2_size
    k = proto.euler_steps
    grid = torch.linspace(0, 1, k + 1, dtype=torch.float64)
    sol = sample(model, x0, "fast_euler", steps=k, times=grid)
    pe = float(path_energy(sol.trajectory).mean())
    npe = float(normalized_path_energy(sol.trajectory, ref["w2sq_q0_q1"]))
    w2_low = {str(s): float(wasserstein2(sample(model, x0[:n], "fast_euler", steps=s).x, x1[:n]))
              for s in proto.low_nfe}
    sde = {}
    if diffusion is not None:
        tick = time.perf_counter()
        x = sample_sde(model, x0[:n], score=model.score, diffusion=diffusion, solver="euler",
                       steps=k, generator=generator).x
        sde = {"w2_sde": float(wasserstein2(x, x1[:n])),
               "sde": {"solver": "euler", "steps": k, "diffusion": diffusion,
                       "noise_stream": SDE_NOISE_STREAM, "finite": bool(x.isfinite().all()),
                       "seconds": time.perf_counter() - tick}}
    return {"w2": float(wasserstein2(sol.x[:n], x1[:n])), "pe": pe, "npe": npe,
            "w2_low_nfe": w2_low, **sde, **ref}


def run_one(task: str, name: str, seed: int, proto: Protocol, out: Path, quiet: bool) -> dict:
    """Train and evaluate one (task, method, seed), or read its finished result."""
    stem = f"{task}__{name}__seed{seed}"
    result_path = out / "runs" / f"{stem}.json"
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "status": "skipped"}
    method, data = METHODS[name], task_data(task, seed, proto)
    model = make_method_model(method, seed)
    config = TrainConfig(steps=proto.total_steps, batch_size=proto.batch_size, lr=proto.lr,
                         weight_decay=proto.weight_decay, ema_decay=None, log_every=100,
                         checkpoint_every=500, progress=not quiet)
    coupling = make_coupling(method)
    ckpt = out / "checkpoints" / f"{stem}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    res = train(model, data["x1_train"], config, source=data["x0_train"],
                path=GaussianBridge(method.sigma, method.schedule), coupling=coupling,
                checkpoint=ckpt, generator=torch.Generator().manual_seed(seed))
    sde = ({"diffusion": method.sigma, "generator": _generator(seed, SDE_NOISE_STREAM)}
           if method.score else {})
    metrics = evaluate(res.model, data, proto, reference(task, seed, proto, data, out), **sde)
    result = {
        "task": task, "method": name, "label": method.label, "seed": seed,
        "protocol": asdict(proto), "steps": res.step, "resumed_from_step": res.start_step,
        "train_seconds": res.wall_time, "data_seconds": res.data_wait,
        "final_loss": res.losses[-1] if res.losses else None,
        **metrics,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    _write_json(result_path, result)
    status = "resumed" if res.start_step else "trained"
    return {**result, "status": status}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} ({torch.get_num_threads()} thread(s))")


# -- the table ---------------------------------------------------------------------------------
COLUMNS = ["w2", "w2_sde", "npe", "pe", *(f"w2_nfe{s}" for s in (1, 2, 4, 8))]


def _flat(r: dict) -> dict:
    return {"w2": r["w2"], **({"w2_sde": r["w2_sde"]} if "w2_sde" in r else {}),
            "npe": r["npe"], "pe": r["pe"],
            **{f"w2_nfe{s}": v for s, v in r["w2_low_nfe"].items()}}


def summarise(results: list[dict], out: Path) -> list[dict]:
    """Mean and sample std over seeds per (task, method); writes results.csv / .md."""
    rows = []
    for task in TASKS:
        for name in METHODS:
            group = [r for r in results if r["task"] == task and r["method"] == name]
            if not group:
                continue
            flat = [_flat(r) for r in group]
            row = {"task": task, "method": METHODS[name].label, "seeds": len(group),
                   "w2sq_q0_q1": statistics.mean(r["w2sq_q0_q1"] for r in group),
                   "w2_floor": statistics.mean(r["w2_floor"] for r in group),
                   "train_seconds": statistics.mean(r["train_seconds"] for r in group)}
            for col in [c for c in COLUMNS if c in flat[0]]:
                values = [f[col] for f in flat]
                row[f"{col}_mean"] = statistics.mean(values)
                row[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            rows.append(row)
    if not rows:
        return rows
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown(rows))
    return rows


def _pm(row: dict, col: str, digits: int) -> str:
    mean, std = row.get(f"{col}_mean"), row.get(f"{col}_std")
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    nfe = [c for c in COLUMNS if c.startswith("w2_nfe") and f"{c}_mean" in rows[0]]
    sde = any("w2_sde_mean" in r for r in rows)  # the column only when an SDE was sampled
    head = (["task", "method", "seeds", "W2 (100 Euler)", *["W2 (SDE 100)"] * sde, "NPE", "PE",
             "W2^2(q0,q1)"]
            + [f"W2 @{c[6:]} step{'s' * (c != 'w2_nfe1')}" for c in nfe]
            + ["W2 floor", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["task"], r["method"], str(r["seeds"]), _pm(r, "w2", 3),
                 *[_pm(r, "w2_sde", 3)] * sde, _pm(r, "npe", 4),
                 _pm(r, "pe", 2), f"{r['w2sq_q0_q1']:.2f}", *(_pm(r, c, 3) for c in nfe),
                 f"{r['w2_floor']:.3f}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="quick",
                   help="preset sizes and seeds (default quick; paper = Tong et al.)")
    p.add_argument("--quick", action="store_const", const="quick", dest="protocol",
                   help="the short protocol (same as --protocol quick)")
    p.add_argument("--tasks", "--datasets", nargs="+", choices=list(TASKS), default=list(TASKS),
                   dest="tasks", metavar="TASK", help=f"of {', '.join(TASKS)} (default all)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   metavar="METHOD", help=f"of {', '.join(METHODS)} (default all)")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the protocol's")
    p.add_argument("--epochs", type=int, help="epochs over the training set")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--out", type=Path, help="default runs/ot_cfm_2d/<protocol>")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: small ops on a shared CPU)")
    p.add_argument("--quiet", action="store_true", help="no training progress bar")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write the table of every finished run in OUT (of the "
                        "selected tasks, methods and seeds), e.g. while other seeds still run")
    return p.parse_args(argv)


def finished_runs(out: Path, tasks, methods, seeds) -> list[dict]:
    """The records of ``OUT/runs/*.json`` of the selected tasks, methods and seeds (all
    seeds when ``seeds`` is None), ordered by seed."""
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    return sorted((r for r in records if r["task"] in tasks and r["method"] in methods
                   and (seeds is None or r["seed"] in seeds)), key=lambda r: r["seed"])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the selected (task, method, seed) grid; returns one record per run with
    ``status`` ``trained``, ``resumed`` or ``skipped``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    proto, seeds = PROTOCOLS[args.protocol]
    if args.epochs is not None:
        proto = replace(proto, epochs=args.epochs, steps=None)
    if args.steps is not None:
        proto = replace(proto, steps=args.steps)
    out = args.out or Path("runs") / "ot_cfm_2d" / args.protocol
    if args.report:
        if not (out / "protocol.json").exists():
            sys.exit(f"--report: {out} holds no runs (no protocol.json); give the --out of a run")
        _check_protocol(out, proto)
        results = finished_runs(out, args.tasks, args.methods, args.seeds)
        rows = summarise(results, out)
        print(f"{len(results)} finished runs in {out}")
        if rows:
            sys.stdout.write("\n" + markdown(rows))
        return results
    seeds = args.seeds or seeds
    out.mkdir(parents=True, exist_ok=True)
    _check_protocol(out, proto)
    grid = [(t, m, s) for s in seeds for t in args.tasks for m in args.methods]
    print(f"{len(grid)} runs of {proto.total_steps} steps -> {out}  [{machine()}]")
    results = []
    for i, (task, name, seed) in enumerate(grid, 1):
        tick = time.perf_counter()
        r = run_one(task, name, seed, proto, out, args.quiet)
        results.append(r)
        low = " ".join(f"{v:.3f}" for v in r["w2_low_nfe"].values())
        sde = f"  W2 (SDE) {r['w2_sde']:.3f}" if "w2_sde" in r else ""
        print(f"[{i}/{len(grid)}] {task} {r['label']} seed {seed}: {r['status']} "
              f"({time.perf_counter() - tick:.0f} s)  W2 {r['w2']:.3f}{sde}  NPE {r['npe']:.3f}  "
              f"W2@{','.join(map(str, proto.low_nfe))} {low}", flush=True)
    rows = summarise(results, out)
    if rows:
        sys.stdout.write("\n" + markdown(rows))
    return results


if __name__ == "__main__":
    main()
