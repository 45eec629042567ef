"""Responsiveness of the review widget with 10,000 lesions (napari viewer under Xvfb).

Run on demand (never in CI), on a machine with Xvfb::

    xvfb-run -a python3 tests/benchmarks/bench_review.py [--lesions 10000] [--slide S] [--write]

A result folder with N lesions (and their cells) spread over a 30 x 30 mm section is written,
opened with the plugin's result reader in a real viewer with the Review widget docked, and
these are timed, each repeated on 50 lesions: selecting a lesion (row selected, viewer centred
and zoomed, point selected), changing its class (journal appended and synced to disk, layer
colours, table row and counts updated), rejecting it, and undo. Also the time to open the folder,
and with ``--slide``, the time the plugin's reader takes to open a whole slide (lazy multiscale
layers), to draw it first, and to pan (camera moved, window redrawn).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, write_section  # noqa: E402


def write_results(folder: Path, n: int, seed: int = 0) -> None:
    """A lungmets result folder with `n` lesions (classes as in an infected lung)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    cls = rng.choice(["single", "cluster", "focus"], n, p=[0.7, 0.2, 0.1])
    n_cells = np.where(
        cls == "single",
        1,
        np.where(cls == "cluster", rng.integers(2, 5, n), rng.integers(5, 60, n)),
    )
    ki67 = rng.binomial(n_cells, 0.3)
    lesions = pd.DataFrame(
        {
            "lesion_id": np.arange(1, n + 1),
            "x_um": rng.uniform(0, 30000, n),
            "y_um": rng.uniform(0, 30000, n),
            "n_cells": n_cells,
            "n_ki67_pos": ki67,
            "class": cls,
            "dormant": (cls == "single") & (ki67 == 0),
            "area_um2": n_cells * 150.0,
            "her2_mean": rng.uniform(200, 2000, n),
        }
    )
    lesions.to_csv(folder / "lesions.csv", index=False)
    cells = lesions.loc[lesions.index.repeat(lesions["n_cells"])].reset_index(drop=True)
    cells = pd.DataFrame(
        {
            "cell_id": np.arange(1, len(cells) + 1),
            "lesion_id": cells["lesion_id"],
            "x_um": cells["x_um"] + rng.normal(0, 8, len(cells)),
            "y_um": cells["y_um"] + rng.normal(0, 8, len(cells)),
            "ki67_pos": rng.random(len(cells)) < 0.3,
            "her2_mean": cells["her2_mean"],
        }
    )
    cells.to_csv(folder / "cells.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"input": {"pixel_size_um": 0.5}}))


def open_slide_times(path: Path) -> list[str]:
    """Open a slide with the plugin's reader in a viewer; time reading, first draw and panning."""
    import napari
    import tifffile

    from napari_plugin._reader import get_slide_reader
    from napari_plugin._review_widget import _camera

    viewer = napari.Viewer(show=False)
    viewer.screenshot(canvas_only=False)  # the window's own first paint, not the slide's
    t0 = time.perf_counter()
    layers = get_slide_reader(str(path))(str(path))
    for data, kw, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kw)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    viewer.screenshot(canvas_only=False)
    t_draw = time.perf_counter() - t0
    camera = _camera(viewer)
    pans = []
    for _ in range(10):
        c = list(camera.center)
        c[-1] += 200.0
        camera.center = c
        t0 = time.perf_counter()
        viewer.screenshot(canvas_only=False)
        pans.append(time.perf_counter() - t0)
    viewer.close()
    with tifffile.TiffFile(path) as tf:
        shape = tf.series[0].shape
    return [
        "",
        f"Opening a {shape[-1]} x {shape[-2]} slide ({path.stat().st_size / 1e6:.0f} MB) with the "
        f"plugin's reader: {t_open:.2f} s (layers added); first draw {t_draw:.2f} s; panning "
        f"200 um and redrawing the window: median {np.median(pans) * 1000:.0f} ms.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lesions", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_plugin._reader import get_results_reader
    from napari_plugin._review_widget import ReviewWidget

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench_slide"
        write_results(folder, args.lesions)
        viewer = napari.Viewer(show=False)
        t0 = time.perf_counter()
        for data, kw, kind in get_results_reader(str(folder))(str(folder)):
            getattr(viewer, f"add_{kind}")(data, **kw)
        widget = ReviewWidget(viewer)
        viewer.window.add_dock_widget(widget)
        QApplication.processEvents()
        t_open = time.perf_counter() - t0
        ids = list(widget.session.lesions.index)
        rng = np.random.default_rng(1)
        picks = rng.choice(ids, args.repeats, replace=False)
        times = {"select": [], "set class": [], "reject": [], "undo": []}
        for lid in picks:
            for name, fn in (
                ("select", lambda lid=lid: widget.select_lesion(lid)),
                ("set class", lambda: widget.set_class("focus")),
                ("reject", widget.reject),
                ("undo", widget.undo),
            ):
                t = time.perf_counter()
                fn()
                QApplication.processEvents()  # the canvas and table repaint
                times[name].append(time.perf_counter() - t)
        n_journal = len((folder / "corrections.jsonl").read_text().splitlines())
        viewer.close()

    slide_lines = [] if args.slide is None else open_slide_times(args.slide)
    lines = [
        machine_line(),
        "Command: `xvfb-run -a python3 tests/benchmarks/bench_review.py "
        f"--lesions {args.lesions}"
        + ("" if args.slide is None else " --slide SLIDE")
        + " --write` (SLIDE: `lungmets synth slide SLIDE --size 16384x12288 --group IAV "
        "--seed 5 --no-labels`)",
        "",
        f"Opening the result folder ({args.lesions} lesions) and docking the widget: "
        f"{t_open:.2f} s. Each action on {args.repeats} random lesions, including the repaint "
        f"({n_journal} journal lines written, each synced to disk):",
        "",
        "| action | median (ms) | 95th percentile (ms) | max (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ts in times.items():
        ms = np.array(ts) * 1000
        lines.append(
            f"| {name} | {np.median(ms):.1f} | {np.percentile(ms, 95):.1f} | {ms.max():.1f} |"
        )
    lines += slide_lines
    print("\n".join(lines))
    if args.write:
        write_section("bench_review", "Review widget responsiveness (napari)", lines)


if __name__ == "__main__":
    main()
