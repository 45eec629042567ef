"""Analysis of a tile (pure) and of a whole slide (chunked, with Dask).

`analyze_tile` is the one function that finds cells: a test calls it on an array, a Dask task
calls it on a chunk, the napari widget on the current view. `iter_analyze_slide` plans the
chunks that touch tissue, runs `analyze_tile` on each (threads, a local cluster of processes or
an existing Dask cluster), links the cells of the whole slide into lesions and summarises.
It is a generator that yields progress ``(done, total, message)`` and returns the result;
`analyze_slide` drives it with an optional progress callback.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._threads import iter_in_thread
from ._version import __version__
from .chunks import Chunk, plan_chunks
from .config import KI67_QUANTILES, AnalysisConfig
from .errors import Cancelled, InputError
from .lesions import group_lesions
from .markers import apply_thresholds
from .tissue import StainLevels, glass_level, stain_levels, tissue_mask, tissue_windows

log = logging.getLogger(__name__)

Progress = tuple[int, int, str]

CELL_OUTPUT_COLUMNS = [
    "cell_id",
    "lesion_id",
    "x_um",
    "y_um",
    "ki67_pos",
    "her2_mean",
    "nucleus_area_um2",
    "cell_area_um2",
    "her2_ratio",
    "her2_coverage",
    "ki67_mean",
    "ki67_raw_mean",
    "dapi_mean",
]


@dataclass
class AnalysisResult:
    """What an analysis found in one slide.

    Attributes
    ----------
    slide_path : Path
    cells : pandas.DataFrame
        One row per HER2+ cell (see `CELL_OUTPUT_COLUMNS`, plus ``<channel>_mean`` for any
        further channels).
    lesions : pandas.DataFrame
        One row per lesion (see `histo.lesions.LESION_COLUMNS`).
    summary : dict
        Counts, densities, tissue area, parameters, versions, input checksum, timings.
    tissue_mask : ndarray of bool
        The tissue mask at `tissue_pixel_size_um`.
    tissue_pixel_size_um : float
    """

    slide_path: Path
    cells: pd.DataFrame
    lesions: pd.DataFrame
    summary: dict
    tissue_mask: np.ndarray = field(repr=False)
    tissue_pixel_size_um: float = 0.0


def analyze_tile(
    pixels: np.ndarray,
    origin_px: tuple[int, int],
    config: AnalysisConfig,
    *,
    roles: dict[str, int],
    stain: StainLevels,
    pixel_size_um: float,
    core: Chunk | None = None,
    extra_channels: tuple[tuple[str, int], ...] = (),
    downsample: int = 1,
) -> pd.DataFrame:
    """Find the HER2+ cells of one tile of level-0 pixels.

    Parameters
    ----------
    pixels : ndarray, shape (C, Y, X)
        Raw counts: level 0, or (network only) its `downsample` x `downsample` block means, as
        a pyramid level that holds them stores (`histo.io.binned_level`).
    origin_px : (int, int)
        Level-0 (row, column) of ``pixels[:, 0, 0]`` (a multiple of `downsample`).
    config : AnalysisConfig
    roles : dict
        Channel indices of DAPI, HER2 and (optionally) Ki67.
    stain : StainLevels
        Slide-wide intensity levels (see `histo.tissue.stain_levels`).
    pixel_size_um : float
    core : Chunk, optional
        Keep only cells whose centre this chunk owns (the others belong to a neighbour).
    extra_channels : tuple of (name, index)
    downsample : int
        Level-0 pixels per pixel of `pixels` along each axis (1: level 0). `pixel_size_um`
        stays level 0's.

    Returns
    -------
    pandas.DataFrame
        Cells with ``x_um``, ``y_um`` (``x_um = x_px * pixel_size_um``) and measurements.
    """
    kw = {}
    if config.method == "unet":
        from .network import detect_cells_unet as detect

        kw["downsample"] = downsample
    else:
        from .detect import detect_cells as detect

        if downsample != 1:
            raise ValueError("the classical detector reads level 0 (downsample 1)")
    cells = detect(
        pixels,
        roles=roles,
        stain=stain,
        pixel_size_um=pixel_size_um,
        config=config,
        origin_px=origin_px,
        extra_channels=extra_channels,
        **kw,
    )
    fallback = cells.attrs.get("fallback")  # e.g. GPU out of memory: ran on the CPU
    if core is not None and len(cells):
        cells = cells[core.owns(cells["y_px"].to_numpy(), cells["x_px"].to_numpy())]
    cells = cells.assign(x_um=cells["x_px"] * pixel_size_um, y_um=cells["y_px"] * pixel_size_um)
    cells = cells.drop(columns=["x_px", "y_px"]).reset_index(drop=True)
    if fallback:
        cells.attrs["fallback"] = fallback
    return cells


def _chunk_task(
    path, channels, pixel_size_um, read_level, chunk: Chunk, config, stain
) -> pd.DataFrame:
    """One Dask task: open the slide in this process, read a chunk (from `read_level` where
    its box falls on that level's pixels: see `_read_level`), analyse it."""
    from .io import open_slide

    slide = open_slide(path, channels=channels, pixel_size_um=pixel_size_um)
    y0, y1, x0, x1 = chunk.read
    d = round(slide.downsamples[read_level]) if read_level else 1
    if d > 1 and y0 % d == 0 and x0 % d == 0:
        h, w = slide.levels[read_level].shape[1:]
        pixels = slide.read_region(read_level, y0 // d, min(y1 // d, h), x0 // d, min(x1 // d, w))
    else:
        d = 1
        pixels = slide.read_region(0, y0, y1, x0, x1)
    return analyze_tile(
        pixels,
        (y0, x0),
        config,
        roles=slide.roles,
        stain=stain,
        pixel_size_um=slide.pixel_size_um,
        core=chunk,
        extra_channels=slide.extra_channels,
        downsample=d,
    )


#: A pyramid level stores its block means rounded to the file's integers (up to half a count
#: off): it is read only where that stays within 5% of every channel's reference unit, the
#: autofluorescence the network's input is measured in (dark or 8-bit slides: full resolution).
MIN_REFERENCE_COUNTS_FOR_PYRAMID = 10.0


def _read_level(slide, config, chunks, stain) -> int:
    """The pyramid level the network's chunks are read from: one that holds level 0's block
    means at (a divisor of) the model's resolution (`histo.io.binned_level`, checked on the
    middle of up to four tissue chunks), else 0. Always 0 for the classical detector, with
    ``config.read_pyramid`` off, where the model's resolution is not a whole number of slide
    pixels, or where an integer file's autofluorescence levels are under
    `MIN_REFERENCE_COUNTS_FOR_PYRAMID` counts."""
    if config.method != "unet" or not config.read_pyramid or not chunks or slide.n_levels < 2:
        return 0
    if np.issubdtype(slide.levels[0].dtype, np.integer):
        used = sorted(set(slide.roles.values()))
        if min(float(stain.autofluorescence[i]) for i in used) < MIN_REFERENCE_COUNTS_FOR_PYRAMID:
            return 0
    from models import model_config
    from models.infer import integer_factor

    from .io import binned_level
    from .network import model_factor

    um = float(model_config(config.model_path)["input_um_per_px"])
    factor = integer_factor(model_factor(um, slide.pixel_size_um, slide.path))
    if factor is None or factor < 2:
        return 0
    step = max(1, len(chunks) // 4)
    regions = []
    for c in chunks[::step][:4]:
        y0, y1, x0, x1 = c.core
        cy, cx, half = (y0 + y1) // 2, (x0 + x1) // 2, 128 * factor
        regions.append((max(cy - half, 0), cy + half, max(cx - half, 0), cx + half))
    return binned_level(slide, factor, regions)


def file_checksum(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """SHA-256 of a file; for a folder (Zarr), of its file names and sizes (prefixed).

    A Zarr image's ``labels/`` group is left out: labels written into it (``--labels-zarr``)
    do not change the image.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.relative_to(path).parts[0] != "labels":
                h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode())
        return "listing-sha256:" + h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def measure_background(slide, config: AnalysisConfig) -> tuple[np.ndarray, float, StainLevels]:
    """Tissue mask (at about `config.tissue_pixel_size_um`) and slide-wide stain levels.

    Returns
    -------
    mask : ndarray of bool
    mask_pixel_size_um : float
    stain : StainLevels

    Raises
    ------
    InputError
        If the slide holds no tissue.
    """
    lev = slide.level_for_pixel_size(config.tissue_pixel_size_um)
    if slide.overview_level is not None:  # giant, no pyramid: no finer level is read whole
        lev = max(lev, slide.overview_level)
    ds = slide.downsamples[lev]
    from dask.threaded import get as threaded_get

    # Read here, in this process's threads (also under a distributed client).
    low = np.asarray(slide.levels[lev].compute(scheduler=threaded_get))
    mask_px = slide.pixel_size_um * ds
    mask, offset = tissue_mask(low, mask_px, stored=slide.stored_mask(lev))
    if not mask.any():
        raise InputError(
            f"{slide.path}: no tissue found (the slide looks like empty glass); check that this "
            "is the right file and that --channels names the DAPI and HER2 channels"
        )
    # Stain levels from windows of tissue at about 1 um/px.
    fds, windows, tissue = _stain_windows(slide, mask, ds)
    unit = None
    if not np.issubdtype(low.dtype, np.integer):
        # Float data: about half the glass noise of the windows' level plays a camera count
        # (block means of ds x ds pixels have 1/ds of the noise of single pixels).
        noise_low = np.array([glass_level(ch, quantum=0)[1] for ch in low.astype(np.float32)])
        unit = noise_low * (ds / fds) / 2.5
    her2 = slide.roles.get("HER2")
    stain = stain_levels(
        windows,
        offset,
        slide.roles["DAPI"],
        unit=unit,
        negative_in_nuclei=() if her2 is None else (her2,),
        tissue=tissue,
    )
    return mask, mask_px, stain


def _stain_windows(slide, mask: np.ndarray, mask_downsample: float, n: int = 24):
    """``(downsample, windows, tissue)``: `n` windows of 128 x 128 px of tissue (spread over
    `mask`) from the level nearest 1 um/px, that level's downsample, and each window's tissue
    mask (`mask` at the window's pixels: what lies outside is glass)."""
    fine = slide.level_for_pixel_size(1.0)
    fds = slide.downsamples[fine]
    fy, fx = slide.levels[fine].shape[1:]
    half = 64
    windows, tissue = [], []
    for cy, cx in tissue_windows(mask, n=n):
        y = int((cy + 0.5) * mask_downsample / fds)
        x = int((cx + 0.5) * mask_downsample / fds)
        y0, x0 = max(0, min(y - half, fy - 2 * half)), max(0, min(x - half, fx - 2 * half))
        w = slide.read_region(fine, y0, min(fy, y0 + 2 * half), x0, min(fx, x0 + 2 * half))
        windows.append(w)
        scale = fds / mask_downsample
        rows = ((np.arange(y0, y0 + w.shape[1]) + 0.5) * scale).astype(int)
        cols = ((np.arange(x0, x0 + w.shape[2]) + 0.5) * scale).astype(int)
        tissue.append(
            mask[np.ix_(rows.clip(0, mask.shape[0] - 1), cols.clip(0, mask.shape[1] - 1))]
        )
    return fds, windows, tissue


def marker_thresholds(
    slide,
    mask: np.ndarray,
    mask_pixel_size_um: float,
    stain: StainLevels,
    config: AnalysisConfig,
    cells: pd.DataFrame,
) -> dict:
    """Each per-cell marker's positivity threshold: the user's, or calibrated on the slide's
    own nuclei (`histo.markers.calibrate_threshold`).

    HER2 (applied only with ``her2_threshold`` "auto" or a number; with "off", the default,
    it is reported): a detected cell counts when the mean HER2 of its body reaches the
    threshold, `NEGATIVE_SDS` robust SDs above the bodies of the slide's ordinary cells (nuclei
    of the tissue windows grown by 3 um). Ki67: the crossing of the negative and positive
    populations of the nuclear Ki67 of the windows' nuclei and of the candidate cells, or of
    the candidate cells alone where they show both.

    Ki67 is calibrated (and called) after taking out of every nucleus the HER2 seen through
    the Ki67 filter, measured on the slide (`_compensate_ki67`).

    Returns
    -------
    thresholds : dict
        Marker role -> `histo.markers.MarkerThreshold` (``"HER2"``, and ``"Ki67"`` when it
        was imaged). Where the tissue holds too few nuclei to calibrate, the entry's method
        says so and its threshold is None: the detector's own calls are kept.
    cells : pandas.DataFrame
        `cells` with ``ki67_mean`` compensated for bleed-through and the measured value as
        ``ki67_raw_mean``.
    """
    from dataclasses import replace

    from .markers import (
        MarkerThreshold,
        calibrate_threshold,
        histogram,
        nuclear_means,
        user_threshold,
    )

    ds = mask_pixel_size_um / slide.pixel_size_um
    fds, windows, _ = _stain_windows(slide, mask, ds, n=48)
    d = slide.roles["DAPI"]
    offset = np.asarray(stain.offset, np.float64)
    px_um = slide.pixel_size_um * fds
    integer = np.issubdtype(slide.levels[0].dtype, np.integer)
    common = {
        "nuclear_dapi": stain.nuclear[d],
        "nucleus_fraction": config.nucleus_threshold,
        "min_area_px": max(1, int(round(config.nucleus_min_area_um2 / px_um**2))),
    }

    def unit(i):
        # Differences below a quarter of the channel's autofluorescence (and one count) are
        # noise for a positivity call.
        return max(0.25 * stain.autofluorescence[i], 1.0 if integer else 0.0)

    def calibrated(role, values, **kw):
        try:
            return calibrate_threshold(values, role, unit=unit(slide.roles[role]), **kw)
        except ValueError as exc:
            log.warning(
                "%s: %s threshold not calibrated (%s); the detector's calls are kept",
                slide.path,
                role,
                exc,
            )
            return MarkerThreshold(
                marker=role,
                threshold=None,
                method=f"detector's own calls ({exc})",
                n_nuclei=int(len(values)),
            )

    out = {}
    h = slide.roles["HER2"]
    if not isinstance(config.her2_threshold, str):
        out["HER2"] = user_threshold("HER2", config.her2_threshold)
    else:
        grow = max(1, int(round(3.0 / px_um)))
        values = nuclear_means(windows, offset, d, h, grow_px=grow, **common)
        out["HER2"] = calibrated("HER2", values, positives=False)
        if config.her2_threshold == "off":
            out["HER2"] = out["HER2"].not_applied()
    if "Ki67" in slide.roles:
        # Always calibrated (a second or less), so that a user's or the detector's choice can
        # be compared with it and `lungmets rethreshold --ki67-threshold auto` can return to it.
        k = slide.roles["Ki67"]
        measure = config.ki67_measure
        column = f"ki67_{measure}"
        values = nuclear_means(windows, offset, d, k, quantile=KI67_QUANTILES[measure], **common)
        values, cells, compensation = _compensate_ki67(
            windows, offset, stain, slide.roles, common, values, cells
        )
        own = cells[column].to_numpy(np.float64) if len(cells) else np.zeros(0)
        own = own[np.isfinite(own)]
        auto = calibrated("Ki67", np.r_[values, own], cells=own)
        auto = replace(
            auto,
            histogram=histogram(values, own, unit=unit(k)),
            compensation=compensation,
            measure=measure,
        )
        if config.ki67_threshold == "detector":
            out["Ki67"] = auto.not_applied()
        elif not isinstance(config.ki67_threshold, str):
            out["Ki67"] = user_threshold(
                "Ki67", config.ki67_threshold, calibrated=auto, measure=measure
            )
        else:
            out["Ki67"] = auto
    if "ki67_raw_mean" not in cells:
        cells = cells.assign(ki67_raw_mean=cells["ki67_mean"])
    cells, checked = _autofluorescence_check(slide, stain, config, out, cells)
    # The ordinary cells' HER2 bound: the calibrated threshold, applied or not (a user's own
    # HER2 threshold is not calibrated on them, so there is none).
    her2 = out["HER2"]
    upper = None if her2.method == "user" else her2.threshold
    cells, population = _negative_population_check(config, cells, upper)
    cells, checked["population"] = _autofluorescent_population_check(config, cells)
    out["HER2"] = replace(out["HER2"], autofluorescence=checked, negative_population=population)
    return out, cells.drop(columns=[c for c in _BLEED_COLUMNS if c in cells])


#: Tissue autofluorescence (flavins, lipofuscin, elastin) is broad: in neighbouring channels it
#: stays within this factor of itself (3-6 on the generator's slides). A slide whose measured
#: HER2/Ki67 levels differ more is one where at least one "autofluorescence" level is the
#: stain's own haze (near-zero autofluorescence under dense HER2+ tumour measured 125): the
#: check is not made there.
MAX_AF_SPECTRUM_RATIO = 20.0


def _autofluorescence_check(slide, stain, config, thresholds, cells):
    """`cells` without those whose HER2 autofluorescence explains
    (`histo.markers.her2_over_autofluorescence` at most
    ``config.her2_min_over_autofluorescence``), with the ratio as ``her2_af_ratio``; and what
    was done (a dict for `MarkerThreshold.autofluorescence`)."""
    from .markers import her2_over_autofluorescence

    minimum = float(config.her2_min_over_autofluorescence)
    if minimum <= 0:
        return cells, {"min_ratio": 0.0, "note": "check turned off"}
    if "Ki67" not in slide.roles:
        return cells, {"min_ratio": minimum, "note": "no Ki67 channel to predict it from"}
    if "ki67_low_mean" not in cells:
        return cells, {"min_ratio": minimum, "note": "not measured by this detector"}
    h, k = slide.roles["HER2"], slide.roles["Ki67"]
    integer = np.issubdtype(slide.levels[0].dtype, np.integer)
    af_h, af_k = stain.autofluorescence[h], stain.autofluorescence[k]
    if min(af_h, af_k) < (1.0 if integer else 1e-6):
        # Without measurable autofluorescence there is nothing it could explain.
        return cells, {"min_ratio": minimum, "note": "no measurable autofluorescence"}
    ratio_af = af_h / af_k
    if not 1 / MAX_AF_SPECTRUM_RATIO <= ratio_af <= MAX_AF_SPECTRUM_RATIO:
        return cells, {
            "her2_per_ki67": round(ratio_af, 4),
            "min_ratio": minimum,
            "note": "HER2/Ki67 autofluorescence ratio not plausible for tissue; not checked",
        }
    ki67 = thresholds.get("Ki67")
    share = (ki67.compensation or {}).get("her2_into_ki67", 0.0) if ki67 else 0.0
    ratio = her2_over_autofluorescence(
        cells[["her2_cytoplasm_mean", "her2_low_ki67_mean"]].to_numpy(np.float64),
        cells[["ki67_cytoplasm_mean", "ki67_low_mean"]].to_numpy(np.float64),
        her2_per_ki67=af_h / af_k,
        her2_into_ki67=share or 0.0,
    )
    explained = ratio <= minimum  # NaN (cytoplasm not measured) is kept
    cells = cells.assign(her2_af_ratio=ratio)[~explained].reset_index(drop=True)
    done = {
        "her2_per_ki67": round(af_h / af_k, 4),
        "min_ratio": minimum,
        "removed": int(explained.sum()),
    }
    return cells, done


def _negative_population_check(config, cells, negative_upper=None):
    """`cells` without a HER2-negative population of their own
    (`histo.markers.negative_population`; `negative_upper`: the HER2 threshold calibrated on
    the slide's ordinary cells, or None), and what was done."""

    def column(name):
        return cells[name].to_numpy(np.float64) if name in cells else None

    return _drop_population(
        cells,
        "her2_ratio",
        config.her2_min_population_gap,
        "HER2 of unstained tissue",
        af_ratio=column("her2_af_ratio"),
        her2_mean=column("her2_mean"),
        negative_upper=negative_upper,
    )


def _autofluorescent_population_check(config, cells):
    """`cells` without a population of their own just above what their autofluorescence
    gives (`histo.markers.negative_population` over ``her2_af_ratio``: at most
    `NEGATIVE_POPULATION_MAX_RATIO` times it, ``config.her2_min_af_population_gap`` below all
    others), and what was done."""
    return _drop_population(
        cells, "her2_af_ratio", config.her2_min_af_population_gap, "autofluorescent tissue"
    )


def _drop_population(cells, column, min_gap, what, **kw):
    """`cells` without the population `histo.markers.negative_population` finds below a gap
    in `column` (none where the column is absent), and its info dict."""
    from .markers import negative_population

    if len(cells) == 0 or column not in cells:
        return cells, {"min_gap": float(min_gap), "removed": 0}
    negative, info = negative_population(cells[column].to_numpy(np.float64), min_gap=min_gap, **kw)
    if negative.any():
        log.info(
            "%d detections form a population of their own, %.1f-fold below the others in %s "
            "(median %.2f): %s, not counted",
            info["removed"],
            info["gap"],
            column,
            info["median_ratio"],
            what,
        )
        cells = cells[~negative].reset_index(drop=True)
    return cells, info


#: Per-cell measurements of the detector that serve only to measure bleed-through
#: (and to tell HER2 from autofluorescence).
_BLEED_COLUMNS = (
    "her2_nucleus_mean",
    "ki67_cytoplasm_mean",
    "her2_cytoplasm_mean",
    "her2_low_ki67_mean",
    "ki67_low_mean",
)


def _compensate_ki67(windows, offset, stain, roles, common, values, cells):
    """The windows' nuclear Ki67 and the cells' ``ki67_mean`` without HER2's bleed-through
    (`histo.markers.compensate_ki67`), the cells' measured value kept as ``ki67_raw_mean``,
    and what was taken out (a dict for `MarkerThreshold.compensation`).

    HER2 into Ki67 is measured where Ki67 is absent and HER2 bright: the cytoplasm of the
    candidate cells with a nucleus (the Ki67 of that nucleus, which blurs into its cytoplasm,
    as a second term); DAPI into HER2 from the floor of HER2 over the slide's nuclei (those
    without HER2 of their own), at every level of DAPI (`histo.markers.floor_spillover`).
    """
    from .markers import compensate_ki67, floor_spillover, nuclear_means, spillover

    cells = cells.copy()
    cells["ki67_raw_mean"] = cells.get("ki67_mean", np.nan)
    if not set(_BLEED_COLUMNS[:3]) <= set(cells.columns):
        return values, cells, {"note": "not measured by this detector"}
    d, h = roles["DAPI"], roles["HER2"]
    her2_nuc = nuclear_means(windows, offset, d, h, **common)
    dapi_nuc = nuclear_means(windows, offset, d, d, **common)
    has_nucleus = np.isfinite(cells["her2_nucleus_mean"].to_numpy(np.float64))
    own = cells[has_nucleus]
    into_ki67 = spillover(
        own["ki67_cytoplasm_mean"], own["her2_cytoplasm_mean"], blur=own["ki67_mean"]
    )
    into_her2 = floor_spillover(her2_nuc, dapi_nuc)
    her2_into_ki67 = None if into_ki67 is None else into_ki67[0]
    dapi_into_her2 = 0.0 if into_her2 is None else into_her2[0]
    out = {
        "her2_into_ki67": round(her2_into_ki67 or 0.0, 4),
        "her2_into_ki67_se": None if into_ki67 is None else round(into_ki67[1], 4),
        "dapi_into_her2": round(dapi_into_her2, 4),
        "n_cells": int(len(own)),
        "n_nuclei": int(len(her2_nuc)),
    }
    if her2_into_ki67 is None:
        out["note"] = "too few cells to measure HER2 in Ki67; nothing taken out"
        return values, cells, out
    if her2_into_ki67 == 0.0:
        return values, cells, out
    kw = {"her2_into_ki67": her2_into_ki67, "dapi_into_her2": dapi_into_her2}
    values = compensate_ki67(values, her2_nuc, dapi_nuc, **kw)
    # The nucleus's brightest tenth ("p90") loses what its mean loses: bleed-through is as
    # even over the nucleus as the HER2 and DAPI it comes from.
    for column in [f"ki67_{m}" for m in KI67_QUANTILES if f"ki67_{m}" in cells]:
        corrected = compensate_ki67(
            cells[column], cells["her2_nucleus_mean"], cells["dapi_mean"], **kw
        )
        cells[column] = np.where(has_nucleus, corrected, cells[column])
    return values, cells, out


def iter_analyze_slide(
    path: str | os.PathLike,
    config: AnalysisConfig | None = None,
    *,
    channels: Sequence[str] | str | None = None,
    pixel_size_um: float | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int | None = None,
    checksum: str | None = None,
    region_px: tuple[int, int, int, int] | None = None,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, AnalysisResult]:
    """Analyse a whole slide chunk by chunk; yields progress, returns an `AnalysisResult`.

    Parameters
    ----------
    path : path-like
        The slide (OME-TIFF, TIFF, SVS, NDPI, OME-Zarr).
    config : AnalysisConfig, optional
    channels : optional
        Channel mapping passed to `histo.io.open_slide`.
    pixel_size_um : float, optional
        Overrides the slide's pixel size.
    workers : int, optional
        Run on a `distributed.LocalCluster` of this many single-threaded worker processes.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:8786``) to run on.
    threads : int, optional
        Threads of the default local threaded scheduler (default: all cores).
    checksum : str, optional
        The input's SHA-256 if the caller has it already (else it is computed).
    region_px : (y0, y1, x0, x1), optional
        Analyse only this level-0 box (end-exclusive), e.g. the view in napari: only cells
        whose centre lies inside are reported, with the same values as in a whole-slide run;
        the tissue area (and densities) are those of the region.
    cancel : threading.Event, optional
        Set it (from any thread) to stop: chunks not yet started are not started and
        `histo.errors.Cancelled` is raised. Closing the generator does the same.

    Yields
    ------
    (done, total, message)

    Returns
    -------
    AnalysisResult
    """
    from .io import iter_overview, open_slide

    config = config or AnalysisConfig()
    t0 = time.perf_counter()
    slide = open_slide(path, channels=channels, pixel_size_um=pixel_size_um)
    yield from iter_overview(slide)  # a giant slide without a pyramid: its coarse view
    mask, mask_px, stain = measure_background(slide, config)
    cancel = cancel if cancel is not None else threading.Event()
    _raise_if_cancelled(cancel)
    t_tissue = time.perf_counter() - t0
    shape = slide.shape_px
    if config.method == "unet":
        from models import model_config

        halo_um = float(model_config(config.model_path).get("halo_um", 0.0))
        config = config.replace(
            halo_px=max(config.halo_px, math.ceil(halo_um / slide.pixel_size_um))
        )
    chunks = plan_chunks(
        shape,
        config.chunk_size_px,
        config.halo_px,
        tissue=mask,
        tissue_downsample=mask_px / slide.pixel_size_um,
        region_px=region_px,
    )
    all_chunks = plan_chunks(shape, config.chunk_size_px, config.halo_px, region_px=region_px)
    n_all = len(all_chunks)
    mask_whole = mask
    if region_px is not None:
        mask = _mask_in_region(mask, mask_px / slide.pixel_size_um, region_px)
    yield (0, len(chunks), "chunks")
    read_level = _read_level(slide, config, chunks, stain)
    args = (str(slide.path), _channels_arg(channels), pixel_size_um, read_level)
    if config.method == "unet" and config.torch_threads == 0:
        # Parallel tasks share the cores: one torch thread per worker process, and the cores
        # divided among the threads of the local scheduler.
        per_task = (
            1
            if (scheduler or workers)
            else max(1, (os.cpu_count() or 1) // (threads or os.cpu_count() or 1))
        )
        config = config.replace(torch_threads=per_task)
    if scheduler or workers:
        runner = _run_distributed(
            args, chunks, config, stain, workers=workers, address=scheduler, cancel=cancel
        )
        where = scheduler or f"LocalCluster({workers} processes)"
    else:
        runner = _run_threaded(args, chunks, config, stain, threads, cancel)
        where = f"threads({threads or os.cpu_count()})"
    parts = yield from runner
    _raise_if_cancelled(cancel)
    t_chunks = time.perf_counter() - t0 - t_tissue
    fell_back = Counter(p.attrs["fallback"] for p in parts if p.attrs.get("fallback"))
    found = [p for p in parts if len(p)]
    # Every chunk returns a table with the detector's columns, empty ones included; a region
    # without tissue has no chunk: the columns then come from one of its chunks, none of its rows.
    if found:
        cells = pd.concat(found, ignore_index=True)
    elif parts:
        cells = parts[0]
    else:
        cells = _chunk_task(*args, all_chunks[0], config, stain).iloc[0:0]
    markers, cells = marker_thresholds(slide, mask_whole, mask_px, stain, config, cells)
    cells = apply_thresholds(cells, markers)
    cells, lesions = group_lesions(cells, config)
    extra = [c for c in cells.columns if c not in CELL_OUTPUT_COLUMNS]
    cells = cells[CELL_OUTPUT_COLUMNS + extra]
    tissue_mm2 = float(mask.sum() * mask_px**2 * 1e-6)
    plan = {"analysed": len(chunks), "total": n_all, "read_level": read_level}
    summary = _summary(slide, config, stain, cells, lesions, tissue_mm2, plan, where, checksum)
    summary["markers"] = {m: t.to_dict() for m, t in markers.items()}
    # Anything that ran otherwise than asked (resources, not results): say so.
    summary["fallbacks"] = [
        f"{what} ({n} of {len(parts)} chunks)" for what, n in sorted(fell_back.items())
    ]
    if region_px is not None:
        summary["input"]["region_px"] = [int(v) for v in region_px]
    summary["timings_s"] = {
        "tissue_and_stain": round(t_tissue, 3),
        "chunks": round(t_chunks, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    return AnalysisResult(
        slide_path=Path(path),
        cells=cells,
        lesions=lesions,
        summary=summary,
        tissue_mask=mask,
        tissue_pixel_size_um=mask_px,
    )


def _mask_in_region(mask: np.ndarray, downsample: float, region_px) -> np.ndarray:
    """The tissue mask with everything outside a level-0 box cleared."""
    y0, y1, x0, x1 = (int(round(v / downsample)) for v in region_px)
    out = np.zeros_like(mask)
    out[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = mask[
        max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)
    ]
    return out


def analyze_slide(
    path: str | os.PathLike,
    config: AnalysisConfig | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    **kwargs,
) -> AnalysisResult:
    """Analyse a whole slide; `progress(done, total, message)` is called as chunks finish.

    Takes the same arguments as `iter_analyze_slide`.
    """
    from ._threads import run_reporting

    return run_reporting(iter_analyze_slide(path, config, **kwargs), progress)


def _channels_arg(channels):
    if channels is None or isinstance(channels, str):
        return channels
    return tuple(channels)


def _raise_if_cancelled(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled("analysis cancelled; nothing was written")


def _run_threaded(args, chunks, config, stain, threads, cancel: threading.Event):
    """Dask's threaded scheduler, with progress from a task callback; once `cancel` is set,
    no further chunk starts (the running ones finish) and `Cancelled` is raised."""
    import dask
    from dask.callbacks import Callback
    from dask.threaded import get as threaded_get

    tasks = [dask.delayed(_chunk_task, pure=False)(*args, c, config, stain) for c in chunks]
    if not tasks:
        return []
    chunk_keys = {t.key for t in tasks}

    def compute(emit, cancel):
        done = 0

        class _Tick(Callback):
            # Called by the scheduler's loop (one thread) before a task starts and as each
            # task finishes.
            def _pretask(self, key, dsk, state):
                if key in chunk_keys:
                    _raise_if_cancelled(cancel)

            def _posttask(self, key, result, dsk, state, worker_id):
                nonlocal done
                if key in chunk_keys:
                    done += 1
                    emit((done, len(tasks), "chunks"))

        with _Tick():
            # The threaded scheduler itself: naming it ("threads") would import distributed
            # (a fifth of a second) to look for a client first.
            return dask.compute(*tasks, scheduler=threaded_get, num_workers=threads)

    parts = yield from iter_in_thread(compute, thread_name="lungmets-chunks", cancel=cancel)
    return list(parts)


def _run_distributed(args, chunks, config, stain, *, cancel, workers=None, address=None):
    """A dask.distributed cluster: an existing one, or a LocalCluster of processes. Chunks not
    yet finished are cancelled on the cluster when `cancel` is set or the generator closed."""
    from distributed import Client, LocalCluster, wait

    cluster = None
    if address:
        client = Client(address)
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    pending: set = set()
    try:
        futures = [client.submit(_chunk_task, *args, c, config, stain, pure=False) for c in chunks]
        index = {f.key: i for i, f in enumerate(futures)}
        parts: list = [None] * len(futures)
        pending = set(futures)
        done = 0
        while pending:
            _raise_if_cancelled(cancel)
            try:
                finished, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            for fut in finished:
                parts[index[fut.key]] = fut.result()
                done += 1
                yield (done, len(futures), "chunks")
        return parts
    finally:
        if pending:
            client.cancel(list(pending))
        client.close()
        if cluster is not None:
            cluster.close()


def summary_counts(cells, lesions, has_ki67: bool, tissue_mm2: float) -> tuple[dict, dict]:
    """The ``counts`` and ``densities_per_mm2`` of summary.json from the two tables."""
    cls = lesions["class"].value_counts() if len(lesions) else pd.Series(dtype=int)
    counts = {
        "her2_cells": int(len(cells)),
        "lesions": int(len(lesions)),
        "single": int(cls.get("single", 0)),
        "cluster": int(cls.get("cluster", 0)),
        "focus": int(cls.get("focus", 0)),
        "dormant": int(lesions["dormant"].astype(bool).sum())
        if has_ki67 and len(lesions)
        else (0 if has_ki67 else None),
        "ki67_pos_cells": int(cells["ki67_pos"].astype(bool).sum()) if has_ki67 else None,
    }
    dens = {
        k: (round(v / tissue_mm2, 4) if v is not None and tissue_mm2 > 0 else None)
        for k, v in counts.items()
    }
    return counts, dens


def _summary(slide, config, stain, cells, lesions, tissue_mm2, plan, where, checksum=None) -> dict:
    """summary.json's content; `plan`: the chunks ``analysed``, their ``total`` and the
    pyramid level read (``read_level``)."""
    import numpy
    import scipy
    import skimage
    import tifffile

    has_ki67 = "Ki67" in slide.roles
    counts, dens = summary_counts(cells, lesions, has_ki67, tissue_mm2)
    p = Path(slide.path)
    return {
        "slide": p.name,
        "path": str(p.resolve()),
        "software": {
            "lungmets": __version__,
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "scipy": scipy.__version__,
            "scikit-image": skimage.__version__,
            "tifffile": tifffile.__version__,
        },
        "method": config.method,
        "model": _model_info(config),
        "parameters": config.to_dict(),
        "input": {
            "format": slide.format,
            "size_bytes": _size_bytes(p),
            "sha256": checksum or file_checksum(p),
            "shape_px": [len(slide.channel_names), *slide.shape_px],
            "pixel_size_um": slide.pixel_size_um,
            "channels": list(slide.channel_names),
            "roles": dict(slide.roles),
        },
        "tissue_area_mm2": round(tissue_mm2, 6),
        "counts": counts,
        "densities_per_mm2": dens,
        "stain_levels": stain.to_dict(slide.channel_names),
        "chunks": {
            "analysed": plan["analysed"],
            "total": plan["total"],
            "size_px": config.chunk_size_px,
            "halo_px": config.halo_px,
            # The pyramid level the chunks were read from (0: full resolution).
            "read_level": int(plan.get("read_level", 0)),
            "read_um_per_px": round(slide.level_pixel_size_um(plan.get("read_level", 0)), 6),
        },
        "scheduler": where,
        "coordinates": "x_um = x_px * pixel_size_um, level-0 pixel centres at integers",
    }


def _model_info(config) -> dict | None:
    if config.method != "unet":
        return None
    from models import DEFAULT_MODEL, model_config

    cfg = model_config(config.model_path)
    return {
        "name": cfg.get("name"),
        "path": str(config.model_path or DEFAULT_MODEL),
        "sha256": cfg.get("sha256"),
        "input_um_per_px": cfg.get("input_um_per_px"),
        "centre_threshold": cfg.get("centre_threshold"),
        "device": config.device,
        "screen": config.screen,
    }


def _size_bytes(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
