"""Per-cell marker calls (Ki67) from thresholds calibrated on each slide's own nuclei.

A nucleus is Ki67-positive when its mean Ki67 (counts above the camera offset) reaches the
slide's threshold. The threshold comes from the slide itself: the mean Ki67 of every nucleus in
the tissue windows that set the stain levels (thousands of ordinary nuclei) is a mixture of a
negative population (autofluorescence, non-specific background, bleed-through) and a positive
one (cycling epithelial and immune cells). In log intensity both are close to normal: the
negatives' centre and spread come robustly from their mode and lower flank, the positives'
from a mixture fit above them, and the threshold is where the two densities cross (equal
priors: among cancer cells the share of positives is not that of all nuclei), never inside the
negative population (at least `MIN_SDS_WITH_POSITIVES` of its robust standard deviations above
its centre). Without a positive population (none at least `NEGATIVE_SDS` above the negatives)
the threshold is `NEGATIVE_SDS` standard deviations above the negatives.

Where HER2 shows through the Ki67 filter, the leaked share is measured on the slide (over the
HER2+ cells' cytoplasm, where there is no Ki67: `spillover`) and HER2's own signal over each
nucleus times that share is taken out of its Ki67 first (`compensate_ki67`).

The intensity the call is made on stays in cells.csv (``ki67_mean``, or ``ki67_p90``, the
nucleus's brightest tenth, with ``ki67_measure="p90"``; the mean as measured in
``ki67_raw_mean``), so any threshold can be applied again later (`apply_threshold`,
``lungmets rethreshold``) without re-running the analysis.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np

#: The threshold is never closer to the negatives than this many of their robust standard
#: deviations (log intensity): one negative nucleus in about 1,000 at most is called positive.
NEGATIVE_SDS = 3.0

#: With a positive population of its own (at least `NEGATIVE_SDS` above the negatives), the
#: crossing of the two populations may come down to this many SDs above the negatives.
MIN_SDS_WITH_POSITIVES = 2.0

#: Two populations of the cancer cells count as such from this Ashman's D (2: just apart;
#: 2.5 until revision 8: 2.25 found the two populations of a 0.2-background section of seeds
#: 96000+ whose positives were all missed, and changed nothing on the benchmark's sections
#: nor on those of seeds 98000+).
BIMODAL_D = 2.25

#: Where the cancer cells show two populations, their crossing may come down to this many of
#: the lower one's SDs above its centre: with Ashman's D at least `BIMODAL_D` the two are apart,
#: and a wide negative population (dim nuclei of a packed focus) must not push the threshold
#: past its own crossing into the positives (2 SD did on bench_markers' 4x-autofluorescence
#: section: 480 counts where negatives end at 355 and positives start at 364).
CELLS_MIN_SDS = 1.5
#: Fewest values on a population's flank facing the other from which its spread is measured
#: there (`_bimodal`); with fewer, the fitted spread stands.
FACING_MIN_VALUES = 5

#: The cancer cells' own crossing is never below the slide's negatives' centre plus this many
#: of their SDs (0: the centre itself; a threshold that calls the slide's typical negative
#: nucleus positive is not a positivity threshold). Non-specific nuclear background on
#: bench_markers' 0.2-background sections put the cells' crossing at 554 counts where the
#: slide's negatives centre on 850, calling 9 negative cells positive. Chosen among 0, 0.5
#: and 1 SD on sections of other seeds than the benchmark's (96000+); 1 SD pushed the
#: threshold of 4x-autofluorescence sections into the positives on a third set (98000+),
#: where the host nuclei's Ki67 carries more autofluorescence than the cancer cells' ...
CELLS_ABOVE_NEGATIVE_SDS = 0.0
#: ... and not where those negatives are too spread to be one population (robust SD above
#: this, in log intensity: 1.65-fold; uneven autofluorescence spreads them to 0.98 on a
#: 4x-autofluorescence section, where the cells' own populations are the better guide).
ONE_POPULATION_MAX_SD = 0.5
#: The cells' upper population counts as a positive one only when its centre stands above
#: the slide's negatives' centre by this many of their SDs (0: above the centre): on a PBS
#: section without a single Ki67+ cancer cell, dim and ordinary negatives of the cells (9 and
#: 52 counts, the slide's negatives at 121) made two populations, and their crossing called 6
#: of 25 cells positive.
UPPER_ABOVE_NEGATIVE_SDS = 0.0

#: A positive population needs at least this share of the nuclei (and 10 nuclei) to be fitted.
MIN_POSITIVE_SHARE = 0.005


@dataclass(frozen=True)
class MarkerThreshold:
    """A marker's positivity threshold and where it came from.

    Attributes
    ----------
    marker : str
        Channel role, e.g. ``"Ki67"``.
    threshold : float or None
        Nuclear intensity above the camera offset (counts, in `measure`) from which a nucleus is
        positive (None: not calibrated, the detector's own calls stand; `method` says why).
    method : str
        ``"two populations"`` (fitted between negatives and positives), ``"negatives + 3 SD"``
        (no positive population found), or ``"user"`` (given with ``--ki67-threshold``).
    n_nuclei : int
        Nuclei measured on the slide to find it (0 for a user threshold).
    negative_median, negative_sd_log : float
        Centre (counts) and robust standard deviation (natural log) of the negative population.
    positive_median : float or None
        Centre (counts) of the positive population, when there is one.
    positive_fraction : float
        Share of the measured nuclei at or above the threshold.
    applied : bool
        False: reported only, the detector's calls stand (HER2 by default).
    calibrated : dict or None
        For a user's threshold: the slide's calibrated one (`to_dict`), for comparison and to
        return to it.
    histogram : dict or None
        What the threshold was calibrated on, for a plot: ``edges_log10`` (bin edges, log10
        counts) and the counts of ``nuclei`` (the slide's nuclei) and ``cells`` (HER2+ cells).
    autofluorescence : dict or None
        HER2: the check of every detected cell against autofluorescence
        (`her2_over_autofluorescence`): ``her2_per_ki67`` (the slide's autofluorescence
        ratio), ``min_ratio`` (the setting), ``removed`` (cells taken out), or a ``note``
        where it could not be made.
    measure : str
        What a nucleus's value is: ``"mean"`` of its pixels, or ``"p90"``, their 90th
        percentile (`AnalysisConfig.ki67_measure`); the threshold applies to the cells'
        `column`.
    negative_population : dict or None
        HER2: detections taken out as a HER2-negative population of their own
        (`negative_population`): ``min_gap`` (the setting), ``removed``, and the ``gap`` found.
    compensation : dict or None
        Ki67: the bleed-through taken out of every nucleus before calibration
        (`compensate_ki67`): ``her2_into_ki67`` and ``dapi_into_her2`` (shares of the source
        channel seen in the target channel, measured on the slide with `spillover`; 0 when
        none is seen), ``her2_into_ki67_se`` (its standard error), ``n_cells`` and
        ``n_nuclei`` they were measured on, and a ``note`` where one could not be measured.
    """

    marker: str
    threshold: float | None
    method: str
    n_nuclei: int = 0
    negative_median: float | None = None
    negative_sd_log: float | None = None
    positive_median: float | None = None
    positive_fraction: float | None = None
    applied: bool = True
    calibrated: dict | None = None
    histogram: dict | None = None
    compensation: dict | None = None
    autofluorescence: dict | None = None
    negative_population: dict | None = None
    measure: str = "mean"

    @property
    def column(self) -> str:
        """The cells.csv column the threshold applies to (``ki67_mean``, ``ki67_p90`` ...)."""
        return f"{self.marker.lower()}_{self.measure}"

    def not_applied(self) -> MarkerThreshold:
        """The same figures, reported only (the detector's calls stand)."""
        return replace(self, applied=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in (
            "calibrated",
            "histogram",
            "compensation",
            "autofluorescence",
            "negative_population",
        ):
            if d[k] is None:
                del d[k]
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4 if k.endswith("_log") or k.endswith("fraction") else 2)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MarkerThreshold:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _robust_negative(
    logs: np.ndarray, lowest: bool, values: np.ndarray | None = None, unit: float = 1.0
) -> tuple[float, float]:
    """Centre and robust SD of the negative population of `logs` (natural log intensities):
    the main population of all nuclei (`lowest` False: Ki67, most nuclei are negative) or the
    lowest one (HER2, whose positives can be most of the tissue).

    The spread comes from the lower flank next to the centre (a quarter of the values below
    it lie within 0.32 SD of a normal centre): positives lie above, and partial or dim nuclei
    make a long tail below that should not widen it. Given the linear `values` (``logs`` is
    ``log(max(values, 0) + unit)``), the same flank is also measured on them and carried to
    log scale at the centre: where the negatives sit at the noise around zero (near-zero
    autofluorescence), half of them are clipped to one log value and the log flank alone
    collapses; the larger of the two spreads is kept.
    """
    from .tissue import _mode

    centre = _mode(logs, lowest=lowest)
    below = centre - logs[logs <= centre]
    sd = float(np.quantile(below, 0.25)) / 0.3186 if below.size >= 20 else float(np.std(logs))
    if values is not None:
        lin_centre = float(np.exp(centre) - unit)
        lin_below = lin_centre - values[values <= lin_centre]
        if lin_below.size >= 20:
            sd_lin = float(np.quantile(lin_below, 0.25)) / 0.3186
            sd = max(sd, sd_lin / (lin_centre + unit))
    return centre, max(sd, 0.05)


def calibrate_threshold(
    values: np.ndarray,
    marker: str = "Ki67",
    *,
    unit: float = 1.0,
    positives: bool = True,
    cells: np.ndarray | None = None,
) -> MarkerThreshold:
    """The positivity threshold of a marker from the mean intensities of a slide's nuclei.

    Parameters
    ----------
    values : ndarray
        Mean marker intensity above the offset of each nucleus (or cell; counts, any dtype).
    marker : str
    unit : float
        The intensity below which differences are noise (a few camera counts, or a fraction
        of the channel's autofluorescence); logs are taken of ``values + unit``.
    positives : bool
        Look for a positive population (Ki67). False (HER2 of candidate cells, whose
        positives are the cells themselves): the threshold is `NEGATIVE_SDS` above the
        lowest population.
    cells : ndarray, optional
        The same measurement on the cancer cells. Where they form two populations of their
        own (Ashman's D at least `BIMODAL_D`, each at least 5% of them, the lower one among
        the slide's negatives, the upper one above their centre), the threshold is where those
        two cross: it then holds even when the slide's negatives are too spread to show a
        positive population above them. Where the slide's negatives are one population
        (robust SD at most `ONE_POPULATION_MAX_SD`), that crossing is not below their centre.

    Returns
    -------
    MarkerThreshold

    Raises
    ------
    ValueError
        With fewer than 20 finite values.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> neg = rng.lognormal(np.log(20), 0.3, 3000)
    >>> pos = rng.lognormal(np.log(400), 0.4, 300)
    >>> t = calibrate_threshold(np.r_[neg, pos])
    >>> t.method, 40 < t.threshold < 200
    ('two populations', True)
    """
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 20:
        raise ValueError(f"{marker}: {v.size} nuclei measured; at least 20 are needed")
    unit = float(unit) if unit and unit > 0 else 1.0
    logs = np.log(np.maximum(v, 0.0) + unit)
    mu0, sd0 = _robust_negative(logs, lowest=not positives, values=v, unit=unit)
    floor = mu0 + NEGATIVE_SDS * sd0
    above = logs[logs > floor]
    fit = None
    if positives and above.size >= max(10, MIN_POSITIVE_SHARE * logs.size):
        fit = _two_populations(logs, mu0, sd0, float(np.median(above)), float(np.std(above)))
    if fit is not None:
        m1, s1 = fit
        # Equal priors: among cancer cells the share of positives is not that of all nuclei.
        t = _equal_density(mu0, sd0, m1, s1)
        t = float(np.clip(t, mu0 + MIN_SDS_WITH_POSITIVES * sd0, m1))
        method, pos_median = "two populations", float(np.exp(m1) - unit)
    else:
        t, method, pos_median = floor, f"negatives + {NEGATIVE_SDS:g} SD", None
    own = None if cells is None else np.asarray(cells, np.float64)
    if positives and own is not None:
        own = own[np.isfinite(own)]
        split = _bimodal(np.log(np.maximum(own, 0.0) + unit)) if own.size >= 20 else None
        if (
            split is not None
            and split[0][0] <= mu0 + NEGATIVE_SDS * sd0
            and split[1][0] > mu0 + UPPER_ABOVE_NEGATIVE_SDS * sd0
        ):
            (a0, b0), (a1, b1) = split
            t = float(np.clip(_equal_density(a0, b0, a1, b1), a0 + CELLS_MIN_SDS * b0, a1))
            if sd0 <= ONE_POPULATION_MAX_SD:
                t = max(t, min(mu0 + CELLS_ABOVE_NEGATIVE_SDS * sd0, a1))
            method, pos_median = "two populations of the cells", float(np.exp(a1) - unit)
    return MarkerThreshold(
        marker=marker,
        threshold=float(np.exp(t) - unit),
        method=method,
        n_nuclei=int(v.size),
        negative_median=float(np.exp(mu0) - unit),
        negative_sd_log=float(sd0),
        positive_median=pos_median,
        positive_fraction=float(np.mean(logs >= t)),
    )


def _two_populations(logs, mu0, sd0, mu1, sd1, iterations: int = 200):
    """The positive population's centre and SD: EM for a mixture of the negatives (held at
    their robust figures) and one normal population above them; None when it is not there."""
    x = logs
    m1, s1, w1 = mu1, max(sd1, sd0), 0.1
    neg = np.exp(-0.5 * ((x - mu0) / sd0) ** 2) / sd0
    for _ in range(iterations):
        pos = np.exp(-0.5 * ((x - m1) / s1) ** 2) / s1
        r = w1 * pos / np.maximum(w1 * pos + (1 - w1) * neg, 1e-300)
        n1 = r.sum()
        if n1 < 5:
            return None
        m_new = float((r * x).sum() / n1)
        s1 = max(float(np.sqrt((r * (x - m_new) ** 2).sum() / n1)), 0.05)
        w1 = n1 / x.size
        done = abs(m_new - m1) < 1e-6
        m1 = m_new
        if done:
            break
    if m1 - mu0 < NEGATIVE_SDS * sd0:  # not a population of its own
        return None
    return m1, s1


def _bimodal(x: np.ndarray, iterations: int = 200):
    """Two normal populations in `x` (EM from its 20th and 80th percentiles), as
    ``((m0, s0), (m1, s1))``, when they are clearly apart (Ashman's D at least `BIMODAL_D`)
    and each holds at least 5%; else None.

    Each spread returned is that of the flank facing the other population (root mean square
    distance from its centre of the values between it and the midpoint of the two centres,
    `FACING_MIN_VALUES` or more): where the two cross depends on those flanks, and a
    population skewed away from the other (negative nuclei trailing down to no Ki67 at all,
    autofluorescence uneven from one nucleus to the next) must not push the crossing into the
    other one. Ashman's D is taken with the fitted spreads."""
    m = np.quantile(x, [0.2, 0.8]).astype(np.float64)
    s = np.full(2, max(float(np.std(x)) / 2, 0.05))
    w = np.array([0.5, 0.5])
    for _ in range(iterations):
        dens = w / s * np.exp(-0.5 * ((x[:, None] - m) / s) ** 2)
        r = dens / np.maximum(dens.sum(axis=1, keepdims=True), 1e-300)
        nk = r.sum(axis=0)
        if np.any(nk < 2):
            return None
        m_new = (r * x[:, None]).sum(axis=0) / nk
        s = np.sqrt((r * (x[:, None] - m_new) ** 2).sum(axis=0) / nk).clip(0.05)
        w = nk / nk.sum()
        done = np.allclose(m_new, m, atol=1e-6)
        m = m_new
        if done:
            break
    # Ashman's D: how far apart two normal populations are for their spreads (> 2: clean).
    ashman_d = np.sqrt(2.0) * (m[1] - m[0]) / np.sqrt((s**2).sum())
    if ashman_d < BIMODAL_D or w.min() < 0.05:
        return None
    mid = (m[0] + m[1]) / 2
    up = x[(x > m[0]) & (x <= mid)] - m[0]
    down = m[1] - x[(x < m[1]) & (x >= mid)]
    s = [
        max(float(np.sqrt(np.mean(flank**2))), 0.05) if flank.size >= FACING_MIN_VALUES else sd
        for flank, sd in ((up, s[0]), (down, s[1]))
    ]
    return (float(m[0]), s[0]), (float(m[1]), s[1])


def _equal_density(m0, s0, m1, s1) -> float:
    """Where the two normal densities cross between their centres."""
    grid = np.linspace(m0, m1, 2001)
    d0 = np.exp(-0.5 * ((grid - m0) / s0) ** 2) / s0
    d1 = np.exp(-0.5 * ((grid - m1) / s1) ** 2) / s1
    cross = np.flatnonzero(d1 >= d0)
    return float(grid[cross[0]]) if cross.size else float(m1)


#: A bleed-through share counts from this many of its standard errors above zero.
SPILLOVER_SES = 3.0


def spillover(
    target: np.ndarray,
    source: np.ndarray,
    *,
    blur: np.ndarray | None = None,
    min_values: int = 20,
) -> tuple[float, float] | None:
    """Share of a source channel's signal seen in a target channel (bleed-through), from
    objects that hold none of the target's own stain.

    A robust straight line (Tukey's biweight, iteratively reweighted least squares) through
    ``target = level + share * source (+ spread * blur)``: the level takes up the target's
    autofluorescence, `blur` what spreads into the objects from a bright neighbour (a Ki67+
    nucleus lighting its own cytoplasm), and objects that hold the target's own stain fall
    out as outliers.

    Parameters
    ----------
    target, source : ndarray
        Mean intensities of the same objects above the camera offset (counts): e.g. Ki67 and
        HER2 over the cytoplasm of HER2+ cells (Ki67 is nuclear), or HER2 and DAPI over the
        slide's nuclei (most hold no HER2).
    blur : ndarray, optional
        A second explanatory intensity (e.g. the Ki67 of each cell's own nucleus).
    min_values : int
        Fewer usable objects than this: not measured (None).

    Returns
    -------
    (share, standard_error) or None
        The share is 0 unless it is at least `SPILLOVER_SES` standard errors above zero, and
        at most 1; None when too few objects were measured.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> her2 = rng.lognormal(np.log(1500), 0.4, 200)
    >>> ki67 = 30 + 0.2 * her2 + rng.normal(0, 20, 200)
    >>> share, se = spillover(ki67, her2)
    >>> round(share, 2)
    0.2
    """
    cols = [np.asarray(source, np.float64)] + ([] if blur is None else [np.asarray(blur, float)])
    y = np.asarray(target, np.float64)
    ok = np.isfinite(y) & np.all([np.isfinite(c) for c in cols], axis=0)
    if ok.sum() < min_values:
        return None
    x = np.column_stack([np.ones(int(ok.sum()))] + [c[ok] for c in cols])
    y = y[ok]
    w = np.ones_like(y)
    for _ in range(50):
        sw = np.sqrt(w)
        beta = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)[0]
        r = y - x @ beta
        scale = 1.4826 * np.median(np.abs(r - np.median(r))) + 1e-9
        u = r / (4.685 * scale)
        w_new = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
        if np.allclose(w_new, w, atol=1e-4):
            break
        w = w_new
    xw = x * np.sqrt(w)[:, None]
    dof = max(float(w.sum()) - x.shape[1], 1.0)
    cov = float(np.sum(w * r**2)) / dof * np.linalg.pinv(xw.T @ xw)
    share, se = float(beta[1]), float(np.sqrt(max(cov[1, 1], 0.0)))
    if share < SPILLOVER_SES * se:
        share = 0.0
    return min(max(share, 0.0), 1.0), se


def floor_spillover(
    target: np.ndarray, source: np.ndarray, *, quantile: float = 0.1, bins: int = 8
) -> tuple[float, float] | None:
    """Share of a source channel seen in a target channel, from the floor of the target: where
    most objects may hold the target's own stain (HER2 over the nuclei of a tumour-dense
    slide), those without it still make the lowest `quantile` of the target at every level
    of the source, and that floor rises with the source by the share.

    The objects are split into `bins` of equal size by their source intensity; a straight
    line through each bin's median source and `quantile` of target gives the share (0 unless
    at least `SPILLOVER_SES` standard errors above zero, at most 1). None with fewer than
    ``10 * bins`` objects.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> dapi = rng.uniform(600, 1600, 2000)
    >>> her2 = 300 + 0.25 * dapi + rng.normal(0, 30, 2000)
    >>> her2[:1400] += rng.uniform(200, 2000, 1400)  # 70% HER2+ nuclei
    >>> share, se = floor_spillover(her2, dapi)
    >>> 0.22 < share < 0.28
    True
    """
    t = np.asarray(target, np.float64)
    s = np.asarray(source, np.float64)
    ok = np.isfinite(t) & np.isfinite(s)
    t, s = t[ok], s[ok]
    if t.size < 10 * bins:
        return None
    order = np.argsort(s)
    parts = np.array_split(order, bins)
    x = np.array([np.median(s[p]) for p in parts])
    y = np.array([np.quantile(t[p], quantile) for p in parts])
    sxx = float(np.sum((x - x.mean()) ** 2))
    if sxx <= 0:
        return None
    share = float(np.sum((x - x.mean()) * (y - y.mean())) / sxx)
    resid = y - (y.mean() + share * (x - x.mean()))
    se = float(np.sqrt(np.sum(resid**2) / (bins - 2) / sxx))
    if share < SPILLOVER_SES * se:
        share = 0.0
    return min(max(share, 0.0), 1.0), se


def compensate_ki67(
    ki67: np.ndarray,
    her2: np.ndarray,
    dapi: np.ndarray,
    *,
    her2_into_ki67: float,
    dapi_into_her2: float,
) -> np.ndarray:
    """Nuclear Ki67 without the HER2 seen through the Ki67 filter.

    HER2's own signal over a nucleus is its HER2 less the DAPI seen through the HER2 filter;
    that share `her2_into_ki67` of it is taken out of the nucleus's Ki67 (never added:
    a negative estimate counts as none). All arrays hold means over the same nuclei, above the
    camera offset.
    """
    own_her2 = np.maximum(np.asarray(her2, np.float64) - dapi_into_her2 * np.asarray(dapi), 0.0)
    return np.asarray(ki67, np.float64) - her2_into_ki67 * own_her2


def her2_over_autofluorescence(
    her2: np.ndarray,
    ki67: np.ndarray,
    *,
    her2_per_ki67: float,
    her2_into_ki67: float = 0.0,
) -> np.ndarray:
    """Each cell's HER2 over the HER2 its autofluorescence would give.

    Autofluorescence has one spectrum: wherever tissue glows (hepatocytes, macrophages,
    elastin), its HER2 and Ki67 stand in the slide's own ratio, `her2_per_ki67` (the tissue's
    autofluorescence levels, `histo.tissue.stain_levels`), however bright or uneven it is. Ki67
    is nuclear, so over the parts of a cell away from its nucleus the Ki67 channel holds
    autofluorescence, HER2's bleed-through (taken out with `her2_into_ki67`) and light from
    Ki67+ nuclei nearby, which only ever adds: it is an upper bound of the autofluorescence
    there, and ``her2_per_ki67`` times it an upper bound of the HER2 autofluorescence explains.
    Measured over several parts of the cell (columns), the largest ratio (the tightest bound)
    is returned. A ratio at or below 1 is a cell autofluorescence explains entirely; HER2+
    cells stand several times above it.

    Parameters
    ----------
    her2, ki67 : ndarray, shape (n,) or (n, parts)
        Mean HER2 and Ki67 above the camera offset (counts) over a part of each cell away from
        its nucleus (its cytoplasm; the third of it lowest in Ki67), one column per part.
    her2_per_ki67 : float
        Autofluorescence of HER2 over that of Ki67 on this slide.
    her2_into_ki67 : float
        Share of HER2 seen through the Ki67 filter (`spillover`).

    Returns
    -------
    ndarray, shape (n,)
        The ratio per cell (NaN where no part was measured; +inf where a part holds no Ki67
        beyond HER2's bleed-through).

    Examples
    --------
    >>> her2 = np.array([[200.0, 210.0], [900.0, 500.0]])
    >>> ki67 = np.array([[40.0, 40.0], [45.0, 60.0]])
    >>> her2_over_autofluorescence(her2, ki67, her2_per_ki67=5.0).round(2)
    array([1.05, 4.  ])
    """
    h = np.asarray(her2, np.float64)
    h = h.reshape(len(h), -1)
    k = np.asarray(ki67, np.float64).reshape(h.shape) - her2_into_ki67 * h
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(k > 0, h / (her2_per_ki67 * np.where(k > 0, k, 1.0)), np.inf)
    ratio[~(np.isfinite(h) & np.isfinite(k))] = np.nan
    if ratio.shape[1] == 0:
        return np.full(len(h), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        return np.nanmax(ratio, axis=1)


#: A separate population of detections counts as HER2-negative only when its cells sit at the
#: tissue's negative level: median HER2 at most this multiple of the slide's HER2 reference
#: (the autofluorescence of HER2-negative tissue; HER2+ cells stand several times above it).
NEGATIVE_POPULATION_MAX_RATIO = 2.0
#: ... and only when the population above the gap is established (this many cells or more).
NEGATIVE_POPULATION_MIN_ABOVE = 10


def negative_population(
    her2_ratio: np.ndarray,
    *,
    min_gap: float,
    max_ratio: float = NEGATIVE_POPULATION_MAX_RATIO,
    min_above: int = NEGATIVE_POPULATION_MIN_ABOVE,
    af_ratio: np.ndarray | None = None,
    her2_mean: np.ndarray | None = None,
    negative_upper: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Detected cells that form a HER2-negative population of their own.

    HER2+ cells of one slide spread over a continuous range of HER2 (dim to bright, membrane
    to cytoplasm). Detections whose HER2 is that of unstained tissue (a median at most
    `max_ratio` times the slide's HER2 reference, or, given `af_ratio`, at most `max_ratio`
    times what their own autofluorescence gives, or, given `her2_mean` and `negative_upper`,
    a median HER2 within that of the slide's ordinary cells), separated from all other
    detections by an empty gap of at least `min_gap`-fold in HER2, are a second population:
    cells the stain did not mark (e.g. proliferating immune nuclei on tissue with almost no
    autofluorescence, where the reference is a few counts of noise and unstained nuclei
    measure 2-9 times it). The slide's own cells decide, not a fixed threshold: without such a
    gap nothing is removed.

    Parameters
    ----------
    her2_ratio : ndarray, shape (n,)
        Each detection's mean HER2 over the slide's HER2 reference (``her2_ratio``).
    min_gap : float
        Smallest empty gap (fold change between neighbouring detections) that separates two
        populations; 0 turns the check off.
    max_ratio : float
        Largest median ``her2_ratio`` of the lower population.
    min_above : int
        Fewest detections above the gap.
    af_ratio : ndarray, shape (n,), optional
        Each detection's HER2 over what its autofluorescence gives
        (`her2_over_autofluorescence`); NaN where not measured.
    her2_mean : ndarray, shape (n,), optional
        Each detection's mean HER2 (counts above offset), to compare with `negative_upper`.
    negative_upper : float, optional
        Upper end of the HER2 of the slide's ordinary (HER2-negative) cells, counts above
        offset: the HER2 threshold calibrated on their bodies (`calibrate_threshold` with
        ``positives=False``), applied or not. Where the reference is a few counts of noise
        (near-zero autofluorescence) unstained cells can measure several times it; they still
        measure what the slide's other unstained cells do.

    Returns
    -------
    negative : ndarray of bool, shape (n,)
        The detections of the negative population (NaN ratios are never in it).
    info : dict
        ``min_gap``, ``removed`` and, where a population was found, ``gap`` (fold),
        ``below`` and ``above`` (the ratios either side of the gap) and ``median_ratio``.

    Examples
    --------
    >>> ratio = np.r_[np.linspace(0.9, 1.8, 12), np.linspace(20.0, 60.0, 30)]
    >>> negative, info = negative_population(ratio, min_gap=4.0)
    >>> int(negative.sum()), info["gap"]
    (12, 11.11)
    >>> int(negative_population(np.linspace(1.0, 60.0, 42), min_gap=4.0)[0].sum())
    0
    """
    ratio = np.asarray(her2_ratio, np.float64)
    negative = np.zeros(len(ratio), bool)
    info: dict = {"min_gap": float(min_gap), "removed": 0}
    mean = None
    if her2_mean is not None and negative_upper is not None and np.isfinite(negative_upper):
        mean = np.asarray(her2_mean, np.float64)
        info["negative_upper"] = round(float(negative_upper), 2)
    ok = np.flatnonzero(np.isfinite(ratio) & (ratio > 0))
    if min_gap <= 0 or len(ok) < min_above + 1:
        return negative, info
    order = ok[np.argsort(ratio[ok])]
    af = None if af_ratio is None else np.asarray(af_ratio, np.float64)
    v = ratio[order]
    gaps = v[1:] / v[:-1]
    best = None
    for k in np.flatnonzero(gaps >= min_gap):
        n_above = len(v) - k - 1
        lower = order[: k + 1]
        lower_is_negative = (
            np.median(v[: k + 1]) <= max_ratio
            or _median_at_most(None if af is None else af[lower], max_ratio)
            or _median_at_most(None if mean is None else mean[lower], negative_upper)
        )
        if n_above >= min_above and lower_is_negative and (best is None or gaps[k] > gaps[best]):
            best = k
    if best is None:
        return negative, info
    negative[order[: best + 1]] = True
    info.update(
        removed=int(best + 1),
        gap=round(float(gaps[best]), 2),
        below=round(float(v[best]), 3),
        above=round(float(v[best + 1]), 3),
        median_ratio=round(float(np.median(v[: best + 1])), 3),
    )
    return negative, info


def _median_at_most(values, limit: float) -> bool:
    """Whether the median of the finite `values` (None: none) is at most `limit`."""
    if values is None:
        return False
    values = values[np.isfinite(values)]
    return bool(values.size) and float(np.median(values)) <= limit


def user_threshold(
    marker: str, value: float, calibrated: MarkerThreshold | None = None, measure: str = "mean"
) -> MarkerThreshold:
    """A threshold the scientist chose (counts above offset, in `measure`), with the slide's
    calibrated one kept beside it (``calibrated``) when known."""
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{marker} threshold must be a non-negative number, got {value}")
    return MarkerThreshold(
        marker=marker,
        threshold=float(value),
        method="user",
        calibrated=None if calibrated is None else calibrated.to_dict(),
        measure=measure,
    )


def _window_nuclei(windows, offset, dapi, marker, nuclear_dapi, nucleus_fraction):
    """For each window: (nucleus labels, their number, the marker above the offset)."""
    from scipy import ndimage as ndi

    for w in windows:
        d = w[dapi].astype(np.float32) - np.float32(offset[dapi])
        k = w[marker].astype(np.float32) - np.float32(offset[marker])
        lab, n = ndi.label(d > nucleus_fraction * nuclear_dapi)
        if n:
            yield lab, n, k


def nuclear_means(
    windows: list[np.ndarray],
    offset: np.ndarray,
    dapi: int,
    marker: int,
    *,
    nuclear_dapi: float,
    nucleus_fraction: float = 0.2,
    min_area_px: int = 8,
    grow_px: int = 0,
    quantile: float | None = None,
) -> np.ndarray:
    """Mean marker intensity above the offset of every nucleus in tissue windows (with
    `grow_px`, over the nucleus grown by that much: a cell's body, as a detector measures a
    HER2+ cell; with `quantile`, that quantile of its pixels instead of their mean, as
    ``AnalysisConfig.ki67_measure`` "p90" measures the cells).

    Nuclei are the connected regions where DAPI (above the offset) exceeds `nucleus_fraction`
    of the slide's nuclear DAPI level, as the detectors define a cell's nucleus; those smaller
    than `min_area_px` are left out.
    """
    from scipy import ndimage as ndi

    out = []
    for lab, n, k in _window_nuclei(windows, offset, dapi, marker, nuclear_dapi, nucleus_fraction):
        area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        region = lab
        if grow_px > 0:
            region = np.where(lab > 0, lab, ndi.grey_dilation(lab, size=2 * grow_px + 1))
        keep = area >= min_area_px
        if quantile is not None:
            from .detect import _label_quantile

            out.append(_label_quantile(k, region, n, quantile)[1:][keep].astype(np.float64))
        else:
            sums = np.bincount(region.ravel(), weights=k.ravel(), minlength=n + 1)[1:]
            cnt = np.bincount(region.ravel(), minlength=n + 1)[1:]
            out.append(sums[keep] / np.maximum(cnt[keep], 1))
    return np.concatenate(out) if out else np.zeros(0)


def apply_threshold(cells, threshold: MarkerThreshold):
    """``ki67_pos`` of every cell from its stored value (``ki67_mean``, or the column of the
    threshold's `MarkerThreshold.measure`), as a copy of `cells`.

    Cells without a Ki67 measurement (NaN) stay NA.
    """
    import pandas as pd

    col = threshold.column
    out = cells.copy()
    if col not in out:
        if len(out):
            raise ValueError(f"no {col} in the cells' table: they were measured another way")
        out[col] = np.zeros(0)
    v = out[col].to_numpy(np.float64)
    call = pd.array(v >= threshold.threshold, dtype="boolean")
    call[np.isnan(v)] = pd.NA
    out[f"{threshold.marker.lower()}_pos"] = call
    return out


def apply_thresholds(cells, thresholds: dict):
    """Cells with the calls of `thresholds` (marker -> `MarkerThreshold`; None thresholds
    keep the detector's calls): candidates below the HER2 threshold are not HER2+ cells and
    are left out; ``ki67_pos`` comes from the Ki67 threshold's `MarkerThreshold.column`.
    Returns a new table."""
    out = cells
    her2 = thresholds.get("HER2")
    if her2 is not None and her2.applied and her2.threshold is not None and len(out):
        out = out[out["her2_mean"].to_numpy(np.float64) >= her2.threshold].reset_index(drop=True)
    ki67 = thresholds.get("Ki67")
    if ki67 is not None and ki67.applied and ki67.threshold is not None:
        out = apply_threshold(out, ki67)
    return out


def histogram(nuclei: np.ndarray, cells: np.ndarray, *, unit: float = 1.0, bins: int = 48) -> dict:
    """Log-spaced histogram of the nuclei's and the cells' intensities (for `histogram`)."""
    both = np.r_[nuclei, cells]
    both = both[np.isfinite(both)]
    lo = np.log10(max(float(np.percentile(both, 0.5)) if both.size else 1.0, unit, 1e-6))
    hi = np.log10(max(float(np.percentile(both, 99.9)) if both.size else 10.0, 10**lo * 10))
    edges = np.linspace(lo, hi, bins + 1)
    clip = 10 ** np.array([lo, hi])

    def count(v):
        v = np.clip(np.asarray(v, float)[np.isfinite(v)], *clip)
        return np.histogram(np.log10(v), bins=edges)[0].tolist()

    return {
        "edges_log10": np.round(edges, 4).tolist(),
        "nuclei": count(nuclei),
        "cells": count(cells),
    }
