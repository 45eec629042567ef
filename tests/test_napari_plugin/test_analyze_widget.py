"""The "Analyze slide" widget in a real viewer, on a generated slide."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.napari

WAIT_MS = 180_000


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from histo.synthetic import generate_slide

    path = tmp_path_factory.mktemp("slide") / "lung_IAV_d15.ome.tif"
    generate_slide(path, size_px=(1280, 1024), group="IAV", dpi=15, seed=41, labels=False)
    return path


def _open(viewer, path):
    from napari.layers import Layer

    from napari_plugin._reader import read_slide

    for layer_data in read_slide(str(path)):
        viewer.add_layer(Layer.create(*layer_data))


def _analyze_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Analyze slide")
    return widget


def _run(qtbot, widget):
    from qtpy.QtCore import Qt

    qtbot.mouseClick(widget.run_button, Qt.MouseButton.LeftButton)
    assert widget.worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)


def test_offers_one_entry_per_slide_and_a_results_folder_beside_it(make_napari_viewer, slide):
    from histo.config import AnalysisConfig

    viewer = make_napari_viewer()
    _open(viewer, slide)
    widget = _analyze_widget(viewer)
    assert len([ly for ly in viewer.layers if ly.metadata.get("lungmets_slide")]) == 3
    assert widget.slide_combo.count() == 1
    assert widget.slide_path == str(slide)
    assert widget.output_folder() == slide.parent / "lungmets_results"
    assert widget.config() == AnalysisConfig()  # the defaults come from the library
    viewer.layers.clear()
    assert widget.slide_combo.count() == 0
    assert not widget.run_button.isEnabled()


def test_run_writes_and_shows_what_analyze_slide_computes(
    make_napari_viewer, qtbot, slide, tmp_path
):
    from histo.config import AnalysisConfig
    from histo.pipeline import analyze_slide

    viewer = make_napari_viewer()
    _open(viewer, slide)
    widget = _analyze_widget(viewer)
    widget.method_combo.setCurrentText("classical")
    widget.chunk_spin.setValue(512)
    widget.out_edit.setText(str(tmp_path / "out"))
    config = AnalysisConfig(method="classical", chunk_size_px=512)
    assert widget.config() == config
    assert not widget.device_combo.isEnabled()  # no network, no device
    widget.ki67_combo.setCurrentIndex(widget.ki67_combo.findData("p90"))
    assert widget.config() == AnalysisConfig(
        method="classical", chunk_size_px=512, ki67_measure="p90"
    )
    assert widget.ki67_combo.currentText() == "brightest tenth (p90)"
    widget.ki67_combo.setCurrentIndex(widget.ki67_combo.findData("mean"))

    _run(qtbot, widget)
    folder = tmp_path / "out" / "lung_IAV_d15"
    assert widget.status_label.text().startswith("Done"), widget.status_label.text()
    assert (folder / "summary.json").is_file()

    expected = analyze_slide(slide, config).lesions
    written = pd.read_csv(folder / "lesions.csv")
    assert len(expected) > 0
    assert written["lesion_id"].tolist() == expected["lesion_id"].tolist()
    assert written["n_cells"].tolist() == expected["n_cells"].tolist()
    assert written["class"].tolist() == expected["class"].tolist()
    np.testing.assert_allclose(written[["x_um", "y_um"]], expected[["x_um", "y_um"]], atol=1e-3)

    lesions = viewer.layers["lung_IAV_d15 lesions"]
    assert len(lesions.data) == len(expected)
    np.testing.assert_allclose(lesions.data, expected[["y_um", "x_um"]], atol=1e-3)
    assert "lung_IAV_d15 cells" in viewer.layers

    # A second run replaces the layers of the first instead of stacking them.
    _run(qtbot, widget)
    names = [ly.name for ly in viewer.layers]
    assert names.count("lung_IAV_d15 lesions") == 1
    assert names.count("lung_IAV_d15 cells") == 1


def test_cancel_stops_without_adding_layers(make_napari_viewer, qtbot, slide, tmp_path):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    _open(viewer, slide)
    widget = _analyze_widget(viewer)
    widget.method_combo.setCurrentText("classical")
    widget.chunk_spin.setValue(128)  # many chunks: time to cancel
    widget.out_edit.setText(str(tmp_path / "out"))
    qtbot.mouseClick(widget.run_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    assert widget.status_label.text() == "Cancelled."
    assert not any(ly.name.endswith("lesions") for ly in viewer.layers)
    assert not (tmp_path / "out" / "lung_IAV_d15" / "summary.json").exists()
    assert widget.run_button.isEnabled()


def test_bad_slide_is_reported_in_the_status_line(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    bad = tmp_path / "broken.ome.tif"
    bad.write_bytes(b"this is not a TIFF file")
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8)), metadata={"lungmets_slide": str(bad)})
    widget = _analyze_widget(viewer)
    widget.method_combo.setCurrentText("classical")
    shown = []
    notification_manager.notification_ready.connect(shown.append)
    try:
        _run(qtbot, widget)
    finally:
        notification_manager.notification_ready.disconnect(shown.append)
    assert str(bad) in widget.status_label.text()
    assert [str(n.message) for n in shown] == [widget.status_label.text()]
    assert not (tmp_path / "lungmets_results").exists()


def test_visible_region_follows_the_camera(make_napari_viewer, slide):
    from napari_plugin._analyze_widget import visible_region_px

    viewer = make_napari_viewer()
    _open(viewer, slide)
    layer = viewer.layers[0]
    viewer.reset_view()
    assert visible_region_px(viewer, layer) == (0, 1024, 0, 1280)

    px = layer.scale[-1]
    height, width = viewer.canvas.size
    viewer.scene.camera.center = (500 * px, 600 * px)
    viewer.scene.camera.zoom = 4 / px  # 4 screen pixels per slide pixel
    y0, y1, x0, x1 = visible_region_px(viewer, layer)
    assert abs((y0 + y1) / 2 - 500) <= 1 and abs((x0 + x1) / 2 - 600) <= 1
    assert abs((y1 - y0) - height / 4) <= 2 and abs((x1 - x0) - width / 4) <= 2

    viewer.scene.camera.center = (-1e6, -1e6)
    assert visible_region_px(viewer, layer) is None


def test_current_view_only_analyses_the_visible_region(make_napari_viewer, qtbot, slide, tmp_path):
    viewer = make_napari_viewer()
    _open(viewer, slide)
    widget = _analyze_widget(viewer)
    widget.method_combo.setCurrentText("classical")
    widget.out_edit.setText(str(tmp_path / "out"))
    layer = viewer.layers[0]
    px = layer.scale[-1]
    viewer.scene.camera.center = (512 * px, 640 * px)
    viewer.scene.camera.zoom = 2 / px
    widget.view_check.setChecked(True)
    from napari_plugin._analyze_widget import visible_region_px

    y0, y1, x0, x1 = visible_region_px(viewer, layer)
    _run(qtbot, widget)
    folder = tmp_path / "out" / "current_view" / "lung_IAV_d15"
    assert (folder / "summary.json").is_file(), widget.status_label.text()
    import json

    from histo.synthetic import load_truth

    # What was analysed is the region on the screen, and only it: every cell found lies in
    # it, and the slide's cells outside it (the generator's truth) were not looked at.
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["input"]["region_px"] == [y0, y1, x0, x1]
    cells = pd.read_csv(folder / "cells.csv")
    um = 0.5  # the slide's pixel size
    assert cells["x_um"].between(x0 * um, x1 * um).all()
    assert cells["y_um"].between(y0 * um, y1 * um).all()
    truth = load_truth(slide).cells
    inside = truth["x_um"].between(x0 * um, x1 * um) & truth["y_um"].between(y0 * um, y1 * um)
    assert (~inside).sum() > 0 and len(cells) < len(truth)
