"""Where the tissue is, how large it is, and how bright its background is.

Tissue is found on a low-resolution level (about 8 um/px): glass is never analysed. The same
pass estimates, per channel, the camera offset (the level of glass) and, on a few windows of a
finer level, the tissue autofluorescence and the typical nuclear DAPI intensity. These
slide-wide levels, not per-chunk statistics, set the detector's thresholds, so that a cell is
judged the same whichever chunk it falls in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


@dataclass(frozen=True)
class StainLevels:
    """Slide-wide intensity levels, per channel of the slide (counts).

    Attributes
    ----------
    offset : tuple of float
        Camera offset: the level of glass.
    autofluorescence : tuple of float
        Typical tissue autofluorescence above the offset (alveolar walls, no nuclei).
    nuclear : tuple of float
        Typical intensity above the offset inside nuclei (used for DAPI).
    """

    offset: tuple[float, ...]
    autofluorescence: tuple[float, ...]
    nuclear: tuple[float, ...]

    def to_dict(self, names) -> dict:
        return {
            n: {"offset": round(o, 2), "autofluorescence": round(a, 2), "nuclear": round(u, 2)}
            for n, o, a, u in zip(
                names, self.offset, self.autofluorescence, self.nuclear, strict=True
            )
        }


def tissue_mask(
    image: np.ndarray,
    pixel_size_um: float,
    *,
    min_object_um2: float = 5000.0,
    max_hole_um2: float = 200_000.0,
    min_snr: float = 8.0,
    stored: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue mask of a low-resolution (C, Y, X) image.

    Glass is the darkest mode of each channel (see `glass_level`); tissue is whatever is
    clearly brighter than glass noise, closed over the airspaces of the lung, with small specks
    (debris) removed and holes smaller than `max_hole_um2` (alveoli, vessel lumens) filled. A
    slide of empty glass gives an empty mask.

    Parameters
    ----------
    image : ndarray, shape (C, Y, X)
        A low-resolution level (block means, so glass noise is low).
    pixel_size_um : float
        Pixel size of `image`.
    min_object_um2 : float
        Smaller bright objects are debris, not tissue.
    max_hole_um2 : float
        Holes smaller than this are airspaces inside tissue.
    min_snr : float
        Tissue is brighter than glass by this many standard deviations of glass noise
        (averaged over channels, after light smoothing).
    stored : ndarray of bool, shape (Y, X), optional
        Pixels the file holds data for (`histo.io.Slide.stored_mask`); the others are glass
        the scanner did not store: they are neither measured nor tissue.

    Returns
    -------
    mask : ndarray of bool, shape (Y, X)
    offset : ndarray of float, shape (C,)
        The glass level of each channel (camera offset).
    """
    img = image.astype(np.float32)
    c = img.shape[0]
    offset = np.zeros(c)
    noise = np.zeros(c)
    # Integer levels are block means rounded to integers: noise is never below rounding's.
    # Float data have no such floor (their whole range may be 0..1).
    quantum = 1.0 if np.issubdtype(image.dtype, np.integer) else 0.0
    for i in range(c):
        values = img[i] if stored is None or not stored.any() else img[i][stored]
        offset[i], noise[i] = glass_level(values, quantum=quantum)
    # Signal-to-noise over glass, averaged over channels: glass is ~0, tissue (even the faint
    # autofluorescence of airspaces, at this resolution) is far above it.
    snr = ((img - offset[:, None, None]) / noise[:, None, None]).mean(axis=0)
    snr = ndi.gaussian_filter(snr, 1.0)
    mask = snr > min_snr
    if stored is not None:
        mask &= stored
    close_px = max(1, int(round(12.0 / pixel_size_um)))
    mask = ndi.binary_closing(mask, iterations=close_px, border_value=0)
    px_area = pixel_size_um**2
    lab, n = ndi.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes * px_area >= min_object_um2
        keep[0] = False
        mask = keep[lab]
    holes = ndi.binary_fill_holes(mask) & ~mask
    lab, n = ndi.label(holes)
    if n:
        sizes = np.bincount(lab.ravel())
        small = sizes * px_area < max_hole_um2
        small[0] = False
        mask |= small[lab]
    if stored is not None:
        mask &= stored
    return mask, offset


