"""The classical detector: HER2+ cells from DAPI nuclei and the HER2 signal around them.

One tile of pixels in, a table of HER2+ cells out. The steps:

1. nuclei: DAPI smoothed and thresholded at a fraction of the slide's typical nuclear
   intensity; touching nuclei split by a watershed on the distance transform;
2. cells: each nucleus grown by a ring of `cell_ring_um` (never into a neighbour);
3. HER2+: the ring's mean HER2 is well above the slide's tissue autofluorescence *and* most of
   the ring is bright (a red blood cell beside a nucleus lights only part of it);
4. autofluorescent objects (macrophages, debris), bright in channels where a cell's cytoplasm
   should be dark (Ki67, or DAPI without Ki67), are rejected;
5. Ki67 status per nucleus from its mean Ki67 over the Ki67 autofluorescence.

Every threshold is relative to slide-wide levels (`histo.tissue.StainLevels`) and every
operation is local, so a cell gets the same answer in any chunk that contains it with its
surroundings (the chunk halo).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .config import KI67_QUANTILES, AnalysisConfig
from .tissue import StainLevels

CELL_COLUMNS = [
    "x_px",
    "y_px",
    "her2_mean",
    "her2_ratio",
    "her2_coverage",
    "ki67_mean",
    "ki67_pos",
    "dapi_mean",
    "nucleus_area_um2",
    "cell_area_um2",
]


def _label_means(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    sums = np.bincount(labels.ravel(), weights=values.ravel(), minlength=n + 1)
    return sums / np.maximum(counts, 1)


def _label_quantile(values: np.ndarray, labels: np.ndarray, n: int, q: float) -> np.ndarray:
    """Per label 1..n, the `q` quantile (lower) of `values` over its pixels; index 0 (and
    labels without pixels) hold -inf. Returned with a leading entry for label 0."""
    lab = labels.ravel()
    sel = lab > 0
    lv, vv = lab[sel], values.ravel()[sel]
    order = np.lexsort((vv, lv))
    lv, vv = lv[order], vv[order]
    counts = np.bincount(lv, minlength=n + 1)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    out = np.full(n + 1, -np.inf, np.float32)
    has = counts > 0
    has[0] = False
    out[has] = vv[starts[has] + ((counts[has] - 1) * q).astype(np.int64)]
    return out


def segment_nuclei(
    dapi: np.ndarray, *, threshold: float, pixel_size_um: float, config: AnalysisConfig
) -> np.ndarray:
    """Instance labels of nuclei in a DAPI image (offset already subtracted).

    Parameters
    ----------
    dapi : ndarray, shape (Y, X)
        DAPI above the camera offset.
    threshold : float
        Intensity above which a pixel is nuclear.
    pixel_size_um : float
    config : AnalysisConfig

    Returns
    -------
    ndarray of int32, shape (Y, X)
    """
    from skimage.segmentation import watershed

    sm = ndi.gaussian_filter(dapi, config.nucleus_sigma_um / pixel_size_um)
    mask = sm > threshold
    mask = ndi.binary_opening(mask, iterations=1)
    lab, n = ndi.label(mask)
    if n == 0:
        return lab.astype(np.int32)
    min_px = config.nucleus_min_area_um2 / pixel_size_um**2
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    mask = keep[lab]
    dist = ndi.distance_transform_edt(mask)
    dist = ndi.gaussian_filter(dist, 2.0)
    md = max(1, int(round(config.nucleus_min_distance_um / pixel_size_um)))
    # One marker per local maximum of the distance map (a plateau counts once): the centres of
    # touching nuclei, at least `md` pixels apart.
    peaks = (dist >= ndi.maximum_filter(dist, size=2 * md + 1) - 1e-6) & mask & (dist >= 1.0)
    markers, _ = ndi.label(peaks)
    return watershed(-dist, markers, mask=mask).astype(np.int32)


def detect_cells(
    image: np.ndarray,
    *,
    roles: dict[str, int],
    stain: StainLevels,
    pixel_size_um: float,
    config: AnalysisConfig | None = None,
    origin_px: tuple[int, int] = (0, 0),
    extra_channels: tuple[tuple[str, int], ...] = (),
    all_nuclei: bool = False,
) -> pd.DataFrame:
    """Find HER2+ cells in one tile.

    Parameters
    ----------
    image : ndarray, shape (C, Y, X)
        Level-0 pixels, raw counts.
    roles : dict
        Channel index of ``"DAPI"`` and ``"HER2"``, and of ``"Ki67"`` when imaged.
    stain : StainLevels
        Slide-wide offset, autofluorescence and nuclear levels per channel.
    pixel_size_um : float
    config : AnalysisConfig, optional
    origin_px : (int, int)
        Level-0 (row, column) of the tile's top-left pixel; output coordinates include it.
    extra_channels : tuple of (name, index)
        Further channels whose mean intensity per cell is reported as ``<name>_mean``.
    all_nuclei : bool
        Report every nucleus with a boolean ``her2_pos`` column instead of HER2+ cells only
        (for inspecting and tuning the detector).

    Returns
    -------
    pandas.DataFrame
        One row per HER2+ cell: x_px, y_px (level-0 nucleus centroid), her2_mean (ring mean
        above offset), her2_ratio (over autofluorescence), her2_coverage, ki67_mean, ki67_pos
        (NA without Ki67), dapi_mean, nucleus_area_um2, cell_area_um2, and extra channel means.
    """
    from skimage.segmentation import expand_labels

    config = config or AnalysisConfig()
    off = np.asarray(stain.offset, np.float32)
    af = np.asarray(stain.autofluorescence, np.float32)
    d_i, h_i = roles["DAPI"], roles["HER2"]
    k_i = roles.get("Ki67")
    dapi = image[d_i].astype(np.float32) - off[d_i]
    her2 = image[h_i].astype(np.float32) - off[h_i]
    nuclei = segment_nuclei(
        dapi,
        threshold=config.nucleus_threshold * stain.nuclear[d_i],
        pixel_size_um=pixel_size_um,
        config=config,
    )
    n = int(nuclei.max())
    extra_cols = [f"{name}_mean" for name, _ in extra_channels]
    if n == 0:
        return _empty(k_i is not None, extra_cols)
    ring_px = config.cell_ring_um / pixel_size_um
    cells = expand_labels(nuclei, distance=ring_px)
    ring = np.where(nuclei > 0, 0, cells)

    her2_ring = _label_means(her2, ring, n)[1:]
    bright = (her2 > config.her2_pixel_ratio * af[h_i]).astype(np.float32)
    coverage = _label_means(bright, ring, n)[1:]
    ratio = her2_ring / af[h_i]
    her2_pos = (ratio >= config.her2_min_ratio) & (coverage >= config.her2_min_coverage)
    # Autofluorescent objects are bright where a cancer cell's cytoplasm is dark.
    probe = k_i if k_i is not None else d_i
    probe_img = image[probe].astype(np.float32) - off[probe]
    probe_ring = _label_means(probe_img, ring, n)[1:]
    probe_nucleus = _label_means(probe_img, nuclei, n)[1:]
    probe_ref = af[probe] if k_i is not None else 0.25 * stain.nuclear[d_i]
    # Bright around the nucleus, and about as bright there as inside it: autofluorescence. (A
    # Ki67+ nucleus also lights its ring through blur, but far less than itself.)
    autofluorescent = (probe_ring > config.autofluorescence_max_ratio * probe_ref) & (
        probe_ring > 0.5 * probe_nucleus
    )
    her2_pos &= ~autofluorescent
    if not her2_pos.any() and not all_nuclei:
        return _empty(k_i is not None, extra_cols)

    idx = (np.arange(n) if all_nuclei else np.flatnonzero(her2_pos)) + 1
    counts_nuc = np.bincount(nuclei.ravel(), minlength=n + 1)
    counts_cell = np.bincount(cells.ravel(), minlength=n + 1)
    com = ndi.center_of_mass(np.ones_like(nuclei, np.float32), nuclei, idx)
    com = np.asarray(com, np.float64).reshape(-1, 2)
    px2 = pixel_size_um**2
    out = {
        "x_px": com[:, 1] + origin_px[1],
        "y_px": com[:, 0] + origin_px[0],
        "her2_mean": her2_ring[idx - 1],
        "her2_ratio": ratio[idx - 1],
        "her2_coverage": coverage[idx - 1],
    }
    if k_i is not None:
        ki67 = image[k_i].astype(np.float32) - off[k_i]
        ki67_nuc = _label_means(ki67, nuclei, n)[idx]
        out["ki67_mean"] = ki67_nuc
        q = KI67_QUANTILES[config.ki67_measure]
        if q is not None:
            out[f"ki67_{config.ki67_measure}"] = _label_quantile(ki67, nuclei, n, q)[idx]
        out["ki67_pos"] = pd.array(ki67_nuc >= config.ki67_min_ratio * af[k_i], dtype="boolean")
    else:
        out["ki67_mean"] = np.full(idx.size, np.nan)
        out["ki67_pos"] = pd.array([pd.NA] * idx.size, dtype="boolean")
    out["dapi_mean"] = _label_means(dapi, nuclei, n)[idx]
    out["nucleus_area_um2"] = counts_nuc[idx] * px2
    out["cell_area_um2"] = counts_cell[idx] * px2
    for (_, ci), col in zip(extra_channels, extra_cols, strict=True):
        ch = image[ci].astype(np.float32) - off[ci]
        out[col] = _label_means(ch, cells, n)[idx]
    if all_nuclei:
        out["her2_pos"] = her2_pos
        out["autofluorescent"] = autofluorescent
    return pd.DataFrame(out)


def _empty(has_ki67: bool, extra_cols: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype=float) for c in CELL_COLUMNS + extra_cols})
    df["ki67_pos"] = df["ki67_pos"].astype("boolean")
    return df
