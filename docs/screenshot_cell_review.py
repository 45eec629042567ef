"""Render docs/images/napari_cell_review.png: reviewing single cells, then teaching.

Writes the bundled infected sample section, analyses it with the shipped network, opens it in
napari with the Review widget, zooms to a single cell, adds a cell the analysis "missed" next
to it (the single becomes a cluster, status edited), marks the view as reviewed completely,
then docks the Teach widget and fine-tunes for a few steps on that review (house-style share 0,
so nothing is generated), and saves a screenshot of the whole window. Under a virtual X server
on a machine without one::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_cell_review.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _napari_scene import open_sample_section, save_window  # noqa: E402


def main(out: Path = HERE / "images" / "napari_cell_review.png") -> Path:
    from qtpy.QtWidgets import QApplication

    viewer, review = open_sample_section("Review lesions")
    lesions = review.session.lesions
    single = lesions[lesions["n_cells"] == 1].iloc[0]
    x, y = float(single["x_um"]), float(single["y_um"])
    viewer.camera.center = (y, x)
    viewer.camera.zoom = 5.0
    review.set_add_mode(True)
    review.add_cell(x + 14.0, y + 6.0, ki67_pos=False)
    review.set_add_mode(False)
    review.mark_view_complete()
    _, teach = viewer.window.add_plugin_dock_widget("lungmets", "Teach (fine-tune from reviews)")
    teach.steps.setValue(20)
    teach.synthetic.setValue(0.0)
    teach.out_edit.setText(str(Path(tempfile.mkdtemp()) / "taught.pt"))
    teach.run()
    while teach.worker is not None:
        QApplication.processEvents()
    viewer.camera.center = (y, x)
    viewer.camera.zoom = 5.0
    return save_window(viewer, out)


if __name__ == "__main__":
    print(main())
