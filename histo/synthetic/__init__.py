"""Synthetic whole-slide images of mouse lung sections, with exact ground truth.

The generator is lungmets' ground truth: the network is trained on it and every accuracy
figure of the project is measured against it. A slide is an immunofluorescence section of a
MMTV-Her2 mouse lung stained for DAPI, HER2 and (optionally) Ki67:

- irregular tissue lobes filling about half of the field, alveolar septa around empty
  airspaces with dense DAPI nuclei, bronchioles with epithelium and companion arteries,
  veins with red blood cells;
- weak tissue autofluorescence in every channel, HER2-bright red blood cells without a
  nucleus, alveolar macrophages autofluorescent in every channel, debris;
- Ki67+ normal cells, and in infected lungs Ki67-rich, HER2-negative immune infiltrates;
- HER2+ cancer cells (12-18 um, membrane and cytoplasmic HER2 around a larger nucleus) as
  dormant single cells, clusters of 2-4 and foci of 5 to a few hundred cells, with lesion
  brightness from about 2x to 15x the autofluorescence;
- optical blur, shot and read noise, camera offset, per-field illumination of a stitching
  scanner and slide-to-slide variation of stain and exposure.

Files written by `generate_slide` for ``OUT.ome.tif``:

- ``OUT.ome.tif``: pyramidal tiled OME-TIFF, axes CYX, uint16, channels DAPI, HER2[, Ki67];
- ``OUT.truth/lesions.csv``: lesion_id, x_um, y_um, n_cells, n_ki67_pos, class, dormant,
  area_um2, her2_level (lesion brightness / HER2 autofluorescence);
- ``OUT.truth/cells.csv``: cell_id, lesion_id, x_um, y_um, ki67_pos, her2_mean,
  cell_area_um2, nucleus_area_um2 (one row per HER2+ cancer cell; position = nucleus centre);
- ``OUT.truth/nuclei.csv``: every labelled nucleus (nucleus_id, x_um, y_um, kind, ki67_pos);
- ``OUT.truth/labels.ome.tif``: int32 instance labels, channels ``nuclei`` (cancer nuclei
  carry their cell_id), ``cells`` (cell_id) and ``lesions`` (lesion_id);
- ``OUT.truth/slide.json``: the parameters, counts and tissue area, and which generator drew
  it (``generator_revision``, `GENERATOR_REVISION`).

Coordinates: ``x_um = x_px * pixel_size_um`` with level-0 pixel centres at integers.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> module that defines it, imported on first access (``__getattr__``), so that
# the CLI can read the appearance families' names without loading numpy and pandas.
_LAZY_ATTRIBUTES = {
    "GENERATOR_REVISION": "._api",
    "SAMPLE_SIZE_PX": "._api",
    "SAMPLE_SLIDES": "._api",
    "SyntheticSlide": "._api",
    "generate_cohort": "._api",
    "generate_sample_data": "._api",
    "generate_slide": "._api",
    "load_truth": "._api",
    "render_preview": "._api",
    "slide_is_current": "._api",
    "slide_stem": "._api",
    "truth_dir_for": "._api",
    "lesion_model": "._biology",
    "CHANNELS": "._scene",
    "LABEL_CHANNELS": "._scene",
    "SlideSpec": "._scene",
    "build_scene": "._scene",
    "Appearance": "._appearance",
    "FAMILIES": "._appearance",
    "random_appearance": "._appearance",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
