"""Review widget: every lesion one click away, every correction kept.

The widget shows the lesion table of a lesions layer (sortable; filtered by class, status, size
and HER2), centres the viewer on a lesion when its row is clicked, and records each decision
through `histo.review.ReviewSession`, which appends it to the result folder's journal at once.

Keys (while the table has the focus): ``1`` dormant single, ``2`` single Ki67+, ``3`` cluster,
``4`` focus, ``A`` accept, ``R`` / ``Delete`` reject, ``N`` next unreviewed, ``Ctrl+Z`` undo.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QSortFilterProxyModel, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from ._layers import border_colours, cell_colours, lesion_colours, lesion_sizes_um
from ._widget_util import (
    SharedSessionMixin,
    refill_layer_box,
    result_layers_of,
    session_hub,
    shared_session,
)

COLUMNS = (
    "lesion_id",
    "review_class",
    "status",
    "n_cells",
    "n_ki67_pos",
    "area_um2",
    "her2_mean",
    "x_um",
    "y_um",
)
KEYS = {"1": "dormant", "2": "single", "3": "cluster", "4": "focus"}
#: Zooming to a lesion shows about this many micrometres across a canvas of CANVAS_PX pixels.
FIELD_OF_VIEW_UM = 250.0
CANVAS_PX = 800


class LesionTableModel(QAbstractTableModel):
    """The lesion table of a review session, as a Qt model (fast for 10,000s of rows)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._df = None
        self._values = np.empty((0, len(COLUMNS)), object)

    def set_frame(self, df) -> None:
        self.beginResetModel()
        self._df = df
        self._values = (
            df[list(COLUMNS)].to_numpy(object) if df is not None else np.empty((0, 9), object)
        )
        self.endResetModel()

    def update_row(self, row: int) -> None:
        self._values[row] = self._df.iloc[row][list(COLUMNS)].to_numpy(object)
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(COLUMNS) - 1))

    def rowCount(self, parent=None):  # noqa: N802 (Qt API)
        return 0 if parent is not None and parent.isValid() else len(self._values)

    def columnCount(self, parent=None):  # noqa: N802
        return len(COLUMNS)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        v = self._values[index.row(), index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            if isinstance(v, float | np.floating):
                return "" if not np.isfinite(v) else f"{v:.1f}"
            return str(v)
        if role == Qt.ItemDataRole.UserRole:  # sort key
            return v if isinstance(v, int | float | np.integer | np.floating) else str(v)
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section].replace("_", " ")
        return None


