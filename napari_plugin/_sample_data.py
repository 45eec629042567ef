"""Sample data: the two small synthetic lung sections of ``histo.synthetic``.

The repository's ``sample_data/`` folder is not part of the wheel, so the slides are generated
on first use (a few seconds each, nothing is downloaded) into a per-user cache folder and
reused afterwards. The cache folder is, in order of preference:

1. ``$LUNGMETS_CACHE/sample_data/<version>``;
2. ``$XDG_CACHE_HOME/lungmets/sample_data/<version>``;
3. ``~/.cache/lungmets/sample_data/<version>``.

The generator writes each slide under a temporary name and renames it into place once
complete (after its truth tables), so a slide present in the cache is a complete one, even if
napari was closed during the generation or two viewers generated it at the same time.

Only the images are returned: finding the lesions is the job of the *Analyze slide* widget.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: Environment variable naming lungmets' cache folder.
CACHE_ENV = "LUNGMETS_CACHE"


def cache_dir() -> Path:
    """The folder the sample slides are generated into (not created here).

    Returns
    -------
    Path
        ``<cache root>/sample_data/<lungmets version>``, where the cache root is
        ``$LUNGMETS_CACHE``, else ``$XDG_CACHE_HOME/lungmets``, else ``~/.cache/lungmets``.
        The version is part of the path because another release of the generator may draw
        other pixels from the same seed.
    """
    from histo._version import __version__

    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lungmets"
    return base / "sample_data" / __version__


def sample_slide_path(group: str) -> Path:
    """The cached sample slide of a group, generated first if it is not there yet.

    Parameters
    ----------
    group : {"IAV", "PBS"}
        Infected or control section, as in ``histo.synthetic.SAMPLE_SLIDES``.

    Returns
    -------
    Path
        The OME-TIFF.

    Raises
    ------
    ValueError
        For a group that has no sample slide.
    OSError
        If the cache folder cannot be written (the message names `CACHE_ENV`).
    """
    from histo.synthetic import SAMPLE_SIZE_PX, SAMPLE_SLIDES, generate_slide

    specs = {g: (name, dpi, seed) for name, g, dpi, seed in SAMPLE_SLIDES}
    if group not in specs:
        raise ValueError(f"no sample slide for group {group!r}; choose one of {sorted(specs)}")
    name, dpi, seed = specs[group]
    path = cache_dir() / name
    if path.is_file():
        return path
    log.info("generating the sample slide %s (once)", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # No label masks: they are truth for the tests, not something to look at.
        generate_slide(path, size_px=SAMPLE_SIZE_PX, group=group, dpi=dpi, seed=seed, labels=False)
    except OSError as err:
        raise OSError(
            f"cannot write the lungmets sample data to {path.parent} ({err}); "
            f"set the environment variable {CACHE_ENV} to a writable folder"
        ) from err
    return path


def _section_layers(group: str) -> list[tuple]:
    from histo.io import open_slide

    from ._layers import slide_layers

    return slide_layers(open_slide(sample_slide_path(group)))


def infected_section() -> list[tuple]:
    """The infected (IAV, 15 days post infection) sample section as napari layer data.

    Returns
    -------
    list of (data, kwargs, "image")
        One lazy multiscale image layer per channel (DAPI, HER2, Ki67), in micrometres.

    Examples
    --------
    >>> viewer.open_sample("lungmets", "infected")  # doctest: +SKIP
    """
    return _section_layers("IAV")


def control_section() -> list[tuple]:
    """The control (PBS, 15 days post infection) sample section as napari layer data.

    Returns
    -------
    list of (data, kwargs, "image")
        One lazy multiscale image layer per channel (DAPI, HER2, Ki67), in micrometres.

    Examples
    --------
    >>> viewer.open_sample("lungmets", "control")  # doctest: +SKIP
    """
    return _section_layers("PBS")
