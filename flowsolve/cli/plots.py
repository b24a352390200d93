"""Figures of the ``flowsolve`` command: scatter plots of 2-D point sets side by side, drawn
with matplotlib's Agg canvas (no pyplot, no display, the caller's backend untouched) and
written like every output of the command, through a private temporary file renamed into
place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._core.files import write_atomically

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["FIGURE_SUFFIXES", "have_matplotlib", "scatter_panels"]

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
"""The file types a figure may be written as (by the name's suffix)."""


def have_matplotlib() -> bool:
    """Whether the figures can be drawn (``pip install flowsolve[plot]``)."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def scatter_panels(path: str | Path, panels: Sequence[tuple[str, Tensor]], *,
                   title: str | None = None, overwrite: bool = False) -> Path:
    """One scatter plot a panel, ``(panel title, (N, 2) points)``, side by side on shared
    axes of equal scale; written to ``path`` as its suffix says (png, pdf or svg). Raises
    ImportError without matplotlib and ValueError for points that are not ``(N, 2)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if f".{fmt}" not in FIGURE_SUFFIXES:
        raise ValueError(f"{path}: a figure is written as {', '.join(FIGURE_SUFFIXES)}")
    points = []
    for name, x in panels:
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"panel {name!r}: scatter plots take (N, 2) points; got "
                             f"{tuple(x.shape)}")
        points.append(x.detach().cpu())
    fig = Figure(figsize=(3.3 * len(panels), 3.6 if title else 3.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, _), x in zip(axes, panels, points, strict=True):
        ax.scatter(x[:, 0].tolist(), x[:, 1].tolist(), s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda file: fig.savefig(file, format=fmt, dpi=100),
                     overwrite=overwrite)
    return path
