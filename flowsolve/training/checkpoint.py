"""The training checkpoint's format and what a resume may change.

A checkpoint holds the run's settings (``config``) and a ``setup`` record of its inputs
(data set names, the path's repr, the coupling's kind). :func:`load_checked` refuses a
resume whose settings or setup differ, except :data:`MAY_CHANGE_ON_RESUME`: a resumed run
continues the same trajectory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .._core.files import load_checked_file

FORMAT = "flowsolve.training.loop/1"

# Settings a resumed run may change: they do not alter the weights' trajectory (workers give
# the same batches as the main process). Every other setting must match the checkpoint's.
MAY_CHANGE_ON_RESUME = frozenset({"steps", "log_every", "checkpoint_every", "num_workers",
                                  "prefetch_factor", "worker_start_method", "progress"})
# what a checkpoint written before a setting existed ran with
_LEGACY_DEFAULTS = {"ema_warmup": False}


# Version of the "setup" record: 2 from when the reprs of the paths hold exact floats (the
# earlier ones rounded to 6 significant digits) and coupling=None is recorded as "None".
SETUP_VERSION = 2
_UNNAMED = "a tensor or callable (not recorded)"


def setup_record(data: Any, source: Any, path: Any, coupling: Any) -> dict[str, str | None]:
    """What a resume compares of the run's inputs: data set names, the path's repr and the
    coupling's kind ("None" for no coupling); None where the data or source (a tensor, a
    callable) has no stable name. A resume refuses any difference, None included."""
    def name(obj: Any) -> str | None:
        return obj if isinstance(obj, str) else None

    kind = "None" if coupling is None else type(coupling).__name__ + (
        f"({coupling.method!r})" if isinstance(getattr(coupling, "method", None), str) else "")
    return {"data": name(data), "source": "N(0, I)" if source is None else name(source),
            "path": repr(path), "coupling": kind}


_FLOAT_LITERAL = re.compile(r"(?<![\w.])-?(?:\d+\.\d*(?:e[+-]?\d+)?|\d+e[+-]?\d+)(?![\w.])")


def _rounded_repr(text: str) -> str:
    """A path repr as version 1 of the setup wrote it: floats formatted with ``:g``."""
    return _FLOAT_LITERAL.sub(lambda m: f"{float(m.group()):g}", text)


def _written_setup(state: dict, setup: dict) -> dict:
    """The checkpoint's setup record in this version's terms, and the keys it lacks taken
    from ``setup`` (unchecked); ``setup`` itself for a checkpoint written before it."""
    written = state.get("setup")
    if not isinstance(written, dict):  # written before the setup was recorded: unchecked
        return dict(setup)
    written = {**setup, **written}
    if state.get("setup_version", 1) < 2:
        if written["coupling"] is None:  # version 1 wrote None for coupling=None
            written["coupling"] = "None"
        if written["path"] == _rounded_repr(setup["path"]):  # it recorded no more digits
            written["path"] = setup["path"]
    return written


def load_checked(path: Path, config: dict, world: int, setup: dict, conditional: bool) -> dict:
    """Load a training checkpoint and refuse it where it was written with settings
    (``config``: the call's ``asdict(TrainConfig)``) or a setup that would change the
    trajectory; the ValueError names every difference."""
    state = load_checked_file(path, "flowsolve training checkpoint")
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a flowsolve training checkpoint ({FORMAT})")
    written = {**_LEGACY_DEFAULTS, **state.get("config", {}), "world_size": state["world_size"]}
    now = {**config, "world_size": world}
    # settings this run never reads (the prediction and EMA are compared themselves)
    if config["ema_decay"] is None and written.get("ema_decay") is None:
        now.pop("ema_warmup")  # no EMA either way: its warm-up is irrelevant
    if config["prediction"] != "score":
        now.pop("dsm_weighting")  # only the score loss is weighted
    if not conditional:
        now.pop("label_dropout")  # a model without num_classes is fed no labels
    differ = [f"{key}={written[key]!r} (this call: {value!r})" for key, value in now.items()
              if key not in MAY_CHANGE_ON_RESUME and key in written
              and _plain(written[key]) != _plain(value)]
    written_setup = _written_setup(state, setup)
    differ += [f"{key}={_shown(written_setup[key])} (this call: {_shown(value)})"
               for key, value in setup.items() if written_setup[key] != value]
    if differ:
        raise ValueError(f"checkpoint {path} was written with {', '.join(differ)}. A resumed run "
                         "continues the same trajectory: use the same values to resume (only "
                         f"{', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change), or another "
                         "checkpoint path to start afresh")
    return state


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _shown(value: str | None) -> str:
    return _UNNAMED if value is None else value
