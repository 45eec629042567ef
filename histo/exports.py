"""Results in the formats other tools read: GeoJSON for QuPath, OME-Zarr label images.

GeoJSON
    ``cells.geojson`` and ``lesions.geojson``: one Feature per cell / lesion with a polygon in
    level-0 pixel coordinates as QuPath expects them (pixel corners at integers, so a pixel
    centre is at ``x_px + 0.5``), ``objectType: "detection"``, a classification (lesion class;
    cells ``<class>: Ki67+`` / ``<class>: Ki67-``) and the table's numbers as measurements.
    In QuPath: *File > Import objects from file* (or drag the file onto the viewer).
    A cell's polygon is a circle of the cell's area; a lesion's the convex hull of its cells.

OME-Zarr labels
    A lesion label image (each cell's footprint painted with its ``lesion_id``) with one level
    per level of the slide. For an OME-Zarr slide it goes into the slide's own ``labels/``
    group, as NGFF describes; for other slides into a standalone NGFF label image.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import _jsonable, atomic_path

#: QuPath classification colours (RGB) per lesion class.
CLASS_COLOURS = {"single": (76, 155, 232), "cluster": (242, 165, 65), "focus": (209, 73, 91)}
_DEFAULT_RADIUS_UM = 6.0


def _radius_um(area_um2) -> np.ndarray:
    a = pd.to_numeric(pd.Series(area_um2), errors="coerce").to_numpy(float)
    r = np.sqrt(np.clip(a, 0, None) / np.pi)
    return np.where(np.isfinite(r) & (r > 0), r, _DEFAULT_RADIUS_UM)


def _circles(x_px, y_px, r_px, n: int = 16) -> np.ndarray:
    """Closed polygons (N, n + 1, 2) of n corners approximating circles, to 0.01 px."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y, r = (np.asarray(v, float).reshape(-1, 1) for v in (x_px, y_px, r_px))
    pts = np.stack([x + r * np.cos(t), y + r * np.sin(t)], axis=-1).round(2)
    return np.concatenate([pts, pts[:, :1]], axis=1)


def _measurement_rows(table: pd.DataFrame, skip=()) -> list[dict]:
    """Per row, its finite numbers and booleans as floats (QuPath measurements)."""
    columns = []
    for k in table.columns:
        if k in skip:
            continue
        col = table[k]
        if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
            values = pd.to_numeric(col, errors="coerce").to_numpy(float, na_value=np.nan)
        else:  # mixed: keep what is a number or a boolean, as one row at a time would
            values = np.array(
                [
                    float(v)
                    if isinstance(v, bool | np.bool_ | int | float | np.integer | np.floating)
                    else np.nan
                    for v in col
                ],
                float,
            )
        columns.append((k, np.where(np.isfinite(values), values, np.nan).tolist()))
    rows: list[dict] = [{} for _ in range(len(table))]
    for k, values in columns:
        for row, v in zip(rows, values, strict=True):
            if v == v:  # not NaN
                row[k] = v
    return rows


