"""The review journal: corrections appended at once, replayed on load, used by the cohort."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from histo.batch import run_batch
from histo.config import AnalysisConfig
from histo.errors import InputError
from histo.review import JOURNAL, ReviewSession, read_journal, repair_journal
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


def test_torn_last_line_is_skipped_and_a_new_correction_does_not_run_on_from_it(folder):
    s = ReviewSession(folder)
    s.reject(s.lesions.index[0])
    with open(folder / JOURNAL, "a") as f:
        f.write('{"seq": 2, "action": "rej')  # napari died mid-write
    again = ReviewSession(folder)
    assert again.lesions["status"].iloc[0] == "rejected"
    assert again.n_corrections == 1
    again.reject(again.lesions.index[1])  # the torn line is cut off, the new one kept
    lines = (folder / JOURNAL).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["action"] == "reject" for line in lines)
    assert ReviewSession(folder).n_corrections == 2


def _journal_with_a_bad_line(folder):
    """Three rejections, the second line damaged (edited by hand, or a disk error)."""
    s = ReviewSession(folder)
    for lesion in s.lesions.index[:3]:
        s.reject(lesion)
    lines = (folder / JOURNAL).read_text().splitlines()
    lines[1] = "#" + lines[1][1:]
    (folder / JOURNAL).write_text("\n".join(lines) + "\n")
    return lines


def test_a_bad_line_that_is_not_the_last_is_an_error_naming_file_and_line(folder):
    _journal_with_a_bad_line(folder)
    with pytest.raises(InputError, match=r"corrections\.jsonl: line 2: not a correction.*--repair"):
        read_journal(folder / JOURNAL)
    with pytest.raises(InputError, match="line 2"):
        ReviewSession(folder)


def test_an_undo_of_nothing_is_an_error(folder):
    s = ReviewSession(folder)
    s.reject(s.lesions.index[0])
    s.undo()
    lines = (folder / JOURNAL).read_text().splitlines()
    (folder / JOURNAL).write_text(lines[1] + "\n")  # the undo without what it undoes
    with pytest.raises(InputError, match="line 1: undoes correction 1, not there"):
        read_journal(folder / JOURNAL)


def test_repair_drops_only_the_bad_lines_and_keeps_a_backup(folder):
    lines = _journal_with_a_bad_line(folder)
    dropped, backup = repair_journal(folder / JOURNAL)
    assert [d.line for d in dropped] == [2]
    assert backup.read_text().splitlines() == lines  # the journal as it was
    assert (folder / JOURNAL).read_text().splitlines() == [lines[0], lines[2]]
    assert ReviewSession(folder).n_corrections == 2
    assert repair_journal(folder / JOURNAL) == ([], None)  # nothing left to repair


def test_the_cohort_refuses_a_damaged_journal_and_repairs_it_when_asked(folder, tmp_path):
    import subprocess
    import sys

    _journal_with_a_bad_line(folder)
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"slide,mouse,group,dpi,section\n{folder.name}.ome.tif,m1,IAV,15,1\n")
    cmd = [sys.executable, "-m", "histo", "cohort", str(sheet), str(folder.parent)]
    refused = subprocess.run(
        [*cmd, "--out", str(tmp_path / "r1")], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{folder / JOURNAL}: line 2" in refused.stderr
    repaired = subprocess.run(
        [*cmd, "--out", str(tmp_path / "r2"), "--repair", "--bootstrap", "100"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert repaired.returncode == 0, repaired.stderr
    assert "1 line(s)" in repaired.stderr and ".bak-" in repaired.stderr
    sections = pd.read_csv(tmp_path / "r2" / "sections.csv")
    assert sections["reviewed_corrections"].iloc[0] == 2


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


def test_a_summary_missing_fields_is_a_warning_of_the_cohort_naming_them(folder, tmp_path):
    """Nothing missing goes unsaid: a summary.json without the tissue area or the provenance
    fields gives a warning naming the file and the fields, in the CLI and the report."""
    import subprocess
    import sys

    summary = json.loads((folder / "summary.json").read_text())
    del summary["tissue_area_mm2"], summary["software"]
    summary["input"].pop("sha256")
    (folder / "summary.json").write_text(json.dumps(summary))
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"slide,mouse,group,dpi,section\n{folder.name}.ome.tif,m1,IAV,15,1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "histo", "cohort", str(sheet), str(folder.parent),
         "--out", str(tmp_path / "report"), "--bootstrap", "100"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    where = f"{folder / 'summary.json'}"
    assert f"{where} lacks input.sha256, software.lungmets" in proc.stderr
    assert f"{where} gives no tissue area" in proc.stderr
    report = (tmp_path / "report" / "report.html").read_text()
    assert "lacks input.sha256, software.lungmets" in report
    mice = pd.read_csv(tmp_path / "report" / "mice.csv")
    assert mice["her2_cells"].iloc[0] > 0
    assert mice["her2_cells_per_mm2"].isna().all()  # no area: no density, not a guess


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
    measure = s.run_ki67["measure"]  # the run's Ki67 measure
    high = float(cells[f"ki67_{measure}"].quantile(0.9))  # most cells Ki67- from here
    singles = s.lesions.index[s.lesions["n_cells"] == 1]
    hand = singles[0]
    s.set_class(hand, "single")  # a class set by hand stays whatever the threshold
    s.set_ki67_threshold(high)
    expected = apply_threshold(cells, user_threshold("Ki67", high, measure=measure))
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


def _two_slide_study(folder, tmp_path):
    """A second copy of the result folder (lung2, mouse m2) and a sample sheet of the two."""
    import shutil

    other = folder.parent / "lung2"
    shutil.copytree(folder, other)
    sheet = tmp_path / "samples.csv"
    sheet.write_text(
        "slide,mouse,group,dpi,section\n"
        f"{folder.name}.ome.tif,m1,IAV,15,1\nlung2.ome.tif,m2,IAV,15,1\n"
    )
    return other, sheet


def test_cohort_counts_with_the_reviewed_threshold_and_flags_outliers(folder, tmp_path):

    from histo.cohort import analyze_cohort, set_study_ki67_threshold

    other, sheet = _two_slide_study(folder, tmp_path)
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


def test_cohort_lets_a_far_threshold_pass_where_it_calls_every_cell_alike(folder, tmp_path):
    """A threshold more than THRESHOLD_SPREAD x from the study's, but inside the empty gap
    between a slide's negative and positive cells, calls them as the study's would: not
    listed as very different. Moved past its cells, it is, with how many it calls otherwise."""

    from histo.cohort import THRESHOLD_SPREAD, analyze_cohort

    other, sheet = _two_slide_study(folder, tmp_path)
    s = ReviewSession(other)
    t = s.ki67_threshold
    values = s.cells[s.ki67_column].to_numpy(float)
    below = values[values < t].max()
    low = (below + t / THRESHOLD_SPREAD) / 2  # in the gap, far from the study's threshold
    assert below < low < t / THRESHOLD_SPREAD and (values >= t).sum() >= 5
    s.set_ki67_threshold(low)
    quiet = analyze_cohort(sheet, folder.parent)
    assert not any("very different thresholds" in w for w in quiet.warnings)
    assert quiet.sections.set_index("mouse").loc["m2", "ki67_threshold"] == low
    high = 5 * t
    s.set_ki67_threshold(high)
    loud = analyze_cohort(sheet, folder.parent)
    (w,) = [w for w in loud.warnings if "very different thresholds" in w]
    n = int(((values >= t) & (values < high)).sum())
    assert n > 0 and f"lung2.ome.tif ({high:.0f} counts" in w
    assert f"{n} of its {len(values)} cells called otherwise" in w


def test_cohort_warns_when_slides_measured_ki67_differently(folder, tmp_path):
    """A study whose slides were run with different ``--ki67-measure``: their thresholds do
    not compare, and the cohort says so; each slide is reviewed in its own measure."""
    import shutil

    from histo.cohort import analyze_cohort

    own = ReviewSession(folder).run_ki67["measure"]
    other_measure = "mean" if own == "p90" else "p90"
    other = folder.parent / "lung3"
    shutil.copytree(folder, other)
    cells = pd.read_csv(other / "cells.csv")
    column = f"ki67_{other_measure}"
    if column not in cells:
        cells[column] = 2 * cells["ki67_mean"]
        cells.to_csv(other / "cells.csv", index=False)
    summary = json.loads((other / "summary.json").read_text())
    summary["markers"]["Ki67"]["measure"] = other_measure
    (other / "summary.json").write_text(json.dumps(summary))
    sheet = tmp_path / "samples.csv"
    sheet.write_text(
        "slide,mouse,group,dpi,section\n"
        f"{folder.name}.ome.tif,m1,IAV,15,1\nlung3.ome.tif,m2,IAV,15,1\n"
    )
    result = analyze_cohort(sheet, folder.parent)
    assert any("measured in different ways" in w and "mean, p90" in w for w in result.warnings)
    s = ReviewSession(other)
    assert s.ki67_column == column and ReviewSession(folder).ki67_column == f"ki67_{own}"
    s.set_ki67_threshold(float(cells[column].median()))
    assert s.counts()["ki67_pos_cells"] == int((cells[column] >= cells[column].median()).sum())


# --------------------------------------------------------------------------- cells


def _isolated_single(session, clear_um: float = 80.0):
    """A single-cell lesion with no other cell within `clear_um`."""
    import numpy as np

    cells = session.cells
    for lid, les in session.lesions[session.lesions["n_cells"] == 1].iterrows():
        d = np.hypot(cells["x_um"] - les["x_um"], cells["y_um"] - les["y_um"])
        if (d < clear_um).sum() == 1:
            return lid
    raise AssertionError("no isolated single cell on the test slide")


def test_a_cell_added_next_to_a_single_makes_a_cluster(folder):
    s = ReviewSession(folder, user="bob")
    lid = _isolated_single(s)
    x, y = (float(v) for v in s.lesions.loc[lid, ["x_um", "y_um"]])
    was_dormant = s.lesions.loc[lid, "review_class"] == "dormant"
    before = s.counts()
    s.add_cell(x + 12.0, y, ki67_pos=False)  # within the 25-um link distance
    after = s.counts()
    assert lid not in s.lesions.index
    new = s.lesions[s.lesions["status"] == "edited"]
    assert len(new) == 1 and new["n_cells"].iloc[0] == 2
    assert new["review_class"].iloc[0] == "cluster"
    assert after["her2_cells"] == before["her2_cells"] + 1
    assert after["single"] == before["single"] - 1
    assert after["cluster"] == before["cluster"] + 1
    assert after["dormant"] == before["dormant"] - int(was_dormant)
    (entry,) = read_journal(folder / JOURNAL)
    assert entry.action == "add_cell" and entry.x_um == pytest.approx(x + 12.0)
    assert entry.user == "bob"
    added = s.cells[s.cells["review"] == "added"]
    assert len(added) == 1 and added["lesion_id"].iloc[0] == new["lesion_id"].iloc[0]
    # Replayed by a new session: the same lesions and cells.
    again = ReviewSession(folder)
    pd.testing.assert_frame_equal(again.lesions, s.lesions)
    pd.testing.assert_frame_equal(again.cells, s.cells)


def test_deleting_a_cell_splits_its_lesion_and_undo_restores_it(folder):
    s = ReviewSession(folder)
    original, base = s.lesions.copy(), s.counts()
    lid = _isolated_single(s)
    x, y = (float(v) for v in s.lesions.loc[lid, ["x_um", "y_um"]])
    # A chain of three cells 20 um apart (each link shorter than 25 um): one cluster.
    s.add_cell(x + 20.0, y)
    s.add_cell(x + 40.0, y)
    chain = s.lesions[s.lesions["status"] == "edited"]
    assert len(chain) == 1 and chain["n_cells"].iloc[0] == 3
    middle = s.cell_at(x + 20.0, y)
    s.delete_cell(middle)
    parts = s.lesions[s.lesions["status"] == "edited"].sort_values("x_um")
    assert parts["n_cells"].tolist() == [1, 1]  # 40 um apart: two single cells
    assert parts["x_um"].tolist() == pytest.approx([x, x + 40.0])
    assert s.cells.loc[middle, "review"] == "deleted"
    s.undo()  # the deletion
    chain = s.lesions[s.lesions["status"] == "edited"]
    assert chain["n_cells"].tolist() == [3]
    s.undo()
    s.undo()  # both additions: the analysis' lesions again
    assert s.counts() == base
    pd.testing.assert_frame_equal(
        s.lesions[["lesion_id", "n_cells", "review_class", "status"]],
        original[["lesion_id", "n_cells", "review_class", "status"]],
    )
    assert [e.action for e in read_journal(folder / JOURNAL)] == [
        "add_cell", "add_cell", "delete_cell", "undo", "undo", "undo"
    ]  # fmt: skip


def test_a_cells_ki67_set_by_hand_holds_against_the_threshold(folder):
    s = ReviewSession(folder)
    dormant = s.lesions.index[s.lesions["review_class"] == "dormant"][0]
    cell = int(s.cells.index[s.cells["lesion_id"] == dormant][0])
    before = s.counts()
    s.toggle_cell_ki67(cell)
    assert s.lesions.loc[dormant, "review_class"] == "single"  # Ki67+ single now
    assert s.counts()["dormant"] == before["dormant"] - 1
    assert s.counts()["ki67_pos_cells"] == before["ki67_pos_cells"] + 1
    # A threshold no nucleus reaches: every other cell Ki67-, this one stays Ki67+.
    s.set_ki67_threshold(1e9)
    assert s.counts()["ki67_pos_cells"] == 1
    assert s.lesions.loc[dormant, "review_class"] == "single"
    again = ReviewSession(folder)
    assert again.counts() == s.counts()


def test_cell_corrections_follow_their_cells_after_reanalysis(folder):
    s = ReviewSession(folder)
    lid = _isolated_single(s)
    cell = int(s.cells.index[s.cells["lesion_id"] == lid][0])
    s.delete_cell(cell)
    gone = s.counts()
    # As if the slide had been analysed again: another run key, and cell ids shuffled.
    summary = json.loads((folder / "summary.json").read_text())
    summary["run_key"] = "another run"
    (folder / "summary.json").write_text(json.dumps(summary))
    cells = pd.read_csv(folder / "cells.csv")
    cells["cell_id"] = cells["cell_id"].to_numpy()[::-1]
    cells.to_csv(folder / "cells.csv", index=False)
    again = ReviewSession(folder)
    assert not again.unmatched
    assert again.counts() == gone
    deleted = again.cells[again.cells["review"] == "deleted"]
    assert len(deleted) == 1
    assert deleted["x_um"].iloc[0] == pytest.approx(s.cells.loc[cell, "x_um"])


def test_a_region_reviewed_completely_is_journaled_and_replayed(folder):
    s = ReviewSession(folder)
    s.mark_complete(300.0, 200.0, 100.0, 50.0)  # any two corners
    assert s.complete_regions == [(100.0, 50.0, 300.0, 200.0)]
    assert ReviewSession(folder).complete_regions == [(100.0, 50.0, 300.0, 200.0)]
    with pytest.raises(ValueError, match="width and a height"):
        s.mark_complete(10.0, 10.0, 10.0, 50.0)
    s.undo()
    assert ReviewSession(folder).complete_regions == []


def test_cohort_counts_reviewed_cells_and_says_how_many_were_reviewed(folder, tmp_path):
    from histo.cohort import analyze_cohort

    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"slide,mouse,group,dpi,section\n{folder.name}.ome.tif,m1,IAV,15,1\n")
    raw = analyze_cohort(sheet, folder.parent)
    s = ReviewSession(folder)
    lid = _isolated_single(s)
    x, y = (float(v) for v in s.lesions.loc[lid, ["x_um", "y_um"]])
    s.add_cell(x + 150.0, y + 150.0)  # a missed cell on its own
    s.add_cell(x + 12.0, y)
    reviewed = analyze_cohort(sheet, folder.parent)
    assert reviewed.mice["her2_cells"].iloc[0] == raw.mice["her2_cells"].iloc[0] + 2
    assert reviewed.sections["reviewed_cell_edits"].iloc[0] == 2
    line = reviewed.review_line()
    assert "1 of 1 sections reviewed" in line and "2 cells added" in line
    assert "0 of 1 sections reviewed" in raw.review_line()