class _Filter(QSortFilterProxyModel):
    """Rows by class/status, minimum cells and minimum HER2."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.kind = "all"
        self.min_cells = 0
        self.min_her2 = 0.0
        self.setSortRole(Qt.ItemDataRole.UserRole)

    def filterAcceptsRow(self, row, parent):  # noqa: N802
        values = self.sourceModel()._values[row]
        cls, status, n, her2 = values[1], values[2], values[3], values[6]
        if self.kind in ("unreviewed", "rejected", "accepted", "corrected"):
            if status != self.kind:
                return False
        elif self.kind != "all" and cls != self.kind:
            return False
        if n < self.min_cells:
            return False
        return not (self.min_her2 > 0 and not her2 >= self.min_her2)

    def refilter(self):
        self.invalidateFilter()


class _LesionTable(QTableView):
    """The table; review keys are handled here (before Qt's type-to-search takes them)."""

    def __init__(self, keys: dict):
        super().__init__()
        self.keys = keys

    def keyPressEvent(self, event):  # noqa: N802 (Qt API)
        mods = event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier
        key = (event.key(), mods == Qt.KeyboardModifier.ControlModifier)
        fn = self.keys.get(key)
        if fn is not None:
            fn()
            event.accept()
            return
        super().keyPressEvent(event)


class ReviewWidget(SharedSessionMixin, QWidget):
    """Review the lesions of a lungmets lesions layer; corrections go to the journal at once.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = None
        self.layer = None
        self._row_of: dict = {}
        self._blind_names: dict = {}

        self.layer_box = QComboBox()
        self.slide_label = QLabel("")
        self.counts_label = QLabel("")
        self.counts_label.setWordWrap(True)
        self.kind_box = QComboBox()
        self.kind_box.addItems(
            ["all", "dormant", "single", "cluster", "focus", "unreviewed", "accepted",
             "corrected", "rejected", "edited"]
        )  # fmt: skip
        self.min_cells = QSpinBox()
        self.min_cells.setRange(0, 100000)
        self.min_her2 = QDoubleSpinBox()
        self.min_her2.setRange(0, 1e6)
        self.min_her2.setDecimals(0)
        self.blind = QCheckBox("blinded (hide slide name and group)")

        self.model = LesionTableModel(self)
        self.proxy = _Filter(self)
        self.proxy.setSourceModel(self.model)
        keys = {
            (Qt.Key.Key_A, False): self.accept,
            (Qt.Key.Key_R, False): self.reject,
            (Qt.Key.Key_Delete, False): self.reject,
            (Qt.Key.Key_N, False): self.next_unreviewed,
            (Qt.Key.Key_Z, True): self.undo,
            (Qt.Key.Key_C, False): self.toggle_add_mode,
            (Qt.Key.Key_X, False): self.delete_selected_cells,
            (Qt.Key.Key_K, False): self.toggle_selected_ki67,
            (Qt.Key.Key_V, False): self.mark_view_complete,
            **{
                (getattr(Qt.Key, f"Key_{k}"), False): (lambda c=c: self.set_class(c))
                for k, c in KEYS.items()
            },
        }
        self.table = _LesionTable(keys)
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.selectionModel().currentRowChanged.connect(self._on_row)

        buttons = QHBoxLayout()
        self.action_buttons = {}
        for key, cls in KEYS.items():
            b = QPushButton(f"{cls} [{key}]")
            b.clicked.connect(lambda _=False, c=cls: self.set_class(c))
            buttons.addWidget(b)
            self.action_buttons[cls] = b
        row2 = QHBoxLayout()
        for text, fn in (
            ("accept [A]", self.accept),
            ("reject [R]", self.reject),
            ("next unreviewed [N]", self.next_unreviewed),
            ("undo [Ctrl+Z]", self.undo),
        ):
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, f=fn: f())
            row2.addWidget(b)
            self.action_buttons[text.split()[0]] = b

        row3 = QHBoxLayout()
        self.add_button = QPushButton("add cells [C]")
        self.add_button.setCheckable(True)
        self.add_button.setToolTip(
            "While on, a click on the slide adds a HER2+ cell there (at its nucleus); "
            "Shift+click adds a Ki67+ one. Drag to pan as usual."
        )
        self.add_button.toggled.connect(self.set_add_mode)
        row3.addWidget(self.add_button)
        for text, fn, tip in (
            ("delete cell [X]", self.delete_selected_cells, "delete the cells selected in the "
             "cells layer (false positives)"),
            ("Ki67 ± [K]", self.toggle_selected_ki67, "call the selected cells' Ki67 the "
             "other way"),
            ("view reviewed [V]", self.mark_view_complete, "every HER2+ cell in the current "
             "view is marked, and nothing else is one"),
        ):  # fmt: skip
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(lambda _=False, f=fn: f())
            row3.addWidget(b)
            self.action_buttons[text.split()[0]] = b
        self.add_mode = False
        self.cells_layer = None

        grid = QGridLayout()
        grid.addWidget(QLabel("lesions layer"), 0, 0)
        grid.addWidget(self.layer_box, 0, 1, 1, 3)
        grid.addWidget(QLabel("show"), 1, 0)
        grid.addWidget(self.kind_box, 1, 1)
        grid.addWidget(QLabel("min cells"), 1, 2)
        grid.addWidget(self.min_cells, 1, 3)
        grid.addWidget(QLabel("min HER2"), 2, 2)
        grid.addWidget(self.min_her2, 2, 3)
        grid.addWidget(self.blind, 2, 0, 1, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(grid)
        layout.addWidget(self.slide_label)
        layout.addWidget(self.counts_label)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        layout.addLayout(row2)
        layout.addWidget(QLabel("cells:"))
        layout.addLayout(row3)

        self.kind_box.currentTextChanged.connect(self._filter)
        self.min_cells.valueChanged.connect(self._filter)
        self.min_her2.valueChanged.connect(self._filter)
        self.blind.toggled.connect(self._blind)
        self.layer_box.currentIndexChanged.connect(self._on_layer)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        session_hub().changed.connect(self._on_session_changed)
        self.viewer.mouse_drag_callbacks.append(self._on_mouse)
        self._refresh_layers()

    # ----------------------------------------------------------------- layers

    def _lesion_layers(self):
        return result_layers_of(self.viewer, "lesions")

    def _refresh_layers(self, event=None):
        layers = self._lesion_layers()
        if refill_layer_box(self.layer_box, layers, self.layer):
            self._on_layer()
        elif not layers:  # the last lesions layer went; another one added keeps this one
            self.set_layer(None)

    def _on_layer(self, *_):
        self.set_layer(self.layer_box.currentData())

    def set_layer(self, layer) -> None:
        """Review this lesions layer (its result folder's journal is replayed)."""
        if layer is self.layer and layer is not None:
            return
        self.layer = layer
        if layer is None:
            self.session = None
            self.model.set_frame(None)
            self._update_counts()
            return
        self.session = shared_session(layer.metadata["lungmets_results"])
        self._reload()

    def _reload(self) -> None:
        """Show the session's lesions in the table, the layer and the counts."""
        lesions, layer = self.session.lesions, self.layer
        self._row_of = {lid: i for i, lid in enumerate(lesions.index)}
        # The layer shows the session's state (the journal may have grown since it was read;
        # cells edited by hand change the lesions themselves).
        if len(layer.data) != len(lesions) or not np.allclose(
            layer.data, lesions[["y_um", "x_um"]].to_numpy(float)
        ):
            layer.data = lesions[["y_um", "x_um"]].to_numpy(float).reshape(-1, 2)
            layer.size = lesion_sizes_um(lesions)
        layer.features = lesions.reset_index(drop=True)
        layer.face_color = lesion_colours(lesions)
        layer.border_color = border_colours(lesions)
        self._show_cells()
        self.model.set_frame(lesions)
        self._update_counts()
        self._blind(self.blind.isChecked())

    # ----------------------------------------------------------------- actions

    def current_lesion(self):
        """The lesion id of the selected row, or None."""
        idx = self.table.selectionModel().currentIndex()
        if not idx.isValid() or self.session is None:
            return None
        row = self.proxy.mapToSource(idx).row()
        return self.session.lesions.index[row]

    def select_lesion(self, lesion_id) -> None:
        """Select a lesion's row, centre the viewer on it and select its point."""
        row = self._row_of[lesion_id]
        idx = self.proxy.mapFromSource(self.model.index(row, 0))
        if not idx.isValid():  # filtered out: show everything
            self.kind_box.setCurrentText("all")
            self.min_cells.setValue(0)
            self.min_her2.setValue(0)
            idx = self.proxy.mapFromSource(self.model.index(row, 0))
        self.table.selectionModel().setCurrentIndex(
            idx,
            self.table.selectionModel().SelectionFlag.ClearAndSelect
            | self.table.selectionModel().SelectionFlag.Rows,
        )
        self.table.scrollTo(idx)

    def _on_row(self, current, previous=None):
        if not current.isValid() or self.session is None:
            return
        row = self.proxy.mapToSource(current).row()
        les = self.session.lesions.iloc[row]
        centre = (float(les["y_um"]), float(les["x_um"]))
        camera = _camera(self.viewer)
        camera.center = centre
        camera.zoom = CANVAS_PX / FIELD_OF_VIEW_UM
        self.layer.selected_data = {row}

    def _apply(self, correction) -> None:
        if correction is None:
            return
        lid = correction.lesion_id
        row = self._row_of[lid]
        les = self.session.lesions
        for col in ("review_class", "status"):
            self.layer.features.loc[row, col] = les.iloc[row][col]
        face = self.layer.face_color
        face[row] = lesion_colours(les.iloc[[row]])[0]
        self.layer.face_color = face
        border = self.layer.border_color
        border[row] = border_colours(les.iloc[[row]])[0]
        self.layer.border_color = border
        self.model.update_row(row)
        self._update_counts()
        self._tell_others()

    def _session_refreshed(self) -> None:
        # Another widget (the Markers widget's threshold) changed this slide's session.
        self._reload()

    def set_class(self, review_class: str) -> None:
        """Give the selected lesion a class (dormant, single, cluster, focus)."""
        lid = self.current_lesion()
        if lid is not None:
            self._apply(self.session.set_class(lid, review_class))

    def accept(self) -> None:
        """Accept the selected lesion as it is, and go to the next unreviewed one."""
        lid = self.current_lesion()
        if lid is not None:
            self._apply(self.session.accept(lid))
            self.next_unreviewed()

    def reject(self) -> None:
        """Reject the selected lesion (a false positive)."""
        lid = self.current_lesion()
        if lid is not None:
            self._apply(self.session.reject(lid))

    def undo(self) -> None:
        """Take back the latest correction."""
        if self.session is not None:
            c = self.session.undo()
            if c is not None and c.lesion_id is None:  # a threshold: every lesion may change
                self._reload()
                self._tell_others()
                return
            self._apply(c)
            if c is not None:
                self.select_lesion(c.lesion_id)

    def next_unreviewed(self) -> None:
        """Go to the next lesion nobody has looked at yet."""
        if self.session is None:
            return
        lid = self.session.next_unreviewed(self.current_lesion())
        if lid is not None:
            self.select_lesion(lid)

    # ----------------------------------------------------------------- cells

    def _find_cells_layer(self):
        folder = str(self.session.folder) if self.session is not None else None
        return next(
            (
                c
                for c in result_layers_of(self.viewer, "cells")
                if str(c.metadata["lungmets_results"]) == folder
            ),
            None,
        )

    def _show_cells(self) -> None:
        """The cells layer shows the reviewed cells (added ones in, deleted ones out)."""
        self.cells_layer = self._find_cells_layer()
        if self.cells_layer is None:
            return
        cells = self.session.reviewed_cells()
        layer = self.cells_layer
        coords = cells[["y_um", "x_um"]].to_numpy(float).reshape(-1, 2)
        if len(layer.data) != len(coords) or not np.allclose(layer.data, coords):
            layer.data = coords
        layer.features = cells
        layer.face_color = cell_colours(cells)

    def set_add_mode(self, on: bool) -> None:
        """Clicks on the slide add cells (on), or do what they always do (off)."""
        self.add_mode = bool(on) and self.session is not None
        if self.add_button.isChecked() != self.add_mode:
            self.add_button.setChecked(self.add_mode)
        if self.add_mode and self.cells_layer is not None:
            self.cells_layer.visible = True

    def toggle_add_mode(self) -> None:
        self.set_add_mode(not self.add_mode)

    def _on_mouse(self, viewer, event):
        """In add mode, a click (a press and a release without dragging) adds a cell."""
        if not self.add_mode or self.session is None or event.button in (2, 3):
            return  # the right and middle buttons keep their own use
        start = np.asarray(event.position, float)[-2:]
        dragged = False
        yield
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged:
            shift = "Shift" in {str(getattr(m, "name", m)) for m in event.modifiers}
            self.add_cell(float(start[1]), float(start[0]), ki67_pos=shift)

    def add_cell(self, x_um: float, y_um: float, ki67_pos: bool = False):
        """Add a cell the analysis missed (journaled); the lesions around it are re-derived."""
        if self.session is None:
            return None
        ki67 = ki67_pos if self.session.has_ki67 else None
        c = self.session.add_cell(x_um, y_um, ki67_pos=ki67)
        self._after_cell_edit()
        return c

    def selected_cells(self) -> list[int]:
        """Cell ids of the points selected in the cells layer."""
        layer = self.cells_layer
        if layer is None or not layer.selected_data:
            return []
        ids = layer.features["cell_id"].to_numpy()
        return [int(ids[i]) for i in sorted(layer.selected_data)]

    def delete_selected_cells(self) -> None:
        """Delete the cells selected in the cells layer (journaled; undo brings them back)."""
        ids = self.selected_cells()
        if not ids:
            self.counts_label.setText("Select cells in the cells layer first (its select tool).")
            return
        for cid in ids:
            self.session.delete_cell(cid)
        self.cells_layer.selected_data = set()
        self._after_cell_edit()

    def toggle_selected_ki67(self) -> None:
        """Call the selected cells' Ki67 the other way (journaled)."""
        ids = self.selected_cells()
        if not ids:
            self.counts_label.setText("Select cells in the cells layer first (its select tool).")
            return
        for cid in ids:
            self.session.toggle_cell_ki67(cid)
        self._after_cell_edit()

    def mark_view_complete(self):
        """Mark the current view as reviewed completely (journaled)."""
        if self.session is None:
            return None
        c = self.session.mark_complete(*_view_box_um(self.viewer))
        self._update_counts()
        self._tell_others()
        return c

    def _after_cell_edit(self) -> None:
        self._reload()
        self._tell_others()

    # ----------------------------------------------------------------- display

    def _filter(self, *_):
        self.proxy.kind = self.kind_box.currentText()
        self.proxy.min_cells = self.min_cells.value()
        self.proxy.min_her2 = self.min_her2.value()
        self.proxy.refilter()

    def _update_counts(self) -> None:
        if self.session is None:
            self.counts_label.setText("Open a lungmets result folder (File > Open Folder).")
            self.slide_label.setText("")
            return
        c = self.session.counts()
        status = self.session.lesions["status"].value_counts()
        n = len(self.session.lesions)
        dormant = "n/a" if c["dormant"] is None else c["dormant"]
        self.counts_label.setText(
            f"HER2+ cells {c['her2_cells']} · lesions {c['lesions']}: {dormant} dormant, "
            f"{c['single'] - (c['dormant'] or 0)} single Ki67+, {c['cluster']} clusters, "
            f"{c['focus']} foci · reviewed {n - status.get('unreviewed', 0)}/{n}, "
            f"rejected {status.get('rejected', 0)}"
        )
        edits = self.session.cell_edit_counts()
        regions = len(self.session.complete_regions)
        if sum(edits.values()) or regions:
            self.counts_label.setText(
                self.counts_label.text()
                + f" · cells added {edits['add_cell']}, deleted {edits['delete_cell']}, "
                f"Ki67 by hand {edits['set_cell_ki67']}; regions reviewed completely {regions}"
            )
        self._show_slide_name()

    def _show_slide_name(self):
        if self.session is None:
            return
        name = "blinded" if self.blind.isChecked() else self.session.folder.name
        self.slide_label.setText(f"slide: {name}")

    def _blind(self, on: bool) -> None:
        """Hide (or restore) the slide name, which often says the group, in layer names."""
        if on:
            for i, lyr in enumerate(self.viewer.layers):
                ours = lyr.metadata.get("lungmets_slide") or lyr.metadata.get("lungmets_results")
                if ours and lyr not in self._blind_names:
                    self._blind_names[lyr] = lyr.name
                    kind = lyr.metadata.get("lungmets_channel") or lyr.metadata.get(
                        "lungmets_kind", ""
                    )
                    lyr.name = f"blinded {kind} {i}"
        else:
            for lyr, name in self._blind_names.items():
                if lyr in self.viewer.layers:
                    lyr.name = name
            self._blind_names.clear()
        self._refresh_box_names()
        self._show_slide_name()

    def _refresh_box_names(self):
        for i in range(self.layer_box.count()):
            self.layer_box.setItemText(i, self.layer_box.itemData(i).name)


def _view_box_um(viewer) -> tuple[float, float, float, float]:
    """The part of the slide in view, ``(x0, y0, x1, y1)`` in um."""
    camera = _camera(viewer)
    cy, cx = (float(v) for v in camera.center[-2:])
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None) or getattr(viewer, "_canvas_size", (CANVAS_PX,) * 2)
    h, w = (float(v) / float(camera.zoom) for v in size[-2:])
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera
