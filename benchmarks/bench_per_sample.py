"""Per-sample step control for dataset likelihoods: shared stepping vs per-sample vs torchode.

Exact-divergence dataset log-likelihood ``fs.dataset_log_likelihood(field, x, solver="dopri5",
rtol=, atol=)`` with one step size for each batch (``step_control="shared"``, torchdiffeq's
RMS error over the whole batch) and with one step size per sample
(``step_control="per_sample"``, :mod:`flowsolve.ode.per_sample`: finished samples leave the
batch), and the same augmented system ``[x, l]`` (``AugmentedSystem``, exact divergence)
solved by torchode's ``Dopri5`` + ``IntegralController`` (per-sample steps, but every call
evaluates the whole batch until its last sample finishes; eager: its ``torch.jit.script``
path needs a scriptable right-hand side, which an autograd divergence is not, and the
script prints why it fails). torchode is not a project dependency: ``.venv/bin/pip install
torchode`` (pulls torchtyping and typeguard < 3); without it its rows are skipped.

Per row: sample-evaluations (shared: the batch NFE x batch size summed over batches;
per-sample: the sum of each sample's NFE; torchode: its ``n_f_evals`` summed, which is its
batched calls x batch size; all three checked against the rows counted by wrapping the
velocity), batched field calls, wall time (median of ``--repeats`` interleaved rounds after
a warm-up), the mean log p, the largest and the mean |error| against a reference, and the
spread of NFE per sample (min / median / max; shared: the NFE of each sample's batch).
Then the largest |difference| between the methods and between batch sizes (per-sample
results do not depend on the batch), and a tolerance sweep (1e-5 .. 1e-8, batch 256):
evaluations and errors of shared and per-sample stepping, accuracy at equal work.

Cases (float64): the exact velocity of a ring of 8 Gaussians (radius 4, CondOT path, std
0.5 and 0.05; reference: the closed-form log-density), an MLP 3x64 trained with
``fs.train`` on 8gaussians (600 steps, ~10 s; reference: dopri8 per sample at 1e-10), and
with ``--unet`` the label-free velocity of the 8x8-digits U-Net of
``examples/cfg_digits.py`` (trained here, 75-160 s; d = 64, so each call costs 64
vector-Jacobian products: 64 points, one batch, tolerance 1e-5, float32, timed once;
reference: dopri5 per sample at 1e-6 on the first 16 points). The default run takes about
2.5 minutes on a loaded 2-core CPU; ``--unet`` adds about 16 (training 160 s, the
reference 280 s, three solves of 150-175 s).

Run: .venv/bin/python benchmarks/bench_per_sample.py [--points 512] [--batches 64 256]
     [--tol 1e-6] [--unet | --cases unet] [--no-torchode] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import flowsolve as fs
from flowsolve.likelihood.augmented import AugmentedSystem, standard_normal_log_prob
from flowsolve.training.data import get_dataset

try:
    import torchode
except ImportError as err:  # not a dependency: measured when installed
    torchode, TORCHODE_MISSING = None, f"{type(err).__name__}: {err}"
else:
    TORCHODE_MISSING = ""


class Counted:
    """The velocity with its batched calls and evaluated rows counted (a network treats its
    rows independently: per-sample compaction needs no ``rows``)."""

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor]):
        self.field, self.calls, self.rows = field, 0, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.field(x, t)


def torchode_log_likelihood(field, x: Tensor, batch_size: int, rtol: float,
                            atol: float) -> dict:
    """log p_1(x) = log N(x_0) + l_0 for ``[x, l]`` from t = 1 (l = 0) to t = 0, torchode's
    Dopri5 with its IntegralController (per-sample steps), batch by batch."""
    lps, n_f, n_steps, batch_calls = [], [], [], 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        b = xb.shape[0]
        system = AugmentedSystem(field, xb.shape, "auto", None, False, None)
        term = torchode.ODETerm(lambda t, y, system=system: system(y, t))
        step = torchode.Dopri5(term=term)
        controller = torchode.IntegralController(atol=atol, rtol=rtol, term=term)
        solver = torchode.AutoDiffAdjoint(step, controller)  # eager
        z1 = torch.cat([xb.flatten(1), xb.new_zeros(b, 1)], dim=1)
        problem = torchode.InitialValueProblem(
            y0=z1, t_start=torch.ones(b, dtype=x.dtype), t_end=torch.zeros(b, dtype=x.dtype))
        with torch.no_grad():
            sol = solver.solve(problem)
        if not bool((sol.status == 0).all()):
            raise RuntimeError(f"torchode status {sol.status.unique().tolist()}")
        z0 = sol.ys[:, -1]
        d = xb[0].numel()
        lps.append(standard_normal_log_prob(z0[:, :d].reshape(xb.shape)) + z0[:, d])
        n_f.append(sol.stats["n_f_evals"])
        n_steps.append(sol.stats["n_steps"])
        batch_calls += int(sol.stats["n_f_evals"].max()) * b
    return {"log_prob": torch.cat(lps), "n_f_evals": torch.cat(n_f),
            "n_steps": torch.cat(n_steps), "calls_x_batch": batch_calls}


class TimeFirst(torch.nn.Module):
    """``(t, y) -> system(y, t)``: torchode's argument order, as a module (what
    ``torch.jit.script`` needs of a term)."""

    def __init__(self, system: AugmentedSystem):
        super().__init__()
        self.system = system

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.system(y, t)


def torchode_jit_check(field, x: Tensor, tol: float) -> str:
    """Whether torchode's compiled path (``torch.jit.script`` of its solver, the term fixed)
    compiles for the augmented system; the first line of the error if not."""
    system = AugmentedSystem(field, x.shape, "auto", None, False, None)
    term = torchode.ODETerm(TimeFirst(system))
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term),
                                      torchode.IntegralController(atol=tol, rtol=tol, term=term))
    try:
        torch.jit.script(solver)
    except Exception as err:  # noqa: BLE001 - reported, not handled
        line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        return f"fails: {type(err).__name__}: {line[:110]}"
    return "compiles"


def spread(nfe: Tensor) -> str:
    v = nfe.to(torch.float64)
    return f"{int(v.min())} / {int(v.median())} / {int(v.max())}"


def run_case(label, field, x, ref, ref_name, batches, tol, repeats, use_torchode, rows):
    """The table of one case; ``ref`` holds the reference log p of the first ``len(ref)``
    points (the errors are over those)."""
    n_ref = len(ref)
    over = "" if n_ref == len(x) else f" (errors over the first {n_ref} points)"
    print(f"\n## {label}: {len(x)} points, d = {x[0].numel()}, {str(x.dtype)[6:]}, dopri5 "
          f"rtol = atol = {tol:g}; reference: {ref_name}{over}\n")
    print("| batch | stepping | sample-evaluations | batched calls | wall s | mean log p | "
          "max abs err | mean abs err | NFE per sample min / median / max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    kw = {"solver": "dopri5", "rtol": tol, "atol": tol, "progress": False}
    by_batch: dict[int, dict[str, Tensor]] = {}
    for bs in batches:
        counted = Counted(field)
        methods = {
            "shared": lambda bs=bs, f=counted: fs.dataset_log_likelihood(
                f, x, batch_size=bs, **kw),
            "per-sample": lambda bs=bs, f=counted: fs.dataset_log_likelihood(
                f, x, batch_size=bs, step_control="per_sample", **kw),
        }
        if use_torchode:
            methods["torchode"] = lambda bs=bs, f=counted: torchode_log_likelihood(
                f, x, bs, tol, tol)
        times: dict[str, list[float]] = {m: [] for m in methods}
        out, counts, first = {}, {}, {}
        for name, fn in methods.items():  # warm-up, counted once (timed: --repeats 0)
            counted.calls = counted.rows = 0
            start = time.perf_counter()
            out[name] = fn()
            first[name] = time.perf_counter() - start
            counts[name] = (counted.calls, counted.rows)
        for _ in range(repeats):  # interleaved rounds
            for name, fn in methods.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        by_batch[bs] = {}
        for name, res in out.items():
            calls, counted_rows = counts[name]
            if name == "torchode":
                lp, evals = res["log_prob"], int(res["n_f_evals"].sum())
                nfe_spread = f"{spread(res['n_steps'] * 6 + 2)} *"
                assert evals == res["calls_x_batch"] == counted_rows
            else:
                lp, evals = res.log_prob, int(res.nfe.sum())
                nfe_spread = spread(res.nfe)
                assert evals == counted_rows, (name, evals, counted_rows)
            by_batch[bs][name] = lp
            err = (lp[:n_ref] - ref).abs()
            wall = statistics.median(times[name]) if repeats else first[name]
            print(f"| {bs} | {name} | {evals} | {calls} | {wall:.3f} | {float(lp.mean()):.6f} | "
                  f"{float(err.max()):.2e} | {float(err.mean()):.2e} | {nfe_spread} |")
            rows.append({"case": label, "batch": bs, "stepping": name, "tol": tol,
                         "evaluations": evals, "calls": calls, "seconds": wall,
                         "mean_log_prob": float(lp.mean()), "max_abs_err": float(err.max()),
                         "mean_abs_err": float(err.mean()), "nfe_min_median_max": nfe_spread})
        sys.stdout.flush()
    if use_torchode:
        print("\n\\* torchode evaluates the whole batch at every call (its `n_f_evals` is the "
              "batch's call count for every sample, summed above = calls x batch); the spread "
              "is of what each sample needed, 6 x its steps + 2")
    print()
    for bs, lps in by_batch.items():
        d_sp = float((lps["shared"] - lps["per-sample"]).abs().max())
        closer = int(((lps["per-sample"][:n_ref] - ref).abs()
                      < (lps["shared"][:n_ref] - ref).abs()).sum())
        line = (f"batch {bs}: max |shared - per-sample| {d_sp:.2e}; per-sample closer to the "
                f"reference than shared on {closer} of {n_ref} points")
        if "torchode" in lps:
            line += (f"; max |torchode - per-sample| "
                     f"{float((lps['torchode'] - lps['per-sample']).abs().max()):.2e}")
        print(line)
    if len(by_batch) > 1:
        first_bs, *others = list(by_batch)
        for name in by_batch[first_bs]:
            diff = max(float((by_batch[b][name] - by_batch[first_bs][name]).abs().max())
                       for b in others)
            print(f"{name}: max |log p(batch {first_bs}) - log p(batch "
                  f"{', '.join(map(str, others))})| {diff:.2e}")
    sys.stdout.flush()


def sweep(label, field, x, ref, tols, batch, rows) -> None:
    """Evaluations and errors of shared and per-sample stepping over tolerances (no timing):
    accuracy at equal work."""
    print(f"\n### {label}: tolerance sweep, batch {batch}\n")
    print("| rtol = atol | shared evaluations | shared max / mean abs err | per-sample "
          "evaluations | per-sample max / mean abs err |")
    print("| --- | --- | --- | --- | --- |")
    for tol in tols:
        cells = []
        for control in ("shared", "per_sample"):
            res = fs.dataset_log_likelihood(field, x, batch_size=batch, solver="dopri5",
                                            rtol=tol, atol=tol, step_control=control,
                                            progress=False)
            err = (res.log_prob - ref).abs()
            cells += [str(int(res.nfe.sum())), f"{float(err.max()):.1e} / {float(err.mean()):.1e}"]
            rows.append({"case": f"{label} (sweep)", "batch": batch, "stepping": control,
                         "tol": tol, "evaluations": int(res.nfe.sum()), "calls": "",
                         "seconds": "", "mean_log_prob": float(res.log_prob.mean()),
                         "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
                         "nfe_min_median_max": spread(res.nfe)})
        print(f"| {tol:g} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def reference(field, x: Tensor, solver: str, tol: float, batch: int) -> Tensor:
    return fs.dataset_log_likelihood(field, x, batch_size=batch, solver=solver, rtol=tol,
                                     atol=tol, step_control="per_sample",
                                     progress=False).log_prob


def trained_mlp(steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    model = fs.MLP(2, hidden=64, depth=3, generator=torch.Generator().manual_seed(seed))
    cfg = fs.TrainConfig(steps=steps, batch_size=256, lr=2e-3, ema_decay=0.99, progress=False)
    start = time.perf_counter()
    run = fs.train(model, "8gaussians", cfg, coupling=fs.OTCoupling("exact"), generator=gen)
    return run.ema_model.eval().double(), time.perf_counter() - start


def trained_unet(seed: int, steps: int | None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import cfg_digits  # noqa: PLC0415

    train, test = cfg_digits.split_digits(seed, 0.2)
    settings = cfg_digits.DEFAULT if steps is None else \
        dataclasses.replace(cfg_digits.DEFAULT, steps=steps)
    start = time.perf_counter()
    model, _ = cfg_digits.train_model(train, settings, seed, quiet=True)
    model.eval()
    null = torch.tensor(10)  # the null label (0-d: any batch): unconditional

    def u(x, t):  # no torch.no_grad(): the divergence differentiates it
        return model(x, t.expand(x.shape[0]), null)

    return u, test, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=512, help="points per 2-D case")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--tol", type=float, default=1e-6, help="rtol = atol of the 2-D cases")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (2-D cases)")
    p.add_argument("--stds", type=float, nargs="*", default=[0.5, 0.05],
                   help="stds of the ring's components, one case each (none: no ring)")
    p.add_argument("--train-steps", type=int, default=600, help="MLP training steps")
    p.add_argument("--sweep", type=float, nargs="*", default=[1e-5, 1e-6, 1e-7, 1e-8],
                   help="tolerances of the sweep (2-D cases, batch 256; none: no sweep)")
    p.add_argument("--cases", nargs="+", choices=("ring", "mlp", "unet"),
                   default=["ring", "mlp"], help="which cases run (--unet adds unet)")
    p.add_argument("--unet", action="store_true",
                   help="also the 8x8-digits U-Net (~16 min on a loaded 2-core CPU)")
    p.add_argument("--unet-points", type=int, default=64)
    p.add_argument("--unet-batches", type=int, nargs="+", default=[64])
    p.add_argument("--unet-tol", type=float, default=1e-5)
    p.add_argument("--unet-train-steps", type=int, default=None,
                   help="U-Net training steps (default: examples/cfg_digits.py's 2000)")
    p.add_argument("--unet-ref-points", type=int, default=16,
                   help="points of the U-Net's reference solve (dopri5 per sample at 1e-6)")
    p.add_argument("--no-torchode", action="store_true", help="skip torchode's rows")
    p.add_argument("--csv", help="write every row here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    tode = (f"torchode {torchode.__version__}" if torchode is not None
            else f"torchode not installed ({TORCHODE_MISSING}): its rows are skipped")
    print(f"# per-sample step control: torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads "
          f"{torch.get_num_threads()}, load average {load}, flowsolve {fs.__version__}, {tode}")
    use_torchode = torchode is not None and not args.no_torchode
    rows: list[dict] = []
    sweep_batch = max(args.batches)

    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    if use_torchode:  # once: TorchScript will not compile a class twice in one process
        u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(8, radius=4.0), path)
        print(f"torchode runs eager: torch.jit.script of its solver on the augmented system "
              f"{torchode_jit_check(u, torch.randn(4, 2, dtype=torch.float64), 1e-6)}")
    for std in args.stds if "ring" in args.cases else ():
        ring = fs.GaussianMixture.ring(8, radius=4.0, std=std)
        u = fs.analytic.marginal_velocity(ring, path)
        x = ring.sample(args.points, generator=torch.Generator().manual_seed(args.seed),
                        dtype=torch.float64)
        label = f"ring of 8 Gaussians (radius 4, std {std:g}), exact velocity"
        run_case(label, u, x, ring.log_prob(x), "the closed-form log-density", args.batches,
                 args.tol, args.repeats, use_torchode, rows)
        if args.sweep:
            sweep(label, u, x, ring.log_prob(x), args.sweep, sweep_batch, rows)

    if "mlp" in args.cases:
        mlp_case(args, use_torchode, sweep_batch, rows)
    if args.unet or "unet" in args.cases:
        unet_case(args, use_torchode, rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def mlp_case(args, use_torchode, sweep_batch, rows) -> None:
    net, secs = trained_mlp(args.train_steps, args.seed)
    print(f"\n(MLP 3x64 trained on 8gaussians for {args.train_steps} steps in {secs:.1f} s)")
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = get_dataset("8gaussians").sample(args.points, generator=gen, dtype=torch.float64)
    start = time.perf_counter()
    ref = reference(net, x, "dopri8", 1e-10, 256)
    ref_name = f"dopri8 per sample at 1e-10 ({time.perf_counter() - start:.1f} s)"
    label = "MLP trained on 8gaussians, held-out points"
    run_case(label, net, x, ref, ref_name, args.batches, args.tol, args.repeats,
             use_torchode, rows)
    if args.sweep:
        sweep(label, net, x, ref, args.sweep, sweep_batch, rows)


def unet_case(args, use_torchode, rows) -> None:
    u, test, secs = trained_unet(args.seed, args.unet_train_steps)
    print(f"\n(digits U-Net trained in {secs:.1f} s)")
    x = test.x[: args.unet_points]
    n_ref = min(args.unet_ref_points, len(x))
    start = time.perf_counter()
    ref = reference(u, x[:n_ref], "dopri5", 1e-6, max(args.unet_batches))
    ref_name = (f"dopri5 per sample at 1e-6, float32 ({time.perf_counter() - start:.0f} s; "
                "itself uncertain by ~0.02 nats: in float32 tighter tolerances drown in "
                "round-off)")
    run_case("digits U-Net (label-free), held-out digits", u, x, ref, ref_name,
             args.unet_batches, args.unet_tol, 0, use_torchode, rows)


if __name__ == "__main__":
    main()
