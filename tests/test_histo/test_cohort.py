"""A whole study: generated cohort -> `lungmets run --samples` -> `lungmets cohort`, against truth.

The cohort (4 mice per group, 3 sections, 2 time points) is generated once per test session
and analysed with the shipped network in a subprocess, as a user would; every number asserted
is computed from the generator's truth tables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histo.cohort import (
    aggregate_mice,
    compare_groups,
    fold_change_ci,
    holm,
    read_sample_sheet,
)
from histo.errors import InputError
from histo.synthetic import generate_cohort

DPIS = (3, 15)
SIZE = (2048, 1536)


def lungmets(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "histo", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


#: How far beyond a published figure of the study the tests still pass (points of relative
#: error); the figures come from `tests/benchmarks/bench_ci_accuracy.py` (BENCHMARKS.md).
MARGIN = 0.02


def make_study(root: Path) -> dict:
    """The generated cohort, analysed as a user would: ``lungmets run --samples``, then
    ``lungmets cohort`` (subprocesses). Used by the tests and by bench_ci_accuracy.py."""
    cohort = root / "cohort"
    generate_cohort(
        cohort,
        mice=4,
        sections=3,
        dpis=DPIS,
        size_px=SIZE,
        seed=11,
        labels=False,
        jobs=os.cpu_count() or 1,
    )
    results, report = root / "results", root / "report"
    run = lungmets("run", "--samples", cohort / "samples.csv", "--out", results)
    assert run.returncode == 0, run.stderr[-3000:]
    coh = lungmets("cohort", cohort / "samples.csv", results, "--out", report)
    assert coh.returncode == 0, coh.stderr[-3000:]
    return {
        "cohort": cohort,
        "results": results,
        "report": report,
        "run": run,
        "cohort_proc": coh,
        "truth": pd.read_csv(cohort / "truth_slides.csv"),
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The generated cohort, its per-slide results and its report."""
    return make_study(tmp_path_factory.mktemp("study"))


def truth_mice(truth: pd.DataFrame) -> pd.DataFrame:
    t = truth.groupby(["mouse", "group", "dpi"])[["n_her2_cells", "tissue_area_mm2"]].sum()
    t["density"] = t["n_her2_cells"] / t["tissue_area_mm2"]
    return t.reset_index().set_index("mouse")


def study_figures(study: dict) -> dict:
    """The study's accuracy against the generator's truth, computed from the report's tables:
    per-mouse HER2+ count and tissue area errors (largest and median, relative) and the error
    of the infected/control fold change of HER2+ cells per mm² at the late time point."""
    mice = pd.read_csv(study["report"] / "mice.csv").set_index("mouse")
    truth = truth_mice(study["truth"])
    err = (mice["her2_cells"] - truth["n_her2_cells"]).abs() / truth["n_her2_cells"]
    area_err = (mice["tissue_area_mm2"] / truth["tissue_area_mm2"] - 1).abs()
    stats = pd.read_csv(study["report"] / "stats.csv")
    late = max(DPIS)
    row = stats[(stats["metric"] == "her2_cells_per_mm2") & (stats["dpi"] == late)].iloc[0]
    at = truth[truth["dpi"] == late]
    true_fc = (
        at.loc[at["group"] == "IAV", "density"].mean()
        / at.loc[at["group"] == "PBS", "density"].mean()
    )
    return {
        "max_count_error": float(err.max()),
        "median_count_error": float(err.median()),
        "max_area_error": float(area_err.max()),
        "median_area_error": float(area_err.median()),
        "fold_change_error": float(abs(row["fold_change"] / true_fc - 1)),
    }


def published_study_figures() -> dict:
    """The study's row of BENCHMARKS.md's "Accuracy on the CI tests' slides"."""
    import re

    text = (Path(__file__).parents[2] / "BENCHMARKS.md").read_text()
    section = text[text.index("<!-- bench_ci_accuracy:start -->") :]
    row = next(line for line in section.splitlines() if line.startswith("| test_cohort study "))
    values = [float(v) for v in re.findall(r"\|\s*([+-]?\d+\.\d+)\s*(?=\|)", row)]
    keys = [
        "max_count_error",
        "median_count_error",
        "max_area_error",
        "median_area_error",
        "fold_change_error",
    ]
    return dict(zip(keys, values, strict=True))


def test_per_mouse_counts_as_published(study):
    """Every mouse's HER2+ count and tissue area against the generator's truth, within
    `MARGIN` of the published figures (the shipped network calls a few nuclei of the dense
    immune infiltrates 3 days after infection, so the largest error is not 0)."""
    mice = pd.read_csv(study["report"] / "mice.csv").set_index("mouse")
    truth = truth_mice(study["truth"])
    assert set(mice.index) == set(truth.index) and len(mice) == 16
    assert (mice["n_sections"] == 3).all()
    measured, published = study_figures(study), published_study_figures()
    for key in ("max_count_error", "median_count_error", "max_area_error", "median_area_error"):
        assert measured[key] <= published[key] + MARGIN, (key, measured, published)


