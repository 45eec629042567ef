"""What the plugin's widgets share: finding lungmets result layers and a box to pick one."""

from __future__ import annotations


def result_layers_of(viewer, kind: str) -> list:
    """The viewer's layers of a lungmets result folder of one kind (``lesions``, ``cells``)."""
    return [
        lyr
        for lyr in viewer.layers
        if lyr.metadata.get("lungmets_kind") == kind and lyr.metadata.get("lungmets_results")
    ]


def refill_layer_box(box, layers: list, current) -> bool:
    """Fill a QComboBox with `layers`, keeping `current` selected if still there; returns True
    when the selection moved to another layer (the newest), so the caller reloads."""
    box.blockSignals(True)
    box.clear()
    for lyr in layers:
        box.addItem(lyr.name, lyr)
    box.blockSignals(False)
    if current in layers:
        box.setCurrentIndex(layers.index(current))
        return False
    if layers:
        box.setCurrentIndex(len(layers) - 1)
        return True
    return False
