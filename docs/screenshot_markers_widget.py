"""Render docs/images/napari_markers.png: a slide, its cells and the Markers (Ki67) widget.

Writes the bundled infected sample section, analyses it with the shipped network, opens it and
its results in napari with the plugin's readers, docks the Markers widget and moves the
threshold above the slide's own (a preview: nothing is recorded), then saves a screenshot of
the whole window. Under a virtual X server on a machine without one::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_markers_widget.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _napari_scene import open_sample_section, save_window  # noqa: E402


def main(out: Path = HERE / "images" / "napari_markers.png") -> Path:
    viewer, widget = open_sample_section("Markers (Ki67 threshold)")
    cells = widget.cells_layer
    cells.visible = True
    widget.set_threshold(widget.session.ki67_threshold * 1.6)
    focus = widget.session.lesions.sort_values("n_cells").iloc[-1]
    viewer.camera.center = (float(focus["y_um"]), float(focus["x_um"]))
    viewer.camera.zoom = 4.0
    return save_window(viewer, out)


if __name__ == "__main__":
    print(main())
