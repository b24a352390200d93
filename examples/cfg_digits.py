r"""Classifier-free guidance on scikit-learn's 8x8 digits with flowsolve's small U-Net.

A label-conditioned velocity ``u_theta(x, t, y)`` (:class:`flowsolve.UNet`, 10 classes plus
the null label) is trained by conditional flow matching on the CondOT path
``x_t = t x1 + (1 - t) x0`` with flowsolve's training loop, the labels replaced by the null
label with probability ``p`` (Ho & Salimans 2022), so that one network learns both
``u_t(x | y)`` and ``u_t(x)``. Samples for each guidance weight ``w`` integrate the guided
field

    u_w(x, t | y) = (1 - w) u_theta(x, t | null) + w u_theta(x, t | y)

(:func:`flowsolve.guided`) from the same noise ``x0`` with a fixed-step solver
(:func:`flowsolve.sample`); ``w = 0`` is the unconditional model, ``w = 1`` the conditional
one, ``w > 1`` extrapolates away from the unconditional field. Generated images are clamped
to the data range [-1, 1] (the fraction of pixels that needed it is reported).

What guidance does, measured for every ``w``:

* **class fidelity**: the fraction of samples that a classifier trained on the real digits
  (scikit-learn's ``LogisticRegression`` on the 64 pixels of the training split; its
  accuracy on the held-out split is reported) assigns to the requested label;
* **within-class std**: the pixel standard deviation over the samples of one requested
  class, averaged over the 64 pixels and the 10 classes (the same on the held-out real
  digits for reference): a diversity measure;
* **class MMD^2**: the unbiased squared MMD (:func:`flowsolve.mmd`, RBF kernels with
  bandwidths fixed once from the real data) between the samples of a class and the real
  training images of that class, averaged over classes (the held-out real images give
  the reference, about 0): low when samples are both right and as varied as the data.

Files in ``--out`` (default ``runs/cfg_digits``; an existing non-empty folder is refused
unless ``--force``): ``results.json`` (settings, classifier accuracy, one row per ``w``,
times, machine), ``results.csv`` (the rows), ``samples.pt`` (``{w: (10, n, 1, 8, 8)}``) and,
with matplotlib, ``samples_w<w>.png`` (rows = classes, columns = samples).

Usage::

    python examples/cfg_digits.py                  # the default run (about 75 s, 1 thread)
    python examples/cfg_digits.py --quick          # a few seconds (the smoke test)
    python examples/cfg_digits.py --steps 4000 --seed 1 --out runs/cfg_digits/long

Needs scikit-learn (the digits and the classifier): ``pip install flowsolve[data]``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import flowsolve as fs
from flowsolve.training.data import LabeledSamples, load_digits

NUM_CLASSES = 10


@dataclass(frozen=True)
class Settings:
    """Training and sampling sizes of one run (the EMA is the library's: decay 0.999 with
    the warm-up ``min(0.999, (1 + n) / (10 + n))``, so short runs average recent weights)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    channels: int = 16  # UNet width C (1.0e5 parameters with embedding_dim 64)
    embedding_dim: int = 64
    label_dropout: float = 0.2
    weights: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    per_class: int = 50  # samples generated per class and guidance weight
    solver: str = "fast_midpoint"
    solver_steps: int = 16
    test_fraction: float = 0.2  # held-out real digits (classifier accuracy, references)
    grid_columns: int = 12
    ema_decay: float = 0.999


DEFAULT = Settings()
QUICK = Settings(steps=40, batch_size=64, warmup_steps=0, per_class=8, solver_steps=4,
                 grid_columns=8)


# -- data and the classifier ---------------------------------------------------------------
def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent generator per use (split, training, noise) of one seed."""
    return torch.Generator().manual_seed(1000 * seed + stream)


def split_digits(seed: int, test_fraction: float) -> tuple[LabeledSamples, LabeledSamples]:
    """The 1797 digits, ``x`` ``(N, 1, 8, 8)`` in [-1, 1], shuffled and split (train, test)."""
    digits = load_digits(dtype=torch.float32)
    perm = torch.randperm(len(digits), generator=_generator(seed, 1))
    n_test = round(test_fraction * len(digits))
    test, train = perm[:n_test], perm[n_test:]
    return (LabeledSamples(digits.x[train], digits.y[train]),
            LabeledSamples(digits.x[test], digits.y[test]))


def fit_classifier(train: LabeledSamples, test: LabeledSamples):
    """Multinomial logistic regression on the 64 pixels; returns (classifier, test accuracy)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(train.x.flatten(1).numpy(), train.y.numpy())
    accuracy = float(clf.score(test.x.flatten(1).numpy(), test.y.numpy()))
    return clf, accuracy


