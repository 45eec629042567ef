"""Render docs/images/napari_review.png: a slide, its lesions and the "Review lesions" widget.

Writes the bundled infected sample section, analyses it with the shipped network, opens it and
its results in napari with the plugin's readers, docks the Review widget, reviews two lesions
and saves a screenshot of the whole window. Under a virtual X server on a machine without one::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_review_widget.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _napari_scene import open_sample_section, save_window  # noqa: E402


def main(out: Path = HERE / "images" / "napari_review.png") -> Path:
    viewer, widget = open_sample_section("Review lesions")
    lesions = widget.session.lesions
    focus = lesions.index[lesions["review_class"] == "focus"][0]
    widget.select_lesion(lesions.index[0])
    widget.accept()
    widget.select_lesion(focus)
    widget.accept()
    viewer.reset_view()
    return save_window(viewer, out)


if __name__ == "__main__":
    print(main())
