"""What the commands of ``flowsolve`` share: :class:`CliError`, the checks of ``--out`` and
``--device`` made before any work, the model file (``flowsolve.cli-model/1``: the MLP's
shape, its (EMA) weights and how it was trained, loaded with
``torch.load(weights_only=True)``), the seeded source draws, the solver options and what a
training record says about the model's path.

Torch and the library are imported inside the functions that use them, once a command
runs: ``flowsolve --help`` and ``--version`` start without them.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .._core.files import UnreadableFileError, load_checked_file

if TYPE_CHECKING:
    import torch

__all__ = ["CliError", "MODEL_FORMAT", "out_path", "beside", "check_device", "load_model",
           "seeded_generator", "source_points", "solver_kwargs", "check_solver_options",
           "was_given", "no_plot_message", "on_condot_path", "bridge_noise"]


MODEL_FORMAT = "flowsolve.cli-model/1"


class CliError(Exception):
    """A bad option or file: printed as ``flowsolve: error: ...`` with exit status 2."""


def out_path(path: str | None, force: bool) -> Path | None:
    """Check ``--out`` before any work: free (or ``--force``), not a folder, and in a folder
    that can be written, so that a long run is never lost at the end."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file name")
    if out.exists() and not force:
        raise CliError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise CliError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") \
            from None
    return out


def beside(out: Path, suffix: str, force: bool) -> Path:
    """The file written beside ``--out`` with another suffix (samples.pt -> samples.csv),
    checked like ``--out`` before any work."""
    path = out.with_suffix(suffix)
    if path == out:
        raise CliError(f"--out {out}: give the name of the .pt file; the {suffix} file is "
                       f"written beside it ({out.with_suffix('.pt').name} -> {path.name})")
    if path.is_dir():
        raise CliError(f"{path} is a folder, and --out {out} writes a file there; choose "
                       "another --out")
    if path.exists() and not force:
        raise CliError(f"{path} exists (--out {out} writes it beside the .pt file); pass "
                       "--force to overwrite it, or choose another --out")
    return path


