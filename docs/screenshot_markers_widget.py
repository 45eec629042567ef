"""Render docs/images/napari_markers.png: a slide, its cells and the Markers (Ki67) widget.

Writes the bundled infected sample section, analyses it with the shipped network, opens it and
its results in napari with the plugin's readers, docks the Markers widget and moves the
threshold above the slide's own (a preview: nothing is recorded), then saves a screenshot of
the whole window. Under a virtual X server on a machine without one::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_markers_widget.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(out: Path = HERE / "images" / "napari_markers.png") -> Path:
    import napari
    from qtpy.QtWidgets import QApplication

    from histo.batch import run_batch
    from histo.synthetic import SAMPLE_SIZE_PX, generate_slide

    work = Path(tempfile.mkdtemp())
    slide = generate_slide(
        work / "lung_IAV_d15.ome.tif", size_px=SAMPLE_SIZE_PX, group="IAV", dpi=15, seed=41,
        labels=False,
    )  # fmt: skip
    (result,) = run_batch([slide.path], work / "results")
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 900)
    viewer.open(str(slide.path), plugin="lungmets")
    viewer.open(str(result.out_dir), plugin="lungmets")
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Markers (Ki67 threshold)")
    cells = widget.cells_layer
    cells.visible = True
    widget.set_threshold(widget.session.ki67_threshold * 1.6)
    focus = widget.session.lesions.sort_values("n_cells").iloc[-1]
    viewer.camera.center = (float(focus["y_um"]), float(focus["x_um"]))
    viewer.camera.zoom = 4.0
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()
    return out


if __name__ == "__main__":
    print(main())
