"""The "Analyze slide" dock widget: one slide, one call of `histo.pipeline.iter_analyze_slide`.

The widget builds an `histo.config.AnalysisConfig` from its controls, runs the library's
generator in a napari ``thread_worker`` (progress from its yields, cancel with the Cancel
button), writes the result with `histo.outputs.write_results` and shows the written folder as
layers (`napari_plugin._layers.result_layers`). It computes nothing itself: the same analysis
is ``histo.analyze_slide(path, config)`` in a script.

Heavy modules (histo's pipeline, pandas, dask) are imported only when the analysis runs, so
napari starts fast.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._widget_util import advance

if TYPE_CHECKING:
    import napari

#: Devices offered for the network (the combo is editable: ``cuda:1`` works too).
DEVICES = ("auto", "cpu", "cuda", "mps")
#: Name of the results folder created beside a slide when none is chosen.
RESULTS_FOLDER = "lungmets_results"
#: How the Ki67 measures (`histo.config.KI67_MEASURES`) read in the widget.
KI67_MEASURE_LABELS = {"mean": "mean of the nucleus", "p90": "brightest tenth (p90)"}
#: Sub-folder of the output folder for "Current view only" runs, so that they never
#: overwrite the results of the whole slide.
VIEW_SUBFOLDER = "current_view"

_SLIDE_KEY = "lungmets_slide"
_RESULTS_KEY = "lungmets_results"


@dataclass(frozen=True)
class AnalysisFailure:
    """A run that stopped on bad input (`histo.errors.InputError`): the message to show."""

    message: str


def slide_paths(layers) -> list[str]:
    """Paths of the slides shown by image layers, one per slide (not per channel), in order.

    Parameters
    ----------
    layers : iterable of napari layers

    Returns
    -------
    list of str
        The ``lungmets_slide`` metadata of the image layers that carry it.
    """
    from napari.layers import Image

    out: list[str] = []
    for layer in layers:
        path = layer.metadata.get(_SLIDE_KEY) if isinstance(layer, Image) else None
        if path and str(path) not in out:
            out.append(str(path))
    return out


def visible_region_px(viewer: napari.viewer.Viewer, layer) -> tuple[int, int, int, int] | None:
    """The part of a slide that the canvas shows, in level-0 pixels.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    layer : napari.layers.Image
        A layer of the slide (its data coordinates are level-0 pixels).

    Returns
    -------
    (y0, y1, x0, x1) or None
        The visible region clipped to the slide, or None when no part of the slide is visible.
    """
    import numpy as np

    camera = viewer.scene.camera
    height, width = viewer.canvas.size
    half = np.array([height, width], float) / camera.zoom / 2
    centre = np.asarray(camera.center, float)[-2:]
    ndim = layer.ndim
    corners = []
    for world in (centre - half, centre + half):
        point = np.zeros(ndim)
        point[-2:] = world
        corners.append(np.asarray(layer.world_to_data(point), float)[-2:])
    level0 = layer.data[0] if layer.multiscale else layer.data
    shape = np.asarray(level0.shape[-2:])
    lo = np.clip(np.floor(np.minimum(*corners)), 0, shape).astype(int)
    hi = np.clip(np.ceil(np.maximum(*corners)) + 1, 0, shape).astype(int)
    if np.any(hi <= lo):
        return None
    return int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1])


def analyze_and_write(path, config, out_dir, region_px=None, cancel=None):
    """Analyse a slide, write its results and read them back as layer data (a generator).

    The body of the widget's worker, and nothing but library calls:
    `histo.pipeline.iter_analyze_slide`, `histo.outputs.write_results` and
    `napari_plugin._layers.result_layers`.

    Parameters
    ----------
    path : path-like
        The slide.
    config : histo.config.AnalysisConfig
    out_dir : path-like
        Results go to ``out_dir/<slide name>/``.
    region_px : (y0, y1, x0, x1), optional
        Analyse only this region of level 0.
    cancel : threading.Event, optional
        Set by the Cancel button: chunks not yet started are not started, nothing is written.

    Yields
    ------
    (done, total, message)
        Progress of the analysis.

    Returns
    -------
    (Path, list of layer-data tuples), AnalysisFailure or None
        The written folder and its layers, the message of an `InputError`, or None when
        cancelled.
    """
    from histo.batch import check_output_folder
    from histo.errors import Cancelled, InputError
    from histo.outputs import write_results
    from histo.pipeline import iter_analyze_slide

    from ._layers import result_layers

    kwargs = {} if region_px is None else {"region_px": tuple(region_px)}
    kwargs["cancel"] = cancel
    try:
        check_output_folder(out_dir)
        result = yield from iter_analyze_slide(path, config, **kwargs)
        yield (1, 1, "writing results")
        try:
            folder = write_results(result, out_dir)
        except OSError as exc:
            return AnalysisFailure(
                f"{out_dir}: results not written: {exc.strerror or exc}; free space there or "
                "choose another output folder"
            )
        return folder, result_layers(folder)
    except InputError as exc:
        return AnalysisFailure(str(exc))
    except Cancelled:
        return None


class AnalyzeWidget(QWidget):
    """Analyse the slide shown in napari and add its lesions and cells as layers.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose slide layers (opened with the lungmets reader) are offered.
    parent : QWidget, optional

    Notes
    -----
    Defaults come from `histo.config.AnalysisConfig`; only the method, chunk size, device,
    screen and Ki67 measure are set here (the Ki67 threshold is moved afterwards, in the Markers
    widget; the measure cannot be: it is what the slide's nuclei were measured as). Results
    are written to ``<output folder>/<slide name>/`` (the same layout as ``lungmets run
    --out``), and "Current view only" runs to
    ``<output folder>/current_view/<slide name>/``.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        from histo.config import KI67_MEASURES, METHODS, AnalysisConfig

        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self._pbar = None
        self._returned = False
        self._cancel = threading.Event()
        self._default_out = ""
        defaults = AnalysisConfig()

        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("Slides opened with the lungmets reader")
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(METHODS))
        self.method_combo.setCurrentText(defaults.method)
        self.method_combo.setToolTip("unet: the segmentation network; classical: DAPI + HER2")
        self.chunk_spin = QSpinBox()
        self.chunk_spin.setRange(128, 65536)
        self.chunk_spin.setSingleStep(256)
        self.chunk_spin.setSuffix(" px")
        self.chunk_spin.setValue(defaults.chunk_size_px)
        self.chunk_spin.setToolTip("Side of a chunk in full-resolution pixels")
        self.device_combo = QComboBox()
        self.device_combo.setEditable(True)  # cuda:1 and friends
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setCurrentText(defaults.device)
        self.device_combo.setToolTip("Where the network runs (a missing GPU falls back to CPU)")
        self.screen_check = QCheckBox("screen candidates")
        self.screen_check.setChecked(defaults.screen)
        self.screen_check.setToolTip(
            "Run the network only around nuclei wrapped in HER2 (faster, same lesions)"
        )
        self.ki67_combo = QComboBox()
        for measure in KI67_MEASURES:
            self.ki67_combo.addItem(KI67_MEASURE_LABELS.get(measure, measure), measure)
        self.ki67_combo.setCurrentIndex(KI67_MEASURES.index(defaults.ki67_measure))
        self.ki67_combo.setToolTip(
            "What a nucleus's Ki67 is: the mean of its pixels, or their brightest tenth "
            "(granular positives stand out of a haze spread evenly on every nucleus). Keep "
            "one for a whole study."
        )
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText(f"{RESULTS_FOLDER} beside the slide")
        self.out_button = QToolButton()
        self.out_button.setText("…")
        self.out_button.setToolTip("Choose the output folder")
        out_row = QHBoxLayout()
        out_row.setContentsMargins(0, 0, 0, 0)
        out_row.addWidget(self.out_edit)
        out_row.addWidget(self.out_button)
        self.view_check = QCheckBox("Current view only")
        self.view_check.setToolTip("Analyse only the region of the slide shown in the canvas")

        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        form = QFormLayout()
        form.addRow("slide", self.slide_combo)
        form.addRow("method", self.method_combo)
        form.addRow("chunk size", self.chunk_spin)
        form.addRow("device", self.device_combo)
        form.addRow("", self.screen_check)
        form.addRow("Ki67 measure", self.ki67_combo)
        form.addRow("output folder", out_row)
        form.addRow("", self.view_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.method_combo.currentTextChanged.connect(self._on_method)
        self.slide_combo.currentIndexChanged.connect(self._on_slide)
        self.out_button.clicked.connect(self._choose_out)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self.refresh_slides)
        self.viewer.layers.events.removed.connect(self.refresh_slides)
        self.refresh_slides()
        self._on_method(self.method_combo.currentText())

    # ------------------------------------------------------------------ controls -> config

    @property
    def slide_path(self) -> str | None:
        """The chosen slide, or None."""
        return self.slide_combo.currentData()

    def config(self):
        """The `histo.config.AnalysisConfig` that the controls describe.

        Returns
        -------
        histo.config.AnalysisConfig
        """
        from histo.config import AnalysisConfig

        return AnalysisConfig(
            method=self.method_combo.currentText(),
            chunk_size_px=self.chunk_spin.value(),
            device=self.device_combo.currentText().strip() or "auto",
            screen=self.screen_check.isChecked(),
            ki67_measure=self.ki67_combo.currentData(),
        )

    def output_folder(self) -> Path | None:
        """The output folder (default: ``lungmets_results`` beside the slide)."""
        text = self.out_edit.text().strip()
        if text:
            return Path(text).expanduser()
        if self.slide_path is None:
            return None
        return Path(self.slide_path).parent / RESULTS_FOLDER

    def refresh_slides(self, event=None) -> None:
        """Re-list the slide layers, keeping the current choice when it is still there."""
        from histo.io import slide_name

        current = self.slide_path
        paths = slide_paths(self.viewer.layers)
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        for p in paths:
            self.slide_combo.addItem(slide_name(p), p)
            self.slide_combo.setItemData(
                self.slide_combo.count() - 1, p, Qt.ItemDataRole.ToolTipRole
            )
        if current in paths:
            self.slide_combo.setCurrentIndex(paths.index(current))
        self.slide_combo.blockSignals(False)
        self._on_slide()

    def _on_slide(self, index=None) -> None:
        # Follow the slide until the user types or picks a folder of their own.
        if self.out_edit.text() in ("", self._default_out):
            path = self.slide_path
            self._default_out = "" if path is None else str(Path(path).parent / RESULTS_FOLDER)
            self.out_edit.setText(self._default_out)
        self.run_button.setEnabled(self.slide_path is not None and self.worker is None)

    def _on_method(self, method: str) -> None:
        network = method == "unet"
        self.device_combo.setEnabled(network)
        self.screen_check.setEnabled(network)

    def _choose_out(self) -> None:
        start = str(self.output_folder() or Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Output folder", start)
        if folder:
            self.out_edit.setText(folder)

    def _slide_layer(self, path: str):
        from napari.layers import Image

        for layer in self.viewer.layers:
            if isinstance(layer, Image) and layer.metadata.get(_SLIDE_KEY) == path:
                return layer
        return None

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Start the analysis of the chosen slide in a worker thread."""
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        path = self.slide_path
        if path is None or self.worker is not None:
            return
        try:
            config = self.config()
        except ValueError as exc:
            self._fail(str(exc))
            return
        out_dir = self.output_folder()
        region = None
        if self.view_check.isChecked() and self.view_check.isEnabled():
            layer = self._slide_layer(path)
            region = None if layer is None else visible_region_px(self.viewer, layer)
            if region is None:
                self._fail("The slide is not in view: pan to it or untick 'Current view only'.")
                return
            out_dir = out_dir / VIEW_SUBFOLDER

        self._pbar = progress(total=0, desc=f"lungmets: {Path(path).name}")
        self._cancel = threading.Event()
        self._returned = False
        worker = thread_worker(analyze_and_write, start_thread=False)(
            path, config, out_dir, region, self._cancel
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        where = "the current view of " if region else ""
        self._set_status(f"Analysing {where}{Path(path).name} ({config.method}) …")
        worker.start()

    def cancel(self) -> None:
        """Stop the running analysis: chunks not yet started are not started (the running
        ones finish), and nothing is written."""
        if self.worker is not None:
            self._cancel.set()
            self.worker.quit()
            self._set_status("Cancelling …")

    def _on_progress(self, step) -> None:
        if self._returned:  # a step's signal handled after the result: stale
            return
        done, total, message = step
        # The status first: moving the progress bar may let the result's signal in, whose
        # status must stay the last word.
        if message == "chunks":
            self._set_status(f"Analysing: {done} of {total} chunks")
        elif message == "overview":
            self._set_status(f"No pyramid: reading an overview, {done} of {total} regions")
        else:
            self._set_status(f"{message[:1].upper()}{message[1:]} …")
        advance(self._pbar, done, total, message)

    def _on_returned(self, value) -> None:
        self._returned = True
        if value is None:  # cancelled before anything was written
            self._on_aborted()
            return
        if isinstance(value, AnalysisFailure):
            self._fail(value.message)
            return
        folder, layers = value
        self.show_results(folder, layers)
        n = sum(
            len(data)
            for data, kwargs, _ in layers
            if kwargs["metadata"].get("lungmets_kind") == "lesions"
        )
        self._set_status(f"Done: {n} lesions, written to {folder}")

    def _on_aborted(self) -> None:
        self._set_status("Cancelled.")

    def _on_finished(self) -> None:
        if self._cancel.is_set() and self.status_label.text() == "Cancelling …":
            # Cancelled while the last chunks finished: the worker neither returned a result
            # nor saw the abort between two steps.
            self._on_aborted()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.worker = None
        self.cancel_button.setEnabled(False)
        self.run_button.setEnabled(self.slide_path is not None)

    def show_results(self, folder, layers) -> list:
        """Add result layers, replacing earlier ones from the same folder.

        Parameters
        ----------
        folder : path-like
            The result folder the layers were read from.
        layers : list of layer-data tuples
            From `napari_plugin._layers.result_layers`.

        Returns
        -------
        list of napari layers
            The layers added.
        """
        from napari.layers import Layer

        folder = Path(folder).resolve()
        for layer in list(self.viewer.layers):
            old = layer.metadata.get(_RESULTS_KEY)
            if old and Path(old).resolve() == folder:
                self.viewer.layers.remove(layer)
        return [self.viewer.add_layer(Layer.create(*layer)) for layer in layers]

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _fail(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._set_status(message)
        show_error(message)