# -- the model --------------------------------------------------------------------------------
def train_model(train: LabeledSamples, settings: Settings, seed: int,
                quiet: bool) -> tuple[nn.Module, fs.TrainResult]:
    """Train the label-conditioned U-Net by CFM on the CondOT path with label dropout."""
    # the documented numbers were made with these weights: fs.UNet(..., generator=g) draws
    # others; fork_rng restores the global RNG afterwards
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = fs.UNet(channels=settings.channels, embedding_dim=settings.embedding_dim,
                        num_classes=NUM_CLASSES)
    config = fs.TrainConfig(
        steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
        warmup_steps=min(settings.warmup_steps, settings.steps), ema_decay=settings.ema_decay,
        label_dropout=settings.label_dropout, log_every=min(100, settings.steps),
        progress=not quiet,
    )
    result = fs.train(model, train, config, path=fs.AffineGaussianPath(fs.CondOTScheduler()),
                      generator=_generator(seed, 2))
    return result.ema_model, result


@torch.no_grad()
def generate(model: nn.Module, labels: Tensor, x0: Tensor, w: float,
             settings: Settings) -> tuple[Tensor, float, int]:
    """Guided samples ``(B, 1, 8, 8)`` clamped to [-1, 1], the fraction of pixels that lay
    more than 0.05 outside [-1, 1] before the clamp, and the solver's NFE (each one guided
    evaluation: a single model call on ``2B`` samples, ``B`` at w = 0 and 1)."""
    sol = fs.sample(fs.guided(model, labels, w), x0, settings.solver, steps=settings.solver_steps)
    outside = float((sol.x.abs() > 1.05).float().mean())
    return sol.x.clamp(-1, 1), outside, sol.nfe


# -- what guidance does -------------------------------------------------------------------------
def within_class_std(x: Tensor, y: Tensor) -> float:
    """Pixel std over the samples of each class, averaged over pixels, then classes."""
    return float(torch.stack([x[y == c].flatten(1).std(0).mean()
                              for c in range(NUM_CLASSES)]).mean())


def class_mmd2(x: Tensor, y: Tensor, real: LabeledSamples,
               bandwidths: tuple[float, ...]) -> tuple[float, float]:
    """Mean over classes of the unbiased MMD^2 between ``x[y == c]`` and the real images of
    class c, and the standard error of that mean (classes independent)."""
    res = [fs.mmd(x[y == c].double(), real.x[real.y == c].double(), bandwidths=bandwidths)
           for c in range(NUM_CLASSES)]
    mean = float(torch.stack([r.mmd2 for r in res]).mean())
    se = float(torch.stack([r.stderr for r in res]).square().sum().sqrt()) / NUM_CLASSES
    return mean, se


def median_distance(x: Tensor) -> float:
    """Median pairwise Euclidean distance of the flattened images."""
    d = torch.pdist(x.flatten(1).double())
    return float(d.median())


