"""The Teach widget in a real napari viewer (under Xvfb): fine-tunes from the reviewed slides
of a results folder in a worker, analyses the slide again and shows the counts."""

from __future__ import annotations

import shutil

import pytest

from histo.review import ReviewSession
from models import load_model
from napari_plugin._reader import get_results_reader

pytestmark = pytest.mark.napari


def test_teach_widget_fine_tunes_and_compares_the_counts(
    make_napari_viewer, qtbot, analysed, tmp_path
):
    folder = tmp_path / "results" / analysed[1].name
    shutil.copytree(analysed[1], folder)
    s = ReviewSession(folder)
    cells = s.cells
    s.add_cell(float(cells["x_um"].iloc[0]) + 40.0, float(cells["y_um"].iloc[0]) + 40.0)
    s.delete_cell(int(cells.index[-1]))
    viewer = make_napari_viewer()
    for data, kw, kind in get_results_reader(str(folder))(str(folder)):
        getattr(viewer, f"add_{kind}")(data, **kw)
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Teach (fine-tune from reviews)")
    assert widget.sources() == [folder]
    assert "1 reviewed slide(s)" in widget.sources_label.text()
    widget.steps.setValue(2)
    widget.synthetic.setValue(0.0)
    out = tmp_path / "taught.pt"
    widget.out_edit.setText(str(out))
    widget.run()
    assert widget.worker is not None and not widget.teach_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
    assert widget.result is not None, widget.status_label.text()
    assert load_model(out).config["n_corrections"] == 2
    c = widget.result.compare
    assert c["reviewed"] == ReviewSession(folder).counts()
    text = widget.status_label.text()
    assert f"{c['new_model']['her2_cells']} with the new model" in text
    assert f"{c['reviewed']['her2_cells']} as reviewed" in text
    # The new results are shown beside the old ones.
    new = [lyr for lyr in viewer.layers if lyr.metadata.get("lungmets_results") == c["results"]]
    assert {lyr.metadata["lungmets_kind"] for lyr in new} == {"cells", "lesions"}
    assert all(lyr.name.endswith("(taught)") for lyr in new)


def test_teach_widget_chooses_the_operating_point_only(make_napari_viewer, qtbot, tmp_path):
    """ "Operating point only": the threshold chosen on a region reviewed completely, the same
    tensors written under the new name, the slide analysed again and shown; with too few
    reviewed cells, the reason is shown and nothing is written."""
    from histo.batch import run_batch
    from histo.config import AnalysisConfig
    from histo.synthetic import generate_slide

    s = generate_slide(
        tmp_path / "lung.ome.tif", size_px=(1536, 1536), group="IAV", dpi=28, seed=61, labels=False
    )
    (out,) = run_batch([s.path], tmp_path / "results", AnalysisConfig(method="classical"))
    session = ReviewSession(out.out_dir)
    session.mark_complete(0.0, 0.0, 100.0, 100.0)  # a corner: too few cells
    viewer = make_napari_viewer()
    for data, kw, kind in get_results_reader(str(out.out_dir))(str(out.out_dir)):
        getattr(viewer, f"add_{kind}")(data, **kw)
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Teach (fine-tune from reviews)")
    widget.operating_point_only.setChecked(True)
    assert not widget.steps.isEnabled() and not widget.synthetic.isEnabled()
    model = tmp_path / "study.pt"
    widget.out_edit.setText(str(model))
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
    assert "at least 50" in widget.status_label.text() and not model.exists()

    session.mark_complete(0.0, 0.0, 768.0, 768.0)  # the whole section
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
    assert widget.result is not None, widget.status_label.text()
    cfg = load_model(model).config
    assert cfg["sha256"] == load_model(None).sha256  # the shipped tensors
    assert cfg["centre_threshold"] == widget.result["centre_threshold"]
    assert "the same tensors, centre threshold" in widget.status_label.text()
    c = widget.result["compare"]
    new = [lyr for lyr in viewer.layers if lyr.metadata.get("lungmets_results") == c["results"]]
    assert {lyr.metadata["lungmets_kind"] for lyr in new} == {"cells", "lesions"}
    assert all(lyr.name.endswith("(study)") for lyr in new)
