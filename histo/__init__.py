"""lungmets: find and measure lung metastases in whole-slide immunofluorescence images.

``histo`` is the pipeline library behind the ``lungmets`` command and the napari plugin. It
works on pyramidal OME-TIFF slides (DAPI, HER2, Ki67 channels), finds HER2+ tumour cells,
groups them into lesions (single cells, clusters, foci), flags dormant single cells and
summarises slides, mice and groups of a cohort. It imports neither napari nor Qt.

The public names below are imported on first use, so that ``import histo`` stays fast and
loads no NumPy, pandas or torch until a function that needs them is called.

Public API
----------
open_slide, Slide
    Open a whole-slide image lazily (OME-TIFF, TIFF, SVS, NDPI, OME-Zarr).
AnalysisConfig
    Every setting of an analysis, with its default and unit.
analyze_tile
    Find HER2+ cells in one array of pixels.
analyze_slide, iter_analyze_slide, AnalysisResult
    Analyse a whole slide chunk by chunk (threads, processes or a Dask cluster).
write_results
    Write an analysis to ``<out>/<slide name>/`` (cells.csv, lesions.csv, summary.json).
generate_slide
    Write one synthetic slide and its ground truth.
generate_cohort
    Write a synthetic cohort (mice x time points x sections) and its sample sheet.
generate_sample_data
    Write the small slides used by the tutorial and the napari sample data.
InputError
    Raised for bad user input; the message names the file, the problem and the fix.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from histo._version import __version__

if TYPE_CHECKING:
    from histo.config import AnalysisConfig
    from histo.errors import InputError
    from histo.io import Slide, open_slide
    from histo.outputs import write_results
    from histo.pipeline import AnalysisResult, analyze_slide, analyze_tile, iter_analyze_slide
    from histo.synthetic import generate_cohort, generate_sample_data, generate_slide

# Public name -> module that defines it; imported by ``__getattr__`` on first access.
_LAZY_ATTRIBUTES = {
    "AnalysisConfig": "histo.config",
    "AnalysisResult": "histo.pipeline",
    "InputError": "histo.errors",
    "Slide": "histo.io",
    "analyze_slide": "histo.pipeline",
    "analyze_tile": "histo.pipeline",
    "iter_analyze_slide": "histo.pipeline",
    "open_slide": "histo.io",
    "write_results": "histo.outputs",
    "generate_cohort": "histo.synthetic",
    "generate_sample_data": "histo.synthetic",
    "generate_slide": "histo.synthetic",
}

__all__ = [
    "AnalysisConfig",
    "AnalysisResult",
    "InputError",
    "Slide",
    "__version__",
    "analyze_slide",
    "analyze_tile",
    "generate_cohort",
    "generate_sample_data",
    "generate_slide",
    "iter_analyze_slide",
    "open_slide",
    "write_results",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