# -- files ------------------------------------------------------------------------------------
def prepare_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a folder that holds anything, unless ``force``."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SystemExit(f"{out} already holds results; pass --force to overwrite them, "
                             "or choose another --out")
        for name in ("results.json", "results.csv", "samples.pt"):
            (out / name).unlink(missing_ok=True)
        for png in out.glob("samples_w*.png"):
            png.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_grid(path: Path, x: Tensor, w: float, fidelity: float, columns: int) -> bool:
    """A PNG of ``x`` ``(10, n, 1, 8, 8)``: rows = classes, columns = samples; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k = min(columns, x.shape[1])
    tiles = x[:, :k, 0].numpy()  # (10, k, 8, 8)
    canvas = -np.ones((10 * 9 + 1, k * 9 + 1))  # one-pixel gaps of background (-1)
    for r in range(10):
        for c in range(k):
            canvas[1 + 9 * r:9 * (r + 1), 1 + 9 * c:9 * (c + 1)] = tiles[r, c]
    fig, ax = plt.subplots(figsize=(0.45 * k + 0.6, 5.0))
    ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")  # dark ink
    ax.set_yticks([4.5 + 9 * r for r in range(10)], [str(r) for r in range(10)])
    ax.set_xticks([])
    ax.set_ylabel("requested class")
    ax.set_title(f"w = {w:g}   fidelity {fidelity:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} ({torch.get_num_threads()} thread(s))")


COLUMNS = ("w", "fidelity", "within_class_std", "class_mmd2", "class_mmd2_se", "outside",
           "nfe", "sample_seconds")


def table(rows: list[dict], ref: dict) -> str:
    lines = ["| w | class fidelity | within-class std | class MMD^2 | pixels outside |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['w']:g} | {r['fidelity']:.3f} | {r['within_class_std']:.3f} | "
                     f"{r['class_mmd2']:.4f} ± {r['class_mmd2_se']:.4f} | {r['outside']:.4f} |")
    lines.append(f"| real (held out) | {ref['classifier_accuracy']:.3f} | "
                 f"{ref['within_class_std']:.3f} | {ref['class_mmd2']:.4f} ± "
                 f"{ref['class_mmd2_se']:.4f} | 0 |")
    return "\n".join(lines) + "\n"


# -- the run ----------------------------------------------------------------------------------
def run(settings: Settings, seed: int, out: Path, quiet: bool = False) -> dict:
    """Train, sample for every ``w``, measure, write the files; returns the results dict."""
    begin = time.perf_counter()
    train, test = split_digits(seed, settings.test_fraction)
    clf, accuracy = fit_classifier(train, test)
    h = median_distance(train.x)
    bandwidths = (0.5 * h, h, 2 * h)
    real_mmd2, real_se = class_mmd2(test.x, test.y, train, bandwidths)
    ref = {"classifier_accuracy": accuracy, "within_class_std": within_class_std(test.x, test.y),
           "class_mmd2": real_mmd2, "class_mmd2_se": real_se, "bandwidths": list(bandwidths),
           "n_train": len(train), "n_test": len(test)}

    model, result = train_model(train, settings, seed, quiet)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.per_class)
    x0 = torch.randn(labels.shape[0], 1, 8, 8, generator=_generator(seed, 3))  # shared by all w
    rows, samples = [], {}
    for w in settings.weights:
        tick = time.perf_counter()
        x, outside, nfe = generate(model, labels, x0, w, settings)
        seconds = time.perf_counter() - tick
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"non-finite samples at w = {w}")
        predicted = torch.as_tensor(clf.predict(x.flatten(1).numpy()))
        mmd2, se = class_mmd2(x, labels, train, bandwidths)
        rows.append({
            "w": float(w), "fidelity": float((predicted == labels).double().mean()),
            "fidelity_per_class": [float((predicted[labels == c] == c).double().mean())
                                   for c in range(NUM_CLASSES)],
            "predicted_histogram": torch.bincount(predicted, minlength=NUM_CLASSES).tolist(),
            "within_class_std": within_class_std(x, labels), "class_mmd2": mmd2,
            "class_mmd2_se": se, "outside": outside,
            "nfe": nfe,
            "sample_seconds": seconds,
        })
        samples[float(w)] = x.reshape(NUM_CLASSES, settings.per_class, 1, 8, 8)

    pngs = [f"samples_w{r['w']:g}.png" for r in rows
            if save_grid(out / f"samples_w{r['w']:g}.png", samples[r["w"]], r["w"],
                         r["fidelity"], settings.grid_columns)]
    torch.save(samples, out / "samples.pt")
    results = {
        "example": "cfg_digits", "seed": seed, "settings": {**asdict(settings),
                                                           "ema_decay": settings.ema_decay},
        "reference": ref, "rows": rows, "final_loss": result.losses[-1],
        "train_seconds": result.wall_time, "total_seconds": time.perf_counter() - begin,
        "pngs": pngs, "machine": machine(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write(out / "results.json", json.dumps(results, indent=1))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    results["table"] = table(rows, ref)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT.steps}; "
                   f"{QUICK.steps} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run of a few seconds (the smoke test): too short to learn")
    p.add_argument("--seed", type=int, default=0, help="seeds split, weights, batches, noise")
    p.add_argument("--out", type=Path, default=Path("runs") / "cfg_digits",
                   help="output folder (default runs/cfg_digits)")
    p.add_argument("--force", action="store_true", help="overwrite the results in --out")
    p.add_argument("--quiet", action="store_true", help="no training progress bar")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1; got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if importlib.util.find_spec("sklearn") is None:
        raise SystemExit("cfg_digits needs scikit-learn (the digits and the classifier): "
                         "pip install flowsolve[data]")
    torch.set_num_threads(1)  # small convolutions: one thread is fastest on a shared CPU
    settings = QUICK if args.quick else DEFAULT
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    prepare_out(args.out, args.force)
    print(f"cfg_digits: {settings.steps} steps, seed {args.seed} -> {args.out}  [{machine()}]",
          flush=True)
    results = run(settings, args.seed, args.out, quiet=args.quiet)
    sys.stdout.write("\n" + results["table"])
    print(f"\ntrain {results['train_seconds']:.0f} s, total {results['total_seconds']:.0f} s; "
          f"results in {args.out.resolve()}")
    return results


if __name__ == "__main__":
    main()
