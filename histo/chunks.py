"""The chunk plan: square cores that tile the slide, each read with a halo of context.

Every level-0 pixel belongs to exactly one core; a cell belongs to the chunk whose core holds
its centre. Pixel ``i`` covers ``[i - 0.5, i + 0.5)``, so a core of rows ``[y0, y1)`` owns
centres with ``y0 - 0.5 <= y < y1 - 0.5``: every centre is owned once, whatever the chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """One chunk: its core (owned pixels) and the region read (core plus halo, clipped).

    Boxes are ``(y0, y1, x0, x1)`` in level-0 pixels, end-exclusive.
    """

    row: int
    col: int
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    def owns(self, y_px: np.ndarray, x_px: np.ndarray) -> np.ndarray:
        """Whether centres at level-0 (y_px, x_px) belong to this chunk."""
        y0, y1, x0, x1 = self.core
        return (y_px >= y0 - 0.5) & (y_px < y1 - 0.5) & (x_px >= x0 - 0.5) & (x_px < x1 - 0.5)


def plan_chunks(
    shape_px: tuple[int, int],
    chunk_size_px: int,
    halo_px: int,
    *,
    tissue: np.ndarray | None = None,
    tissue_downsample: float = 1.0,
    region_px: tuple[int, int, int, int] | None = None,
) -> list[Chunk]:
    """Chunks covering a slide, optionally only those that touch tissue.

    Parameters
    ----------
    shape_px : (int, int)
        Level-0 (rows, columns).
    chunk_size_px : int
        Core side.
    halo_px : int
        Context around each core.
    tissue : ndarray of bool, optional
        Tissue mask at a lower resolution; chunks whose core (grown by the halo) holds no tissue
        are left out: glass is never analysed.
    tissue_downsample : float
        Level-0 pixels per mask pixel.
    region_px : (y0, y1, x0, x1), optional
        Only this level-0 box (end-exclusive): cores are cut to it, so only cells whose centre
        lies inside are reported; halos still read the context around it.

    Returns
    -------
    list of Chunk
        Row-major order.
    """
    h, w = shape_px
    ry0, ry1, rx0, rx1 = region_px if region_px is not None else (0, h, 0, w)
    ry0, ry1, rx0, rx1 = max(0, ry0), min(h, ry1), max(0, rx0), min(w, rx1)
    out = []
    for r in range(math.ceil(h / chunk_size_px)):
        for c in range(math.ceil(w / chunk_size_px)):
            y0, x0 = r * chunk_size_px, c * chunk_size_px
            y1, x1 = min(h, y0 + chunk_size_px), min(w, x0 + chunk_size_px)
            y0, y1, x0, x1 = max(y0, ry0), min(y1, ry1), max(x0, rx0), min(x1, rx1)
            if y0 >= y1 or x0 >= x1:
                continue
            if tissue is not None:
                m = tissue_downsample
                my0 = max(0, int((y0 - halo_px) / m))
                my1 = min(tissue.shape[0], math.ceil((y1 + halo_px) / m))
                mx0 = max(0, int((x0 - halo_px) / m))
                mx1 = min(tissue.shape[1], math.ceil((x1 + halo_px) / m))
                if not tissue[my0:my1, mx0:mx1].any():
                    continue
            read = (
                max(0, y0 - halo_px),
                min(h, y1 + halo_px),
                max(0, x0 - halo_px),
                min(w, x1 + halo_px),
            )
            out.append(Chunk(row=r, col=c, core=(y0, y1, x0, x1), read=read))
    return out