def glass_level(values: np.ndarray, *, quantum: float = 1.0) -> tuple[float, float]:
    """Level and noise (standard deviation) of glass in one channel.

    The glass level is the mode of the darker half of the values; its noise is estimated from
    the values below that mode only, which tissue does not reach.

    Parameters
    ----------
    values : ndarray
    quantum : float
        Step of the values (1 for integer counts, 0 for floats): noise is at least half of it.

    Returns
    -------
    level, noise : float
    """
    v = np.asarray(values, np.float64).ravel()
    lo = v[v <= np.median(v)]
    hist, edges = np.histogram(lo, bins=256)
    k = int(np.argmax(hist))
    level = 0.5 * (edges[k] + edges[k + 1])
    left = level - lo[lo <= level]
    noise = 1.4826 * float(np.median(left)) if left.size > 10 else float(lo.std())
    if quantum <= 0:  # floats: a floor relative to the data, not to a count
        return float(level), max(noise, 1e-6 * float(np.ptp(v)), 1e-12)
    return float(level), max(noise, 0.5 * quantum)


def stain_levels(
    windows: list[np.ndarray],
    offset: np.ndarray,
    dapi: int,
    *,
    unit: np.ndarray | None = None,
    negative_in_nuclei: tuple[int, ...] = (),
    tissue: list[np.ndarray] | None = None,
    rim_px: int = 2,
    per_window: bool = True,
) -> StainLevels:
    """Autofluorescence and nuclear levels from windows of tissue at about 1 um/px.

    The autofluorescence of each channel is its median over the alveolar walls, tissue (glass
    left out) that is neither nucleus nor airspace: the brighter class of the channel's own
    non-nuclear tissue, or of DAPI's (the same pixels in every channel), whichever gives more.
    Nuclei are where DAPI stands out, both over the tissue and over what the
    autofluorescence's own spectrum predicts (`_nuclei`), with their rims. Where the airspace
    holds a measurable haze, the walls are found window by window and their typical level
    kept, as autofluorescence can vary several-fold over a section (`_median`). For a marker whose
    positive cells cover much of the section (solid tumour), where that median is the marker
    itself, it comes instead from tissue that stays negative: the autofluorescence's own ratio
    to the DAPI channel (the lowest population of that ratio; autofluorescence is broad-band, a
    marker is not) times the DAPI channel's level.

    Parameters
    ----------
    windows : list of ndarray, each (C, Y, X)
        Tissue regions (a few hundred um each) from a level of about 1 um/px.
    offset : ndarray, shape (C,)
        Glass level per channel, from `tissue_mask`.
    dapi : int
        Index of the DAPI channel.
    unit : ndarray, shape (C,), optional
        For float data: the intensity that plays the role of one camera count (about half
        the glass noise), below which differences are noise. Integer data use 1.
    negative_in_nuclei : tuple of int
        Channels whose marker the tissue's ordinary nuclei do not carry (HER2): their
        reference is at most `HOST_NUCLEI_MULTIPLE` times the nuclei's own level (the lowest
        mode over bright nuclear pixels), which autofluorescence reaches too.
    tissue : list of ndarray of bool, each (Y, X), optional
        Each window's tissue mask: pixels outside it are glass and left out. Where a window
        reaches over the edge of the section, glass would otherwise be the dark class of the
        split below and the faint haze of the airspaces the bright one (a reference 8x too
        low on a bright, uneven slide).
    rim_px : int
        Pixels around each nucleus left out with it (DAPI blurred out of it): in tissue
        without airspace (stroma) the rims were the brighter class of the split.
    per_window : bool
        Split each window on its own where it shows haze and walls (see `_median`); False
        pools every window.

    Returns
    -------
    StainLevels
    """
    c = len(offset)
    if tissue is None or sum(int(m.sum()) for m in tissue) < 1000:
        tissue = [np.ones(w.shape[1:], bool) for w in windows]
    pix = np.concatenate([w[:, m] for w, m in zip(windows, tissue, strict=True)], axis=1)
    pix = pix.astype(np.float32) - offset[:, None].astype(np.float32)
    d = pix[dapi]
    nuclear_dapi = float(np.percentile(d, 99.0))
    # Integer counts cannot resolve less than one count; floats get the equivalent of a count.
    integer = all(np.issubdtype(w.dtype, np.integer) for w in windows)
    if integer:
        floors = np.ones(c)
    elif unit is not None:
        floors = np.maximum(np.asarray(unit, float), 1e-12)
    else:
        floors = np.full(c, max(1e-6 * float(np.ptp(pix)), 1e-12))
    # Tissue that is neither nucleus nor airspace, nor the rim of a nucleus: the alveolar walls'
    # autofluorescence.
    not_nuclear = np.concatenate(
        [
            ~_grown(_nuclei(w, offset, dapi, nuclear_dapi, negative_in_nuclei, floors), rim_px)[m]
            for w, m in zip(windows, tissue, strict=True)
        ]
    )
    # Lung tissue is dark airspace and bright alveolar walls: split the two (Otsu on log
    # intensity, so the split does not depend on exposure) and take the walls' median.
    logs = [_log_units(pix[i][not_nuclear], floors[i]) for i in range(c)]
    which = np.concatenate([np.full(int(m.sum()), k) for k, m in enumerate(tissue)])[not_nuclear]
    lit = [_lit(lv) for lv in logs]
    lit_w = [_lit(lv, which) for lv in logs] if per_window else lit
    # Two estimates of the walls, each of which can only err low: the channel's own split
    # (it can fall between airspace clipped at the offset and a faint haze above it) and the
    # walls found in DAPI, the same pixels in every channel (where DAPI's walls are lost in
    # the noise, its split finds the dim rims of nuclei instead, where a marker is at the
    # noise). The larger is the walls'; a level too high (positive cells) is the spectral
    # guard's below.
    walls, walls_w = lit[dapi], lit_w[dapi]
    w_ = which if per_window else None
    af = [
        max(
            float(np.expm1(_median(lv, m, m_w, w_)) * f),
            float(np.expm1(_median(lv, walls, walls_w, w_)) * f) if walls.sum() >= 200 else 0.0,
            f,
        )
        for lv, m, m_w, f in zip(logs, lit, lit_w, floors, strict=True)
    ]
    # Where autofluorescence is near zero, the walls are lost in the noise and every estimate
    # above finds the marker's own positive cells (or DAPI's the rims of nuclei): a HER2
    # reference 40-160x the drawn autofluorescence. The ordinary nuclei stay HER2-negative
    # and hold the autofluorescence too (0.5-1.5x it wherever it was measured right): a
    # reference far above their level is the marker itself, and their level is the reference.
    # Made before the spectral guard below, which on such a slide reads its ratio off the rims
    # of dim nuclei and would leave a reference between the two (4x the drawn level).
    cores = d >= 0.5 * nuclear_dapi
    settled = set()
    if cores.sum() >= 200:
        for i in negative_in_nuclei:
            host = float(np.expm1(_mode(_log_units(pix[i][cores], floors[i]))) * floors[i])
            if af[i] > HOST_NUCLEI_MULTIPLE * max(host, floors[i]):
                af[i] = max(host, floors[i])
                settled.add(i)
    # Where a marker's positive cells cover much of the tissue (solid tumour), its median is the
    # marker itself. Autofluorescence is broad-band: its ratio to the DAPI channel's is the same
    # in walls, interstitium and airspace, and a positive cell only raises that ratio. The
    # lowest population of the ratio is therefore the autofluorescence's own, and times the
    # DAPI channel's level it gives the marker's reference where the median is far above it.
    # Pixels whose DAPI stands above the walls' own (more than RIM_DAPI times it) are the rims
    # of nuclei, DAPI blurred out of them: there DAPI, not the marker, sets the ratio, and
    # where nuclei are bright their rims make a population of the ratio below the
    # autofluorescence's own (a membrane-only HER2 slide: the reference fell 6x, every
    # ordinary nucleus looked HER2+). They are left out where enough pixels remain.
    # The ratio is read over the walls both channels call bright, then over DAPI's walls where
    # the marker stands clear of the noise (in stroma, which has no dark class, a marker's own
    # bright class can be its positive cells alone: the first reading is theirs).
    for i in range(c):
        if i == dapi or i in settled:
            continue
        for both in (
            lit[i] & lit[dapi],
            lit[dapi] & (pix[i][not_nuclear] >= MEASURED_FLOORS * floors[i]),
        ):
            if both.sum() < 200:
                continue
            v_i = np.maximum(pix[i][not_nuclear][both], floors[i])
            v_d = np.maximum(pix[dapi][not_nuclear][both], floors[dapi])
            walls_only = v_d <= RIM_DAPI * af[dapi]
            if walls_only.sum() >= 200:
                v_i, v_d = v_i[walls_only], v_d[walls_only]
            spectral = np.exp(_mode(np.log(v_i / v_d))) * af[dapi]
            if af[i] > SPECTRAL_GUARD * spectral:
                af[i] = max(float(spectral), floors[i])
    nuc = [float(np.percentile(pix[i], 99.0)) for i in range(c)]
    return StainLevels(
        offset=tuple(float(o) for o in offset), autofluorescence=tuple(af), nuclear=tuple(nuc)
    )


def _nuclei(window, offset, dapi, nuclear_dapi, negative_in_nuclei, floors) -> np.ndarray:
    """Nuclear pixels of one window (C, Y, X): DAPI above 0.15 of the nuclear level and, where
    a channel the nuclei do not carry is given (HER2), more than `NUCLEAR_DAPI_EXCESS` times
    the DAPI that the tissue's own autofluorescence spectrum predicts from that channel.

    Autofluorescence is broad-band: the ratio of the two channels over the window's faint
    tissue (airspace haze, walls, interstitium) is the autofluorescence's own, and bright
    walls keep it (at 5x autofluorescence their DAPI passes the nuclear level), where a
    nucleus's DAPI stands far above it.
    """
    d = window[dapi].astype(np.float32) - np.float32(offset[dapi])
    bright = d >= 0.15 * nuclear_dapi
    if not negative_in_nuclei:
        return bright
    h_i = negative_in_nuclei[0]
    h = window[h_i].astype(np.float32) - np.float32(offset[h_i])
    fd, fh = np.float32(floors[dapi]), np.float32(floors[h_i])
    faint = ~bright & (d >= fd) & (h >= fh)
    if faint.sum() < 200:
        return bright
    spectrum = _mode(np.log(h[faint] / d[faint]), lowest=False)
    ratio = np.log(np.maximum(h, fh) / np.maximum(d, fd))
    excess = ratio < spectrum - np.log(NUCLEAR_DAPI_EXCESS)
    return bright & excess


