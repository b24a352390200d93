"""The training checkpoint's format and what a resume may change.

A checkpoint holds the run's settings (``config``) and a ``setup`` record of its inputs
(data set names, the path's repr, the coupling's kind and settings). :func:`load_checked`
refuses a resume whose settings or setup differ, except :data:`MAY_CHANGE_ON_RESUME`: a
resumed run continues the same trajectory.

The coupling's settings are those its ``settings()`` method returns (flowsolve's couplings:
the public attributes that decide the pairs, e.g. for
:class:`~flowsolve.training.couplings.OTCoupling` method, cost, max_iter, keep, and for
Sinkhorn also reg, normalize, tol, fallback, domain), else its public attributes (``vars``,
no leading underscore: a coupling class of one's own), as plain values. A setting that is
not a plain value (None, bool, int, float, str, or a tuple / list of them) cannot be
compared across processes -- a callable cost, a tensor, a module: it is recorded as
unrecorded (``{"unrecorded": "function mod.name"}``), and a resume with one is refused
unless the caller states it is the same (``same_cost=True``, from
``train(..., resume_same_cost=True)``). Setup records written before the settings were
(``setup_version`` < 3) compare the kind only, as they did.
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._core.files import load_checked_file

FORMAT = "flowsolve.train/1"

# Settings a resumed run may change: they do not alter the weights' trajectory (workers give
# the same batches as the main process). Every other setting must match the checkpoint's.
MAY_CHANGE_ON_RESUME = frozenset({"steps", "log_every", "checkpoint_every", "num_workers",
                                  "prefetch_factor", "worker_start_method", "progress"})
# what a checkpoint written before a setting existed ran with
_LEGACY_DEFAULTS = {"ema_warmup": False}


# Version of the "setup" record: 2 from when the reprs of the paths hold exact floats (the
# earlier ones rounded to 6 significant digits) and coupling=None is recorded as "None";
# 3 from when the coupling's settings are recorded ("coupling_settings").
SETUP_VERSION = 3
_UNNAMED = "a tensor or callable (not recorded)"
_SETTINGS = "coupling_settings"
_UNRECORDED = "unrecorded"  # the key of a setting that cannot be compared
_FLAG = "resume_same_cost=True"  # how a caller of train() states such settings are the same


def setup_record(data: Any, source: Any, path: Any, coupling: Any) -> dict[str, Any]:
    """What a resume compares of the run's inputs: data set names, the path's repr, the
    coupling's kind ("None" for no coupling) and its settings (:func:`coupling_settings`);
    None where the data or source (a tensor, a callable) has no stable name. A resume
    refuses any difference, None included."""
    def name(obj: Any) -> str | None:
        return obj if isinstance(obj, str) else None

    kind = "None" if coupling is None else type(coupling).__name__ + (
        f"({coupling.method!r})" if isinstance(getattr(coupling, "method", None), str) else "")
    return {"data": name(data), "source": "N(0, I)" if source is None else name(source),
            "path": repr(path), "coupling": kind, _SETTINGS: coupling_settings(coupling)}


def coupling_settings(coupling: Any) -> dict[str, Any]:
    """The coupling's settings as plain values (numpy scalars as Python numbers, lists as
    tuples); one that is not a plain value as ``{"unrecorded": description}``. The settings
    are what its ``settings()`` method returns, where it has one (flowsolve's couplings:
    those that decide the pairs), else its public attributes; ``{}`` for ``coupling=None``
    and for objects without a ``__dict__``."""
    own = getattr(coupling, "settings", None)
    attrs = own() if callable(own) else None
    if not isinstance(attrs, dict):
        try:
            attrs = vars(coupling) if coupling is not None else {}
        except TypeError:  # __slots__ or a built-in: nothing to read
            attrs = {}
    out = {}
    for key, value in attrs.items():
        if isinstance(key, str) and not key.startswith("_"):
            plain = _plain_setting(value)
            out[key] = {_UNRECORDED: _described(value)} if plain is _NOT_PLAIN else plain
    return out


_NOT_PLAIN = object()


def _plain_setting(value: Any) -> Any:
    """``value`` as a built-in plain value, or ``_NOT_PLAIN``."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return value if value is None else bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        items = tuple(_plain_setting(v) for v in value)
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def _described(value: Any) -> str:
    """A callable by its qualified name, anything else by its type."""
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str) and callable(value):
        return f"{type(value).__name__} {getattr(value, '__module__', None) or '?'}.{name}"
    return f"a {type(value).__name__}"


