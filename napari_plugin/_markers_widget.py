"""Markers widget: the slide's Ki67 threshold, shown on its histogram, moved, checked, applied.

The histogram holds the nuclear Ki67 (in the run's ``--ki67-measure``) of the slide's
ordinary nuclei (the sample the threshold was calibrated on, grey) and of its HER2+ cells
(coloured), on a log scale, with the negative and positive populations and the threshold as
lines. Dragging the slider or typing a
value recolours the cells (magenta Ki67+, cyan Ki67-) and the lesions and updates the counts at
once (`histo.review.ReviewSession.preview_ki67_threshold`); "Apply" records the threshold in the
slide's correction journal (undoable; ``lungmets cohort`` counts with it), "Apply to study"
records it for every slide of a sample sheet. Nothing here names a group or a mouse, so a
blinded review stays blinded.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from ._layers import border_colours, lesion_colours
from ._widget_util import (
    SharedSessionMixin,
    drop_session,
    refill_layer_box,
    result_layers_of,
    session_hub,
    shared_session,
)

#: Slider steps over the log range of the histogram.
SLIDER_STEPS = 1000
KI67_POS = np.array([1.0, 0.2, 0.8, 1.0])  # magenta
KI67_NEG = np.array([0.2, 0.9, 0.9, 1.0])  # cyan


class MarkersWidget(SharedSessionMixin, QWidget):
    """Look at and set the Ki67 threshold of a lungmets result (a lesions layer).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    def __init__(self, napari_viewer):
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.session = None
        self.layer = None
        self.cells_layer = None
        self._lo, self._hi = 0.0, 4.0  # log10 range of the slider

        self.layer_box = QComboBox()
        self.method_label = QLabel("")
        self.method_label.setWordWrap(True)
        self.figure = Figure(figsize=(4.2, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, SLIDER_STEPS)
        self.value_box = QDoubleSpinBox()
        self.value_box.setRange(0, 1e9)
        self.value_box.setDecimals(1)
        self.value_box.setSuffix(" counts")
        self.counts_label = QLabel("")
        self.counts_label.setWordWrap(True)
        self.apply_button = QPushButton("Apply to this slide")
        self.auto_button = QPushButton("Slide's own (auto)")
        self.undo_button = QPushButton("Undo")
        self.study_button = QPushButton("Apply to study...")

        grid = QGridLayout()
        grid.addWidget(QLabel("lesions layer"), 0, 0)
        grid.addWidget(self.layer_box, 0, 1, 1, 2)
        grid.addWidget(QLabel("Ki67 threshold"), 1, 0)
        grid.addWidget(self.slider, 1, 1)
        grid.addWidget(self.value_box, 1, 2)
        buttons = QHBoxLayout()
        for b in (self.apply_button, self.auto_button, self.undo_button, self.study_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(grid)
        layout.addWidget(self.canvas)
        layout.addWidget(self.method_label)
        layout.addWidget(self.counts_label)
        layout.addLayout(buttons)

        self.slider.valueChanged.connect(self._on_slider)
        self.value_box.valueChanged.connect(self._on_value)
        self.apply_button.clicked.connect(lambda _=False: self.apply())
        self.auto_button.clicked.connect(lambda _=False: self.apply(None))
        self.undo_button.clicked.connect(lambda _=False: self.undo())
        self.study_button.clicked.connect(lambda _=False: self._ask_study())
        self.layer_box.currentIndexChanged.connect(self._on_layer)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        session_hub().changed.connect(self._on_session_changed)
        self._refresh_layers()

    # ----------------------------------------------------------------- layers

    def _refresh_layers(self, event=None):
        if refill_layer_box(self.layer_box, result_layers_of(self.viewer, "lesions"), self.layer):
            self._on_layer()

    def _on_layer(self, index=None):
        self.layer = self.layer_box.currentData()
        if self.layer is None:
            self.session = None
            return
        folder = self.layer.metadata["lungmets_results"]
        self.session = shared_session(folder)
        self.cells_layer = next(
            (
                c
                for c in result_layers_of(self.viewer, "cells")
                if str(c.metadata["lungmets_results"]) == str(folder)
            ),
            None,
        )
        hist = self.session.ki67_histogram()
        if hist is not None:
            edges = np.asarray(hist["edges_log10"], float)
            self._lo, self._hi = float(edges[0]), float(edges[-1])
        self._show(self.session.ki67_threshold)

    # ----------------------------------------------------------------- threshold

    @property
    def threshold(self) -> float | None:
        """The threshold shown (counts), or None without a result."""
        return None if self.session is None else float(self.value_box.value())

    def set_threshold(self, value: float) -> dict:
        """Show the slide as it would be called with `value` (nothing is recorded yet);
        returns the previewed counts."""
        self.value_box.setValue(float(value))  # -> _on_value -> _preview
        return self._preview_counts

    def _show(self, value):
        if value is None:
            return
        self.value_box.blockSignals(True)
        self.value_box.setValue(float(value))
        self.value_box.blockSignals(False)
        self._sync_slider(float(value))
        self._preview(float(value))

    def _sync_slider(self, value: float):
        pos = (np.log10(max(value, 1e-3)) - self._lo) / max(self._hi - self._lo, 1e-9)
        self.slider.blockSignals(True)
        self.slider.setValue(int(round(np.clip(pos, 0, 1) * SLIDER_STEPS)))
        self.slider.blockSignals(False)

    def _on_slider(self, step: int):
        value = 10 ** (self._lo + (self._hi - self._lo) * step / SLIDER_STEPS)
        self.value_box.blockSignals(True)
        self.value_box.setValue(value)
        self.value_box.blockSignals(False)
        self._preview(value)

    def _on_value(self, value: float):
        self._sync_slider(value)
        self._preview(value)

    def _preview(self, value: float):
        if self.session is None:
            return
        lesions, cells, counts = self.session.preview_ki67_threshold(value)
        self._preview_counts = counts
        if self.cells_layer is not None and len(cells) == len(self.cells_layer.data):
            pos = cells["ki67_pos"].to_numpy(bool)
            self.cells_layer.face_color = np.where(pos[:, None], KI67_POS, KI67_NEG)
        if self.layer is not None and len(lesions) == len(self.layer.data):
            self.layer.face_color = lesion_colours(lesions)
            self.layer.border_color = border_colours(lesions)
        n_single = counts["single"]
        frac = counts["ki67_pos_cells"] / max(counts["her2_cells"], 1)
        state = "applied" if self.session.ki67_threshold == value else "preview, not applied"
        self.counts_label.setText(
            f"{counts['dormant']} dormant single cells, {n_single - counts['dormant']} single "
            f"Ki67+, Ki67+ {frac:.1%} of {counts['her2_cells']} HER2+ cells ({state})"
        )
        self._draw(value)

    def _draw(self, value: float):
        fig = self.figure
        fig.clear()
        ax = fig.add_subplot(111)
        hist = self.session.ki67_histogram()
        if hist is not None:
            edges = 10 ** np.asarray(hist["edges_log10"], float)
            ax.stairs(hist["nuclei"], edges, fill=True, color="0.75", label="all nuclei")
            cells = np.asarray(hist["cells"], float)
            scale = max(np.max(hist["nuclei"]), 1) / max(cells.max(), 1)
            ax.stairs(cells * scale, edges, color="#c03090", label="HER2+ cells (scaled)")
            ax.set_xscale("log")
        run = self.session.run_ki67
        for key, style in (("negative_median", ":"), ("positive_median", "--")):
            v = (run or {}).get(key)
            if v:
                ax.axvline(v, color="0.35", ls=style, lw=1)
        ax.axvline(value, color="#1060d0", lw=2, label=f"threshold {value:.0f}")
        measure = {"ki67_p90": "brightest tenth of"}.get(self.session.ki67_column, "mean")
        ax.set_xlabel(f"{measure} nuclear Ki67 above offset (counts)")
        ax.set_yticks([])
        ax.legend(fontsize=7, frameon=False, loc="upper right")
        self.canvas.draw_idle()
        if run:
            leak = (run.get("compensation") or {}).get("her2_into_ki67") or 0.0
            self.method_label.setText(
                f"the slide's own threshold: {run.get('threshold', float('nan')):.0f} counts "
                f"({run.get('method')}); negatives around {run.get('negative_median') or 0:.0f}, "
                f"positives around {run.get('positive_median') or 0:.0f} (dotted, dashed)"
                + (f"; {leak:.0%} of HER2 seen in Ki67 taken out first" if leak else "")
            )

    # ----------------------------------------------------------------- record

    def apply(self, value: float | None = ...):
        """Record the threshold shown (or `value`; None: back to the slide's own) in the
        slide's correction journal."""
        if self.session is None:
            return None
        if value is ...:
            value = self.threshold
        c = self.session.set_ki67_threshold(value)
        self._show(self.session.ki67_threshold)
        self._tell_others()
        return c

    def undo(self):
        """Take back the slide's latest change (a threshold, or a lesion's class set in the
        Review widget)."""
        if self.session is None:
            return None
        c = self.session.undo()
        self._show(self.session.ki67_threshold)
        self._tell_others()
        return c

    def _session_refreshed(self) -> None:
        # A lesion reviewed (or a threshold set) in another widget: recount.
        self._show(self.session.ki67_threshold)

    def apply_to_study(self, sheet_path) -> list:
        """Record the threshold shown for every slide of a sample sheet (their result folders
        beside this slide's); returns the folders written."""
        from pathlib import Path

        from histo.cohort import set_study_ki67_threshold

        results_dir = Path(self.session.folder).parent
        folders = set_study_ki67_threshold(sheet_path, results_dir, self.threshold)
        # Their journals were written behind the shared sessions' backs: read them again.
        for folder in folders:
            drop_session(folder)
        self._on_layer()
        for folder in folders:
            session_hub().changed.emit(str(Path(folder).resolve()))
        return folders

    def _ask_study(self):  # pragma: no cover - a file dialog
        path, _ = QFileDialog.getOpenFileName(self, "Sample sheet", "", "CSV (*.csv)")
        if path:
            self.apply_to_study(path)