#: A nuclear pixel's DAPI is more than this many times what the autofluorescence spectrum
#: predicts (see `_nuclei`).
NUCLEAR_DAPI_EXCESS = 2.0


def _median(lv, m, m_w=None, which=None, min_px: int = 200) -> float:
    """Median of the log units ``lv[m]`` (the lit class of a pooled split); with `which` (each
    pixel's window) and `m_w` (the lit class of each window's own split), the median over
    windows of each window's lit median where at least `MIN_WINDOWS`
    windows show two measured populations: a dark class of at least `HAZE_FLOORS` floors and
    a lit class at least `WALLS_OVER_HAZE` times it (airspace haze and walls, which vary
    together over an uneven section). Elsewhere (dark airspace at the noise, stroma without
    airspace) the pooled median."""
    pooled = float(np.median(lv[m]))
    if which is None:
        return pooled
    per_window = []
    for k in range(int(which.max()) + 1):
        sel = which == k
        lit, dark = lv[sel & m_w], lv[sel & ~m_w]
        if lit.size < min_px or dark.size < min_px:
            continue
        lit_med, dark_med = float(np.median(lit)), float(np.median(dark))
        if dark_med >= np.log1p(HAZE_FLOORS) and lit_med >= dark_med + np.log(WALLS_OVER_HAZE):
            per_window.append(lit_med)
    return float(np.median(per_window)) if len(per_window) >= MIN_WINDOWS else pooled


