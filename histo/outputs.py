"""Atomic writing of everything lungmets produces.

A file is written under a temporary name in its destination folder and renamed into place
when complete (``os.replace`` is atomic on one file system), so a killed run never leaves a
table or image that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` if the block succeeds.

    Parameters
    ----------
    path : path-like
        Final destination. Its folder is created if needed.

    Examples
    --------
    >>> with atomic_path("out/table.csv") as tmp:  # doctest: +SKIP
    ...     df.to_csv(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give it the usual permissions instead.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(df, path: str | os.PathLike, **kwargs) -> Path:
    """Write a pandas DataFrame to CSV atomically (no index by default)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write a JSON-serialisable object atomically, pretty-printed."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return Path(path)


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
