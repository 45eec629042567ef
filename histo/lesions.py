"""From cells to lesions: linking, classes and dormancy.

Cells closer than `link_distance_um` (centre to centre) are linked, and each connected group is
one lesion, however many chunks it spans: linking runs on the whole slide's cell table, after
the chunks, so foci far larger than a chunk come out whole.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .config import AnalysisConfig

LESION_COLUMNS = [
    "lesion_id",
    "x_um",
    "y_um",
    "n_cells",
    "n_ki67_pos",
    "class",
    "dormant",
    "area_um2",
    "her2_mean",
]


def lesion_class(n_cells, cluster_min_cells: int = 2, focus_min_cells: int = 5):
    """``"single"``, ``"cluster"`` or ``"focus"`` for a number (or array) of cells."""
    n = np.asarray(n_cells)
    out = np.where(
        n >= focus_min_cells, "focus", np.where(n >= cluster_min_cells, "cluster", "single")
    )
    return out.item() if out.ndim == 0 else out


def link_cells(cells: pd.DataFrame, link_distance_um: float) -> np.ndarray:
    """Lesion id (1-based) of each cell: connected components of the 'closer than' graph.

    Lesion ids are ordered by the position of each lesion's first cell in `cells`, so a table
    sorted by position gives ids that do not depend on how the slide was chunked.
    """
    n = len(cells)
    if n == 0:
        return np.zeros(0, np.int64)
    xy = cells[["x_um", "y_um"]].to_numpy(np.float64)
    pairs = cKDTree(xy).query_pairs(link_distance_um, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # Renumber components in order of first appearance.
    _, first = np.unique(comp, return_index=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(1, len(order) + 1)
    return remap[comp]


def group_lesions(cells: pd.DataFrame, config: AnalysisConfig | None = None):
    """Group cells into lesions.

    Parameters
    ----------
    cells : pandas.DataFrame
        Columns x_um, y_um, ki67_pos (boolean, NA without Ki67), her2_mean, cell_area_um2.
    config : AnalysisConfig, optional

    Returns
    -------
    cells : pandas.DataFrame
        The input sorted by position, with ``cell_id`` and ``lesion_id``.
    lesions : pandas.DataFrame
        lesion_id, x_um, y_um (mean of its cells), n_cells, n_ki67_pos (NA without Ki67),
        class, dormant (single and Ki67-negative; NA without Ki67), area_um2 (sum of its
        cells), her2_mean.
    """
    config = config or AnalysisConfig()
    cells = cells.sort_values(["y_um", "x_um"], kind="stable").reset_index(drop=True)
    cells.insert(0, "cell_id", np.arange(1, len(cells) + 1))
    cells.insert(1, "lesion_id", link_cells(cells, config.link_distance_um))
    if len(cells) == 0:
        lesions = pd.DataFrame({c: pd.Series(dtype=float) for c in LESION_COLUMNS})
        return cells, lesions
    has_ki67 = cells["ki67_pos"].notna().all()
    g = cells.groupby("lesion_id", sort=True)
    lesions = pd.DataFrame(
        {
            "lesion_id": g.size().index.to_numpy(),
            "x_um": g["x_um"].mean().to_numpy(),
            "y_um": g["y_um"].mean().to_numpy(),
            "n_cells": g.size().to_numpy(),
        }
    )
    if has_ki67:
        lesions["n_ki67_pos"] = g["ki67_pos"].sum().astype(int).to_numpy()
    else:
        lesions["n_ki67_pos"] = pd.array([pd.NA] * len(lesions), dtype="Int64")
    lesions["class"] = lesion_class(
        lesions["n_cells"].to_numpy(), config.cluster_min_cells, config.focus_min_cells
    )
    single = lesions["n_cells"] == 1
    if has_ki67:
        lesions["dormant"] = single & (lesions["n_ki67_pos"] == 0)
    else:
        lesions["dormant"] = pd.array([pd.NA] * len(lesions), dtype="boolean")
    lesions["area_um2"] = g["cell_area_um2"].sum().to_numpy()
    lesions["her2_mean"] = g["her2_mean"].mean().to_numpy()
    return cells, lesions[LESION_COLUMNS]