#: Window by window estimates need a haze of at least this many floors (counts), walls this
#: many times brighter, and this many windows (see `_median`).
HAZE_FLOORS = 2.0
WALLS_OVER_HAZE = 4.0
MIN_WINDOWS = 3


def _grown(mask: np.ndarray, px: int) -> np.ndarray:
    """`mask` grown by `px` pixels (as it is for 0)."""
    return ndi.binary_dilation(mask, iterations=px) if px > 0 else mask


def _log_units(values: np.ndarray, floor: float) -> np.ndarray:
    """log1p of intensities in units of `floor` (for integer counts, log1p of the counts)."""
    return np.log1p(np.clip(np.asarray(values, np.float64) / floor, 0, None))


def _lit(lv: np.ndarray, which: np.ndarray | None = None, min_px: int = 2000) -> np.ndarray:
    """The brighter class of an Otsu split of log intensities (all True when flat); with
    `which`, split each window (its label in `which`) of at least `min_px` pixels on its own and
    the others together."""
    if which is None:
        return lv > threshold_otsu(lv) if np.ptp(lv) > 0 else np.ones(lv.shape, bool)
    out = np.zeros(lv.shape, bool)
    counts = np.bincount(which)
    small = counts[which] < min_px
    for k in np.flatnonzero(counts >= min_px):
        sel = which == k
        out[sel] = _lit(lv[sel])
    if small.any():
        out[small] = _lit(lv[small])
    return out


#: A HER2 reference more than this many times the ordinary nuclei's own HER2 is the marker
#: itself (see `stain_levels`); the nuclei's level is taken instead.
HOST_NUCLEI_MULTIPLE = 10.0

#: Tissue pixels with DAPI more than this many times the walls' autofluorescence are nuclear
#: rims, left out of the spectral guard's ratio (see `stain_levels`).
RIM_DAPI = 2.0

#: A marker at least this many floors (counts) above the offset stands clear of the noise (see
#: the spectral guard of `stain_levels`).
MEASURED_FLOORS = 4.0

#: A marker's median over lit tissue this far above its autofluorescence-ratio level means
#: positive cells dominate it (see `stain_levels`).
SPECTRAL_GUARD = 1.5


def _mode(values: np.ndarray, *, lowest: bool = True) -> float:
    """A mode of `values`, refined as the median within 0.3 of it: the lowest one that holds a
    real population (at least 30% of the highest peak of the smoothed histogram), or with
    `lowest` False the highest peak itself."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 20 or np.ptp(v) < 0.2:
        return float(np.median(v)) if v.size else 0.0
    hist, edges = np.histogram(v, bins=max(8, int(np.ptp(v) / 0.05)))
    smooth = ndi.gaussian_filter1d(hist.astype(np.float64), 2.0, mode="constant")
    if lowest:
        k = int(
            np.flatnonzero(
                (smooth >= np.r_[-1, smooth[:-1]])
                & (smooth >= np.r_[smooth[1:], -1])
                & (smooth >= 0.3 * smooth.max())
            )[0]
        )
    else:
        k = int(np.argmax(smooth))
    mode = 0.5 * (edges[k] + edges[k + 1])
    near = v[np.abs(v - mode) < 0.3]
    return float(np.median(near if near.size else v))


def tissue_windows(mask: np.ndarray, n: int = 24, seed: int = 0) -> np.ndarray:
    """Centres (row, col) in mask pixels of up to `n` windows spread over the tissue."""
    ys, xs = np.nonzero(ndi.binary_erosion(mask, iterations=2) if mask.sum() > 50 else mask)
    if ys.size == 0:
        return np.zeros((0, 2), int)
    rng = np.random.default_rng(seed)
    pick = rng.choice(ys.size, size=min(n, ys.size), replace=False)
    return np.c_[ys[pick], xs[pick]]
