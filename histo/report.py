"""The cohort report: tidy tables, figures and one self-contained HTML page.

`write_report` writes a `histo.cohort.CohortResult` to a folder::

    REPORT/
      report.html            everything below in one file (figures embedded), opens offline
      sections.csv           one row per slide (+ .parquet when pyarrow is installed)
      mice.csv               one row per mouse: totals and densities per mm²
      stats.csv              infected vs control at each dpi (mouse = unit)
      trend.csv              Kruskal–Wallis across time points, per group
      provenance.json        versions, model SHA-256, parameters, input checksums
      figures/*.png, *.svg   box plots (every mouse a dot) and lesion composition

Every table carries the provenance: the slides' input SHA-256 (sections, mice), the software
version, model SHA-256 and the hash of the parameters (whose full text is in provenance.json).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._version import __version__
from .atomic import atomic_path, write_csv, write_json
from .cohort import METRICS, CohortResult, analyze_cohort


def run_cohort(
    samples: str | os.PathLike,
    results_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    control: str | None = None,
    n_boot: int = 5000,
    seed: int = 0,
    repair_journals: bool = False,
) -> tuple[CohortResult, Path]:
    """Analyse a study and write its report: `histo.cohort.analyze_cohort` + `write_report`.

    Returns
    -------
    result : CohortResult
    report : Path
        The HTML report.
    """
    result = analyze_cohort(
        samples,
        results_dir,
        control=control,
        n_boot=n_boot,
        seed=seed,
        repair_journals=repair_journals,
    )
    return result, write_report(result, out_dir)


def _stamp(df: pd.DataFrame, result: CohortResult) -> pd.DataFrame:
    """Add the provenance columns a table lacks (version, model, parameters)."""
    from .cohort import parameters_sha256

    prov = result.provenance
    df = df.copy()
    if "lungmets_version" not in df.columns:
        df["lungmets_version"] = ";".join(prov.get("analysis_versions", [])) or __version__
    if "model_sha256" not in df.columns:
        df["model_sha256"] = ";".join(prov.get("model_sha256", []))
    if "parameters_sha256" not in df.columns:
        df["parameters_sha256"] = ";".join(
            sorted(parameters_sha256(p) for p in prov.get("parameters", {}).values())
        )
    return df


def write_tables(result: CohortResult, out_dir: str | os.PathLike) -> list[Path]:
    """Write sections, mice, stats and trend as CSV (and Parquet if pyarrow is present)."""
    out_dir = Path(out_dir)
    tables = {
        "sections": result.sections.drop(columns=["line"], errors="ignore"),
        "mice": result.mice,
        "stats": result.stats,
        "trend": result.trend,
    }
    try:
        import pyarrow  # noqa: F401

        parquet = True
    except ImportError:
        parquet = False
    paths = []
    for name, df in tables.items():
        df = _stamp(df, result)
        paths.append(write_csv(df, out_dir / f"{name}.csv", float_format="%.6g"))
        if parquet:
            with atomic_path(out_dir / f"{name}.parquet") as tmp:
                df.to_parquet(tmp, index=False)
            paths.append(out_dir / f"{name}.parquet")
    return paths


def write_report(result: CohortResult, out_dir: str | os.PathLike) -> Path:
    """Write the tables, figures, provenance and ``report.html`` to `out_dir`.

    Returns
    -------
    Path
        The HTML report. It is written last: a report folder with ``report.html`` is complete.
    """
    from .plots import cohort_figures, save_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.html"
    if report.exists():  # an old report must not vouch for half-rewritten tables
        report.unlink()
    write_tables(result, out_dir)
    write_json(result.provenance | {"warnings": result.warnings}, out_dir / "provenance.json")
    figs = cohort_figures(result.mice, result.stats, result.control)
    pngs = {}
    for stem, fig in figs.items():
        save_figure(fig, out_dir / "figures" / stem)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        pngs[stem] = base64.b64encode(buf.getvalue()).decode()
    with atomic_path(report) as tmp:
        tmp.write_text(render_html(result, pngs), encoding="utf-8")
    return report


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.muted { color: #666; font-size: 0.9em; }
.headline { background: #f4f7fb; border-left: 4px solid #1f77b4; padding: 0.6em 1em; }
.warn { background: #fff6e5; border-left: 4px solid #f2a541; padding: 0.5em 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 420px; }
code, pre { background: #f6f6f6; font-size: 0.85em; }
"""


def _table(df: pd.DataFrame, columns=None, floats: str = "{:.3g}") -> str:
    df = df if columns is None else df[[c for c in columns if c in df.columns]]

    def fmt(v):
        if isinstance(v, float | np.floating):
            return "" if not np.isfinite(v) else floats.format(v)
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


