"""Reading and writing whole-slide images.

Writing: `write_ome_tiff` writes a tiled, compressed, pyramidal OME-TIFF (sub-resolution
levels as SubIFDs, as Bio-Formats, QuPath and tifffile expect) atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .outputs import atomic_path

TILE_PX = 512


def downsample_mean(image: np.ndarray, factor: int = 2) -> np.ndarray:
    """Block-mean downsampling of a (C, Y, X) image by an integer factor (edges cropped).

    Parameters
    ----------
    image : ndarray, shape (C, Y, X)
    factor : int

    Returns
    -------
    ndarray of the input dtype, shape (C, Y // factor, X // factor)
    """
    c, h, w = image.shape
    h2, w2 = h // factor, w // factor
    out = np.empty((c, h2, w2), image.dtype)
    for i in range(c):  # one channel at a time keeps the float temporary small
        blk = image[i, : h2 * factor, : w2 * factor].reshape(h2, factor, w2, factor)
        out[i] = np.rint(blk.mean(axis=(1, 3), dtype=np.float32)).astype(image.dtype)
    return out


def pyramid_levels(image: np.ndarray, min_size_px: int = 1024) -> list[np.ndarray]:
    """Level 0 and 2x-downsampled levels until the largest side is below `min_size_px`."""
    levels = [image]
    while max(levels[-1].shape[1:]) >= min_size_px:
        levels.append(downsample_mean(levels[-1], 2))
    return levels


def write_ome_tiff(
    path: str | os.PathLike,
    levels: Sequence[np.ndarray],
    *,
    channel_names: Sequence[str],
    pixel_size_um: float,
    compression: str = "zlib",
    compression_level: int | None = 1,
    tile_px: int = TILE_PX,
    maxworkers: int | None = None,
) -> Path:
    """Write a pyramidal, tiled, compressed OME-TIFF (axes CYX) atomically.

    Parameters
    ----------
    path : path-like
        Destination, usually ``*.ome.tif``.
    levels : sequence of ndarray, each (C, Y, X)
        Level 0 first; each further level is a sub-resolution stored as a SubIFD.
    channel_names : sequence of str
        One name per channel, written as OME ``Channel/@Name``.
    pixel_size_um : float
        Level-0 pixel size (``PhysicalSizeX/Y`` in um).
    compression : str
        A tifffile compression name; ``"zlib"`` (deflate) is read by every TIFF reader.
    compression_level : int, optional
        Level 1 writes about 5x faster than zlib's default 6 and costs ~3% in size on
        noisy fluorescence data.

    Returns
    -------
    Path
    """
    import tifffile

    if len(channel_names) != levels[0].shape[0]:
        raise ValueError(f"{len(channel_names)} channel names for {levels[0].shape[0]} channels")
    metadata = {
        "axes": "CYX",
        "PhysicalSizeX": pixel_size_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_size_um,
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": list(channel_names)},
    }
    opts = {
        "tile": (tile_px, tile_px),
        "compression": compression,
        "predictor": True,
        "compressionargs": {} if compression_level is None else {"level": compression_level},
        "photometric": "minisblack",
        "maxworkers": maxworkers,
    }
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **opts)
        for lev in levels[1:]:
            tif.write(lev, subfiletype=1, **opts)
    return Path(path)
