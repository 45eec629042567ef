"""Readers: whole slides and lungmets result folders.

Each ``get_*_reader`` answers quickly whether it can read a path and returns None otherwise
(never raises), as napari expects; the returned function does the reading.
"""

from __future__ import annotations

from pathlib import Path

from ._layers import is_result_folder


def _one(path):
    if isinstance(path, list | tuple):
        return path[0] if len(path) == 1 else None
    return path


def get_slide_reader(path):
    """A reader for OME-TIFF, TIFF, SVS, NDPI and OME-Zarr slides, or None."""
    from histo.io import SLIDE_SUFFIXES

    p = _one(path)
    if p is None or not str(p).lower().rstrip("/").endswith(SLIDE_SUFFIXES):
        return None
    return read_slide


def read_slide(path) -> list[tuple]:
    """One lazy multiscale image layer per channel, in micrometres.

    Raises
    ------
    histo.InputError
        With the file, the problem and the fix, for a file lungmets cannot read.
    """
    from histo.io import open_slide

    from ._layers import slide_layers

    return slide_layers(open_slide(_one(path)))


def get_results_reader(path):
    """A reader for a folder written by ``lungmets run`` (summary.json + lesions.csv), or None."""
    p = _one(path)
    if p is None or not is_result_folder(Path(p)):
        return None
    return read_results


def read_results(path) -> list[tuple]:
    """Cells and lesions (review corrections applied) of a result folder."""
    from ._layers import result_layers

    return result_layers(Path(_one(path)))
