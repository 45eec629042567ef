"""What the README's napari screenshots share: the infected sample section, analysed, open."""

from __future__ import annotations

import tempfile
from pathlib import Path


def open_sample_section(widget_name: str):
    """Generate the bundled infected sample section, analyse it with the shipped network, open
    it and its results in a shown napari viewer and dock the lungmets widget `widget_name`;
    returns ``(viewer, widget)``."""
    import napari

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
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", widget_name)
    return viewer, widget


def save_window(viewer, out: Path) -> Path:
    """Let Qt paint, save a screenshot of the whole window to `out`, close the viewer."""
    from qtpy.QtWidgets import QApplication

    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()
    return out
