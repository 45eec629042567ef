"""The "Compare mice" dock widget: one study, one call of `histo.cohort.analyze_cohort`.

Choose a sample sheet and the results folder of ``lungmets run``; "Compute" runs
`histo.cohort.analyze_cohort` in a napari ``thread_worker`` and shows its per-mouse table, a
box plot of the chosen metric (`histo.plots.metric_figure`, infected vs control at each day
post infection, every mouse a dot) and its headline. Reviewed counts are used wherever a slide's
result folder holds review corrections (`histo.cohort` does it). The exports are
`histo.plots.save_figure`, `histo.report.write_tables` and `histo.report.write_report`: the
same files as ``lungmets cohort``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._analyze_widget import AnalysisFailure

if TYPE_CHECKING:
    import napari

#: Text of the control combo that lets `histo.cohort.find_control` choose.
AUTO = "auto"
#: Columns of the mouse table that are provenance, not numbers: left out of the table.
HIDDEN_COLUMNS = ("input_sha256", "lungmets_version", "model_sha256", "parameters_sha256")
#: Role under which each cell of the table keeps its exact value (the text is rounded).
VALUE_ROLE = Qt.ItemDataRole.UserRole


def compute_cohort(samples, results_dir, control=None):
    """`histo.cohort.analyze_cohort`, with bad input returned as an `AnalysisFailure`.

    The body of the widget's worker.

    Parameters
    ----------
    samples : path-like
        The sample sheet.
    results_dir : path-like
        The ``--out`` folder of ``lungmets run``.
    control : str, optional
        The control group (default: found by name).

    Returns
    -------
    histo.cohort.CohortResult or AnalysisFailure
    """
    from histo.cohort import analyze_cohort
    from histo.errors import InputError

    try:
        return analyze_cohort(samples, results_dir, control=control)
    except InputError as exc:
        return AnalysisFailure(str(exc))


def _format(value) -> str:
    import numpy as np

    if isinstance(value, float | np.floating):
        return "" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


class CohortWidget(QWidget):
    """Compare infected with control mice from a sample sheet and per-slide results.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    parent : QWidget, optional

    Attributes
    ----------
    result : histo.cohort.CohortResult or None
        The last computed study.
    figure : matplotlib.figure.Figure
        The figure drawn in the widget.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        from histo.cohort import METRICS

        super().__init__(parent)
        self.viewer = napari_viewer
        self.result = None
        self.worker = None

        self.samples_edit = QLineEdit()
        self.samples_edit.setPlaceholderText("samples.csv: slide, mouse, group, dpi, section")
        self.samples_button = QToolButton()
        self.samples_button.setText("…")
        self.results_edit = QLineEdit()
        self.results_edit.setPlaceholderText("the --out folder of lungmets run")
        self.results_button = QToolButton()
        self.results_button.setText("…")
        self.control_combo = QComboBox()
        self.control_combo.setEditable(True)
        self.control_combo.addItem(AUTO)
        self.control_combo.setToolTip("The control group (auto: PBS, control, mock, saline …)")
        self.metric_combo = QComboBox()
        for key, label in METRICS.items():
            self.metric_combo.addItem(label, key)
        self.compute_button = QPushButton("Compute")
        self.export_figure_button = QPushButton("Export figure")
        self.export_tables_button = QPushButton("Export tables")
        self.export_report_button = QPushButton("Export report")
        for b in (self.export_figure_button, self.export_tables_button, self.export_report_button):
            b.setEnabled(False)
        self.export_tables_button.setToolTip("sections, mice, stats and trend as CSV")
        self.export_report_button.setToolTip("Tables, figures and report.html (lungmets cohort)")

        self.headline_label = QLabel("")
        self.headline_label.setWordWrap(True)
        self.headline_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(False)
        self.table.verticalHeader().setVisible(False)
        self.figure = Figure(figsize=(4.5, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

        form = QFormLayout()
        form.addRow("sample sheet", _row(self.samples_edit, self.samples_button))
        form.addRow("results", _row(self.results_edit, self.results_button))
        form.addRow("control", self.control_combo)
        form.addRow("metric", self.metric_combo)
        exports = QHBoxLayout()
        for b in (self.export_figure_button, self.export_tables_button, self.export_report_button):
            exports.addWidget(b)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.canvas)
        splitter.addWidget(self.table)
        splitter.setChildrenCollapsible(False)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.compute_button)
        layout.addWidget(self.headline_label)
        layout.addWidget(splitter, stretch=1)
        layout.addLayout(exports)
        layout.addWidget(self.status_label)

        self.samples_button.clicked.connect(self._choose_samples)
        self.results_button.clicked.connect(self._choose_results)
        self.compute_button.clicked.connect(self.compute)
        self.metric_combo.currentIndexChanged.connect(self._show_metric)
        self.export_figure_button.clicked.connect(lambda: self.export_figure())
        self.export_tables_button.clicked.connect(lambda: self.export_tables())
        self.export_report_button.clicked.connect(lambda: self.export_report())

    # ------------------------------------------------------------------ inputs

    @property
    def metric(self) -> str:
        """The chosen metric (a key of `histo.cohort.METRICS`)."""
        return self.metric_combo.currentData()

    @property
    def control(self) -> str | None:
        """The chosen control group, or None to let `histo.cohort` find it."""
        text = self.control_combo.currentText().strip()
        return None if text in ("", AUTO) else text

    def _choose_samples(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Sample sheet", self.samples_edit.text(), "Sample sheets (*.csv);;All (*)"
        )
        if path:
            self.samples_edit.setText(path)
            guess = Path(path).parent / "results"
            if not self.results_edit.text().strip() and guess.is_dir():
                self.results_edit.setText(str(guess))

    def _choose_results(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Results folder", self.results_edit.text())
        if folder:
            self.results_edit.setText(folder)

    # ------------------------------------------------------------------ computing

    def compute(self) -> None:
        """Run `histo.cohort.analyze_cohort` on the chosen files in a worker thread."""
        from napari.qt.threading import thread_worker

        samples = self.samples_edit.text().strip()
        results = self.results_edit.text().strip()
        if not samples or not results:
            self._fail("Choose a sample sheet and a results folder first.")
            return
        if self.worker is not None:
            return
        worker = thread_worker(compute_cohort, start_thread=False, progress={"desc": "cohort"})(
            samples, results, self.control
        )
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.compute_button.setEnabled(False)
        self.status_label.setText("Computing …")
        worker.start()

    def _on_finished(self) -> None:
        self.worker = None
        self.compute_button.setEnabled(True)

    def _on_returned(self, value) -> None:
        if isinstance(value, AnalysisFailure):
            self._fail(value.message)
            return
        self.show_result(value)

    def show_result(self, result) -> None:
        """Show a `histo.cohort.CohortResult`: table, plot, headline; enable the exports."""
        self.result = result
        self.control_combo.blockSignals(True)
        chosen = self.control_combo.currentText()
        self.control_combo.clear()
        self.control_combo.addItem(AUTO)
        self.control_combo.addItems(sorted(map(str, result.mice["group"].unique())))
        self.control_combo.setCurrentText(chosen)
        self.control_combo.blockSignals(False)
        self._fill_table(result.mice)
        self._show_metric()
        for b in (self.export_figure_button, self.export_tables_button, self.export_report_button):
            b.setEnabled(True)
        n = len(result.mice)
        text = f"{n} mice, {len(result.sections)} sections; control: {result.control}"
        text += "\n" + result.review_line()
        if result.warnings:
            text += "\n" + "\n".join(f"warning: {w}" for w in result.warnings)
        self.status_label.setText(text)

    def _fill_table(self, mice) -> None:
        columns = [c for c in mice.columns if c not in HIDDEN_COLUMNS]
        self.table.clear()
        self.table.setRowCount(len(mice))
        self.table.setColumnCount(len(columns))
        self.table.setHorizontalHeaderLabels(columns)
        for i, row in enumerate(mice[columns].itertuples(index=False)):
            for j, value in enumerate(row):
                item = QTableWidgetItem(_format(value))
                item.setData(VALUE_ROLE, value.item() if hasattr(value, "item") else value)
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()

    def table_frame(self):
        """The mouse table as shown, with exact values (a `pandas.DataFrame`)."""
        import pandas as pd

        columns = [
            self.table.horizontalHeaderItem(j).text() for j in range(self.table.columnCount())
        ]
        rows = [
            [self.table.item(i, j).data(VALUE_ROLE) for j in range(len(columns))]
            for i in range(self.table.rowCount())
        ]
        return pd.DataFrame(rows, columns=columns)

    def _show_metric(self, index=None) -> None:
        from histo.plots import metric_figure

        if self.result is None:
            return
        r = self.result
        self.figure.clear()
        if self.metric in r.mice.columns and r.mice[self.metric].notna().any():
            ax = self.figure.add_subplot()
            metric_figure(r.mice, self.metric, control=r.control, stats=r.stats, ax=ax)
            lines = r.headline(self.metric)
            self.headline_label.setText("\n".join(lines) or "No infected group to compare.")
        else:
            self.headline_label.setText(f"No values of {self.metric} (no Ki67 channel?).")
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ exports

    def export_figure(self, path: str | Path | None = None) -> Path | None:
        """Save the box plot of the chosen metric as PNG or SVG (by the file's suffix).

        Parameters
        ----------
        path : path-like, optional
            Where to save; a file dialog asks when not given.

        Returns
        -------
        Path or None
            The file written, or None if the dialog was cancelled.
        """
        from histo.plots import metric_figure, save_figure

        if self.result is None:
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Export figure", f"{self.metric}.png", "PNG (*.png);;SVG (*.svg)"
            )
            if not path:
                return None
        path = Path(path)
        fmt = path.suffix.lower().lstrip(".") or "png"
        if fmt not in ("png", "svg"):
            self._fail(f"{path.name}: save the figure as .png or .svg")
            return None
        r = self.result
        fig = metric_figure(r.mice, self.metric, control=r.control, stats=r.stats)
        (written,) = save_figure(fig, path.with_suffix(""), formats=(fmt,))
        self.status_label.setText(f"Figure written to {written}")
        return written

    def export_tables(self, folder: str | Path | None = None) -> list[Path]:
        """Write sections, mice, stats and trend tables (`histo.report.write_tables`).

        Parameters
        ----------
        folder : path-like, optional
            Where to write; a folder dialog asks when not given.

        Returns
        -------
        list of Path
        """
        from histo.report import write_tables

        folder = self._folder(folder, "Export tables")
        if folder is None:
            return []
        paths = write_tables(self.result, folder)
        self.status_label.setText(f"Tables written to {folder}")
        return paths

    def export_report(self, folder: str | Path | None = None) -> Path | None:
        """Write the full report, as ``lungmets cohort`` does (`histo.report.write_report`).

        Parameters
        ----------
        folder : path-like, optional
            Where to write; a folder dialog asks when not given.

        Returns
        -------
        Path or None
            ``report.html``.
        """
        from histo.report import write_report

        folder = self._folder(folder, "Export report")
        if folder is None:
            return None
        report = write_report(self.result, folder)
        self.status_label.setText(f"Report written to {report}")
        return report

    def _folder(self, folder, title: str) -> Path | None:
        if self.result is None:
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, title, self.results_edit.text())
            if not folder:
                return None
        return Path(folder)

    def _fail(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status_label.setText(message)
        show_error(message)


def _row(edit: QLineEdit, button: QToolButton) -> QWidget:
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(edit)
    row.addWidget(button)
    return box
