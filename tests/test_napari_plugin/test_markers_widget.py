"""The Markers widget in a real napari viewer (under Xvfb): the Ki67 threshold on its
histogram, moved with live counts, applied to the journal, undone, used by the cohort."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from histo.review import JOURNAL, ReviewSession, read_journal
from napari_plugin._reader import get_results_reader
from napari_plugin._review_widget import COLUMNS

pytestmark = pytest.mark.napari


@pytest.fixture
def results(analysed, tmp_path):
    dst = tmp_path / "results" / analysed[1].name
    shutil.copytree(analysed[1], dst)
    return dst


def test_markers_widget_moves_applies_and_undoes_the_threshold(make_napari_viewer, results):
    viewer = make_napari_viewer()
    for data, kw, kind in get_results_reader(str(results))(str(results)):
        getattr(viewer, f"add_{kind}")(data, **kw)
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Markers (Ki67 threshold)")
    assert widget.session is not None and widget.session.folder == results
    own = widget.session.ki67_threshold
    assert widget.threshold == pytest.approx(own, rel=1e-3)
    # The histogram is drawn with the threshold as a line.
    ax = widget.figure.axes[0]
    assert any(abs(line.get_xdata()[0] - own) < 1 for line in ax.get_lines())
    cells_layer = widget.cells_layer
    colours0 = np.array(cells_layer.face_color)
    counts0 = widget.session.counts()

    # Typing a high threshold: fewer Ki67+ cells, more dormant, cells recoloured; nothing saved.
    cells = pd.read_csv(results / "cells.csv")
    column = widget.session.ki67_column  # the run's Ki67 measure
    high = float(cells[column].quantile(0.95))
    preview = widget.set_threshold(high)
    assert preview["ki67_pos_cells"] == int((cells[column] >= high).sum())
    assert preview["ki67_pos_cells"] < counts0["ki67_pos_cells"]
    assert preview["dormant"] >= counts0["dormant"]
    assert f"{preview['dormant']} dormant" in widget.counts_label.text()
    assert "not applied" in widget.counts_label.text()
    assert not np.array_equal(np.array(cells_layer.face_color), colours0)
    assert not (results / JOURNAL).exists()
    # The slider moves with the value.
    assert 0 < widget.slider.value() <= widget.slider.maximum()

    widget.apply()
    (line,) = read_journal(results / JOURNAL)
    assert line.action == "set_ki67_threshold"
    assert line.after["ki67_threshold"] == pytest.approx(high, rel=1e-3)
    assert ReviewSession(results).counts() == preview  # what the cohort will count
    assert "(applied)" in widget.counts_label.text()

    widget.undo()
    assert ReviewSession(results).reviewed_ki67_threshold is None
    assert widget.threshold == pytest.approx(own, rel=1e-3)
    assert [c.action for c in read_journal(results / JOURNAL)] == ["set_ki67_threshold", "undo"]


def test_markers_widget_applies_one_threshold_to_a_study(make_napari_viewer, results, tmp_path):
    other = results.parent / "lung2"
    shutil.copytree(results, other)
    sheet = tmp_path / "samples.csv"
    sheet.write_text(
        "slide,mouse,group,dpi,section\nlung.ome.tif,m1,IAV,15,1\nlung2.ome.tif,m2,PBS,15,1\n"
    )
    viewer = make_napari_viewer()
    for data, kw, kind in get_results_reader(str(results))(str(results)):
        getattr(viewer, f"add_{kind}")(data, **kw)
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Markers (Ki67 threshold)")
    widget.set_threshold(123.0)
    folders = widget.apply_to_study(sheet)
    assert sorted(f.name for f in folders) == ["lung", "lung2"]
    for f in folders:
        assert ReviewSession(f).reviewed_ki67_threshold == 123.0
    # Blinded: nothing in the widget names a group or a mouse.
    texts = " ".join(
        w.text() for w in (widget.counts_label, widget.method_label) if hasattr(w, "text")
    )
    assert "PBS" not in texts and "m2" not in texts


def test_review_and_markers_widgets_show_each_others_changes(make_napari_viewer, results):
    """One session per slide: a threshold applied in the Markers widget recounts the Review
    widget's table and counts at once; a lesion reviewed there recounts the Markers widget;
    undo in either takes back the latest change, whichever widget made it."""
    viewer = make_napari_viewer()
    for data, kw, kind in get_results_reader(str(results))(str(results)):
        getattr(viewer, f"add_{kind}")(data, **kw)
    _, review = viewer.window.add_plugin_dock_widget("lungmets", "Review lesions")
    _, markers = viewer.window.add_plugin_dock_widget("lungmets", "Markers (Ki67 threshold)")
    assert review.session is markers.session
    before = review.counts_label.text()
    cells = pd.read_csv(results / "cells.csv")
    markers.set_threshold(float(cells[markers.session.ki67_column].quantile(0.95)))
    assert review.counts_label.text() == before  # a preview is not a change
    markers.apply()
    counts = ReviewSession(results).counts()
    assert f"{counts['dormant']} dormant" in review.counts_label.text()
    assert review.counts_label.text() != before
    table = review.session.lesions["n_ki67_pos"].to_numpy()
    col = COLUMNS.index("n_ki67_pos")
    shown = [review.model.data(review.model.index(r, col)) for r in range(review.model.rowCount())]
    assert [int(v) for v in shown] == table.tolist()

    # A dormant lesion set to "focus" in the Review widget: one dormant fewer in Markers.
    dormant = review.session.lesions.index[review.session.lesions["review_class"] == "dormant"]
    review.select_lesion(dormant[0])
    review.set_class("focus")
    assert f"{counts['dormant'] - 1} dormant" in markers.counts_label.text()
    # Markers' undo takes back the class; Review's undo then the threshold.
    markers.undo()
    assert f"{counts['dormant']} dormant" in review.counts_label.text()
    review.undo()
    assert review.counts_label.text() == before
    assert ReviewSession(results).reviewed_ki67_threshold is None
