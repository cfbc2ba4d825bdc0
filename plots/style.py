"""One look for every figure: a colour, marker and label per placement, unit formatters, and saving as PNG + PDF.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: no global
state, no GUI backend, nothing to close.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

logger = logging.getLogger(__name__)

# Okabe–Ito colours: distinguishable with the common colour-vision deficiencies, and in greyscale by marker.
COLORS = {"hpc": "#7f7f7f", "centralized": "#cc79a7", "petals": "#e69f00", "swarm": "#0072b2", "hybrid": "#009e73"}
MARKERS = {"hpc": "s", "centralized": "D", "petals": "^", "swarm": "v", "hybrid": "o"}
LABELS = {"hpc": "HPC (local load)", "centralized": "centralized (NDIF-like)", "petals": "Petals 2.2",
          "swarm": "swarm (client-side graph)", "hybrid": "hybrid (ours)"}
ORDER = ("hpc", "centralized", "petals", "swarm", "hybrid")
"""Placement order of every legend and bar group."""
WORKLOAD_LABELS = {"remote_inference": "plain remote inference", "patching": "activation patching",
                   "ioi_patching": "IOI patching",
                   "attribution_patching": "IOI attribution patching", "logit_lens": "all-layer logit lens",
                   "steering_generation": "steering-vector generation", "setup_time": "setup",
                   "patching_vs_size": "activation patching", "concurrency": "concurrent users"}

RC = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "axes.spines.top": False,
    "axes.spines.right": False, "lines.linewidth": 1.5, "lines.markersize": 5, "errorbar.capsize": 3,
    "pdf.fonttype": 42,
}
BAND_ALPHA = 0.2
PNG_DPI = 150


def styled(draw):
    """Decorator: run a figure function inside the house rcParams (they are read when artists are created)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return draw(*args, **kwargs)

    return wrapper


def new_figure(ncols: int = 1, width_in: float = 3.6, height_in: float = 2.8) -> tuple[Figure, list]:
    """A figure with ``ncols`` side-by-side axes (call it inside a :func:`styled` function).

    Returns:
        ``(figure, [axes, ...])``.
    """
    fig = Figure(figsize=(width_in * ncols, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def legend_below(fig: Figure, title: str) -> bool:
    """One legend for the whole figure, under the axes (bars and bands stay uncovered); placements in house order,
    each once even when several panels draw it. Returns whether there was anything to put in it."""
    seen: dict[str, object] = {}
    for ax in fig.axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(text, handle)
    if seen:
        columns = max(1, min(len(seen), 3, int(fig.get_figwidth() / 2.1)))
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=columns,
                   title=title, frameon=False)
    return bool(seen)


def label(placement: str) -> str:
    """Legend label of a placement (its own name if unknown)."""
    return LABELS.get(placement, placement)


def color(placement: str) -> str:
    return COLORS.get(placement, "#000000")


def human_bytes(value: float, _pos=None) -> str:
    """``1234567`` → ``"1.2 MB"`` (decimal units, as link speeds are quoted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def human_count(value: float, _pos=None) -> str:
    """``135e6`` → ``"135M"``: parameter counts on an axis."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


BYTES_FORMATTER = FuncFormatter(human_bytes)


class LogLabels(LogFormatter):
    """Log-axis tick labels in plain or human units (``0.3``, ``2``, ``135M``) instead of ``3×10⁻¹``, labelling
    minor ticks only when the axis spans about a decade or less (matplotlib's thinning)."""

    def __init__(self, text=lambda value: f"{value:g}", minor: bool = False):
        super().__init__(labelOnlyBase=not minor)
        self.text = text

    def __call__(self, value, pos=None):
        return self.text(value) if super().__call__(value, pos) else ""


def log_labels(axis, text=lambda value: f"{value:g}") -> None:
    """Put :class:`LogLabels` on the major and minor ticks of a log ``axis`` (``ax.xaxis`` / ``ax.yaxis``)."""
    axis.set_major_formatter(LogLabels(text))
    axis.set_minor_formatter(LogLabels(text, minor=True))


def link_text(link: dict | None) -> str:
    """``{"bandwidth_Bps": 6e7, "latency_s": 0.02}`` → ``"60 MB/s, 20 ms"``; None → ``"unshaped loopback"``."""
    if link is None:
        return "unshaped loopback"
    return f"{human_bytes(link['bandwidth_Bps'])}/s, {link['latency_s'] * 1e3:.3g} ms"


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """Write ``<out_dir>/<name>.png`` and ``.pdf`` (creating ``out_dir``); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    with matplotlib.rc_context(RC):
        fig.savefig(paths[0], dpi=PNG_DPI)
        fig.savefig(paths[1], metadata={"CreationDate": None})
    logger.info("wrote %s", ", ".join(map(str, paths)))
    return paths
