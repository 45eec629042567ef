"""The "Compare mice" widget in a real viewer, on a generated and analysed cohort."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.napari

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small study (3 infected and 3 control mice, 1 section each), analysed."""
    from histo.batch import run_batch
    from histo.config import AnalysisConfig
    from histo.synthetic import generate_cohort

    d = tmp_path_factory.mktemp("cohort")
    sheet = generate_cohort(
        d, mice=3, sections=1, dpis=(15,), size_px=(768, 640), seed=1, labels=False
    )
    outcomes = run_batch(
        [d / s for s in sheet["slide"]], d / "results", AnalysisConfig(method="classical")
    )
    assert all(o.ok for o in outcomes), [o.message for o in outcomes]
    return d


def _cohort_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("lungmets", "Compare mice")
    return widget


def _compute(qtbot, widget, samples, results):
    from qtpy.QtCore import Qt

    widget.samples_edit.setText(str(samples))
    widget.results_edit.setText(str(results))
    qtbot.mouseClick(widget.compute_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)


def _assert_same_mice(shown: pd.DataFrame, expected: pd.DataFrame, rtol: float) -> None:
    assert len(shown) == len(expected) == 6
    for column in shown.columns:
        want = expected[column]
        got = shown[column]
        if pd.api.types.is_numeric_dtype(want):
            np.testing.assert_allclose(
                got.to_numpy(float), want.to_numpy(float), rtol=rtol, err_msg=column
            )
        else:
            assert got.astype(str).tolist() == want.astype(str).tolist(), column


def test_mouse_table_equals_the_library_and_the_cli(make_napari_viewer, qtbot, study, tmp_path):
    from histo.cohort import METRICS, analyze_cohort

    viewer = make_napari_viewer()
    widget = _cohort_widget(viewer)
    _compute(qtbot, widget, study / "samples.csv", study / "results")
    assert widget.result is not None, widget.status_label.text()

    expected = analyze_cohort(study / "samples.csv", study / "results")
    # Nobody reviewed these slides, and the widget says so.
    assert f"0 of {len(expected.sections)} sections reviewed" in widget.status_label.text()
    shown = widget.table_frame()
    assert {"mouse", "group", "dpi", "her2_cells", "her2_cells_per_mm2"} <= set(shown.columns)
    _assert_same_mice(shown, expected.mice, rtol=1e-12)
    assert expected.mice["her2_cells"].sum() > 0

    report = tmp_path / "report"
    cli = subprocess.run(
        [sys.executable, "-m", "histo", "cohort", "samples.csv", "results", "--out", str(report)],
        cwd=study,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    _assert_same_mice(shown, pd.read_csv(report / "mice.csv"), rtol=1e-5)

    # The plot and the headline follow the metric; the control was found by name.
    assert widget.result.control == "PBS"
    assert widget.headline_label.text() == "\n".join(expected.headline(widget.metric))
    assert widget.figure.axes[0].get_ylabel() == METRICS[widget.metric]
    widget.metric_combo.setCurrentIndex(widget.metric_combo.findData("dormant_per_mm2"))
    assert widget.headline_label.text() == "\n".join(expected.headline("dormant_per_mm2"))
    assert widget.figure.axes[0].get_ylabel() == METRICS["dormant_per_mm2"]

    # Exports write what `lungmets cohort` writes.
    tables = tmp_path / "tables"
    widget.export_tables(tables)
    pd.testing.assert_frame_equal(
        pd.read_csv(tables / "mice.csv"), pd.read_csv(report / "mice.csv")
    )
    assert widget.export_figure(tmp_path / "fig.png").stat().st_size > 1000
    assert widget.export_figure(tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")
    assert widget.export_report(tmp_path / "report2").name == "report.html"


def test_bad_sample_sheet_is_reported_in_the_status_line(make_napari_viewer, qtbot, study):
    viewer = make_napari_viewer()
    widget = _cohort_widget(viewer)
    missing = study / "no_such_sheet.csv"
    _compute(qtbot, widget, missing, study / "results")
    assert widget.result is None
    assert "no_such_sheet.csv" in widget.status_label.text()
    assert not widget.export_tables_button.isEnabled()


def test_unknown_control_group_is_reported(make_napari_viewer, qtbot, study):
    viewer = make_napari_viewer()
    widget = _cohort_widget(viewer)
    widget.control_combo.setCurrentText("MOCK")
    _compute(qtbot, widget, study / "samples.csv", study / "results")
    assert widget.result is None
    assert "MOCK" in widget.status_label.text()
