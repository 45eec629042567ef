"""A study as a whole: sample sheet, sections -> mice -> groups, and the statistics.

The mouse, not the cell or the section, is the unit of statistics: the sections of one lung are
added up (cells, lesions, tissue area) into one row per mouse, and infected and control mice are
compared at each day post infection (dpi).

Example
-------
>>> from histo.cohort import analyze_cohort  # doctest: +SKIP
>>> result = analyze_cohort("samples.csv", "results/")  # doctest: +SKIP
>>> result.stats.query("metric == 'her2_cells_per_mm2'")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .review import JOURNAL, ReviewSession, repair_journal

log = logging.getLogger(__name__)

SHEET_COLUMNS = ("slide", "mouse", "group", "dpi", "section")

#: Names that mark the control group when ``control`` is not given.
CONTROL_NAMES = ("PBS", "CONTROL", "MOCK", "SALINE", "CTRL", "VEHICLE")

#: Counts summed over the sections of a mouse (as `histo.review.reviewed_counts` gives them).
COUNTS = (
    "her2_cells",
    "lesions",
    "single",
    "cluster",
    "focus",
    "dormant",
    "ki67_pos_cells",
    "cells_in_single",
    "cells_in_cluster",
    "cells_in_focus",
)
#: Columns a section row carries about how it was analysed.
PROVENANCE_COLUMNS = (
    "method",
    "input_sha256",
    "lungmets_version",
    "model_sha256",
    "parameters_sha256",
)

#: Mouse-level measures compared between groups, with the label used in tables and plots.
METRICS = {
    "her2_cells_per_mm2": "HER2+ cells per mm² of lung",
    "dormant_per_mm2": "dormant single cells per mm²",
    "single_per_mm2": "single HER2+ cells per mm²",
    "cluster_per_mm2": "clusters (2–4 cells) per mm²",
    "focus_per_mm2": "foci (≥5 cells) per mm²",
    "ki67_fraction": "Ki67+ fraction of HER2+ cells",
    "her2_cells": "HER2+ cells (all sections)",
}


@dataclass
class CohortResult:
    """Everything `analyze_cohort` computes.

    Attributes
    ----------
    sections : pandas.DataFrame
        One row per slide: the sample sheet's columns, the slide's counts, tissue area and
        provenance (input SHA-256, software version, model SHA-256, parameters hash).
    mice : pandas.DataFrame
        One row per mouse: totals over its sections and densities per mm² of tissue.
    stats : pandas.DataFrame
        One row per (metric, dpi, treated group): group sizes, means, medians, fold change with
        its bootstrap confidence interval, Mann–Whitney U and Welch's t-test p-values (raw and
        Holm-adjusted over the time points of the metric).
    trend : pandas.DataFrame
        One row per (metric, group): Kruskal–Wallis test across time points.
    control : str
        The control group.
    warnings : list of str
    provenance : dict
        Versions, models, parameters and input checksums of the slides' analyses.
    """

    sections: pd.DataFrame
    mice: pd.DataFrame
    stats: pd.DataFrame
    trend: pd.DataFrame
    control: str
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def review_line(self) -> str:
        """How much of the study was reviewed by hand, in one sentence."""
        s = self.sections
        if len(s) == 0 or "reviewed_corrections" not in s:
            return "review: no sections"
        corrections = s["reviewed_corrections"].fillna(0).astype(int)
        cells = s.get("reviewed_cell_edits", pd.Series(0, index=s.index)).fillna(0).astype(int)
        added = s.get("reviewed_cells_added", pd.Series(0, index=s.index)).fillna(0).astype(int)
        deleted = s.get("reviewed_cells_deleted", pd.Series(0, index=s.index)).fillna(0)
        return (
            f"review: {int((corrections > 0).sum())} of {len(s)} sections reviewed "
            f"({int(corrections.sum())} corrections; {int(added.sum())} cells added, "
            f"{int(deleted.sum())} deleted, {int(cells.sum() - added.sum() - deleted.sum())} "
            "Ki67 calls changed by hand)"
        )

    def headline(self, metric: str = "her2_cells_per_mm2") -> list[str]:
        """One sentence per time point: the fold change and its p-value for `metric`."""
        out = []
        if len(self.stats) == 0:
            return out
        rows = self.stats[self.stats["metric"] == metric]
        for r in rows.itertuples():
            if not np.isfinite(r.fold_change):
                fc = "fold change undefined (control mean 0)"
            else:
                lo, hi = r.fold_change_ci_low, r.fold_change_ci_high
                fc = f"{r.fold_change:.2f}x (95% CI {lo:.2f}–{hi:.2f})"
            out.append(
                f"dpi {r.dpi:g}: {r.group} vs {self.control}, {METRICS.get(metric, metric)}: "
                f"{r.mean:.3g} vs {r.mean_control:.3g}, {fc}, "
                f"Mann–Whitney p = {r.p_mannwhitney:.3g} (n = {r.n} vs {r.n_control} mice)"
            )
        return out


# --------------------------------------------------------------------------- sample sheet


def read_sample_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a sample sheet (columns slide, mouse, group, dpi, section).

    Extra columns are kept as covariates. Every problem is reported at once, with the line
    numbers of the file (the header is line 1).

    Parameters
    ----------
    path : path-like
        A CSV file (or tab-separated, ``.tsv``).

    Returns
    -------
    pandas.DataFrame
        The sheet, with ``dpi`` as float, ``section`` as int, and a ``line`` column.

    Raises
    ------
    InputError
        If the file is missing or unreadable, a column is missing, or rows are wrong (missing
        values, non-numeric dpi or section, duplicated slides or sections, a mouse in two
        groups or at two time points).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: sample sheet not found; give the path of a CSV file")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        sheet = pd.read_csv(path, sep=sep, dtype=str, skipinitialspace=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot read the sample sheet as CSV ({exc})") from None
    sheet.columns = [str(c).strip() for c in sheet.columns]
    lower = {c.lower(): c for c in sheet.columns}
    sheet = sheet.rename(columns={lower[c]: c for c in SHEET_COLUMNS if c in lower})
    missing = [c for c in SHEET_COLUMNS if c not in sheet.columns]
    if missing:
        raise InputError(
            f"{path}: the sample sheet lacks the column(s) {', '.join(missing)}; it needs "
            f"{', '.join(SHEET_COLUMNS)} (extra columns are kept as covariates); found "
            f"{', '.join(sheet.columns) or 'none'}"
        )
    if len(sheet) == 0:
        raise InputError(f"{path}: the sample sheet has no rows")
    sheet = sheet.apply(lambda c: c.str.strip() if c.dtype == object else c)
    sheet.insert(0, "line", np.arange(2, len(sheet) + 2))
    problems: list[str] = []
    for c in SHEET_COLUMNS:
        for line in sheet.loc[sheet[c].isna() | (sheet[c] == ""), "line"]:
            problems.append(f"line {line}: empty {c}")
    dpi = pd.to_numeric(sheet["dpi"], errors="coerce")
    for line, text in sheet.loc[dpi.isna() & sheet["dpi"].notna(), ["line", "dpi"]].values:
        problems.append(f"line {line}: dpi {text!r} is not a number (days post infection)")
    section = pd.to_numeric(sheet["section"], errors="coerce")
    bad_section = section.isna() | (section != section.round())
    for line, text in sheet.loc[bad_section & sheet["section"].notna(), ["line", "section"]].values:
        problems.append(f"line {line}: section {text!r} is not a whole number")
    dup = sheet["slide"].notna() & sheet.duplicated("slide", keep=False)
    for slide, rows in sheet[dup].groupby("slide")["line"]:
        problems.append(f"lines {', '.join(map(str, rows))}: slide {slide!r} is listed twice")
    ok = sheet["mouse"].notna()
    dup = ok & section.notna() & sheet.assign(_s=section).duplicated(["mouse", "_s"], keep=False)
    for (mouse, sec), rows in sheet[dup].assign(_s=section[dup]).groupby(["mouse", "_s"])["line"]:
        problems.append(
            f"lines {', '.join(map(str, rows))}: mouse {mouse!r} has section {sec:g} twice"
        )
    for mouse, rows in sheet[ok].assign(_d=dpi).groupby("mouse"):
        for col in ("group", "_d"):
            values = rows[col].dropna().unique()
            if len(values) > 1:
                name = "dpi" if col == "_d" else "group"
                problems.append(
                    f"lines {', '.join(map(str, rows['line']))}: mouse {mouse!r} is in more than "
                    f"one {name} ({', '.join(str(v) for v in values)}); a mouse has one group "
                    "and one time point (name mice uniquely, e.g. IAV-d15-m1)"
                )
    if problems:
        raise InputError(
            f"{path}: {len(problems)} problem(s) in the sample sheet:\n  " + "\n  ".join(problems)
        )
    sheet["dpi"] = dpi.astype(float)
    sheet["section"] = section.astype(int)
    return sheet


def resolve_slides(sheet: pd.DataFrame, sheet_path: str | os.PathLike) -> list[Path]:
    """Slide paths of a sample sheet: relative paths are taken from the sheet's folder.

    Raises
    ------
    InputError
        Listing every slide that does not exist.
    """
    base = Path(sheet_path).parent
    paths = [p if p.is_absolute() else base / p for p in map(Path, sheet["slide"])]
    missing = [
        f"line {line}: {p}" for line, p in zip(sheet["line"], paths, strict=True) if not p.exists()
    ]
    if missing:
        raise InputError(
            f"{sheet_path}: {len(missing)} slide(s) of the sample sheet not found "
            "(paths are relative to the sheet's folder):\n  " + "\n  ".join(missing)
        )
    return paths


# --------------------------------------------------------------------------- results


def load_sections(
    sheet: pd.DataFrame,
    results_dir: str | os.PathLike,
    sheet_path: str | os.PathLike = "",
    *,
    repair_journals: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """Join each row of the sample sheet with its slide's results.

    Parameters
    ----------
    sheet : pandas.DataFrame
        From `read_sample_sheet`.
    results_dir : path-like
        The ``--out`` folder of ``lungmets run``: one folder per slide with ``summary.json`` and
        ``lesions.csv``.
    repair_journals : bool
        Drop the lines of review journals that are not corrections (`histo.review.
        repair_journal`, which keeps a backup) instead of refusing those slides; each repair
        is a warning.

    Returns
    -------
    sections : pandas.DataFrame
    warnings : list of str

    Raises
    ------
    InputError
        Listing every row whose results are missing or incomplete.
    """
    from .io import slide_name

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputError(
            f"{results_dir}: results folder not found; run 'lungmets run --samples "
            f"{sheet_path or 'samples.csv'} --out {results_dir}' first"
        )
    rows, problems, warnings = [], [], []
    for r in sheet.itertuples(index=False):
        key = slide_name(r.slide)
        folder = results_dir / key
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            why = (
                "its folder has no summary.json (interrupted run?)"
                if folder.is_dir()
                else "no results"
            )
            problems.append(f"line {r.line}: {r.slide}: {why} in {folder}")
            continue
        if repair_journals:
            dropped, backup = repair_journal(folder / JOURNAL)
            if dropped:
                warnings.append(
                    f"{r.slide}: {len(dropped)} line(s) of {folder / JOURNAL} dropped ("
                    + "; ".join(f"line {d.line}: {d.why}" for d in dropped)
                    + f"); the journal as it was is kept as {backup}"
                )
        try:
            summary = json.loads(summary_path.read_text())
            session = ReviewSession(folder)
        except Exception as exc:
            problems.append(f"line {r.line}: {r.slide}: unreadable results in {folder} ({exc})")
            continue
        row = dict(r._asdict())
        # The lesions as reviewed (corrections.jsonl), or as the analysis called them where
        # nobody has reviewed them: one way of counting for both.
        counts = session.counts()
        row["reviewed_corrections"] = session.n_corrections
        edits = session.cell_edit_counts()
        row["reviewed_cell_edits"] = sum(edits.values())
        row["reviewed_cells_added"] = edits["add_cell"]
        row["reviewed_cells_deleted"] = edits["delete_cell"]
        if session.unmatched:
            warnings.append(
                f"{r.slide}: {len(session.unmatched)} review correction(s) match no lesion "
                "of the current results (re-analysed since?); see corrections.jsonl"
            )
        for k in COUNTS:
            v = counts.get(k)
            row[k] = np.nan if v is None else float(v)
        for note in summary.get("fallbacks", []):
            warnings.append(f"{r.slide}: ran otherwise than asked: {note}")
        missing = missing_summary_fields(summary)
        if missing:
            warnings.append(
                f"{r.slide}: {summary_path} lacks {', '.join(missing)} (written by another "
                "version of lungmets, or edited?); this section's provenance columns are "
                "empty there (run the slide again)"
            )
        row["tissue_area_mm2"] = float(summary.get("tissue_area_mm2", np.nan))
        if not np.isfinite(row["tissue_area_mm2"]) or row["tissue_area_mm2"] <= 0:
            warnings.append(
                f"{r.slide}: {summary_path} gives no tissue area; this section has no "
                "densities and its mouse's densities leave it out (run the slide again)"
            )
        ki67 = (summary.get("markers") or {}).get("Ki67") or {}
        thr = ki67.get("threshold") if ki67.get("applied", True) else None
        method = (ki67.get("method") if ki67.get("applied", True) else "detector") if ki67 else None
        if session.reviewed_ki67_threshold is not None:  # set in review (Markers widget)
            thr, method = session.reviewed_ki67_threshold, "user"
        row["ki67_threshold"] = np.nan if thr is None else float(thr)
        row["ki67_threshold_method"] = method
        row["ki67_measure"] = ki67.get("measure", "mean") if ki67 else None
        # The same threshold relative to the slide's own negative nuclei: exposure differs
        # between slides, where a threshold sits above the negatives should not.
        neg = ki67.get("negative_median") or (ki67.get("calibrated") or {}).get("negative_median")
        row["ki67_threshold_over_negatives"] = (
            float(thr) / float(neg) if thr is not None and neg else np.nan
        )
        row.update(_provenance_columns(summary))
        row["results"] = str(folder)
        rows.append(row)
    if problems:
        raise InputError(
            f"{results_dir}: results missing for {len(problems)} slide(s) of the sample sheet; "
            "run 'lungmets run --samples SHEET --out RESULTS' (it skips finished slides):\n  "
            + "\n  ".join(problems)
        )
    listed = {slide_name(s) for s in sheet["slide"]}
    extra = sorted(
        p.name
        for p in results_dir.iterdir()
        if (p / "summary.json").is_file() and p.name not in listed
    )
    if extra:
        warnings.append(
            f"{len(extra)} result folder(s) in {results_dir} are not in the sample sheet and were "
            f"left out: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}"
        )
    sections = pd.DataFrame(rows)
    warnings += threshold_warnings(sections)
    for col, what in (
        ("method", "detectors"),
        ("model_sha256", "models"),
        ("parameters_sha256", "parameter sets"),
    ):
        values = sections[col].dropna().unique()
        if len(values) > 1:
            warnings.append(
                f"the slides were analysed with {len(values)} different {what} "
                f"({', '.join(str(v)[:12] for v in values)}); re-run them with one setting "
                "before comparing groups"
            )
    return sections, warnings


#: Slides whose Ki67 threshold is further than this factor from the median of the others are
#: listed (where that makes a difference to their calls: `threshold_warnings`).
THRESHOLD_SPREAD = 2.0


def _calls_changed(section: pd.Series, threshold: float) -> tuple[int, int] | None:
    """(HER2+ cells of a section whose Ki67 call `threshold` would change, its cells), from
    its results' cells.csv in the measure it was called in; None where that cannot be read."""
    measure = section.get("ki67_measure") or "mean"
    path = Path(str(section.get("results"))) / "cells.csv"
    try:
        values = pd.read_csv(path, usecols=[f"ki67_{measure}"]).iloc[:, 0].to_numpy(float)
    except (OSError, ValueError):
        return None
    values = values[np.isfinite(values)]
    now = values >= section["ki67_threshold"]
    return int((now != (values >= threshold)).sum()), len(values)


