"""The review journal: corrections appended at once, replayed on load, used by the cohort."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from histo.batch import run_batch
from histo.config import AnalysisConfig
from histo.review import JOURNAL, ReviewSession, read_journal
from histo.synthetic import generate_slide


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    d = tmp_path_factory.mktemp("review")
    s = generate_slide(d / "lung.ome.tif", size_px=(1280, 1024), group="IAV", dpi=15, seed=41,
                       labels=False)  # fmt: skip
    (out,) = run_batch([s.path], d / "results", AnalysisConfig(method="classical"))
    assert out.ok
    return s, out.out_dir


@pytest.fixture
def folder(analysed, tmp_path):
    """A private copy of the result folder (tests write journals into it)."""
    import shutil

    dst = tmp_path / analysed[1].name
    shutil.copytree(analysed[1], dst)
    return dst


def test_corrections_are_journaled_and_replayed(folder):
    s = ReviewSession(folder, user="alice")
    lesions = s.lesions
    assert (lesions["status"] == "unreviewed").all()
    single = lesions.index[lesions["class"] == "single"][0]
    focus = lesions.index[lesions["class"] == "focus"][0]
    before = s.counts()
    s.set_class(single, "cluster")
    s.reject(focus)
    s.accept(lesions.index[-1])
    s.undo()  # takes back the accept
    entries = read_journal(folder / JOURNAL)
    assert [e.action for e in entries] == ["set_class", "reject", "accept", "undo"]
    assert entries[0].user == "alice" and entries[0].before["status"] == "unreviewed"
    assert entries[3].undoes == entries[2].seq
    after = s.counts()
    n_focus_cells = int(lesions.loc[focus, "n_cells"])
    assert after["her2_cells"] == before["her2_cells"] - n_focus_cells
    assert after["focus"] == before["focus"] - 1
    assert after["cluster"] == before["cluster"] + 1
    assert after["lesions"] == before["lesions"] - 1
    # A new session (napari restarted, or crashed) sees the same state.
    again = ReviewSession(folder)
    pd.testing.assert_frame_equal(again.lesions, s.lesions)
    assert again.n_corrections == 2
    assert again.lesions.loc[lesions.index[-1], "status"] == "unreviewed"


def test_torn_last_line_is_skipped(folder):
    s = ReviewSession(folder)
    s.reject(s.lesions.index[0])
    with open(folder / JOURNAL, "a") as f:
        f.write('{"seq": 2, "action": "rej')  # napari died mid-write
    again = ReviewSession(folder)
    assert again.lesions["status"].iloc[0] == "rejected"
    assert again.n_corrections == 1


def test_corrections_follow_lesions_after_reanalysis(analysed, tmp_path):
    slide, _ = analysed
    out = tmp_path / "r"
    (first,) = run_batch([slide.path], out, AnalysisConfig(method="classical"))
    s = ReviewSession(first.out_dir)
    focus = s.lesions.index[s.lesions["class"] == "focus"][0]
    xy = s.lesions.loc[focus, ["x_um", "y_um"]].to_numpy(float)
    s.reject(focus)
    # Re-analysed with other parameters: new run key, ids may change, the journal stays.
    (second,) = run_batch([slide.path], out, AnalysisConfig(method="classical", halo_px=96))
    assert second.status == "ok" and (second.out_dir / JOURNAL).is_file()
    again = ReviewSession(second.out_dir)
    rejected = again.lesions[again.lesions["status"] == "rejected"]
    assert len(rejected) == 1 and not again.unmatched
    assert abs(rejected["x_um"].iloc[0] - xy[0]) < 5 and abs(rejected["y_um"].iloc[0] - xy[1]) < 5


def test_cohort_uses_reviewed_counts(folder, tmp_path):
    from histo.cohort import analyze_cohort

    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"slide,mouse,group,dpi,section\n{folder.name}.ome.tif,m1,IAV,15,1\n")
    raw = analyze_cohort(sheet, folder.parent).mice.iloc[0]
    s = ReviewSession(folder)
    focus = s.lesions.index[s.lesions["class"] == "focus"][0]
    s.reject(focus)
    reviewed = analyze_cohort(sheet, folder.parent)
    row = reviewed.mice.iloc[0]
    assert row["her2_cells"] == raw["her2_cells"] - s.lesions.loc[focus, "n_cells"]
    assert row["focus"] == raw["focus"] - 1
    assert reviewed.sections["reviewed_corrections"].iloc[0] == 1
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["counts"]["focus"] == raw["focus"]  # the analysis' own files are untouched


def test_a_reviewed_ki67_threshold_is_journaled_replayed_and_undone(folder):
    from histo.markers import apply_threshold, user_threshold

    s = ReviewSession(folder, user="alice")
    run_threshold = s.ki67_threshold
    assert run_threshold is not None and s.reviewed_ki67_threshold is None
    raw = s.counts()
    cells = pd.read_csv(folder / "cells.csv")
    high = float(cells["ki67_mean"].quantile(0.9))  # most cells Ki67- from here
    singles = s.lesions.index[s.lesions["n_cells"] == 1]
    hand = singles[0]
    s.set_class(hand, "single")  # a class set by hand stays whatever the threshold
    s.set_ki67_threshold(high)
    expected = apply_threshold(cells, user_threshold("Ki67", high))
    assert s.counts()["ki67_pos_cells"] == int(expected["ki67_pos"].sum())
    n_pos = expected.groupby("lesion_id")["ki67_pos"].sum()
    dormant = [lid for lid in singles if n_pos.get(lid, 0) == 0 and lid != hand]
    assert sorted(s.lesions.index[s.lesions["review_class"] == "dormant"]) == sorted(dormant)
    assert s.lesions.loc[hand, "review_class"] == "single"
    # The journal holds it; a new session replays it.
    line = read_journal(folder / JOURNAL)[-1]
    assert line.action == "set_ki67_threshold" and line.after == {"ki67_threshold": high}
    again = ReviewSession(folder)
    assert again.reviewed_ki67_threshold == high and again.counts() == s.counts()
    # The preview changes nothing; undo returns to the analysis' threshold.
    before = s.counts()
    s.preview_ki67_threshold(0.0)
    assert s.counts() == before
    s.undo()
    assert s.reviewed_ki67_threshold is None and s.ki67_threshold == run_threshold
    assert s.counts()["ki67_pos_cells"] == raw["ki67_pos_cells"]
    assert ReviewSession(folder).reviewed_ki67_threshold is None


def test_cohort_counts_with_the_reviewed_threshold_and_flags_outliers(folder, tmp_path):
    import shutil

    from histo.cohort import analyze_cohort
    from histo.review import set_study_ki67_threshold

    other = folder.parent / "lung2"
    shutil.copytree(folder, other)
    sheet = tmp_path / "samples.csv"
    sheet.write_text(
        "slide,mouse,group,dpi,section\n"
        f"{folder.name}.ome.tif,m1,IAV,15,1\nlung2.ome.tif,m2,IAV,15,1\n"
    )
    raw = analyze_cohort(sheet, folder.parent)
    assert not any("threshold" in w for w in raw.warnings)
    t = ReviewSession(folder).ki67_threshold
    ReviewSession(other).set_ki67_threshold(5 * t)
    flagged = analyze_cohort(sheet, folder.parent)
    assert any("very different thresholds" in w and "lung2" in w for w in flagged.warnings)
    assert any("different ways" in w for w in flagged.warnings)  # auto on one, user on the other
    m2 = flagged.mice.set_index("mouse").loc["m2"]
    assert m2["ki67_pos_cells"] <= raw.mice.set_index("mouse").loc["m2", "ki67_pos_cells"]
    # One threshold for the whole study: no warning left, both slides counted with it.
    set_study_ki67_threshold(sheet, folder.parent, 2 * t)
    same = analyze_cohort(sheet, folder.parent)
    assert not any("threshold" in w or "different ways" in w for w in same.warnings)
    assert (same.sections["ki67_threshold"] == 2 * t).all()
