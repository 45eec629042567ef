"""The slide's reference levels (`histo.tissue.stain_levels`) on windows drawn with a known
answer: walls of a known autofluorescence, the haze of airspace, glass and nuclei."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from histo.tissue import stain_levels

#: Autofluorescence of the walls per channel (DAPI, HER2, Ki67), counts above the offset.
SPECTRUM = np.array([1.0, 3.5, 1.2])
OFFSET = 100.0


def _window(rng, walls_level, *, glass_rows=0, haze=0.06, nucleus_dapi=2000.0, airspace=True):
    """One (3, 128, 128) uint16 window: walls 6 px wide on a 36-px grid at `walls_level` x
    `SPECTRUM` (stroma everywhere with `airspace` False), a `haze` of it in the airspaces,
    nuclei (DAPI `nucleus_dapi`, HER2 and Ki67 at the walls' level), glass in the first
    `glass_rows` rows; blurred, with camera noise. Returns the window and its tissue mask."""
    yy, xx = np.mgrid[:128, :128]
    if airspace:
        wall = ((yy % 36) < 6) | ((xx % 36) < 6)
        density = np.where(wall, 1.0, haze)
    else:
        wall = np.ones((128, 128), bool)
        density = np.exp(0.2 * rng.standard_normal((128, 128)))
    img = walls_level * SPECTRUM[:, None, None] * density[None]
    nuclei = np.zeros((128, 128), bool)
    for cy, cx in rng.integers(4, 124, size=(18, 2)):
        nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
    img[0][nuclei] = nucleus_dapi
    img[1:, nuclei] = walls_level * SPECTRUM[1:, None]  # nuclei hold autofluorescence too
    img = ndi.gaussian_filter(img, (0, 0.8, 0.8))
    tissue = np.ones((128, 128), bool)
    tissue[:glass_rows] = False
    img[:, ~tissue] = 0.0
    img = img + OFFSET + rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 65535).astype(np.uint16), tissue


def _levels(windows, **kw):
    imgs = [w for w, _ in windows]
    return stain_levels(
        imgs,
        np.full(3, OFFSET),
        0,
        negative_in_nuclei=(1,),
        tissue=[t for _, t in windows],
        **kw,
    )


@pytest.mark.parametrize("walls_level", [40.0, 400.0])
def test_walls_found_where_glass_and_airspace_haze_share_the_windows(walls_level):
    """Half of each window is glass: where the haze stands clear of glass, a split of glass,
    haze and walls together falls between glass and the haze, and the reference is the haze
    (16x too low) unless glass is left out."""
    rng = np.random.default_rng(0)
    windows = [_window(rng, walls_level, glass_rows=64) for _ in range(12)]
    af = np.array(_levels(windows).autofluorescence)
    truth = walls_level * SPECTRUM
    assert np.all(af > truth / 1.3) and np.all(af < truth * 1.3), (af, truth)
    if walls_level >= 400:  # a haze well above glass: counted as tissue, glass is the fault
        glass_in = [(w, np.ones_like(t)) for w, t in windows]
        haze = np.array(_levels(glass_in).autofluorescence)
        assert haze[1] < truth[1] / 4


def test_walls_brighter_in_dapi_than_the_nuclear_level_are_not_nuclei():
    """Autofluorescence so bright that the walls' DAPI passes 0.15 of the nuclei's: the walls
    keep the autofluorescence's own HER2/DAPI ratio, the nuclei stand far above it in DAPI."""
    rng = np.random.default_rng(1)
    windows = [_window(rng, 600.0, nucleus_dapi=3000.0) for _ in range(12)]
    af = np.array(_levels(windows).autofluorescence)
    truth = 600.0 * SPECTRUM
    assert np.all(af > truth / 1.3) and np.all(af < truth * 1.3), (af, truth)


def test_an_uneven_section_is_measured_window_by_window():
    """The autofluorescence differs 8x between windows: a pooled split falls between the dim
    windows' walls and the bright windows' haze; each window's own split finds its walls, and
    the reference is their typical level (the geometric middle of the levels drawn)."""
    rng = np.random.default_rng(2)
    levels = np.geomspace(100.0, 800.0, 12)
    windows = [_window(rng, lv, nucleus_dapi=6000.0) for lv in levels]
    af = np.array(_levels(windows).autofluorescence)
    truth = np.sqrt(100.0 * 800.0) * SPECTRUM
    assert np.all(af > truth / 1.5) and np.all(af < truth * 1.5), (af, truth)


def test_stroma_without_airspace_gives_its_own_level_not_the_rims_of_nuclei():
    """Tissue with no airspace: a split finds no dark class, and without the rims of nuclei
    (DAPI blurred out of them) left out, its bright class would be those rims."""
    rng = np.random.default_rng(3)
    windows = [_window(rng, 60.0, airspace=False) for _ in range(12)]
    af = np.array(_levels(windows).autofluorescence)
    truth = 60.0 * SPECTRUM
    assert np.all(af > truth / 1.4) and np.all(af < truth * 1.4), (af, truth)