def threshold_warnings(sections: pd.DataFrame) -> list[str]:
    """Warnings where the slides of one study were called with very different Ki67 thresholds
    or in different ways (calibrated, the user's, the detector's).

    Thresholds are compared relative to each slide's own negative nuclei (exposure differs from
    slide to slide; where the threshold sits above the negatives should not): a slide more
    than `THRESHOLD_SPREAD` x from the median of the other slides is listed when the other
    slides' threshold (that median times its own negatives) would call at least one of its
    HER2+ cells otherwise. A threshold anywhere in the empty gap between a slide's negative
    and positive cells calls them all alike: a gap-wide difference is not one to act on.
    """
    out = []
    if "ki67_threshold" not in sections or not len(sections):
        return out
    rel = "ki67_threshold_over_negatives"
    t = sections[rel if rel in sections else "ki67_threshold"].astype(float)
    ok = (t.notna() & (t > 0)).to_numpy()
    if ok.sum() >= 2:
        v = t.to_numpy()
        # Each slide against the median of the others (with two slides: against each other).
        far, changed = [], []
        for i in np.flatnonzero(ok):
            typical = np.median(v[ok & (np.arange(len(v)) != i)])
            if 1 / THRESHOLD_SPREAD <= v[i] / typical <= THRESHOLD_SPREAD:
                continue
            row = sections.iloc[i]
            n = _calls_changed(row, row["ki67_threshold"] * typical / v[i])
            if n is None or n[0] > 0:
                far.append(i)
                changed.append(n)
        if far:
            rows = sections.iloc[far]
            listed = ", ".join(
                f"{r.slide} ({r.ki67_threshold:.0f} counts, {v[i]:.1f}x its negatives, "
                f"{r.ki67_threshold_method}"
                + (
                    ""
                    if n is None
                    else f"; {n[0]} of its {n[1]} cells called otherwise at the others' threshold"
                )
                + ")"
                for i, r, n in zip(far, rows.itertuples(), changed, strict=True)
            )
            out.append(
                f"Ki67 was called with very different thresholds: {len(far)} slide(s) whose "
                f"threshold over their own negative nuclei is more than {THRESHOLD_SPREAD:g}x "
                f"from the other slides' (median {float(np.median(v[ok])):.1f}x over the "
                f"study): {listed}. Look at them in napari's Markers widget, or give the study "
                "one threshold with 'lungmets rethreshold RESULTS --ki67-threshold COUNTS'"
            )
    methods = sorted({str(m) for m in sections["ki67_threshold_method"].dropna()})
    kinds = {
        "user" if m == "user" else ("detector" if m == "detector" else "auto") for m in methods
    }
    if len(kinds) > 1:
        out.append(
            "Ki67 was called in different ways across the study ("
            + ", ".join(sorted(kinds))
            + "); set one with 'lungmets rethreshold RESULTS --ki67-threshold auto|COUNTS'"
        )
    measures = sorted({str(m) for m in sections.get("ki67_measure", pd.Series()).dropna()})
    if len(measures) > 1:
        out.append(
            "Ki67 was measured in different ways across the study ("
            + ", ".join(measures)
            + "): their thresholds and calls do not compare; analyse the slides again with "
            "one 'lungmets run --ki67-measure'"
        )
    return out


