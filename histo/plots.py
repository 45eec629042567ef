"""Figures of a cohort: every mouse a dot, groups side by side at each day post infection.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state, no display), so
they can be drawn in a worker, a test or a napari dock widget alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .cohort import METRICS

#: Colour of each group: controls grey, infected a warm red; others from a fixed cycle.
_CONTROL_COLOUR = "#8c8c8c"
_CYCLE = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
_CLASS_COLOURS = {"single": "#4c9be8", "cluster": "#f2a541", "focus": "#d1495b"}


def group_colours(groups, control: str) -> dict[str, str]:
    """A colour per group name (the control grey)."""
    others = [g for g in sorted(map(str, groups)) if g != control]
    out = {g: _CYCLE[i % len(_CYCLE)] for i, g in enumerate(others)}
    out[control] = _CONTROL_COLOUR
    return out


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def metric_figure(
    mice: pd.DataFrame,
    metric: str,
    *,
    control: str,
    stats: pd.DataFrame | None = None,
    ax=None,
):
    """Box plot of `metric` per dpi and group, every mouse a dot, Mann–Whitney p above.

    Parameters
    ----------
    mice : pandas.DataFrame
        From `histo.cohort.aggregate_mice`.
    metric : str
        A column of `mice` (see `histo.cohort.METRICS`).
    control : str
        The control group (drawn first, in grey).
    stats : pandas.DataFrame, optional
        From `histo.cohort.compare_groups`; adds the p-value of each comparison.
    ax : matplotlib Axes, optional
        Draw here instead of on a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(1.8 + 1.4 * mice["dpi"].nunique(), 3.6), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    groups = [control] + sorted(set(map(str, mice["group"])) - {control})
    colours = group_colours(groups, control)
    dpis = sorted(mice["dpi"].unique())
    width = 0.8 / len(groups)
    rng = np.random.default_rng(0)  # jitter of the dots, the same every time
    top = np.nanmax(mice[metric].to_numpy(float)) if mice[metric].notna().any() else 1.0
    for i, dpi in enumerate(dpis):
        for j, g in enumerate(groups):
            v = mice.loc[(mice["dpi"] == dpi) & (mice["group"] == g), metric].dropna()
            x = i + (j - (len(groups) - 1) / 2) * width
            if len(v) == 0:
                continue
            ax.boxplot(
                v,
                positions=[x],
                widths=width * 0.8,
                showfliers=False,
                patch_artist=True,
                boxprops={"facecolor": colours[g], "alpha": 0.35, "edgecolor": colours[g]},
                medianprops={"color": colours[g], "linewidth": 2},
                whiskerprops={"color": colours[g]},
                capprops={"color": colours[g]},
            )
            jitter = rng.uniform(-0.18, 0.18, len(v)) * width
            ax.scatter(
                x + jitter, v, s=22, color=colours[g], edgecolor="black", linewidth=0.5, zorder=3
            )
        if stats is not None and len(stats):
            row = stats[(stats["metric"] == metric) & (stats["dpi"] == dpi)]
            for _, r in row.iterrows():
                ax.text(
                    i,
                    top * 1.06,
                    f"{_stars(r['p_mannwhitney'])}\np={r['p_mannwhitney']:.2g}",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(range(len(dpis)), [f"{d:g}" for d in dpis])
    ax.set_xlabel("days post infection")
    ax.set_ylabel(METRICS.get(metric, metric))
    ax.set_ylim(bottom=0, top=top * 1.3 if top > 0 else 1)
    ax.spines[["top", "right"]].set_visible(False)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(facecolor=colours[g], alpha=0.6, label=g) for g in groups],
        frameon=False,
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    return fig


def composition_figure(mice: pd.DataFrame, *, control: str, ax=None):
    """Where the HER2+ cells are: fraction in single cells, clusters and foci, per group and dpi.

    Fractions are the mean over the mice of each group (each mouse counts once).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(
            figsize=(1.5 + 0.9 * mice.groupby(["dpi", "group"]).ngroups, 3.6), layout="constrained"
        )
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    groups = [control] + sorted(set(map(str, mice["group"])) - {control})
    cols = [f"cells_in_{c}" for c in _CLASS_COLOURS]
    total = mice[cols].sum(axis=1).where(lambda s: s > 0)
    frac = mice[cols].div(total, axis=0)
    frac[["dpi", "group"]] = mice[["dpi", "group"]]
    labels, x = [], 0
    for dpi in sorted(mice["dpi"].unique()):
        for g in groups:
            f = frac[(frac["dpi"] == dpi) & (frac["group"] == g)][cols].mean()
            if f.isna().all():
                continue
            bottom = 0.0
            for c, (cls, colour) in zip(cols, _CLASS_COLOURS.items(), strict=True):
                ax.bar(
                    x, f[c], bottom=bottom, color=colour, width=0.75, label=cls if x == 0 else None
                )
                bottom += f[c]
            labels.append(f"{g}\n{dpi:g} dpi")
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("fraction of HER2+ cells")
    ax.set_ylim(0, 1)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


#: The figures of a report: file stem -> metric (or "composition").
REPORT_FIGURES = {
    "her2_cells_per_mm2": "her2_cells_per_mm2",
    "dormant_per_mm2": "dormant_per_mm2",
    "focus_per_mm2": "focus_per_mm2",
    "ki67_fraction": "ki67_fraction",
    "lesion_composition": "composition",
}


def save_figure(fig, stem: str | os.PathLike, formats=("png", "svg"), dpi: int = 150) -> list[Path]:
    """Save a figure as ``stem.png`` and ``stem.svg`` atomically; returns the paths."""
    from .atomic import atomic_path

    out = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        out.append(path)
    return out


def cohort_figures(mice: pd.DataFrame, stats: pd.DataFrame, control: str) -> dict:
    """Every figure of the report, as ``{stem: Figure}`` (metrics without data are skipped)."""
    figs = {}
    for stem, what in REPORT_FIGURES.items():
        if what == "composition":
            figs[stem] = composition_figure(mice, control=control)
        elif what in mice.columns and mice[what].notna().any():
            figs[stem] = metric_figure(mice, what, control=control, stats=stats)
    return figs
