"""Library objects <-> napari layer data (no Qt, no napari import: plain layer-data tuples).

World coordinates are micrometres: image layers carry ``scale = (pixel_size_um, pixel_size_um)``
and points are placed at ``(y_um, x_um)``, so the scale bar is physical and results line up
with the slide (pixel centres at integer pixel indices, the project's rule).

Layer metadata keys used across the plugin:

``lungmets_slide``
    Path of the slide an image layer shows.
``lungmets_results``
    Result folder of a lesions or cells layer.
``lungmets_pixel_size_um``
    Level-0 pixel size of the slide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

#: Colour of each channel role.
CHANNEL_COLOURS = {"DAPI": "blue", "HER2": "green", "Ki67": "magenta"}
#: Colour (RGBA) of each review class and of rejected lesions.
LESION_COLOURS = {
    "dormant": (0.30, 0.61, 0.91, 1.0),  # blue: dormant single cell
    "single": (0.95, 0.85, 0.20, 1.0),  # yellow: single Ki67+ cell
    "cluster": (0.95, 0.55, 0.15, 1.0),  # orange
    "focus": (0.86, 0.18, 0.30, 1.0),  # red
    "rejected": (0.55, 0.55, 0.55, 0.45),  # grey, faded
}


def slide_layers(slide) -> list[tuple]:
    """One lazy (multiscale) image layer per channel of a `histo.io.Slide`.

    Contrast limits come from the smallest pyramid level, so nothing large is read.

    Returns
    -------
    list of (data, kwargs, "image")
    """
    from histo.io import slide_name

    name = slide_name(slide.path)
    px = float(slide.pixel_size_um)
    small = np.asarray(slide.levels[-1])  # the smallest level: a few MB at most
    role_of = {i: r for r, i in slide.roles.items()}
    out = []
    for c, channel in enumerate(slide.channel_names):
        data = [level[c] for level in slide.levels]
        lo, hi = np.percentile(small[c], [1.0, 99.8]) if small[c].size else (0, 1)
        role = role_of.get(c)
        kwargs = {
            "name": f"{name} {channel}",
            "colormap": CHANNEL_COLOURS.get(role, "gray"),
            "blending": "additive",
            "contrast_limits": (float(lo), float(max(hi, lo + 1))),
            "scale": (px, px),
            "units": ("um", "um"),
            "multiscale": len(data) > 1,
            "metadata": {
                "lungmets_slide": str(slide.path),
                "lungmets_channel": channel,
                "lungmets_pixel_size_um": px,
            },
        }
        out.append((data if len(data) > 1 else data[0], kwargs, "image"))
    return out


def _class_colours(lesions: pd.DataFrame) -> np.ndarray:
    cls = lesions["review_class"].astype(str).to_numpy()
    rejected = lesions["status"].astype(str).to_numpy() == "rejected"
    colours = np.array([LESION_COLOURS.get(c, (1, 1, 1, 1)) for c in cls], float).reshape(-1, 4)
    colours[rejected] = LESION_COLOURS["rejected"]
    return colours


def lesion_colours(lesions: pd.DataFrame) -> np.ndarray:
    """Face colour (N, 4): the class colour (review class; grey if rejected), see-through so
    the cells stay visible, and more opaque once the lesion has been reviewed."""
    colours = _class_colours(lesions)
    reviewed = lesions["status"].astype(str).to_numpy() != "unreviewed"
    colours[:, 3] = np.where(reviewed, 0.45, 0.12)
    return colours


def border_colours(lesions: pd.DataFrame) -> np.ndarray:
    """Border colour (N, 4): the class colour (review class; grey if rejected)."""
    return _class_colours(lesions)


def lesion_sizes_um(lesions: pd.DataFrame) -> np.ndarray:
    """Marker diameter of each lesion (um): the diameter of its area, at least 20 um."""
    area = pd.to_numeric(lesions.get("area_um2"), errors="coerce").fillna(150.0).to_numpy(float)
    return np.maximum(2 * np.sqrt(area / np.pi) + 8, 20.0)


def lesions_layer(
    lesions: pd.DataFrame, *, folder: str | Path | None, pixel_size_um: float, name: str
) -> tuple:
    """A points layer of lesions at (y_um, x_um) with the table (and review state) as features."""
    coords = lesions[["y_um", "x_um"]].to_numpy(float).reshape(-1, 2)
    features = lesions.reset_index(drop=True)
    kwargs = {
        "name": f"{name} lesions",
        "features": features,
        "face_color": lesion_colours(features),
        "border_color": border_colours(features),
        "border_width": 0.12,
        "size": lesion_sizes_um(features),
        "units": ("um", "um"),
        "metadata": {
            "lungmets_results": None if folder is None else str(folder),
            "lungmets_pixel_size_um": pixel_size_um,
            "lungmets_kind": "lesions",
        },
    }
    return coords, kwargs, "points"


def cell_colours(cells: pd.DataFrame) -> np.ndarray:
    """Face colour (N, 4) of cells: magenta Ki67+, cyan Ki67-, white without Ki67."""
    ki67 = cells.get("ki67_pos", pd.Series(np.nan, index=cells.index))
    colours = np.tile(np.array([1.0, 1.0, 1.0, 1.0]), (len(cells), 1))
    known = ki67.notna().to_numpy()
    pos = ki67.map(lambda v: str(v).lower() in ("true", "1", "1.0")).to_numpy()
    colours[known & pos] = (1.0, 0.2, 1.0, 1.0)
    colours[known & ~pos] = (0.2, 0.9, 1.0, 1.0)
    return colours


def cells_layer(
    cells: pd.DataFrame, *, folder: str | Path | None, pixel_size_um: float, name: str
) -> tuple:
    """A points layer of HER2+ cells: magenta if Ki67+, cyan if not (white without Ki67)."""
    coords = cells[["y_um", "x_um"]].to_numpy(float).reshape(-1, 2)
    kwargs = {
        "name": f"{name} cells",
        "features": cells.reset_index(drop=True),
        "face_color": cell_colours(cells),
        "size": 6.0,
        "symbol": "disc",
        "units": ("um", "um"),
        "visible": False,
        "metadata": {
            "lungmets_results": None if folder is None else str(folder),
            "lungmets_pixel_size_um": pixel_size_um,
            "lungmets_kind": "cells",
        },
    }
    return coords, kwargs, "points"


def result_layers(folder: str | Path) -> list[tuple]:
    """Lesions (with the review journal applied) and cells of a lungmets result folder."""
    from histo.review import ReviewSession

    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    px = float(summary["input"]["pixel_size_um"])
    session = ReviewSession(folder)
    cells = session.reviewed_cells()  # added cells in, deleted ones out, Ki67 as reviewed
    return [
        cells_layer(cells, folder=folder, pixel_size_um=px, name=folder.name),
        lesions_layer(session.lesions, folder=folder, pixel_size_um=px, name=folder.name),
    ]


def is_result_folder(path: str | Path) -> bool:
    """True for a folder written by ``lungmets run`` (summary.json and lesions.csv)."""
    p = Path(path)
    return p.is_dir() and (p / "summary.json").is_file() and (p / "lesions.csv").is_file()