def test_fold_change_recovered_and_effect_detected(study):
    stats = pd.read_csv(study["report"] / "stats.csv")
    truth = truth_mice(study["truth"])
    late = max(DPIS)
    row = stats[(stats["metric"] == "her2_cells_per_mm2") & (stats["dpi"] == late)].iloc[0]
    at = truth[truth["dpi"] == late]
    true_fc = (
        at.loc[at["group"] == "IAV", "density"].mean()
        / at.loc[at["group"] == "PBS", "density"].mean()
    )
    assert true_fc > 2  # the generator's infection effect
    measured = study_figures(study)["fold_change_error"]
    assert measured <= published_study_figures()["fold_change_error"] + MARGIN, measured
    assert row["fold_change_ci_low"] <= row["fold_change"] <= row["fold_change_ci_high"]
    assert row["group"] == "IAV" and row["control"] == "PBS" and row["n"] == row["n_control"] == 4
    assert row["mean"] > row["mean_control"]
    assert row["p_mannwhitney"] < 0.05
    assert 0 < row["p_welch"] < 1
    # The report says so in its headline.
    assert f"dpi {late}: IAV vs PBS" in study["cohort_proc"].stdout


def test_report_files_and_provenance(study):
    report = study["report"]
    html = (report / "report.html").read_text()
    assert "Did infection wake the dormant cells?" in html
    assert html.count("data:image/png;base64,") == 5  # figures embedded: self-contained
    for stem in ("her2_cells_per_mm2", "dormant_per_mm2", "focus_per_mm2", "lesion_composition"):
        for ext in ("png", "svg"):
            assert (report / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    sections = pd.read_csv(report / "sections.csv")
    summaries = {
        p.parent.name: json.loads(p.read_text()) for p in study["results"].glob("*/summary.json")
    }
    assert len(sections) == 48 == len(summaries)
    for r in sections.itertuples():
        s = summaries[r.slide.removesuffix(".ome.tif")]
        assert r.input_sha256 == s["input"]["sha256"]
        assert r.model_sha256 == s["model"]["sha256"]
        assert r.lungmets_version == s["software"]["lungmets"]
    for name in ("mice", "stats", "trend"):
        table = pd.read_csv(report / f"{name}.csv")
        assert {"lungmets_version", "model_sha256", "parameters_sha256"} <= set(table.columns)
    prov = json.loads((report / "provenance.json").read_text())
    assert len(prov["inputs"]) == 48 and len(prov["parameters"]) == 1


def test_run_table_and_geojson(study):
    out = study["run"].stdout
    assert "48 of 48 slides analysed (0 already done and skipped), 0 failed" in out
    folder = next(p.parent for p in study["results"].glob("IAV_d15_*/summary.json"))
    cells = pd.read_csv(folder / "cells.csv")
    lesions = pd.read_csv(folder / "lesions.csv")
    px = json.loads((folder / "summary.json").read_text())["input"]["pixel_size_um"]
    gj = json.loads((folder / "cells.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(cells)
    for f, c in zip(gj["features"], cells.itertuples(), strict=True):
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all()
        # QuPath's pixel corners are at integers: the centre of pixel x is x + 0.5.
        centre = ring[:-1].mean(axis=0)
        np.testing.assert_allclose(centre, [c.x_um / px + 0.5, c.y_um / px + 0.5], atol=0.05)
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["measurements"]["her2_mean"] == pytest.approx(c.her2_mean)
        ki67 = "Ki67+" if c.ki67_pos else "Ki67-"
        assert props["classification"]["name"].endswith(ki67)
    gl = json.loads((folder / "lesions.geojson").read_text())
    assert [f["properties"]["classification"]["name"] for f in gl["features"]] == list(
        lesions["class"]
    )


def test_interrupted_batch_resumes_to_the_same_tables(study, tmp_path):
    """Kill a batch mid-way; the rerun skips finished slides and ends with identical tables."""
    sheet = pd.read_csv(study["cohort"] / "samples.csv")
    sub = sheet[sheet["dpi"] == max(DPIS)].head(8).copy()
    sub["slide"] = [str(study["cohort"] / s) for s in sub["slide"]]
    sub_path = tmp_path / "samples.csv"
    sub.to_csv(sub_path, index=False)
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "histo", "run", "--samples", str(sub_path), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while len(list(out.glob("*/summary.json"))) < 3 and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name for p in out.glob("*/summary.json")}
    assert 3 <= len(finished) < 8, "the batch should have been killed part-way"
    # No table is left under its final name without the summary that vouches for it ...
    for folder in out.iterdir():
        if folder.name not in finished:
            assert not (folder / "summary.json").exists()
    rerun = lungmets("run", "--samples", sub_path, "--out", out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    skipped = [line for line in rerun.stdout.splitlines() if " skipped " in f" {line} "]
    assert {line.split()[0].removesuffix(".ome.tif") for line in skipped} == finished
    # ... and the final tables equal those of the uninterrupted run.
    for folder in out.iterdir():
        if folder.name.startswith("."):
            continue
        for table in ("cells.csv", "lesions.csv"):
            a = (folder / table).read_bytes()
            b = (study["results"] / folder.name / table).read_bytes()
            assert a == b, (folder.name, table)
    assert not list(out.glob("*/.*.tmp"))  # no temporary files left behind
    # --force redoes every slide (two of them, to keep the test short).
    two = tmp_path / "two.csv"
    sub.head(2).to_csv(two, index=False)
    forced = lungmets("run", "--samples", two, "--out", out, "--force")
    assert "2 of 2 slides analysed (0 already done and skipped)" in forced.stdout


def test_changed_parameters_are_not_skipped(study, tmp_path):
    slide = next(study["cohort"].glob("PBS_d15_m1_s1.ome.tif"))
    out = tmp_path / "r"
    first = lungmets("run", slide, "--out", out, "--method", "classical")
    again = lungmets("run", slide, "--out", out, "--method", "classical")
    other = lungmets("run", slide, "--out", out, "--method", "unet")
    assert "(0 already done" in first.stdout
    assert "(1 already done" in again.stdout
    assert "(0 already done" in other.stdout
    assert json.loads((out / "PBS_d15_m1_s1" / "summary.json").read_text())["method"] == "unet"


# --------------------------------------------------------------------------- sample sheet


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sample_sheet_problems_are_listed_by_line(tmp_path):
    sheet = write(
        tmp_path / "s.csv",
        "slide,mouse,group,dpi,section,cage\n"
        "a.ome.tif,m1,IAV,15,1,c1\n"
        "a.ome.tif,m1,IAV,15,2,c1\n"  # slide twice
        "b.ome.tif,m2,PBS,fifteen,1,c2\n"  # non-numeric dpi
        "c.ome.tif,m3,PBS,9,1,c2\n"
        "d.ome.tif,m3,PBS,9,1,c2\n"  # section twice
        "e.ome.tif,m4,,9,1,c3\n"  # empty group
        "f.ome.tif,m1,PBS,15,3,c1\n",  # mouse in two groups
    )
    with pytest.raises(InputError) as err:
        read_sample_sheet(sheet)
    msg = str(err.value)
    assert str(sheet) in msg
    assert "lines 2, 3: slide 'a.ome.tif' is listed twice" in msg
    assert "line 4: dpi 'fifteen' is not a number" in msg
    assert "lines 5, 6: mouse 'm3' has section 1 twice" in msg
    assert "line 7: empty group" in msg
    assert "mouse 'm1' is in more than one group" in msg


def test_sample_sheet_missing_column_and_covariates(tmp_path):
    with pytest.raises(InputError, match="lacks the column.*dpi"):
        read_sample_sheet(write(tmp_path / "a.csv", "slide,mouse,group,section\nx,m,G,1\n"))
    ok = read_sample_sheet(
        write(tmp_path / "b.csv", "Slide,Mouse,Group,DPI,Section,sex\nx.tif,m,G,3,1,F\n")
    )
    assert list(ok["sex"]) == ["F"] and ok["dpi"].dtype == float


def test_cohort_cli_reports_missing_results(study, tmp_path):
    sheet = pd.read_csv(study["cohort"] / "samples.csv")
    extra = pd.DataFrame(
        [{"slide": "ghost.ome.tif", "mouse": "IAV-d15-m9", "group": "IAV", "dpi": 15, "section": 1}]
    )
    path = tmp_path / "samples.csv"
    pd.concat([sheet, extra]).to_csv(path, index=False)
    proc = lungmets("cohort", path, study["results"], "--out", tmp_path / "rep")
    assert proc.returncode == 2
    assert "line 50: ghost.ome.tif: no results" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "rep" / "report.html").exists()


# --------------------------------------------------------------------------- statistics


def test_statistics_on_known_groups():
    rng = np.random.default_rng(0)
    rows = []
    for dpi, effect in ((3, 1.0), (15, 4.0)):
        for group, scale in (("PBS", 1.0), ("IAV", effect)):
            for m in range(6):
                dens = 50 * scale * rng.lognormal(0, 0.2)
                rows.append(
                    {
                        "mouse": f"{group}{dpi}-{m}",
                        "group": group,
                        "dpi": dpi,
                        "her2_cells": dens,
                        "tissue_area_mm2": 1.0,
                    }
                )
    mice = aggregate_mice(pd.DataFrame(rows))
    stats, trend, warnings = compare_groups(mice, metrics=["her2_cells_per_mm2"], n_boot=2000)
    late = stats[stats["dpi"] == 15].iloc[0]
    early = stats[stats["dpi"] == 3].iloc[0]
    means = mice.groupby(["dpi", "group"])["her2_cells_per_mm2"].mean()
    assert late["fold_change"] == pytest.approx(means[15, "IAV"] / means[15, "PBS"])
    assert late["fold_change_ci_low"] > 2 and late["p_mannwhitney"] < 0.01
    assert early["fold_change_ci_low"] < 1 < early["fold_change_ci_high"]
    assert early["p_mannwhitney"] > 0.05
    assert warnings == []
    iav = trend[trend["group"] == "IAV"].iloc[0]
    assert iav["p_kruskal"] < 0.01 and iav["n_timepoints"] == 2
    # Fewer than 3 mice in a group gives a warning.
    _, _, warnings = compare_groups(mice.drop(mice.index[:4]), metrics=["her2_cells_per_mm2"])
    assert any("only 2 mouse" in w for w in warnings)


def test_holm_and_bootstrap_properties():
    p = np.array([0.01, 0.04, 0.03, np.nan])
    adj = holm(p)
    order = np.argsort(p[:3])
    assert np.isnan(adj[3])
    assert (adj[:3] >= p[:3]).all() and (np.diff(adj[:3][order]) >= 0).all()
    assert adj[0] == pytest.approx(3 * 0.01)
    fc, lo, hi = fold_change_ci([2, 2, 2], [1, 1, 1])
    assert fc == lo == hi == 2
    assert np.isnan(fold_change_ci([1, 2], [0, 0])[0])  # control mean 0: undefined


def test_a_section_without_tissue_area_does_not_inflate_its_mouses_density():
    from histo.cohort import COUNTS, aggregate_mice

    rows = []
    for mouse, cells, area in [("m1", 12, 1.5), ("m1", 30, np.nan), ("m2", 8, 2.0)]:
        row = {"mouse": mouse, "group": "IAV", "dpi": 15, "tissue_area_mm2": area}
        row.update({c: float(cells) for c in COUNTS})
        rows.append(row)
    mice = aggregate_mice(pd.DataFrame(rows)).set_index("mouse")
    assert mice.loc["m1", "her2_cells"] == 42  # every cell is counted ...
    # ... but its density is over the sections whose area is known
    assert mice.loc["m1", "her2_cells_per_mm2"] == pytest.approx(12 / 1.5)
    assert mice.loc["m2", "her2_cells_per_mm2"] == pytest.approx(8 / 2.0)


def test_holm_is_step_down_not_bonferroni():
    # Sorted p 0.01, 0.03, 0.04: Holm multiplies by 3, 2, 1 and keeps them monotone
    # (0.03, 0.06, max(0.06, 0.04)); Bonferroni would give 0.03, 0.09, 0.12.
    adj = holm(np.array([0.04, 0.01, 0.03]))
    np.testing.assert_allclose(adj, [0.06, 0.03, 0.06])
    assert holm(np.array([0.01, 0.02, 0.03]))[2] == pytest.approx(0.04)  # Bonferroni: 0.09


def test_the_t_test_is_welchs_not_students():
    """Unequal spreads and sizes: Welch's p (computed here from its formula) differs from the
    pooled-variance Student p, and the cohort reports Welch's."""
    from scipy import stats as st

    control = np.array([10.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 10.0])
    infected = np.array([12.0, 25.0, 8.0, 30.0])
    mice = pd.DataFrame(
        {
            "mouse": [f"m{i}" for i in range(12)],
            "group": ["PBS"] * 8 + ["IAV"] * 4,
            "dpi": 15,
            "her2_cells_per_mm2": np.r_[control, infected],
        }
    )
    stats, _, _ = compare_groups(mice, metrics=["her2_cells_per_mm2"], n_boot=100)
    v1, v2 = infected.var(ddof=1) / 4, control.var(ddof=1) / 8
    t = (infected.mean() - control.mean()) / np.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / 3 + v2**2 / 7)
    welch = 2 * st.t.sf(abs(t), df)
    pooled = ((3 * infected.var(ddof=1) + 7 * control.var(ddof=1)) / 10) * (1 / 4 + 1 / 8)
    student = 2 * st.t.sf(abs((infected.mean() - control.mean()) / np.sqrt(pooled)), 10)
    assert abs(welch - student) > 0.02  # the case tells the two apart
    assert stats["p_welch"].iloc[0] == pytest.approx(welch, rel=1e-9)
