"""Teach widget: fine-tune the network on the reviewed slides, and see what it changes.

It takes every reviewed slide (a ``corrections.jsonl``) of the results folder of the chosen
lesions layer, fine-tunes the model (`models.teach.iter_teach`) in a worker thread with a
progress bar and a Cancel button, analyses the chosen slide again with the new model and shows
its counts as the analysis found them, as reviewed, and with the new model; the new results
are added as layers. With "operating point only" it keeps the model's tensors and chooses only
its nucleus-centre threshold on the regions reviewed completely
(`models.teach.iter_calibrate_on_reviews`). Nothing here names a group or a mouse.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._widget_util import advance, refill_layer_box, result_layers_of


def teach_and_compare(out, folders, slide_folder, *, init_model=None, steps=300, **kwargs):
    """Worker body: `models.teach.iter_teach` with the chosen slide analysed again; returns
    ``(TeachResult, layer-data tuples of the new results)``."""
    from histo.errors import InputError
    from models.teach import iter_teach

    from ._layers import result_layers

    try:
        result = yield from iter_teach(
            out, folders, init_model=init_model, steps=steps, reanalyse=slide_folder, **kwargs
        )
    except InputError as exc:
        return str(exc)
    return result, result_layers(result.compare["results"])


def calibrate_and_compare(out, folders, slide_folder, *, init_model=None):
    """Worker body: `models.teach.iter_calibrate_on_reviews` with the chosen slide analysed
    again; returns ``(calibration dict, layer-data tuples of the new results)``."""
    from histo.errors import InputError
    from models.teach import iter_calibrate_on_reviews

    from ._layers import result_layers

    try:
        cal = yield from iter_calibrate_on_reviews(
            out, folders, init_model=init_model, reanalyse=slide_folder
        )
    except InputError as exc:
        return str(exc)
    return cal, result_layers(cal["compare"]["results"])


class TeachWidget(QWidget):
    """Fine-tune the network from the reviews of a results folder.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.layer = None
        self.worker = None
        self.result = None
        self._returned = False
        self._pbar = None

        self.layer_box = QComboBox()
        self.sources_label = QLabel("")
        self.sources_label.setWordWrap(True)
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("the shipped model")
        self.model_button = QPushButton("…")
        self.steps = QSpinBox()
        self.steps.setRange(1, 100000)
        self.steps.setValue(300)
        self.synthetic = QDoubleSpinBox()
        self.synthetic.setRange(0.0, 0.9)
        self.synthetic.setSingleStep(0.05)
        self.synthetic.setValue(0.25)
        self.synthetic.setToolTip(
            "share of each batch from generated slides of the house style, so the network "
            "keeps what it knew (0: only your reviews)"
        )
        self.operating_point_only = QCheckBox("operating point only (keep the tensors)")
        self.operating_point_only.setToolTip(
            "choose only the nucleus-centre threshold, on the regions you marked reviewed "
            "completely (at least 50 cells): for images the network is less sure of"
        )
        self.operating_point_only.toggled.connect(self._on_mode)
        self.out_edit = QLineEdit()
        self.teach_button = QPushButton("Teach")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        grid = QGridLayout()
        grid.addWidget(QLabel("slide (lesions layer)"), 0, 0)
        grid.addWidget(self.layer_box, 0, 1, 1, 2)
        grid.addWidget(QLabel("learn from"), 1, 0)
        grid.addWidget(self.sources_label, 1, 1, 1, 2)
        grid.addWidget(QLabel("start from"), 2, 0)
        grid.addWidget(self.model_edit, 2, 1)
        grid.addWidget(self.model_button, 2, 2)
        grid.addWidget(QLabel("steps"), 3, 0)
        grid.addWidget(self.steps, 3, 1)
        grid.addWidget(QLabel("house-style share"), 4, 0)
        grid.addWidget(self.synthetic, 4, 1)
        grid.addWidget(self.operating_point_only, 5, 0, 1, 3)
        grid.addWidget(QLabel("new model"), 6, 0)
        grid.addWidget(self.out_edit, 6, 1, 1, 2)
        buttons = QHBoxLayout()
        buttons.addWidget(self.teach_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(grid)
        layout.addLayout(buttons)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.layer_box.currentIndexChanged.connect(self._on_layer)
        self.model_button.clicked.connect(self._choose_model)
        self.teach_button.clicked.connect(lambda _=False: self.run())
        self.cancel_button.clicked.connect(lambda _=False: self.cancel())
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # ----------------------------------------------------------------- inputs

    def _refresh_layers(self, event=None):
        if refill_layer_box(self.layer_box, result_layers_of(self.viewer, "lesions"), self.layer):
            self._on_layer()

    def _on_layer(self, index=None):
        self.layer = self.layer_box.currentData()
        folders = self.sources()
        if self.layer is None:
            self.sources_label.setText("Open a lungmets result folder first.")
        elif not folders:
            self.sources_label.setText(
                "No reviewed slide in this results folder yet: review cells and lesions in the "
                "Review widget first."
            )
        else:
            self.sources_label.setText(
                f"{len(folders)} reviewed slide(s) in {self.results_dir}: "
                + ", ".join(f.name for f in folders[:6])
                + (" …" if len(folders) > 6 else "")
            )
            if not self.out_edit.text():
                self.out_edit.setText(str(self.results_dir.parent / "lungmets_taught.pt"))
        self.teach_button.setEnabled(bool(folders) and self.worker is None)

    def _on_mode(self, checked: bool) -> None:
        self.steps.setEnabled(not checked)
        self.synthetic.setEnabled(not checked)

    @property
    def results_dir(self) -> Path | None:
        """The results folder holding the chosen slide's result folder."""
        if self.layer is None:
            return None
        return Path(self.layer.metadata["lungmets_results"]).parent

    def sources(self) -> list[Path]:
        """The reviewed slides to learn from: result folders with a journal."""
        from histo.review import JOURNAL

        if self.results_dir is None:
            return []
        return sorted(f.parent for f in self.results_dir.glob(f"*/{JOURNAL}"))

    def _choose_model(self):  # pragma: no cover - a file dialog
        path, _ = QFileDialog.getOpenFileName(self, "Model to start from", "", "Model (*.pt)")
        if path:
            self.model_edit.setText(path)

    # ----------------------------------------------------------------- running

    def run(self) -> None:
        """Fine-tune in a worker thread, then analyse the chosen slide with the new model."""
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        folders = self.sources()
        if not folders or self.worker is not None:
            return
        out = Path(self.out_edit.text() or self.results_dir.parent / "lungmets_taught.pt")
        if out.suffix != ".pt":
            self._set_status(f"{out}: the new model is a .pt file; give a name like taught.pt")
            return
        slide_folder = Path(self.layer.metadata["lungmets_results"])
        init_model = self.model_edit.text() or None
        self._pbar = progress(total=0, desc="lungmets: teaching")
        if self.operating_point_only.isChecked():
            worker = thread_worker(calibrate_and_compare, start_thread=False)(
                out, folders, slide_folder, init_model=init_model
            )
        else:
            worker = thread_worker(teach_and_compare, start_thread=False)(
                out,
                folders,
                slide_folder,
                init_model=init_model,
                steps=int(self.steps.value()),
                synthetic_share=float(self.synthetic.value()),
                data_dir=self.results_dir.parent / "lungmets_training_data",
            )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.aborted.connect(lambda: self._set_status("Cancelled; no model written."))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._returned = False
        self.teach_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._set_status(f"Teaching from {len(folders)} reviewed slide(s) …")
        worker.start()

    def cancel(self) -> None:
        """Stop at the next step (no model is written)."""
        if self.worker is not None:
            self.worker.quit()
            self._set_status("Cancelling …")

    def _on_progress(self, step) -> None:
        if self._returned:  # a step's signal that arrives after the result: stale
            return
        done, total, message = step
        # The status first: moving the progress bar may let the result's signal in, whose
        # status must stay the last word.
        self._set_status(f"{message[:1].upper()}{message[1:]} ({done}/{total}) …")
        advance(self._pbar, done, total, message)

    def _on_returned(self, value) -> None:
        from napari.layers import Layer

        self._returned = True
        if isinstance(value, str):
            self._set_status(value)
            return
        result, layers = value
        self.result = result
        if isinstance(result, dict):  # operating point only
            model_path, c = Path(result["model_path"]), result["compare"]
            what = (
                f"New model {model_path.name}: the same tensors, centre threshold "
                f"{result['parent']} -> {result['centre_threshold']} (chosen on "
                f"{result['n_reviewed']} cells reviewed completely)."
            )
        else:
            model_path, c = result.model_path, result.compare
            what = (
                f"New model {model_path.name} ({result.n_corrections} corrections, "
                f"{result.seconds:.0f} s)."
            )
        a, r, n = c["analysed"], c["reviewed"], c["new_model"]
        for layer in list(self.viewer.layers):
            if str(layer.metadata.get("lungmets_results")) == str(c["results"]):
                self.viewer.layers.remove(layer)
        for data, kwargs, kind in layers:  # named after the model, beside the reviewed ones
            kwargs = {**kwargs, "name": f"{kwargs['name']} ({model_path.stem})"}
            self.viewer.add_layer(Layer.create(data, kwargs, kind))
        self._set_status(
            f"{what} HER2+ cells on this slide: {a['her2_cells']} as analysed, "
            f"{r['her2_cells']} as reviewed, {n['her2_cells']} with the new model "
            f"(lesions {a['lesions']} / {r['lesions']} / {n['lesions']}). "
            f"Use it: lungmets run SLIDES --model {model_path}"
        )

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.worker = None
        self.cancel_button.setEnabled(False)
        self.teach_button.setEnabled(bool(self.sources()))

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)
