"""The result of a solver study: its plain records, the convergence orders fitted from them
(:func:`fit_order`), and the :class:`Study` that holds both with its renderings (CSV and
JSON written atomically, a Markdown table, a work-precision plot). Private; re-exported by
:mod:`flowsolve.studies.compare`, which does the measuring."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._core.files import write_atomically

__all__ = ["RECORD_FIELDS", "Study", "fit_order", "order_entry", "order_key"]

RECORD_FIELDS = (
    "solver", "kind", "library", "declared_order", "budget", "steps", "rejected", "h", "nfe",
    "time_min", "time_median", "error", "below_floor", "mean_error", "moment2_error", "w2",
    "ll_error", "ll_nfe", "grid",
)
"""Keys of every record, in CSV column order. ``kind`` is ``"fixed"``, ``"adaptive"`` or
``"sde"``; ``budget`` is the step count (fixed, sde) or ``rtol = atol`` (adaptive); ``h`` the
step size ``|t1 - t0| / steps`` (None for adaptive); times in seconds; ``error`` the
(strong, for SDE solvers) error at t1, ``below_floor`` True where that error is at or below
the study's floor (``meta["order_floor"]``: what the reference's error, or the round-off of
the study's dtype, could reach; the fitted orders leave such errors out; SDE solvers: floor
0), ``mean_error`` / ``moment2_error`` the errors of the sample mean and second moment,
``w2`` the W2 distance to the data (compare it with ``meta["w2_reference"]``, the
reference's own W2 to the same data: its finite-sample floor), ``ll_error`` the mean
absolute log-likelihood error in nats, ``grid`` the label of the time grid a fixed-step or
SDE solve ran on (``"uniform"``, ``"logsnr"``, ``"edm"``, ``"shift3"``, ``"given"`` or a
label of the user's; None for adaptive solvers, which choose their own steps); None where
not measured."""

_TEXT_FIELDS = ("solver", "kind", "library", "grid")  # read back from CSV as text, always

_PLOTTABLE = ("error", "mean_error", "moment2_error", "w2", "ll_error")


def fit_order(h: Sequence[float], error: Sequence[float | None], *,
              floor: float = 0.0) -> float | None:
    r"""Least-squares slope ``p`` of ``log e = log C + p log h`` over the points with a
    finite error above ``floor`` (DiffEqDevTools' ``𝒪est`` fits successive halvings; a fit
    over all of them is less sensitive to one noisy point). None with fewer than two
    distinct step sizes.

    Example:
        >>> round(fit_order([0.5, 0.25, 0.125], [3 * 0.5**2, 3 * 0.25**2, 3 * 0.125**2]), 12)
        2.0
    """
    pts = [(math.log(a), math.log(e)) for a, e in zip(h, error, strict=True)
           if e is not None and math.isfinite(e) and e > floor and a > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return (sum((p[0] - mx) * (p[1] - my) for p in pts)
            / sum((p[0] - mx) ** 2 for p in pts))


def order_key(solver: str, grid: str | None = None) -> str:
    """The key of a solver's entry in :attr:`Study.orders`: its name on the uniform grid (and
    for adaptive solvers, ``grid=None``), ``"<solver>@<grid>"`` on any other grid.

    Example:
        >>> order_key("rk4"), order_key("rk4", "uniform"), order_key("dpmpp_2m", "logsnr")
        ('rk4', 'rk4', 'dpmpp_2m@logsnr')
    """
    return solver if grid in (None, "uniform") else f"{solver}@{grid}"


def order_entry(records: list[dict], solver: str, kind: str, declared: float | None, *,
                floor: float = 0.0, max_steps: int | None = None,
                grid: str | None = None) -> dict:
    """The ``orders`` entry of one solver on one grid: its declared order, and the order
    fitted by :func:`fit_order` over its records on ``grid`` (None: records on any grid) with
    an error above ``floor`` (and at most ``max_steps`` steps), with the successive
    estimates between neighbouring step sizes."""
    entry = {"kind": kind, "declared": declared, "fitted": None, "points": 0,
             "h_min": None, "h_max": None, "successive": [], "grid": grid}
    if kind == "adaptive":
        return entry
    pts = sorted(((r["h"], r["error"]) for r in records
                  if r["solver"] == solver and (grid is None or r.get("grid") == grid)
                  and r["error"] is not None
                  and r["error"] > floor and (max_steps is None or r["steps"] <= max_steps)),
                 reverse=True)
    fitted = fit_order([p[0] for p in pts], [p[1] for p in pts])
    if fitted is not None:
        entry.update(fitted=fitted, points=len(pts), h_min=pts[-1][0], h_max=pts[0][0],
                     successive=[math.log(a[1] / b[1]) / math.log(a[0] / b[0])
                                 for a, b in zip(pts[:-1], pts[1:], strict=True)])
    return entry


def _atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`flowsolve._core.files.write_atomically`),
    creating its folder: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda file: file.write(data))


def _parse_cell(text: str | None, key: str | None = None):
    if text is None or text == "":  # None: a column the file lacks (an older study)
        return None
    if key in _TEXT_FIELDS:
        return text
    if text in ("True", "False"):  # below_floor
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _fmt(value, time: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * 1e3:.3g}" if time else f"{value:.3g}"
    return str(value)


@dataclass
class Study:
    """What :func:`~flowsolve.studies.compare.compare_solvers` returns.

    Attributes:
        records: one dict per (solver, grid, budget) with the keys of :data:`RECORD_FIELDS`
            (plain ``str`` / ``int`` / ``float`` / ``None`` values).
        orders: per solver and grid, keyed by :func:`order_key` (the solver's name on the
            uniform grid, ``"<solver>@<grid>"`` on another): ``declared`` (the registry's
            order; strong order for SDE solvers), ``fitted`` (least-squares slope of log
            error against log h, None for adaptive solvers or too few points), the
            ``points`` used, their ``h_min`` / ``h_max``, the ``successive`` estimates
            between neighbouring step sizes and the ``grid``.
        meta: how the study was run (reference, dtype, device, batch, repeats, ...).
    """

    records: list[dict]
    orders: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # -- files -------------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the records as CSV (atomically); :meth:`from_csv` reads them back."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RECORD_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records)
        return _atomic_write(path, buf.getvalue().encode())

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> Study:
        """The study of the records written by :meth:`to_csv`: empty cells are None, numbers
        int or float (``solver``, ``kind``, ``library`` and ``grid`` stay text). A column of
        :data:`RECORD_FIELDS` that the file lacks (``grid`` in a file written before grids
        were recorded) is None in every record. A CSV file holds the records only, so
        ``orders`` and ``meta`` are empty; :meth:`to_json` and :meth:`from_json` keep all
        three."""
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        known = (*RECORD_FIELDS, None)  # None: DictReader's key of cells beyond the header
        return cls([{k: _parse_cell(row.get(k), k)
                     for k in (*RECORD_FIELDS, *(k for k in row if k not in known))}
                    for row in rows])

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> list[dict]:
        """Deprecated: ``Study.from_csv(path).records``, the same records (this name warns
        with a DeprecationWarning and will be removed)."""
        warnings.warn("Study.read_csv is deprecated: use Study.from_csv(path).records",
                      DeprecationWarning, stacklevel=2)
        return cls.from_csv(path).records

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write records, orders and meta as JSON (atomically); :meth:`from_json` reads it."""
        doc = {"records": self.records, "orders": self.orders, "meta": self.meta}
        return _atomic_write(path, json.dumps(doc, indent=1).encode())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Study:
        """The study written by :meth:`to_json`: records, orders and meta."""
        with open(path) as f:
            doc = json.load(f)
        return cls(doc["records"], doc.get("orders", {}), doc.get("meta", {}))

    # -- renderings --------------------------------------------------------------------------
    def table(self) -> str:
        """The records and the orders as two Markdown tables (columns that were never
        measured are left out; times in milliseconds; an error at or below the study's floor,
        ``below_floor``, is marked ``*`` and explained under the table; a ``grid`` column
        where some solve ran on another grid than the uniform one)."""
        columns = [("solver", "solver"), ("grid", "grid"), ("budget", "budget"), ("nfe", "NFE"),
                   ("steps", "steps"), ("time_min", "time min (ms)"),
                   ("time_median", "time median (ms)"), ("error", "error"),
                   ("mean_error", "mean err"), ("moment2_error", "2nd-moment err"),
                   ("w2", "W2 to data"), ("ll_error", "loglik err (nats)")]
        columns = [c for c in columns if any(r.get(c[0]) is not None for r in self.records)]
        if all(r.get("grid") in (None, "uniform") for r in self.records):
            columns = [c for c in columns if c[0] != "grid"]  # nothing to tell apart
        lines = ["| " + " | ".join(c[1] for c in columns) + " |",
                 "|" + "---|" * len(columns)]
        keys = [k for k, _ in columns]
        for r in self.records:
            cells = [_fmt(r.get(k), time=k.startswith("time_")) for k in keys]
            if r.get("below_floor") and "error" in keys:
                cells[keys.index("error")] += "*"
            lines.append("| " + " | ".join(cells) + " |")
        if any(r.get("below_floor") for r in self.records):
            floor = self.meta.get("order_floor")
            at = "" if floor is None else f" ({floor:.3g})"
            dtype = self.meta.get("dtype", "the study's dtype")
            lines += ["", f"(*) error at or below the study's floor{at}: the reference's "
                      f"error, or the round-off of {dtype} solves, could be as large; "
                      "left out of the fitted orders."]
        lines += ["", "| solver | declared order | fitted order | points | h range |",
                  "|---|---|---|---|---|"]
        for name, o in self.orders.items():
            h_range = "-" if o.get("h_min") is None else f"{o['h_min']:.3g} .. {o['h_max']:.3g}"
            lines.append(f"| {name} | {_fmt(o.get('declared'))} | {_fmt(o.get('fitted'))} | "
                         f"{o.get('points', 0)} | {h_range} |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, *, metric: str = "error", dpi: int = 120) -> Path:
        """Work-precision plot: ``metric`` against NFE and against median wall time,
        log-log, one line per solver and grid (labelled with its :func:`order_key` and
        fitted order); written atomically in
        the format of ``path``'s suffix (default PNG). Needs matplotlib (Agg canvas; the
        global backend is left alone)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as err:
            raise ImportError("Study.plot needs matplotlib, an optional dependency: "
                              "pip install 'flowsolve[plot]' (or matplotlib)") from err
        if metric not in _PLOTTABLE:
            raise ValueError(f"metric={metric!r}; accepted: {', '.join(_PLOTTABLE)}")
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax_nfe, ax_time = fig.subplots(1, 2)
        drawn = 0
        for solver, grid in dict.fromkeys((r["solver"], r.get("grid")) for r in self.records):
            name = order_key(solver, grid)
            recs = sorted((r for r in self.records if r["solver"] == solver
                           and r.get("grid") == grid
                           and r.get(metric) is not None and r[metric] > 0),
                          key=lambda r: r["nfe"])
            if not recs:
                continue
            fitted = self.orders.get(name, {}).get("fitted")
            label = name if fitted is None else f"{name} (order {fitted:.2f})"
            y = [r[metric] for r in recs]
            ax_nfe.loglog([r["nfe"] for r in recs], y, marker="o", label=label)
            ax_time.loglog([r["time_median"] for r in recs], y, marker="o", label=label)
            drawn += 1
        if not drawn:
            raise ValueError(f"no positive {metric!r} values to plot (was it measured?)")
        ax_nfe.set_xlabel("NFE")
        ax_time.set_xlabel("wall time, median (s)")
        ylabel = metric
        if metric == "error":
            ylabel = f"error at t1 ({self.meta.get('norm', 'rms')}; SDE: strong)"
        for ax in (ax_nfe, ax_time):
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_nfe.legend(fontsize="small")
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        return _atomic_write(path, buf.getvalue())
