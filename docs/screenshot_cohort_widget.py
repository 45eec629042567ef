"""Render docs/images/napari_cohort.png: the "Compare mice" widget docked in napari.

Generates a small study (infected and control mice at 3 and 15 days post infection), analyses
it with the classical detector, opens one infected section with its lesions in the viewer, runs
the widget on the study and saves a screenshot of the whole window. About a minute on 2 cores.

On a machine without a screen, run it under a virtual X server::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_cohort_widget.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_study(work: Path) -> Path:
    """Generate and analyse the study in `work`; returns the sample sheet."""
    from histo.batch import run_batch
    from histo.config import AnalysisConfig
    from histo.synthetic import generate_cohort

    sheet = work / "samples.csv"
    if not sheet.exists():
        generate_cohort(
            work, mice=4, sections=1, dpis=(3, 15), size_px=(1024, 768), seed=3, labels=False
        )
    slides = sorted(work.glob("*.ome.tif"))
    run_batch(slides, work / "results", AnalysisConfig(method="classical"))
    return sheet


def screenshot(work: Path, out: Path, size=(1500, 900)) -> Path:
    """Dock the cohort widget in a viewer showing one analysed section; save the window."""
    import napari
    import npe2
    from napari.layers import Layer
    from qtpy.QtWidgets import QApplication

    from napari_plugin._reader import read_results, read_slide

    npe2.PluginManager.instance().discover()
    sheet = make_study(work)
    viewer = napari.Viewer(show=False)
    viewer.window.resize(*size)
    slide = work / "IAV_d15_m1_s1.ome.tif"
    for layer_data in read_slide(str(slide)) + read_results(
        str(work / "results" / slide.name[:-8])
    ):
        viewer.add_layer(Layer.create(*layer_data))
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Compare mice")
    widget.setMinimumWidth(620)
    widget.samples_edit.setText(str(sheet))
    widget.results_edit.setText(str(work / "results"))
    widget.compute()
    app = QApplication.instance()
    deadline = time.monotonic() + 300
    while widget.worker is not None and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.05)
    if widget.result is None:
        raise RuntimeError(f"the cohort did not compute: {widget.status_label.text()}")
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "images" / "napari_cohort.png")
    parser.add_argument("--work", type=Path, help="folder for the study (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        print(screenshot(args.work, args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="lungmets_screenshot_") as tmp:
            print(screenshot(Path(tmp), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