def check_device(name: str) -> str:
    """``--device``: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CliError(f"--device {name!r} is not a device; accepted: cpu, cuda, cuda:N, mps") \
            from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CliError(f"--device {name}: this machine (or this torch build) has no CUDA "
                           "device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise CliError(f"--device {name}: only {count} CUDA device(s), cuda:0 to "
                           f"cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {name}: accepted: cpu, cuda, cuda:N, mps")
    return name


def load_model(path: str, device: str) -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode on device, the saved dict)`` of a ``--model`` file written by
    ``flowsolve train`` (format ``MODEL_FORMAT``); CliError for a missing, damaged or foreign
    file."""
    if not Path(path).is_file():
        raise CliError(f"--model {path}: no such file (make one with `flowsolve train`)")
    try:
        saved = load_checked_file(path, "flowsolve model file", map_location=device)
    except UnreadableFileError as exc:
        raise CliError(f"--model {exc}") from None
    if saved.get("format") != MODEL_FORMAT:
        raise CliError(f"--model {path}: not a {MODEL_FORMAT} file written by `flowsolve train`")
    model = build_model(saved["trained"].get("method", "cfm"), saved["arch"]).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def build_model(method: str, arch: dict) -> torch.nn.Module:
    """The network of ``flowsolve train --method``: an MLP velocity, or for ``sf2m`` a
    :class:`~flowsolve.training.score_flow.FlowAndScore` of two MLPs of that shape."""
    from ..training.nets import MLP
    from ..training.score_flow import FlowAndScore

    if method == "sf2m":
        return FlowAndScore(MLP(**arch), MLP(**arch))
    return MLP(**arch)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``--seed`` (torch's global RNG is never drawn from)."""
    import torch

    return torch.Generator().manual_seed(seed)


def source_points(saved: dict, n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """``n`` draws of the model's source (``N(0, I)`` or the data set it was trained from),
    drawn on the CPU from ``gen`` and moved to ``device``."""
    import torch

    from ..training.data import sample_dataset

    name = saved["trained"]["source"]
    if name == "normal":
        return torch.randn(n, 2, generator=gen).to(device)
    return sample_dataset(name, n, generator=gen).to(device)


def solver_kwargs(args: argparse.Namespace) -> dict:
    """The budget keywords of ``--solver``: ``rtol`` and ``atol`` of an adaptive solver, else
    ``steps``."""
    from ..ode.solve import ODE_SOLVERS

    if ODE_SOLVERS[args.solver].adaptive:
        control = getattr(args, "step_control", "shared")
        return {"rtol": args.rtol, "atol": args.atol,
                **({"step_control": control} if control != "shared" else {})}
    return {"steps": args.steps}


def check_solver_options(args: argparse.Namespace) -> None:
    """--steps is for fixed-step solvers, --rtol / --atol for adaptive ones: the other kind
    would ignore them."""
    from ..ode.backends import EMBEDDED_TABLEAUS
    from ..ode.solve import ODE_SOLVERS

    adaptive = ODE_SOLVERS[args.solver].adaptive
    if getattr(args, "step_control", "shared") == "per_sample" and \
            args.solver not in EMBEDDED_TABLEAUS:
        raise CliError(f"--step-control per_sample runs {', '.join(EMBEDDED_TABLEAUS)} with a "
                       f"step size a point; {args.solver} is not one of them: choose one with "
                       "--solver, or drop --step-control")
    if adaptive and was_given(args, "steps"):
        raise CliError(f"--steps sets the steps of a fixed-step solver; {args.solver} is "
                       "adaptive and chooses its steps by --rtol and --atol: drop --steps, or "
                       "choose a fixed-step --solver (e.g. rk4)")
    for flag in ("rtol", "atol"):
        if not adaptive and was_given(args, flag):
            raise CliError(f"--{flag} is a tolerance of an adaptive solver; {args.solver} is "
                           f"fixed-step and takes --steps: drop --{flag}, or choose an "
                           "adaptive --solver (e.g. dopri5)")
        value = getattr(args, flag)
        if not (value > 0 and math.isfinite(value)) or (flag == "rtol" and value >= 1):
            raise CliError(f"--{flag} must be a number in (0, {'1' if flag == 'rtol' else 'inf'}"
                           f"); got {value}")


def was_given(args: argparse.Namespace, name: str) -> bool:
    """Whether the option was on the command line (not left at its default)."""
    return name in getattr(args, "given", ())


def no_plot_message(png: Path, force: bool) -> str:
    """What to say when matplotlib is missing; with ``--force`` a plot of an earlier run must
    not stay beside the new results, so it is removed."""
    removed = ""
    if force and png.is_file():
        png.unlink()
        removed = f"; removed the earlier run's {png}"
    return f"(matplotlib not installed: no plot{removed}; pip install flowsolve[plot])"


def on_condot_path(trained: dict) -> bool:
    """Whether the model of a training record is a velocity of the CondOT path ``x_t = t x1 +
    (1 - t) x0``: ``--method cfm``, or icfm / otcfm with ``--sigma 0`` (any coupling of the
    endpoints: ``x_t`` is still ``alpha_t x1 + sigma_t x0``, so the model's posterior means
    and the path's log-SNR are those of the affine path). Bridge noise makes another path."""
    method, sigma = trained["method"], float(trained.get("sigma", 0.0))
    return method == "cfm" or (method in ("icfm", "otcfm") and sigma == 0)


def bridge_noise(trained: dict) -> str:
    """The bridge noise of a training record, in words (for messages)."""
    method, sigma = trained["method"], float(trained.get("sigma", 0.0))
    return (f"a Brownian bridge, noise of std {sigma:g} sqrt(t (1 - t))" if method == "sbcfm"
            else f"a bridge with Gaussian noise of std {sigma:g} at every t")