def cells_geojson(cells: pd.DataFrame, lesions: pd.DataFrame, pixel_size_um: float) -> dict:
    """The cells as a GeoJSON FeatureCollection of QuPath detections.

    Parameters
    ----------
    cells, lesions : pandas.DataFrame
        The ``cells.csv`` and ``lesions.csv`` tables of a slide.
    pixel_size_um : float
        Level-0 pixel size of the slide.

    Returns
    -------
    dict
    """
    cls = lesions.set_index("lesion_id")["class"] if len(lesions) else pd.Series(dtype=str)
    radius = _radius_um(cells.get("cell_area_um2", pd.Series(np.nan, index=cells.index)))
    rings = _circles(
        cells["x_um"].to_numpy(float) / pixel_size_um + 0.5,
        cells["y_um"].to_numpy(float) / pixel_size_um + 0.5,
        radius / pixel_size_um,
    ).tolist()
    lesion_class = [str(cls.get(v, "single")) for v in cells["lesion_id"]]
    ki67 = cells["ki67_pos"] if "ki67_pos" in cells else pd.Series(pd.NA, index=cells.index)
    features = []
    for cell_id, les_cls, k, ring, measurements in zip(
        cells["cell_id"].to_numpy(int),
        lesion_class,
        ki67,
        rings,
        _measurement_rows(cells),
        strict=True,
    ):
        name = les_cls if pd.isna(k) else f"{les_cls}: Ki67{'+' if k else '-'}"
        features.append(
            {
                "type": "Feature",
                "id": f"cell-{int(cell_id)}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": f"cell {int(cell_id)}",
                    "classification": {
                        "name": name,
                        "color": list(CLASS_COLOURS.get(les_cls, (200, 200, 200))),
                    },
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def lesions_geojson(cells: pd.DataFrame, lesions: pd.DataFrame, pixel_size_um: float) -> dict:
    """The lesions as a GeoJSON FeatureCollection of QuPath detections (convex hulls)."""
    from scipy.spatial import ConvexHull, QhullError

    radius = _radius_um(cells.get("cell_area_um2", pd.Series(np.nan, index=cells.index)))
    corners = _circles(
        cells["x_um"].to_numpy(float) / pixel_size_um + 0.5,
        cells["y_um"].to_numpy(float) / pixel_size_um + 0.5,
        radius / pixel_size_um,
    )[:, :-1]
    rows_of = cells.groupby("lesion_id").indices if len(cells) else {}
    features = []
    for les, measurements in zip(
        lesions.to_dict("records"), _measurement_rows(lesions, skip=("class",)), strict=True
    ):
        members = rows_of.get(les["lesion_id"])
        if members is not None:
            pts = corners[members].reshape(-1, 2)
        else:
            x, y = les["x_um"] / pixel_size_um + 0.5, les["y_um"] / pixel_size_um + 0.5
            pts = _circles(x, y, 12)[0, :-1]
        try:
            ring = pts[ConvexHull(pts).vertices].round(2).tolist()
        except QhullError:
            ring = pts.round(2).tolist()
        ring.append(ring[0])
        name = str(les["class"])
        features.append(
            {
                "type": "Feature",
                "id": f"lesion-{int(les['lesion_id'])}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": f"lesion {int(les['lesion_id'])}",
                    "classification": {
                        "name": name,
                        "color": list(CLASS_COLOURS.get(name, (200, 200, 200))),
                    },
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    cells: pd.DataFrame, lesions: pd.DataFrame, pixel_size_um: float, folder: str | os.PathLike
) -> list[Path]:
    """Write ``cells.geojson`` and ``lesions.geojson`` (atomically) into a slide's folder.

    Parameters
    ----------
    cells, lesions : pandas.DataFrame
        The slide's ``cells.csv`` and ``lesions.csv`` tables.
    pixel_size_um : float
        Level-0 pixel size of the slide.
    folder : path-like

    Returns
    -------
    list of Path
    """
    out = []
    for name, make in (("cells", cells_geojson), ("lesions", lesions_geojson)):
        path = Path(folder) / f"{name}.geojson"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(make(cells, lesions, pixel_size_um), default=_jsonable))
        out.append(path)
    return out


# --------------------------------------------------------------------------- label images


def lesion_label_image(
    cells: pd.DataFrame,
    shape_px: tuple[int, int],
    pixel_size_um: float,
    *,
    chunk_px: int = 1024,
):
    """A lazy level-0 label image: each cell's disc (of its area) painted with its lesion_id.

    Returns
    -------
    dask.array.Array of int32, shape `shape_px`
    """
    import dask.array as da
    from skimage.draw import disk

    x = cells["x_um"].to_numpy(float) / pixel_size_um
    y = cells["y_um"].to_numpy(float) / pixel_size_um
    r = _radius_um(cells.get("cell_area_um2", pd.Series(np.nan, index=cells.index))) / pixel_size_um
    ids = cells["lesion_id"].to_numpy(np.int64).astype(np.int32)

    def paint(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        out = np.zeros((y1 - y0, x1 - x0), np.int32)
        near = (x + r >= x0 - 1) & (x - r <= x1) & (y + r >= y0 - 1) & (y - r <= y1)
        for i in np.flatnonzero(near):
            rr, cc = disk((y[i] - y0, x[i] - x0), r[i], shape=out.shape)
            out[rr, cc] = ids[i]
        return out

    chunks = da.core.normalize_chunks((chunk_px, chunk_px), shape_px)
    return da.map_blocks(paint, chunks=chunks, dtype=np.int32, meta=np.zeros((0, 0), np.int32))


def write_lesion_labels(
    folder: str | os.PathLike,
    slide_path: str | os.PathLike,
    *,
    into_slide: bool = True,
    name: str = "lesions",
) -> Path:
    """Write the lesion label image of a slide's results as OME-Zarr (NGFF) labels.

    Parameters
    ----------
    folder : path-like
        The slide's results (``cells.csv``, ``summary.json``).
    slide_path : path-like
        The slide. Its levels give the label pyramid's shapes.
    into_slide : bool
        For an OME-Zarr slide, write into its ``labels/<name>`` group (the image's own
        multiscales are not touched). Otherwise, or for other formats, write a standalone label
        image ``folder/lesion_labels.ome.zarr``.
    name : str
        Name of the label image.

    Returns
    -------
    Path
        The label image's group.
    """
    import zarr

    from .io import open_slide

    folder = Path(folder)
    cells = pd.read_csv(folder / "cells.csv")
    summary = json.loads((folder / "summary.json").read_text())
    px = summary["input"]["pixel_size_um"]
    slide = open_slide(slide_path, pixel_size_um=px)
    shapes = [tuple(lv.shape[-2:]) for lv in slide.levels]
    label0 = lesion_label_image(cells, shapes[0], px)
    space = [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    zarr_slide = slide.format == "ome-zarr" and into_slide
    if zarr_slide:
        root = zarr.open_group(slide.path, mode="r+")
        fmt = root.metadata.zarr_format
        attrs = dict(root.attrs)
        ome = attrs.get("ome", attrs)
        img_axes = ome["multiscales"][0].get("axes") or []
        ndim = len(img_axes) or root[ome["multiscales"][0]["datasets"][0]["path"]].ndim
        axes = img_axes
        labels_group = root.require_group("labels")
        target_path = Path(slide.path) / "labels" / name
        if name in labels_group:
            del labels_group[name]
    else:
        fmt, ndim, axes = 3, 2, space
        target_path = folder / "lesion_labels.ome.zarr"
        tmp_path = folder / ".lesion_labels.ome.zarr.tmp"
        shutil.rmtree(tmp_path, ignore_errors=True)
    group = (
        labels_group.create_group(name)
        if zarr_slide
        else zarr.open_group(tmp_path, mode="w", zarr_format=3)
    )
    datasets = []
    lead = (1,) * (ndim - 2)
    for k, (h, w) in enumerate(shapes):
        fy, fx = max(1, round(shapes[0][0] / h)), max(1, round(shapes[0][1] / w))
        level = label0[::fy, ::fx][:h, :w]
        if level.shape != (h, w):
            import dask.array as da

            level = da.pad(level, ((0, h - level.shape[0]), (0, w - level.shape[1])))
        level = level.reshape(lead + (h, w)).rechunk(lead + (1024, 1024))
        arr = group.create_array(
            str(k), shape=level.shape, chunks=lead + (1024, 1024), dtype=np.int32
        )
        level.store(arr, lock=False)
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * (ndim - 2) + [px * fy, px * fx]}
                ],
            }
        )
    ids = sorted(int(i) for i in pd.unique(cells["lesion_id"])) if len(cells) else []
    multiscale = {"name": name, "axes": axes, "datasets": datasets}
    image_label = {
        "version": "0.5" if fmt == 3 else "0.4",
        "source": {"image": "../../"} if zarr_slide else {},
        "colors": [{"label-value": i, "rgba": [*_lesion_rgb(i), 255]} for i in ids[:5000]],
    }
    if fmt == 2:
        group.attrs.update(
            {"multiscales": [{"version": "0.4", **multiscale}], "image-label": image_label}
        )
    else:
        group.attrs.update(
            {"ome": {"version": "0.5", "multiscales": [multiscale], "image-label": image_label}}
        )
    if zarr_slide:
        la = dict(labels_group.attrs)
        if fmt == 2:
            names = list(dict.fromkeys([*la.get("labels", []), name]))
            labels_group.attrs.update({"labels": names})
        else:
            ome_l = la.get("ome", {"version": "0.5"})
            ome_l["labels"] = list(dict.fromkeys([*ome_l.get("labels", []), name]))
            labels_group.attrs.update({"ome": ome_l})
        return target_path
    shutil.rmtree(target_path, ignore_errors=True)
    os.replace(tmp_path, target_path)
    return target_path


def _lesion_rgb(i: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(i)
    return tuple(int(v) for v in rng.integers(60, 256, 3))
