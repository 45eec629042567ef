"""Readers and the review widget in a real napari viewer (under Xvfb)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from histo.io import open_slide
from histo.review import JOURNAL, ReviewSession, read_journal
from napari_plugin._reader import get_results_reader, get_slide_reader
from napari_plugin._review_widget import _camera

pytestmark = pytest.mark.napari


@pytest.fixture
def results(analysed, tmp_path):
    dst = tmp_path / analysed[1].name
    shutil.copytree(analysed[1], dst)
    return dst


def add(viewer, layer_data):
    return [getattr(viewer, f"add_{kind}")(data, **kw) for data, kw, kind in layer_data]


def test_readers_say_no_politely(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert get_slide_reader(str(tmp_path / "notes.txt")) is None
    assert get_results_reader(str(tmp_path)) is None  # a folder, but not a result folder
    assert get_results_reader(str(tmp_path / "notes.txt")) is None


def test_slide_reader_layers(make_napari_viewer, analysed):
    path, _ = analysed
    viewer = make_napari_viewer()
    layers = add(viewer, get_slide_reader(str(path))(str(path)))
    slide = open_slide(path)
    assert [lyr.name.split()[-1] for lyr in layers] == list(slide.channel_names)
    assert [lyr.colormap.name for lyr in layers] == ["blue", "green", "magenta"]
    for lyr in layers:
        assert lyr.multiscale and len(lyr.data) == slide.n_levels
        np.testing.assert_allclose(lyr.scale, [slide.pixel_size_um] * 2)
        lo, hi = lyr.contrast_limits
        assert 0 <= lo < hi
    # World extent in micrometres: the scale bar is physical.
    h, w = slide.shape_px
    extent = viewer.layers.extent.world
    assert extent[1][0] == pytest.approx((h - 1) * slide.pixel_size_um, abs=1)


def test_result_reader_applies_corrections(make_napari_viewer, results):
    s = ReviewSession(results)
    first = s.lesions.index[0]
    s.set_class(first, "focus")
    viewer = make_napari_viewer()
    cells, lesions = add(viewer, get_results_reader(str(results))(str(results)))
    table = pd.read_csv(results / "lesions.csv")
    assert len(lesions.data) == len(table) and len(cells.data) == len(
        pd.read_csv(results / "cells.csv")
    )
    np.testing.assert_allclose(lesions.data, table[["y_um", "x_um"]].to_numpy())
    assert lesions.features["review_class"].iloc[0] == "focus"
    assert lesions.features["status"].iloc[0] == "corrected"
    assert lesions.metadata["lungmets_results"] == str(results)


def test_review_widget_reclassify_reject_undo(make_napari_viewer, qtbot, results, analysed):
    viewer = make_napari_viewer()
    add(viewer, get_slide_reader(str(analysed[0]))(str(analysed[0])))
    add(viewer, get_results_reader(str(results))(str(results)))
    dock, widget = viewer.window.add_plugin_dock_widget("lungmets", "Review lesions")
    layer = widget.layer
    assert layer is not None and widget.session.folder == results
    lesions = widget.session.lesions
    single = lesions.index[lesions["review_class"].isin(["single", "dormant"])][0]
    focus = lesions.index[lesions["review_class"] == "focus"][0]
    counts0 = widget.session.counts()

    widget.select_lesion(single)
    row = list(lesions.index).index(single)
    assert layer.selected_data == {row}
    np.testing.assert_allclose(
        _camera(viewer).center[-2:], lesions.loc[single, ["y_um", "x_um"]].astype(float), atol=1e-3
    )

    widget.table.setFocus()
    qtbot.keyClick(widget.table, "3")  # cluster
    assert widget.session.lesions.loc[single, "review_class"] == "cluster"
    assert layer.features.loc[row, "review_class"] == "cluster"
    widget.select_lesion(focus)
    qtbot.keyClick(widget.table, "r")  # reject
    assert widget.session.lesions.loc[focus, "status"] == "rejected"
    counts = widget.session.counts()
    assert counts["focus"] == counts0["focus"] - 1
    assert f"{counts['focus']} foci" in widget.counts_label.text()
    qtbot.keyClick(widget.table, "z", modifier=qtbot_ctrl())  # undo the reject
    assert widget.session.lesions.loc[focus, "status"] == "unreviewed"

    actions = [c.action for c in read_journal(results / JOURNAL)]
    assert actions == ["set_class", "reject", "undo"]
    # Reloading the folder (a new viewer, after a crash) shows the corrections.
    viewer2 = make_napari_viewer()
    _, lesions2 = add(viewer2, get_results_reader(str(results))(str(results)))
    assert lesions2.features.loc[row, "review_class"] == "cluster"
    assert (lesions2.features["status"] == "rejected").sum() == 0


def test_review_widget_filter_next_and_blind(make_napari_viewer, results, analysed):
    viewer = make_napari_viewer()
    add(viewer, get_slide_reader(str(analysed[0]))(str(analysed[0])))
    add(viewer, get_results_reader(str(results))(str(results)))
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Review lesions")
    n_focus = int((widget.session.lesions["review_class"] == "focus").sum())
    widget.kind_box.setCurrentText("focus")
    assert widget.proxy.rowCount() == n_focus
    widget.kind_box.setCurrentText("all")
    widget.min_cells.setValue(5)
    assert widget.proxy.rowCount() == int((widget.session.lesions["n_cells"] >= 5).sum())
    widget.min_cells.setValue(0)
    first = widget.session.next_unreviewed()
    widget.select_lesion(first)
    widget.accept()  # accepts and moves on
    assert widget.current_lesion() == widget.session.next_unreviewed()
    names = [lyr.name for lyr in viewer.layers]
    widget.blind.setChecked(True)
    assert not any("lung" in lyr.name for lyr in viewer.layers)
    assert "lung" not in widget.slide_label.text()
    widget.blind.setChecked(False)
    assert [lyr.name for lyr in viewer.layers] == names


def qtbot_ctrl():
    from qtpy.QtCore import Qt

    return Qt.KeyboardModifier.ControlModifier


def test_review_widget_adds_a_cell_where_clicked_and_edits_cells(make_napari_viewer, results):
    """Add-cell mode: a click on the canvas adds a cell there (journaled, the cells layer and
    the lesions follow); the selected cell's Ki67 is toggled, it is deleted, undo brings it
    back; the view is marked as reviewed completely."""
    viewer = make_napari_viewer()
    add(viewer, get_results_reader(str(results))(str(results)))
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Review lesions")
    session = widget.session
    cells = session.reviewed_cells()
    n_cells, n_lesions = len(cells), len(session.lesions)
    # A spot of the section at least 80 um from every cell: the new cell is a lesion of its own.
    xy = cells[["x_um", "y_um"]].to_numpy(float)
    spots = [(x, y) for x in range(100, 600, 20) for y in range(100, 500, 20)]
    x, y = next(p for p in spots if np.hypot(*(xy - p).T).min() > 80)
    camera = _camera(viewer)
    camera.center = (y, x)
    camera.zoom = 4.0  # 4 canvas pixels per um
    widget.set_add_mode(True)
    assert widget.add_button.isChecked() and widget.cells_layer.visible
    clicked = []  # where napari says the click is, in world coordinates (um)
    viewer.mouse_drag_callbacks.append(lambda v, e: clicked.append(e.position[-2:]))
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    middle = (canvas.size[0] / 2, canvas.size[1] / 2)
    canvas.events.mouse_press(pos=middle, modifiers=(), button=1)
    canvas.events.mouse_release(pos=middle, modifiers=(), button=1)
    (entry,) = read_journal(results / JOURNAL)
    assert entry.action == "add_cell"
    assert (entry.y_um, entry.x_um) == pytest.approx(tuple(clicked[0]))
    assert abs(entry.x_um - x) < 60 and abs(entry.y_um - y) < 60  # in view, near its centre
    x, y = entry.x_um, entry.y_um
    assert len(widget.cells_layer.data) == n_cells + 1
    assert len(widget.layer.data) == n_lesions + 1 == widget.model.rowCount()
    assert "cells added 1" in widget.counts_label.text()
    # A drag pans; it adds nothing.
    canvas.events.mouse_press(pos=middle, modifiers=(), button=1)
    canvas.events.mouse_move(
        pos=(middle[0] + 30, middle[1]), modifiers=(), button=1,
        press_event=canvas.events.mouse_press(pos=middle, modifiers=(), button=1),
    )  # fmt: skip
    canvas.events.mouse_release(pos=(middle[0] + 30, middle[1]), modifiers=(), button=1)
    assert len(read_journal(results / JOURNAL)) == 1
    widget.set_add_mode(False)

    new = int(np.argmin(np.hypot(*(widget.cells_layer.data - (y, x)).T)))
    widget.cells_layer.selected_data = {new}
    widget.toggle_selected_ki67()
    assert bool(ReviewSession(results).reviewed_cells().iloc[new]["ki67_pos"]) is True
    widget.cells_layer.selected_data = {new}
    widget.delete_selected_cells()
    assert len(widget.cells_layer.data) == n_cells
    assert ReviewSession(results).counts() == session.counts()
    widget.undo()
    assert len(widget.cells_layer.data) == n_cells + 1
    widget.mark_view_complete()
    (box,) = ReviewSession(results).complete_regions
    assert box[0] < x < box[2] and box[1] < y < box[3]
    assert [e.action for e in read_journal(results / JOURNAL)] == [
        "add_cell", "set_cell_ki67", "delete_cell", "undo", "complete_region"
    ]  # fmt: skip


def test_review_widget_keeps_its_slide_when_other_layers_are_added(make_napari_viewer, results):
    """Opening another image or another result folder does not take the review away."""
    viewer = make_napari_viewer()
    add(viewer, get_results_reader(str(results))(str(results)))
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Review lesions")
    layer, session = widget.layer, widget.session
    viewer.add_image(np.zeros((8, 8)))
    other = results.parent / "other"
    shutil.copytree(results, other)
    add(viewer, get_results_reader(str(other))(str(other)))
    assert widget.layer is layer and widget.session is session
    assert widget.layer_box.count() == 2
    viewer.layers.remove(layer)  # its layer gone: the other result is reviewed
    assert widget.session is not None and widget.session.folder == other
