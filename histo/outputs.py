"""Writing an analysis's results: the tables, the QuPath exports and, last, the summary.

Every file goes through `histo.atomic` (written under a temporary name, renamed into place
when complete), so a killed run never leaves a table that looks complete but is not.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_path, write_csv, write_json

__all__ = ["atomic_path", "write_csv", "write_json", "write_result_folder", "write_results"]


def write_results(result, out_dir: str | os.PathLike) -> Path:
    """Write an `AnalysisResult` to ``out_dir/<slide name>/``.

    Writes ``cells.csv``, ``lesions.csv``, ``cells.geojson`` and ``lesions.geojson`` (QuPath
    detections, see `histo.exports`) and, last, ``summary.json``: a folder with a summary is
    complete. Other files in the folder (a user's corrections) are left alone. Returns the
    folder.
    """
    from .io import slide_name

    return write_result_folder(result, Path(out_dir) / slide_name(result.slide_path))


def write_result_folder(result, folder: str | os.PathLike) -> Path:
    """Write an `AnalysisResult`'s tables and summary into `folder` itself (see
    `write_results`; summary.json last)."""
    from .exports import write_geojson

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = folder / "summary.json"
    if summary.exists():  # the old summary must not vouch for half-rewritten tables
        summary.unlink()
    write_csv(result.cells, folder / "cells.csv", float_format="%.4f")
    write_csv(result.lesions, folder / "lesions.csv", float_format="%.4f")
    write_geojson(result.cells, result.lesions, result.summary["input"]["pixel_size_um"], folder)
    write_json(result.summary, summary)
    return folder
