"""Charts of benchmark results, drawn into PNG files with matplotlib.

A script describes its chart as data: a ``Chart`` of side-by-side ``Panel``s, each of labelled
``Series``. What a figure shows is then testable without matplotlib, and the drawing is done
here, once. matplotlib is an optional dependency (the ``bench`` extra): it is imported only
when a chart is drawn, and always with the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANEL_SIZE_IN = (5.5, 4.2)  # width, height of one panel
DPI = 100


@dataclass(frozen=True)
class Series:
    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    style: Literal["line", "step"] = "line"  # step: a distribution function
    logx: bool = False
    logy: bool = False
    xticks: tuple[float, ...] | None = None  # None: matplotlib's; else these, labelled as numbers


@dataclass(frozen=True)
class Chart:
    title: str
    panels: tuple[Panel, ...]

    @property
    def size_px(self) -> tuple[int, int]:
        """Width and height of the PNG."""
        return round(PANEL_SIZE_IN[0] * len(self.panels) * DPI), round(PANEL_SIZE_IN[1] * DPI)


def series(label: str, points: Sequence[tuple[float, float | None]]) -> Series:
    """A series of the (x, y) points that have a y: a run without a figure leaves a gap, not a zero."""
    kept = [(x, y) for x, y in points if y is not None]
    return Series(label, tuple(x for x, _ in kept), tuple(y for _, y in kept))


def cdf(label: str, samples: Sequence[float]) -> Series:
    """The empirical distribution function of ``samples``: the fraction at or below each."""
    ordered = sorted(samples)
    return Series(label, tuple(ordered), tuple((i + 1) / len(ordered) for i in range(len(ordered))))


def render(chart: Chart, path: Path) -> Figure:
    """Draw ``chart`` into a PNG at ``path`` and return the figure. Raises ImportError without
    matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    # A Figure on an Agg canvas, not pyplot: no global state, no display needed.
    figure = Figure(figsize=(PANEL_SIZE_IN[0] * len(chart.panels), PANEL_SIZE_IN[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(chart.title)
    for ax, panel in zip(figure.subplots(1, len(chart.panels), squeeze=False)[0], chart.panels, strict=True):
        for s in panel.series:
            if panel.style == "step":
                ax.step(s.x, s.y, where="post", label=s.label)
            else:
                ax.plot(s.x, s.y, marker="o", label=s.label)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.logx:
            ax.set_xscale("log")
        if panel.logy:
            ax.set_yscale("log")
        if panel.xticks is not None:
            ax.set_xticks(panel.xticks, labels=[f"{t:g}" for t in panel.xticks])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="major", alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return figure
