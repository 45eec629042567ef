"""How infection changes the disseminated-cell population: the generator's biology.

Everything here is a small, explicit model of what Chia et al. (Nature 2025) describe for
MMTV-Her2 mice: disseminated cancer cells (DCCs) sit in the lung as dormant, Ki67-negative
single cells; a respiratory virus infection wakes a growing fraction of them from about
a week after infection, and the awakened cells proliferate into clusters and foci.

The numbers are chosen to give realistic *shapes* of data (several-fold more HER2+ cells in
infected lungs from about 9 days post infection, lesions shifting from single cells to foci),
not to reproduce the paper's exact values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Seeded DCCs per mm² of lung tissue in an average mouse (PBS or infected alike).
DCC_DENSITY_PER_MM2 = 40.0
#: Largest lesion the generator draws, in cells.
MAX_LESION_CELLS = 400

GROUPS = ("IAV", "PBS")


@dataclass(frozen=True)
class LesionModel:
    """Probabilities that shape the lesion population of one lung.

    Attributes
    ----------
    p_awake : float
        Probability that a DCC has left dormancy.
    median_size : float
        Median number of cells in a lesion grown from an awakened DCC.
    size_sigma : float
        Log-normal spread of that size.
    ki67_fraction : float
        Fraction of Ki67+ cells in lesions grown from awakened DCCs.
    dormant_ki67_fraction : float
        Fraction of dormant single cells that are Ki67+ anyway (staining noise, rare cycling).
    infiltrate : float
        Strength (0..1) of virus-driven immune infiltrates in the lung.
    """

    p_awake: float
    median_size: float
    size_sigma: float
    ki67_fraction: float
    dormant_ki67_fraction: float
    infiltrate: float


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def lesion_model(group: str, dpi: float, response: float = 1.0) -> LesionModel:
    """Lesion-population parameters for a lung of `group` at `dpi` days post infection.

    Parameters
    ----------
    group : {"IAV", "PBS"}
        Infected (influenza A virus) or mock-infected control.
    dpi : float
        Days post infection (or post PBS instillation).
    response : float, optional
        Per-mouse strength of the response (1 = average mouse). Scales the awakened fraction
        and the growth of lesions; sections of one mouse share it.

    Returns
    -------
    LesionModel
    """
    group = group.upper()
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if group == "PBS":
        return LesionModel(
            p_awake=0.05,
            median_size=1.5,
            size_sigma=0.5,
            ki67_fraction=0.5,
            dormant_ki67_fraction=0.03,
            infiltrate=0.0,
        )
    # Awakening starts about 5 days after infection and saturates by two weeks.
    p_awake = min(0.9, (0.08 + 0.55 * _sigmoid((dpi - 6.0) / 2.0)) * response)
    # Awakened cells double about every 4 days from day 3, up to foci of some tens of cells.
    median = min(2.0 ** (max(dpi - 3.0, 0.0) / 4.0), 20.0) ** min(response, 1.5)
    ki67 = float(np.clip(0.75 - 0.006 * dpi, 0.45, 0.75))
    infiltrate = math.exp(-(((dpi - 9.0) / 8.0) ** 2))
    return LesionModel(
        p_awake=p_awake,
        median_size=max(median, 1.0),
        size_sigma=0.8,
        ki67_fraction=ki67,
        dormant_ki67_fraction=0.03,
        infiltrate=infiltrate,
    )


def draw_lesion_sizes(
    rng: np.random.Generator, n_dcc: int, model: LesionModel
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the size of the lesion each DCC has become.

    Returns
    -------
    sizes : ndarray of int
        Number of cells per lesion (1 = still a single cell).
    awake : ndarray of bool
        Whether the lesion grew from an awakened (proliferating) DCC.
    """
    awake = rng.random(n_dcc) < model.p_awake
    sizes = np.ones(n_dcc, dtype=int)
    n_awake = int(awake.sum())
    if n_awake:
        drawn = rng.lognormal(math.log(model.median_size), model.size_sigma, n_awake)
        sizes[awake] = np.clip(np.round(drawn), 1, MAX_LESION_CELLS).astype(int)
    return sizes, awake


def expected_cells_per_dcc(model: LesionModel, n_draws: int = 200_000, seed: int = 0) -> float:
    """Monte-Carlo mean number of HER2+ cells per seeded DCC (used in docs and tests)."""
    sizes, _ = draw_lesion_sizes(np.random.default_rng(seed), n_draws, model)
    return float(sizes.mean())
