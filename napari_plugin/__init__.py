"""napari plugin for lungmets: open, analyse and review lung-metastasis slides in napari.

The contributions are listed in ``napari.yaml``; napari imports each one only when it is used,
so this module imports no widget, no Qt and no napari.
"""

from histo._version import __version__

__all__ = ["__version__"]