_FLOAT_LITERAL = re.compile(r"(?<![\w.])-?(?:\d+\.\d*(?:e[+-]?\d+)?|\d+e[+-]?\d+)(?![\w.])")


def _rounded_repr(text: str) -> str:
    """A path repr as version 1 of the setup wrote it: floats formatted with ``:g``."""
    return _FLOAT_LITERAL.sub(lambda m: f"{float(m.group()):g}", text)


def _written_setup(state: dict, setup: dict) -> dict:
    """The checkpoint's setup record in this version's terms, and the keys it lacks taken
    from ``setup`` (unchecked); ``setup`` itself for a checkpoint written before it."""
    written = state.get("setup")
    if not isinstance(written, dict):  # written before the setup was recorded: unchecked
        return {**setup, _SETTINGS: None}
    recorded = _SETTINGS in written
    written = {**setup, **written}
    if not recorded:  # written before the coupling's settings were (version < 3): unchecked
        written[_SETTINGS] = None
    if state.get("setup_version", 1) < 2:
        if written["coupling"] is None:  # version 1 wrote None for coupling=None
            written["coupling"] = "None"
        if written["path"] == _rounded_repr(setup["path"]):  # it recorded no more digits
            written["path"] = setup["path"]
    return written


def load_checked(path: Path, config: dict, world: int, setup: dict, conditional: bool,
                 same_cost: bool = False) -> dict:
    """Load a training checkpoint and refuse it where it was written with settings
    (``config``: the call's ``asdict(TrainConfig)``) or a setup that would change the
    trajectory; the ValueError names every difference. ``same_cost``: the caller states
    that the coupling's settings that cannot be compared (a callable cost) are the same."""
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
               for key, value in setup.items() if key != _SETTINGS and written_setup[key] != value]
    if written_setup["coupling"] == setup["coupling"]:  # another kind is named above
        differ += _settings_differ(written_setup[_SETTINGS], setup[_SETTINGS], same_cost)
    if differ:
        raise ValueError(f"checkpoint {path} was written with {', '.join(differ)}. A resumed run "
                         "continues the same trajectory: use the same values to resume (only "
                         f"{', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change), or another "
                         "checkpoint path to start afresh")
    return state


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _settings_differ(written: dict | None, now: dict, same_cost: bool) -> list[str]:
    """Each coupling setting that differs, ``coupling.<name>=<written> (this call: <now>)``;
    a setting that cannot be compared on both sides, unless ``same_cost``. ``written``
    None: not recorded (an older checkpoint), nothing to compare."""
    if written is None:
        return []
    differ = []
    for key in [*now, *(k for k in written if k not in now)]:
        old, new = written.get(key, _MISSING), now.get(key, _MISSING)
        if _is_unrecorded(old) and _is_unrecorded(new):
            if not same_cost:
                differ.append(f"coupling.{key}={_setting(old)} (this call: {_setting(new)}; "
                              "it cannot be compared with the checkpoint's: pass "
                              f"{_FLAG} to train() if it is the same)")
        elif not _same_setting(old, new):
            differ.append(f"coupling.{key}={_setting(old)} (this call: {_setting(new)})")
    return differ


_MISSING = object()  # a setting one side lacks


def _is_unrecorded(value: Any) -> bool:
    return isinstance(value, dict) and _UNRECORDED in value


def _same_setting(a: Any, b: Any) -> bool:
    a, b = _deep_tuple(a), _deep_tuple(b)
    return a == b or repr(a) == repr(b)  # repr: nan equals nan


def _deep_tuple(value: Any) -> Any:
    return tuple(map(_deep_tuple, value)) if isinstance(value, (list, tuple)) else value


def _setting(value: Any) -> str:
    if value is _MISSING:
        return "<not set>"
    return value[_UNRECORDED] if _is_unrecorded(value) else repr(_deep_tuple(value))


def _shown(value: str | None) -> str:
    return _UNNAMED if value is None else value