_CAPTIONS = {
    "her2_cells_per_mm2": "HER2+ cancer cells per mm² of lung tissue, all sections of a mouse "
    "pooled. Box: quartiles; dots: mice. Above: two-sided Mann–Whitney U p-value.",
    "dormant_per_mm2": "Dormant cells (single HER2+ cells, Ki67−) per mm².",
    "focus_per_mm2": "Foci (≥5 HER2+ cells) per mm².",
    "ki67_fraction": "Fraction of HER2+ cells with a Ki67+ nucleus.",
    "lesion_composition": "Where the HER2+ cells are: fraction in single cells, clusters (2–4) "
    "and foci (≥5); mean over the mice of each group.",
}


def render_html(result: CohortResult, pngs: dict[str, str]) -> str:
    """The report as one HTML string (figures embedded as PNG data URIs)."""
    prov = result.provenance
    mice, stats = result.mice, result.stats
    groups = ", ".join(
        f"{g}: {n} mice" for g, n in mice.groupby("group")["mouse"].nunique().items()
    )
    dpis = ", ".join(f"{d:g}" for d in sorted(mice["dpi"].unique()))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<title>lungmets cohort report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>lungmets cohort report</h1>",
        f"<p class='muted'>{len(result.sections)} sections from {mice['mouse'].nunique()} mice "
        f"({html.escape(groups)}) at {dpis} days post infection. Control group: "
        f"<b>{html.escape(result.control)}</b>. Unit of statistics: the mouse (sections "
        f"pooled). lungmets {__version__}. Counts as reviewed by hand where a section was "
        f"({html.escape(result.review_line().removeprefix('review: '))}).</p>",
        "<h2>Did infection wake the dormant cells?</h2><div class='headline'><ul>",
    ]
    for metric in ("her2_cells_per_mm2", "dormant_per_mm2", "focus_per_mm2"):
        for line in result.headline(metric):
            parts.append(f"<li>{html.escape(line)}</li>")
    parts.append("</ul></div>")
    if result.warnings:
        parts.append("<div class='warn'><b>Warnings</b><ul>")
        parts += [f"<li>{html.escape(w)}</li>" for w in result.warnings]
        parts.append("</ul></div>")
    parts.append("<h2>Figures</h2>")
    for stem, b64 in pngs.items():
        parts.append(
            f"<figure><img src='data:image/png;base64,{b64}' alt='{stem}'>"
            f"<figcaption>{html.escape(_CAPTIONS.get(stem, stem))} "
            f"(figures/{stem}.png, .svg)</figcaption></figure>"
        )
    parts.append("<h2>Infected vs control, by time point</h2>")
    parts.append(
        "<p class='muted'>Fold change: ratio of group means, 95% percentile bootstrap interval "
        "(mice resampled within groups). p-values: two-sided Mann–Whitney U and Welch's t-test; "
        "_holm: Holm-adjusted over the time points of each measure.</p>"
    )
    if len(stats):
        show = stats.assign(measure=stats["metric"].map(METRICS).fillna(stats["metric"]))
        parts.append(
            _table(
                show,
                [
                    "measure",
                    "dpi",
                    "group",
                    "n",
                    "n_control",
                    "mean",
                    "mean_control",
                    "fold_change",
                    "fold_change_ci_low",
                    "fold_change_ci_high",
                    "p_mannwhitney",
                    "p_welch",
                    "p_mannwhitney_holm",
                ],
            )
        )
    parts.append("<h2>Across time points</h2>")
    parts.append(
        "<p class='muted'>Kruskal–Wallis test of each group's mice across the days post "
        "infection.</p>"
    )
    if len(result.trend):
        parts.append(_table(result.trend))
    parts.append("<h2>Mice</h2>")
    parts.append(
        _table(
            mice,
            [
                "mouse",
                "group",
                "dpi",
                "n_sections",
                "tissue_area_mm2",
                "her2_cells",
                "her2_cells_per_mm2",
                "single",
                "cluster",
                "focus",
                "dormant",
                "dormant_per_mm2",
                "ki67_fraction",
            ],
        )
    )
    parts.append("<h2>Sections</h2>")
    parts.append(
        _table(
            result.sections,
            [
                "slide",
                "mouse",
                "group",
                "dpi",
                "section",
                "tissue_area_mm2",
                "her2_cells",
                "single",
                "cluster",
                "focus",
                "dormant",
                "ki67_pos_cells",
            ],
        )
    )
    parts.append("<h2>Provenance</h2>")
    parts.append(
        "<p class='muted'>Sample sheet: "
        f"{html.escape(str(prov.get('samples')))} "
        f"(SHA-256 {prov.get('samples_sha256', '')[:16]}…); "
        f"results: {html.escape(str(prov.get('results')))}; analysed with lungmets "
        f"{html.escape(', '.join(prov.get('analysis_versions', [])))}, method "
        f"{html.escape(', '.join(prov.get('methods', [])))}, model SHA-256 "
        f"{html.escape(', '.join(m[:16] + '…' for m in prov.get('model_sha256', [])) or 'none')}. "
        "Every input's SHA-256 is in sections.csv and provenance.json.</p>"
    )
    for key, params in prov.get("parameters", {}).items():
        parts.append(
            f"<details><summary>Parameters {key[:16]}…</summary><pre>"
            + html.escape("\n".join(f"{k} = {v}" for k, v in params.items()))
            + "</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
