"""Atomic writing: a file is written under a temporary name in its destination folder and
renamed into place when complete (``os.replace`` is atomic on one file system), so a killed
run never leaves a table or image that looks complete but is not.

The lowest layer of the package: it imports nothing of lungmets, so the reader
(`histo.io`), the result writer (`histo.outputs`) and the exporters (`histo.exports`) can all
use it without importing each other.
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
