"""PNG figures for `mmpt-report`: one per metric, every run overlaid with its name. Needs matplotlib
(`pip install 'mmpt[report]'`); imported only when plotting, with the non-interactive Agg backend."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

from mmpt.tools.run_report import Run, label


class MissingMatplotlib(ImportError):
    """matplotlib is not installed: the CLI prints how to install it."""


def require_matplotlib() -> None:
    """Fail before any work is done when the plots cannot be drawn."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingMatplotlib(
            "mmpt-report draws its plots with matplotlib, which is not installed; "
            "install it with `pip install 'mmpt[report]'` (or `pip install matplotlib`)"
        ) from exc
    matplotlib.use("Agg")  # files only: no display needed (clusters, CI)
    import matplotlib.pyplot as plt

    return plt


def figure_name(key: str) -> str:
    """A file name for a metric key: train/loss -> train_loss.png."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") + ".png"


def short_label(text: str, width: int = 70) -> str:
    """A legend entry of at most two lines of `width` characters (the report's table has the full overrides)."""
    lines = textwrap.wrap(text, width) or [text]
    return "\n".join(lines[:2]) + (" ..." if len(lines) > 2 else "")


def plot_metric(key: str, runs: list[Run], out_dir: Path, dpi: int = 100) -> Path:
    """`key` over steps for every run that logged it; eval metrics (few points) drawn with markers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    marker = "o" if key.startswith("eval/") else None
    for run in runs:
        curve = run.curves.get(key)
        if curve:
            steps, values = zip(*curve)
            ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=short_label(label(run)))
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if key == "train/lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    # below the axes: a long label (many differing overrides) must not squeeze the curves; report.md has them all
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    path = out_dir / figure_name(key)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
