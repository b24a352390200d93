"""The ``flowsolve`` command. Subcommands grow with the toolkit; today: ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import analytic
from .paths import AffineGaussianPath
from .schedules import SCHEDULERS, get_scheduler


def _demo(args: argparse.Namespace) -> int:
    """Show a path, its exact marginal velocity and a log-density table for the built-in
    8-Gaussians mixture (closed forms: nothing is trained or approximated)."""
    data = analytic.GaussianMixture.ring(n_components=8, radius=4.0, std=0.5)
    path = AffineGaussianPath(get_scheduler(args.scheduler))
    log_p = analytic.marginal_log_prob(data, path)
    u = analytic.marginal_velocity(data, path)
    score = analytic.marginal_score(data, path)
    points = torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 2.0], [0.0, -3.0]], dtype=torch.float64)
    times = [0.0, 0.25, 0.5, 0.75, 1.0]

    print(f"data:  {data!r}  (8 Gaussians, radius 4, std 0.5)")
    print(f"path:  {path!r}   x_t = alpha_t x1 + sigma_t x0, t: 0 = noise -> 1 = data\n")
    print("schedule")
    heads = ("t", "alpha_t", "sigma_t", "d_alpha_t", "d_sigma_t")
    print(f"{heads[0]:>6} " + " ".join(f"{h:>10}" for h in heads[1:]))
    for t in times:
        v = path.scheduler(torch.tensor(t, dtype=torch.float64))
        row = [v.alpha_t, v.sigma_t, v.d_alpha_t, v.d_sigma_t]
        print(f"{t:6.2f} " + " ".join(f"{float(c):10.4f}" for c in row))

    print("\nexact marginal log-density log p_t(x)")
    print(f"{'x':>14} " + " ".join(f"{'t=' + format(t, '.2f'):>10}" for t in times))
    for x in points:
        vals = [float(log_p(x[None], t)) for t in times]
        print(f"{str(tuple(x.tolist())):>14} " + " ".join(f"{v:10.4f}" for v in vals))

    print("\nexact marginal velocity u_t(x) and score at t = 0.5")
    for x in points:
        ux, sx = u(x[None], 0.5)[0].tolist(), score(x[None], 0.5)[0].tolist()
        print(f"{str(tuple(x.tolist())):>14}  u = ({ux[0]:8.4f}, {ux[1]:8.4f})"
              f"   score = ({sx[0]:8.4f}, {sx[1]:8.4f})")

    gen = torch.Generator().manual_seed(args.seed)
    x1 = data.sample(4096, generator=gen, dtype=torch.float64)
    print(f"\nmean log p_1 over 4096 data samples: {float(data.log_prob(x1).mean()):.4f} nats")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowsolve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="closed-form tour of a path on built-in data")
    demo.add_argument("--scheduler", default="condot", choices=sorted(SCHEDULERS))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