#: What a summary.json must hold for the cohort's provenance columns (dotted paths); a
#: network's run also its model's SHA-256 (see `missing_summary_fields`).
PROVENANCE_FIELDS = ("method", "input.sha256", "software.lungmets", "parameters")


def missing_summary_fields(summary: dict) -> list[str]:
    """The provenance fields (`PROVENANCE_FIELDS`, and ``model.sha256`` for the network's
    runs) that a slide's summary.json lacks or leaves empty."""

    def get(path: str):
        value = summary
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    wanted = [*PROVENANCE_FIELDS, *(["model.sha256"] if summary.get("method") == "unet" else [])]
    return [f for f in wanted if get(f) in (None, "", {})]


def parameters_sha256(parameters: dict) -> str:
    """SHA-256 of analysis parameters, as canonical JSON."""
    text = json.dumps(parameters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _provenance_columns(summary: dict) -> dict:
    model = summary.get("model") or {}
    return {
        "method": summary.get("method"),
        "input_sha256": summary.get("input", {}).get("sha256"),
        "lungmets_version": summary.get("software", {}).get("lungmets"),
        "model_sha256": model.get("sha256"),
        "parameters_sha256": parameters_sha256(summary.get("parameters", {})),
    }


# --------------------------------------------------------------------------- mice


def aggregate_mice(sections: pd.DataFrame) -> pd.DataFrame:
    """Add up the sections of each mouse; densities are totals over total tissue area.

    Parameters
    ----------
    sections : pandas.DataFrame
        From `load_sections` (or any table with mouse, group, dpi, the `COUNTS` columns and
        tissue_area_mm2).

    Returns
    -------
    pandas.DataFrame
        One row per mouse: mouse, group, dpi, n_sections, the summed counts, tissue_area_mm2,
        ``<count>_per_mm2`` densities, ``ki67_fraction`` (Ki67+ / HER2+ cells, NaN without
        Ki67), covariates that are constant within the mouse, and the sections' input
        checksums.
    """
    counts = [c for c in COUNTS if c in sections.columns]
    keys = ["mouse", "group", "dpi"]
    g = sections.groupby(keys, sort=True, dropna=False)
    # min_count=1: a count that is NaN in every section (no Ki67 channel) stays NaN.
    mice = g[counts + ["tissue_area_mm2"]].sum(min_count=1)
    mice.insert(0, "n_sections", g.size())
    area = mice["tissue_area_mm2"]
    # Densities over the sections whose tissue area is known (a section without one is a
    # warning of `load_sections`): its cells must not count over the others' area.
    has_area = sections["tissue_area_mm2"].gt(0)
    measured = (
        sections[has_area]
        .groupby(keys, sort=True, dropna=False)[counts]
        .sum(min_count=1)
        .reindex(mice.index)
    )
    for c in counts:
        mice[f"{c}_per_mm2"] = measured[c] / area
    if {"ki67_pos_cells", "her2_cells"} <= set(mice.columns):
        her2 = mice["her2_cells"].where(mice["her2_cells"] > 0)
        mice["ki67_fraction"] = mice["ki67_pos_cells"] / her2
    mice = mice.reset_index()
    standard = (
        set(SHEET_COLUMNS)
        | set(COUNTS)
        | {
            "line",
            "tissue_area_mm2",
            "results",
            "method",
            "input_sha256",
            "lungmets_version",
            "model_sha256",
            "parameters_sha256",
        }
    )
    covariates = [c for c in sections.columns if c not in standard]
    for c in covariates:
        per_mouse = sections.groupby("mouse")[c].nunique(dropna=False)
        if (per_mouse <= 1).all():
            mice[c] = mice["mouse"].map(sections.groupby("mouse")[c].first())
    if "input_sha256" in sections.columns:
        prov = sections.groupby("mouse").agg(
            input_sha256=("input_sha256", lambda s: ";".join(map(str, s))),
            lungmets_version=("lungmets_version", lambda s: ";".join(sorted(set(map(str, s))))),
            model_sha256=("model_sha256", lambda s: ";".join(sorted(set(map(str, s))))),
            parameters_sha256=("parameters_sha256", lambda s: ";".join(sorted(set(map(str, s))))),
        )
        mice = mice.join(prov, on="mouse")
    return mice


# --------------------------------------------------------------------------- statistics


def find_control(groups, control: str | None = None) -> str:
    """The control group: `control` if given, else the one named like PBS/control/mock."""
    groups = [str(g) for g in groups]
    if control is not None:
        if control not in groups:
            raise InputError(
                f"control group {control!r} is not in the sample sheet (groups: "
                f"{', '.join(groups)}); pass --control with one of them"
            )
        return control
    named = [g for g in groups if g.upper() in CONTROL_NAMES]
    if len(named) == 1:
        return named[0]
    raise InputError(
        f"cannot tell which group is the control (groups: {', '.join(groups)}); pass --control NAME"
    )


def fold_change_ci(
    treated: np.ndarray,
    control: np.ndarray,
    *,
    n_boot: int = 5000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Fold change of means (treated / control) with a percentile bootstrap interval.

    Mice are resampled with replacement within each group.

    Returns
    -------
    fold_change, ci_low, ci_high : float
        NaN where the control mean is 0.
    """
    treated = np.asarray(treated, float)
    control = np.asarray(control, float)
    treated, control = treated[np.isfinite(treated)], control[np.isfinite(control)]
    if len(treated) == 0 or len(control) == 0 or control.mean() <= 0:
        return np.nan, np.nan, np.nan
    fc = treated.mean() / control.mean()
    rng = np.random.default_rng(seed)
    t = rng.choice(treated, (n_boot, len(treated))).mean(axis=1)
    c = rng.choice(control, (n_boot, len(control))).mean(axis=1)
    ratios = t[c > 0] / c[c > 0]
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha]) if len(ratios) else (np.nan, np.nan)
    return float(fc), float(lo), float(hi)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (NaNs kept as NaN)."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok])]
    m = len(order)
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def compare_groups(
    mice: pd.DataFrame,
    *,
    control: str | None = None,
    metrics=tuple(METRICS),
    n_boot: int = 5000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Compare every other group with the control at each dpi, mouse by mouse.

    Parameters
    ----------
    mice : pandas.DataFrame
        From `aggregate_mice`.
    control : str, optional
        The control group (default: the one named PBS, control, mock, saline ...).
    metrics : sequence of str
        Columns of `mice` to compare.
    n_boot : int
        Bootstrap resamples for the fold-change interval.
    seed : int
        Seed of the bootstrap (results are reproducible).

    Returns
    -------
    stats : pandas.DataFrame
        Per (metric, dpi, group): n, n_control, mean, mean_control, median, median_control,
        fold_change, fold_change_ci_low/high, p_mannwhitney, p_welch, p_mannwhitney_holm,
        p_welch_holm.
    trend : pandas.DataFrame
        Per (metric, group): Kruskal–Wallis H and p across the time points.
    warnings : list of str
        Groups with fewer than 3 mice at a time point, constant metrics.
    """
    from scipy import stats as st

    groups = sorted(map(str, mice["group"].unique()))
    warnings = []
    if len(groups) < 2:
        control = control or groups[0]
        warnings.append(
            f"only one group ({', '.join(groups)}) in the sample sheet: nothing to compare it with"
        )
    else:
        control = find_control(groups, control)
    for (dpi, group), n in mice.groupby(["dpi", "group"]).size().items():
        if n < 3:
            warnings.append(
                f"dpi {dpi:g}, {group}: only {n} mouse/mice; tests need at least 3 per group "
                "to mean much"
            )
    rows = []
    for metric in metrics:
        if metric not in mice.columns or mice[metric].isna().all():
            continue
        for dpi, at in mice.groupby("dpi"):
            c = at.loc[at["group"] == control, metric].dropna().to_numpy(float)
            for group in sorted(set(at["group"]) - {control}):
                t = at.loc[at["group"] == group, metric].dropna().to_numpy(float)
                row = {
                    "metric": metric,
                    "dpi": dpi,
                    "group": group,
                    "control": control,
                    "n": len(t),
                    "n_control": len(c),
                    "mean": t.mean() if len(t) else np.nan,
                    "mean_control": c.mean() if len(c) else np.nan,
                    "sd": t.std(ddof=1) if len(t) > 1 else np.nan,
                    "sd_control": c.std(ddof=1) if len(c) > 1 else np.nan,
                    "median": np.median(t) if len(t) else np.nan,
                    "median_control": np.median(c) if len(c) else np.nan,
                }
                fc, lo, hi = fold_change_ci(t, c, n_boot=n_boot, seed=seed)
                row.update(fold_change=fc, fold_change_ci_low=lo, fold_change_ci_high=hi)
                p_mw = p_w = np.nan
                if len(t) and len(c):
                    p_mw = float(st.mannwhitneyu(t, c, alternative="two-sided").pvalue)
                    if len(t) > 1 and len(c) > 1 and (np.ptp(t) > 0 or np.ptp(c) > 0):
                        p_w = float(st.ttest_ind(t, c, equal_var=False).pvalue)
                row.update(p_mannwhitney=p_mw, p_welch=p_w)
                rows.append(row)
    stats = pd.DataFrame(rows)
    if len(stats):
        for p in ("p_mannwhitney", "p_welch"):
            stats[f"{p}_holm"] = stats.groupby(["metric", "group"])[p].transform(
                lambda s: pd.Series(holm(s.to_numpy()), index=s.index)
            )
    trows = []
    for metric in metrics:
        if metric not in mice.columns:
            continue
        for group, g in mice.groupby("group"):
            samples = [v[metric].dropna().to_numpy(float) for _, v in g.groupby("dpi")]
            samples = [s for s in samples if len(s)]
            h = p = np.nan
            if len(samples) >= 2 and np.ptp(np.concatenate(samples)) > 0:
                h, p = st.kruskal(*samples)
            trows.append(
                {
                    "metric": metric,
                    "group": group,
                    "n_timepoints": len(samples),
                    "n_mice": int(sum(len(s) for s in samples)),
                    "kruskal_h": float(h),
                    "p_kruskal": float(p),
                }
            )
    return stats, pd.DataFrame(trows), warnings


# --------------------------------------------------------------------------- the whole study


def analyze_cohort(
    samples: str | os.PathLike,
    results_dir: str | os.PathLike,
    *,
    control: str | None = None,
    n_boot: int = 5000,
    seed: int = 0,
    repair_journals: bool = False,
) -> CohortResult:
    """Sample sheet + per-slide results -> sections, mice, group statistics.

    Parameters
    ----------
    samples : path-like
        The sample sheet (slide, mouse, group, dpi, section; extra columns are covariates).
    results_dir : path-like
        The ``--out`` folder of ``lungmets run``.
    control : str, optional
        The control group (default: the group named PBS, control, mock, saline ...).
    n_boot, seed
        Bootstrap of the fold-change confidence interval.
    repair_journals : bool
        See `load_sections`.

    Returns
    -------
    CohortResult

    Raises
    ------
    InputError
        For a bad sample sheet or missing results, listing every row at fault.
    """
    sheet = read_sample_sheet(samples)
    sections, warnings = load_sections(sheet, results_dir, samples, repair_journals=repair_journals)
    mice = aggregate_mice(sections)
    stats, trend, w = compare_groups(mice, control=control, n_boot=n_boot, seed=seed)
    warnings += w
    for w_ in warnings:
        log.warning(w_)
    groups = sorted(map(str, mice["group"].unique()))
    control = find_control(groups, control) if len(groups) > 1 else (control or groups[0])
    provenance = _cohort_provenance(sections, results_dir, samples)
    return CohortResult(sections, mice, stats, trend, control, warnings, provenance)


def _cohort_provenance(sections: pd.DataFrame, results_dir, samples) -> dict:
    from ._version import __version__

    params = {}
    for folder in sections["results"].drop_duplicates():
        s = json.loads((Path(folder) / "summary.json").read_text())
        params.setdefault(parameters_sha256(s.get("parameters", {})), s.get("parameters", {}))
    return {
        "lungmets_report": __version__,
        "samples": str(Path(samples).resolve()),
        "samples_sha256": hashlib.sha256(Path(samples).read_bytes()).hexdigest(),
        "results": str(Path(results_dir).resolve()),
        "analysis_versions": sorted(set(map(str, sections["lungmets_version"]))),
        "methods": sorted(set(map(str, sections["method"]))),
        "model_sha256": sorted(
            {str(m) for m in sections["model_sha256"] if m is not None and m == m}
        ),
        "parameters": params,
        "inputs": dict(zip(sections["slide"], sections["input_sha256"], strict=True)),
    }


def set_study_ki67_threshold(
    sheet_path: str | os.PathLike, results_dir: str | os.PathLike, threshold: float | None
) -> list[Path]:
    """Record one Ki67 threshold (counts; None: each slide's own) in the journal of every
    slide of a sample sheet; returns the result folders written.

    Raises
    ------
    InputError
        Listing slides of the sheet without results (nothing is written then).
    """
    from .io import slide_name

    sheet = read_sample_sheet(sheet_path)
    folders = [Path(results_dir) / slide_name(s) for s in sheet["slide"]]
    missing = [str(f) for f in folders if not (f / "summary.json").is_file()]
    if missing:
        raise InputError(
            f"{len(missing)} slide(s) of {sheet_path} have no results in {results_dir}: "
            + ", ".join(missing[:5])
            + "; run 'lungmets run --samples SHEET --out RESULTS' first"
        )
    for f in folders:
        ReviewSession(f).set_ki67_threshold(threshold)
    return folders
