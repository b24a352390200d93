"""OT-CFM training step: flowsolve against torchcfm, on the same network and batch.

One training step = draw x0 ~ N(0, I) and x1 ~ 8gaussians, couple them, draw t and
x_t = (1 - t) x0 + t x1 + sigma eps (sigma = 0.1), regress v(x_t, t) on x1 - x0, AdamW step.
Compared, at batch 256, 1024 and 4096 (d = 2, MLP 3 x 256 SELU on [x, t]):

* torchcfm 1.0.7: ``ConditionalFlowMatcher`` (independent) and
  ``ExactOptimalTransportConditionalFlowMatcher`` (``ot.emd`` at POT's default iteration
  limit, then ``batch`` pairs drawn from the plan *with replacement*);
* flowsolve: independent pairs, ``OTCoupling("exact")`` (the permutation of the plan,
  iteration limit scaled with the batch, result code checked) and ``OTCoupling("sinkhorn",
  reg=0.05)`` (entropic, relative to the mean pair cost; on the inputs' device), with the
  same bridge.

Besides the step time it reports what the coupling returns: the fraction of distinct x0 in
the paired batch (a permutation: 1) and the cost of the plan the pairs come from against POT's
optimum ``ot.emd2`` solved to optimality (1.000 = optimal). Both libraries run the same
loop body here; only the coupling and the bridge sampling differ. ``bench_train.py``
measures the coupling in DataLoader workers, overlapped with the step.

torchcfm is not a dependency of flowsolve: ``pip install --no-deps torchcfm==1.0.7`` (its
core imports only torch, numpy and POT). Ratios are from one run (``--threads`` torch
threads; the step counts shrink with the batch, see ``STEPS``).

Run: .venv/bin/python benchmarks/bench_torchcfm.py [--batches 256 1024 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import ot
import torch

import flowsolve as fs
from flowsolve.paths.bridges import GaussianBridge
from flowsolve.training.data import sample_dataset

SIGMA = 0.1
SINKHORN = 0.05  # entropic regularisation relative to the mean pair cost (OTCoupling's default)
STEPS = {256: 30, 1024: 10, 4096: 4}  # timed steps per (batch, variant), after 1 warm-up


def make_model(device: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fs.MLP(2, hidden=256, depth=3, time_embedding_dim=None,
                      activation="selu").to(device)


def torchcfm_pairs(matcher):
    """torchcfm's batch ``(t, x_t, u_t)``."""
    def pairs(x0, x1, g):
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        return t, xt, ut
    return pairs


def flowsolve_pairs(coupling):
    bridge = GaussianBridge(SIGMA)

    def pairs(x0, x1, g):
        if coupling is not None:
            x0, x1 = coupling(x0, x1)
        t = torch.rand(x0.shape[0], generator=g, device=x0.device)
        s = bridge.sample(x0, x1, t, generator=g)
        return t, s.x_t, s.dx_t
    return pairs


def step_ms(pairs, batch: int, device: str) -> float:
    model = make_model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    g = torch.Generator(device).manual_seed(1)
    gd = torch.Generator().manual_seed(2)  # data on the CPU, as a DataLoader delivers it
    np.random.seed(0)  # noqa: NPY002 - torchcfm draws its pairs from numpy's global state
    torch.manual_seed(0)  # ... and its t and noise with torch's
    n = STEPS[batch]
    for i in range(n + 1):
        if i == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x0 = torch.randn(batch, 2, generator=gd).to(device)
        x1 = sample_dataset("8gaussians", batch, generator=gd).to(device)
        t, xt, ut = pairs(x0, x1, g)
        loss = (model(xt, t) - ut).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / n


def coupling_quality(batch: int) -> dict[str, tuple[float, float]]:
    """(distinct x0 fraction, plan cost / optimal cost) for one batch; torchcfm's pairs are
    drawn from its plan, so their expected cost is the plan's."""
    from torchcfm.optimal_transport import OTPlanSampler

    gd = torch.Generator().manual_seed(3)
    x0 = torch.randn(batch, 2, generator=gd, dtype=torch.float64)
    x1 = sample_dataset("8gaussians", batch, generator=gd).double()
    c = torch.cdist(x0, x1).square().numpy()
    u = np.full(batch, 1.0 / batch)
    best = ot.emd2(u, u, c, numItermax=100 * batch * batch)
    out = {}
    sampler = OTPlanSampler("exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sampler.get_map(x0, x1)
    np.random.seed(0)  # noqa: NPY002 - torchcfm's sample_map draws from numpy's global state
    i, _ = sampler.sample_map(plan, batch)  # torchcfm's own draw, with replacement
    out["torchcfm exact"] = (len(set(i.tolist())) / batch, (plan * c).sum() / best)
    res = fs.OTCoupling("exact").plan(x0, x1)
    i, j = res.i0.numpy(), res.i1.numpy()
    out["flowsolve exact"] = (len(set(i.tolist())) / batch, c[i, j].mean() / best)
    res = fs.OTCoupling("sinkhorn", reg=SINKHORN).plan(x0, x1, generator=torch.Generator())
    out["flowsolve Sinkhorn"] = (len(set(res.i0.tolist())) / batch, float(res.cost) / best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torchcfm
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    print(f"torch {torch.__version__}, torchcfm {torchcfm.__version__}, POT {ot.__version__}, "
          f"device {args.device}, {args.threads} thread(s)")
    variants = {
        "torchcfm independent": lambda: torchcfm_pairs(ConditionalFlowMatcher(SIGMA)),
        "torchcfm exact OT": lambda: torchcfm_pairs(
            ExactOptimalTransportConditionalFlowMatcher(SIGMA)),
        "flowsolve independent": lambda: flowsolve_pairs(None),
        "flowsolve exact OT": lambda: flowsolve_pairs(fs.OTCoupling("exact")),
        "flowsolve Sinkhorn OT": lambda: flowsolve_pairs(
            fs.OTCoupling("sinkhorn", reg=SINKHORN)),
    }
    print(f"{'B':>5} {'variant':<22} {'ms/step':>9} {'x indep.':>9} {'distinct x0':>12}"
          f" {'cost/opt':>9}")
    for b in args.batches:
        times = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchcfm/POT's max_iter warning: see cost/opt
            for name, make in variants.items():
                times[name] = step_ms(make(), b, args.device)
        quality = coupling_quality(b)
        for name, ms in times.items():
            base = times[f"{name.split()[0]} independent"]
            dist, cost = quality.get(name.replace(" OT", ""), (float("nan"),) * 2)
            print(f"{b:>5} {name:<22} {ms:9.2f} {ms / base:9.1f} {dist:12.3f} {cost:9.4f}")
        print(f"{b:>5} torchcfm OT / flowsolve OT step: "
              f"{times['torchcfm exact OT'] / times['flowsolve exact OT']:.2f}x")


if __name__ == "__main__":
    main()
