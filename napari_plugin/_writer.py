"""Writer: a lungmets lesions layer to CSV (the table) or GeoJSON (QuPath detections).

napari calls `write_lesions` for *File > Save Selected Layers...* on a points layer when the
file name ends in ``.csv`` or ``.geojson``. The review state travels along: the CSV holds the
``review_class`` and ``status`` columns, the GeoJSON classifies each lesion by its reviewed
class (``rejected`` for a rejected lesion) and keeps ``review_class`` and ``status`` among the
feature's properties.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

_CELL_COLUMNS = ("cell_id", "lesion_id", "x_um", "y_um", "cell_area_um2")
_REJECTED_COLOUR = [150, 150, 150]


def lesion_table(data, meta: dict) -> pd.DataFrame:
    """The lesion table of a lesions layer, positions taken from the points.

    Parameters
    ----------
    data : array-like, shape (N, 2)
        Point coordinates ``(y_um, x_um)``.
    meta : dict
        The layer's attributes (``features``, ``metadata``, ``name``, ...).

    Returns
    -------
    pandas.DataFrame
        The layer's features with ``x_um`` and ``y_um`` set from `data` (they differ from the
        analysis only where a point was moved).

    Raises
    ------
    ValueError
        If the layer is not a lungmets lesions layer, or if its lesion ids are missing or
        repeated (points added by hand copy the last lesion's values).
    """
    name = meta.get("name", "the layer")
    features = meta.get("features")
    features = pd.DataFrame(features) if features is not None else pd.DataFrame()
    if "lesion_id" not in features.columns:
        raise ValueError(
            f"{name!r} is not a lungmets lesions layer (its points have no 'lesion_id' "
            "feature); open a result folder or run 'Analyze slide' to get one, or save this "
            "layer with napari's own CSV writer"
        )
    coords = np.asarray(data, float).reshape(-1, 2)
    if len(coords) != len(features):
        raise ValueError(
            f"{name!r} has {len(coords)} points but {len(features)} feature rows; "
            "the layer's features no longer describe its points"
        )
    ids = pd.to_numeric(features["lesion_id"], errors="coerce")
    repeated = ids[ids.duplicated(keep=False)].dropna().unique()
    if ids.isna().any() or len(repeated):
        what = "missing lesion ids" if ids.isna().any() else f"repeated lesion ids {repeated[:5]}"
        raise ValueError(
            f"{name!r} has {what}: points added by hand are not lesions of the analysis; "
            "delete them before saving"
        )
    table = features.reset_index(drop=True).copy()
    table["y_um"] = coords[:, 0]
    table["x_um"] = coords[:, 1]
    return table


def _cells_for(lesions: pd.DataFrame, results: str | None) -> pd.DataFrame:
    """The cells that outline each lesion in the GeoJSON.

    The result folder's ``cells.csv`` when there is one (the same hulls ``lungmets run``
    writes); otherwise one pseudo-cell per lesion with the lesion's area, so each lesion
    becomes a circle of its area.
    """
    if results:
        cells_csv = Path(results) / "cells.csv"
        if cells_csv.is_file():
            cells = pd.read_csv(cells_csv)
            if set(_CELL_COLUMNS[1:4]) <= set(cells.columns):
                return cells[cells["lesion_id"].isin(lesions["lesion_id"])]
    area = lesions["area_um2"] if "area_um2" in lesions else pd.Series(np.nan, lesions.index)
    return pd.DataFrame(
        {
            "cell_id": np.arange(len(lesions)),
            "lesion_id": lesions["lesion_id"].to_numpy(),
            "x_um": lesions["x_um"].to_numpy(float),
            "y_um": lesions["y_um"].to_numpy(float),
            "cell_area_um2": pd.to_numeric(area, errors="coerce").to_numpy(float),
        },
        columns=list(_CELL_COLUMNS),
    )


def lesions_feature_collection(table: pd.DataFrame, meta: dict) -> dict:
    """QuPath GeoJSON of a lesion table (see `histo.exports.lesions_geojson`).

    Parameters
    ----------
    table : pandas.DataFrame
        As returned by `lesion_table`.
    meta : dict
        The layer's attributes; ``metadata["lungmets_pixel_size_um"]`` gives the pixel size.

    Returns
    -------
    dict
        A FeatureCollection; each lesion's classification is its reviewed class.
    """
    from histo.exports import CLASS_COLOURS, lesions_geojson

    metadata = meta.get("metadata") or {}
    px = metadata.get("lungmets_pixel_size_um")
    if px is None or not float(px) > 0:
        raise ValueError(
            f"{meta.get('name', 'the layer')!r} has no pixel size (layer metadata "
            "'lungmets_pixel_size_um'); the GeoJSON is written in pixels and needs it"
        )
    lesions = table.copy()
    if "class" not in lesions:
        lesions["class"] = lesions.get("review_class", "single")
    fc = lesions_geojson(_cells_for(lesions, metadata.get("lungmets_results")), lesions, float(px))
    for feature, (_, row) in zip(fc["features"], lesions.iterrows(), strict=True):
        props = feature["properties"]
        if "review_class" not in row:
            continue
        review_class, status = str(row["review_class"]), str(row.get("status", "unreviewed"))
        props["review_class"], props["status"] = review_class, status
        colour = CLASS_COLOURS.get("single" if review_class == "dormant" else review_class)
        props["classification"] = (
            {"name": "rejected", "color": _REJECTED_COLOUR}
            if status == "rejected"
            else {"name": review_class, "color": list(colour or (200, 200, 200))}
        )
    return fc


def write_lesions(path: str, data, meta: dict) -> list[str]:
    """Write a lesions layer to ``.csv`` or ``.geojson`` (npe2 single-layer writer).

    Parameters
    ----------
    path : str
        Destination; its suffix picks the format. Written atomically.
    data : array-like, shape (N, 2)
        Point coordinates ``(y_um, x_um)``.
    meta : dict
        The layer's attributes, with ``features`` (the lesion table, review state included)
        and ``metadata`` (``lungmets_pixel_size_um``, ``lungmets_results``).

    Returns
    -------
    list of str
        ``[path]``.

    Raises
    ------
    ValueError
        For a layer that is not a lungmets lesions layer or a suffix other than ``.csv`` and
        ``.geojson``.

    Examples
    --------
    >>> layer = viewer.layers["lung_IAV_d15 lesions"]  # doctest: +SKIP
    >>> layer.save("lesions.geojson", plugin="lungmets")  # doctest: +SKIP
    """
    from histo.atomic import atomic_path, write_csv

    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".geojson"):
        raise ValueError(f"{path}: lungmets writes lesions as .csv or .geojson, not {suffix!r}")
    table = lesion_table(data, meta)
    if suffix == ".csv":
        write_csv(table, path, float_format="%.4f")
    else:
        fc = lesions_feature_collection(table, meta)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(fc, default=_jsonable))
    return [str(path)]


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
