"""Charts of benchmark results, drawn into PNG files with matplotlib.

A script describes its chart as data: a ``Chart`` of side-by-side ``Panel``s, each of labelled
``Series``. What a figure shows is then testable without matplotlib, and the drawing is done
here, once. matplotlib is an optional dependency (the ``bench`` extra): it is imported only
when a chart is drawn, and always with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
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


def wide(values: Sequence[float | None]) -> bool:
    """Whether positive ``values`` span more than 20x, where a log axis keeps the small ones
    visible (and is sure to hold a power of ten to label)."""
    kept = [v for v in values if v is not None and v > 0]
    return bool(kept) and max(kept) > 20 * min(kept)


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

    # A Figure on an Agg canvas, not pyplot: no global state, no display needed.
    figure = Figure(figsize=(PANEL_SIZE_IN[0] * len(chart.panels), PANEL_SIZE_IN[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(chart.title)
    for ax, panel in zip(figure.subplots(1, len(chart.panels), squeeze=False)[0], chart.panels, strict=True):
        _draw_panel(ax, panel)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return figure


def _draw_panel(ax: Axes, panel: Panel) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    for s in panel.series:
        if panel.style == "step":
            ax.step(s.x, s.y, where="post", label=s.label)
        else:
            ax.plot(s.x, s.y, marker="o", label=s.label)
    ax.set_title(panel.title, fontsize="medium")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    for log, axis, set_scale, values in (
        (panel.logx, ax.xaxis, ax.set_xscale, [x for s in panel.series for x in s.x]),
        (panel.logy, ax.yaxis, ax.set_yscale, [y for s in panel.series for y in s.y]),
    ):
        if log:
            set_scale("log")
            # Plain numbers (1,000, not 10^3); between powers of ten, the 2s and 5s, unless the
            # axis spans so many decades that they would crowd.
            axis.set_major_formatter(FuncFormatter(_plain))
            axis.set_minor_formatter(FuncFormatter(_two_and_five) if _decades(values) <= 3 else NullFormatter())
    if panel.xticks is not None:
        ax.set_xticks(panel.xticks, labels=[f"{t:g}" for t in panel.xticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="major", alpha=0.3)
    if len(panel.series) > 1:
        ax.legend(fontsize="small")


def _plain(value: float, _position: object = None) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _two_and_five(value: float, _position: object = None) -> str:
    leading = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return _plain(value) if leading in (2, 5) else ""


def _decades(values: Sequence[float]) -> float:
    kept = [v for v in values if v > 0]
    return math.log10(max(kept) / min(kept)) if kept else 0.0
