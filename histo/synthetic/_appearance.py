"""Appearance families: how a slide *looks*, separate from the biology it shows.

The generator's default draws one style of mouse-lung immunofluorescence. A detector trained on
one style learns that style, so every way in which real slides differ is a named *family* here,
with a range of values: the HER2 staining pattern, how visible a cancer cell's nucleus is, how
tightly cells pack and how large they are, Ki67 that masks DAPI, the level and evenness of tissue
autofluorescence, channel bleed-through, tumour-dense tissue, the dynamic range of the file, the
pixel size and the tissue layout. `Appearance()` is the default style (pixels identical to the
generator before families existed); `random_appearance` draws a style from chosen families, for
training, and `FAMILIES` names each family's range and the part of it held out of training for
leave-family-out evaluation (``tests/benchmarks/bench_generalisation.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is not imported at run time: the CLI reads this module for --help
    import numpy as np

HER2_PATTERNS = (
    "default",  # bright membrane, weaker cytoplasm, dark over the nucleus
    "membrane",  # a membrane ring only
    "cytoplasmic",  # cytoplasmic fill, faint membrane
    "over_nucleus",  # fill of the whole cell body, over the nucleus too (no nuclear hole)
    "granular",  # punctate granules in the cytoplasm
    "weak_membrane",  # weak membrane with bright cytoplasm
)
KI67_PATTERNS = (
    "default",  # granular fill of the nucleus
    "diffuse",  # even fill of the nucleus
    "speckled",  # a few bright foci, dark between them
)
DTYPES = ("uint16", "uint12", "uint8", "float32")
LAYOUTS = ("alveolar", "stroma", "liver")


@dataclass(frozen=True)
class Appearance:
    """How a synthetic slide looks (the default is the generator's original style).

    Attributes
    ----------
    her2_pattern : str
        One of `HER2_PATTERNS`.
    nucleus_dapi : float
        DAPI of a cancer cell's nucleus relative to the slide's ordinary nuclei (0.3-2).
    nucleoli : bool
        Cancer nuclei show 1-3 DAPI-dim nucleoli.
    cell_diameter_um : (float, float)
        Range of cancer-cell diameters (9-25 um; nuclei scale with the cell).
    packing : (float, float)
        Range of the distance between neighbouring cell centres over the sum of their radii
        (1 = cells just touch, 0.7 = shared, flattened membranes).
    ki67_dapi : float
        DAPI of Ki67+ cancer nuclei is multiplied by this (0.3: Ki67 masks DAPI).
    ki67_pattern : str
        One of `KI67_PATTERNS` (Ki67+ cancer nuclei).
    ki67_background : float
        Non-specific Ki67 in every Ki67-negative nucleus (cancer and host), as a fraction of
        the positive level (0-0.3; another simulator's negatives hold about 0.1).
    autofluorescence : float
        Tissue autofluorescence of every channel relative to the default (0.05-5); the cells'
        own brightness does not change with it.
    af_unevenness : float
        Amplitude (log scale) of slow variation of autofluorescence over the section (0-1).
    bleed_through : float
        Fraction of DAPI seen in HER2 and of HER2 seen in Ki67 (0-0.3).
    tumour_fraction : float
        Fraction of the tissue covered by solid tumour nests of hundreds to thousands of
        HER2+ cells (0: none).
    dtype : str
        Dynamic range of the file: ``uint16`` (16 bit), ``uint12`` (12-bit camera in uint16),
        ``uint8`` or ``float32``.
    layout : str
        Tissue: ``alveolar`` lung, dense ``stroma``, or ``liver``-like parenchyma
        (polygonal hepatocytes with autofluorescent cytoplasm; red blood cells, Kupffer
        cells and the sinusoids' own nuclei in the sinusoids between them).
    her2_level : (float, float)
        Range of a lesion's mean HER2 over the tissue's autofluorescence (drawn log-uniform
        per lesion; default 2-15). HER2-low cells (1.2-3), as dormant cells that lower HER2 or
        a weaker antibody give, are not in any family the network was trained on.
    """

    her2_pattern: str = "default"
    nucleus_dapi: float = 0.8
    nucleoli: bool = False
    cell_diameter_um: tuple[float, float] = (12.0, 18.0)
    packing: tuple[float, float] = (0.86, 1.0)
    ki67_dapi: float = 1.0
    ki67_pattern: str = "default"
    ki67_background: float = 0.0
    autofluorescence: float = 1.0
    af_unevenness: float = 0.0
    bleed_through: float = 0.0
    tumour_fraction: float = 0.0
    dtype: str = "uint16"
    layout: str = "alveolar"
    her2_level: tuple[float, float] = (2.0, 15.0)

    def __post_init__(self):
        if self.her2_pattern not in HER2_PATTERNS:
            raise ValueError(
                f"her2_pattern must be one of {HER2_PATTERNS}, got {self.her2_pattern!r}"
            )
        if self.ki67_pattern not in KI67_PATTERNS:
            raise ValueError(
                f"ki67_pattern must be one of {KI67_PATTERNS}, got {self.ki67_pattern!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "cell_diameter_um", tuple(float(v) for v in self.cell_diameter_um))
        object.__setattr__(self, "packing", tuple(float(v) for v in self.packing))
        lo, hi = self.cell_diameter_um
        if not 6.0 <= lo <= hi <= 40.0:
            raise ValueError(f"cell_diameter_um must be a range within 6-40 um, got {lo}-{hi}")
        object.__setattr__(self, "her2_level", tuple(float(v) for v in self.her2_level))
        if not 1.05 <= self.her2_level[0] <= self.her2_level[1] <= 50.0:
            raise ValueError(f"her2_level must be a range within 1.05-50, got {self.her2_level}")
        if not 0.6 <= self.packing[0] <= self.packing[1] <= 1.1:
            raise ValueError(f"packing must be a range within 0.6-1.1, got {self.packing}")
        for name, lo_, hi_ in (
            ("nucleus_dapi", 0.05, 5.0),
            ("ki67_dapi", 0.05, 2.0),
            ("ki67_background", 0.0, 0.5),
            ("autofluorescence", 0.01, 20.0),
            ("af_unevenness", 0.0, 2.0),
            ("bleed_through", 0.0, 1.0),
            ("tumour_fraction", 0.0, 0.95),
        ):
            v = getattr(self, name)
            if not lo_ <= v <= hi_:
                raise ValueError(f"{name} must be between {lo_} and {hi_}, got {v}")

    @property
    def is_default(self) -> bool:
        return self == Appearance()

    def changes(self) -> list[str]:
        """``name=value`` of every field that differs from the default style."""
        default = Appearance().to_dict()
        return [f"{k}={v}" for k, v in self.to_dict().items() if v != default[k]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cell_diameter_um"] = list(self.cell_diameter_um)
        d["packing"] = list(self.packing)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Appearance:
        names = {f.name for f in fields(cls)}
        return cls(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        )


@dataclass(frozen=True)
class Family:
    """One way slides differ: its ranges for training and the values held out of training.

    Attributes
    ----------
    name : str
    full : callable(rng) -> dict
        Draws `Appearance` fields (and ``pixel_size_um``) over the family's whole range: what
        the shipped network is trained on.
    train : callable(rng) -> dict or None
        Draws over the part of the range a leave-family-out training run may see (None: the
        family is held out entirely and stays at its default).
    held_out : tuple of dict
        Values that `train` never draws, each one evaluation case.
    """

    name: str
    full: Callable[[np.random.Generator], dict]
    train: Callable[[np.random.Generator], dict] | None
    held_out: tuple[dict, ...]

    @property
    def entirely(self) -> bool:
        return self.train is None


def _log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _either_side_of_default(rng, lo, hi):
    """Log-uniform over [lo, 1] or [1, hi], each side as likely: a range that reaches further
    below the default than above it still draws as many brighter slides as darker ones."""
    u = rng.uniform(-1.0, 1.0)
    return float(math.exp(u * (-math.log(lo) if u < 0 else math.log(hi))))


def _diameter(rng, lo, hi):
    d = rng.uniform(lo, hi)
    return (round(max(lo, d - 2.5), 2), round(min(hi, d + 2.5), 2))


def _choice(rng, values):
    return values[int(rng.integers(len(values)))]


#: Every family, its ranges and its held-out values. Held out entirely from the leave-family-out
#: training run (that model never sees them): the HER2 pattern, 8-bit and other file types, and
#: tissue layouts other than lung. Held out by range: the others (trained on the middle of the
#: range, evaluated beyond it).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "her2_pattern",
            full=lambda rng: {"her2_pattern": _choice(rng, HER2_PATTERNS)},
            train=None,
            held_out=(
                {"her2_pattern": "over_nucleus"},
                {"her2_pattern": "granular"},
                {"her2_pattern": "membrane"},
                {"her2_pattern": "weak_membrane"},
            ),
        ),
        Family(
            "nucleus_dapi",
            full=lambda rng: {
                "nucleus_dapi": _log_uniform(rng, 0.3, 2.0),
                "nucleoli": bool(rng.random() < 0.3),
            },
            train=lambda rng: {
                "nucleus_dapi": _log_uniform(rng, 0.5, 1.4),
                "nucleoli": bool(rng.random() < 0.3),
            },
            held_out=({"nucleus_dapi": 0.3}, {"nucleus_dapi": 2.0, "nucleoli": True}),
        ),
        Family(
            "packing",
            full=lambda rng: {
                "cell_diameter_um": _diameter(rng, 9.0, 25.0),
                "packing": (round(rng.uniform(0.7, 0.9), 3), 1.0),
            },
            train=lambda rng: {
                "cell_diameter_um": _diameter(rng, 11.5, 20.0),
                "packing": (round(rng.uniform(0.8, 0.9), 3), 1.0),
            },
            held_out=(
                {"cell_diameter_um": (9.0, 11.0), "packing": (0.7, 0.8)},
                {"cell_diameter_um": (21.0, 25.0), "packing": (0.7, 0.8)},
            ),
        ),
        Family(
            "ki67_dapi",
            full=lambda rng: {"ki67_dapi": _log_uniform(rng, 0.25, 1.0)},
            train=lambda rng: {"ki67_dapi": _log_uniform(rng, 0.55, 1.0)},
            held_out=({"ki67_dapi": 0.3},),
        ),
        Family(
            "autofluorescence",
            full=lambda rng: {
                "autofluorescence": _either_side_of_default(rng, 0.04, 6.0),
                "af_unevenness": float(rng.uniform(0.0, 0.9)),
            },
            # Trained up to 4.5x with unevenness 0.75 since v5 (v2 and v4: 3x, 0.4, which drew
            # almost no cell under half the septa's autofluorescence): the bright held-out value
            # (5x, 0.8) lies just beyond that, the dark one (0.05x) far below it.
            train=lambda rng: {
                "autofluorescence": _log_uniform(rng, 0.3, 4.5),
                "af_unevenness": float(rng.uniform(0.0, 0.75)),
            },
            held_out=({"autofluorescence": 0.05}, {"autofluorescence": 5.0, "af_unevenness": 0.8}),
        ),
        Family(
            "bleed_through",
            full=lambda rng: {"bleed_through": float(rng.uniform(0.0, 0.3))},
            train=lambda rng: {"bleed_through": float(rng.uniform(0.0, 0.1))},
            held_out=({"bleed_through": 0.25},),
        ),
        Family(
            "tumour_dense",
            full=lambda rng: {"tumour_fraction": float(rng.uniform(0.1, 0.9))},
            train=lambda rng: {"tumour_fraction": float(rng.uniform(0.1, 0.4))},
            held_out=({"tumour_fraction": 0.6}, {"tumour_fraction": 0.85}),
        ),
        Family(
            "dtype",
            full=lambda rng: {"dtype": _choice(rng, DTYPES)},
            train=None,
            held_out=({"dtype": "uint8"}, {"dtype": "uint12"}, {"dtype": "float32"}),
        ),
        Family(
            "pixel_size",
            full=lambda rng: {"pixel_size_um": round(_log_uniform(rng, 0.25, 1.0), 3)},
            train=lambda rng: {"pixel_size_um": round(rng.uniform(0.4, 0.7), 3)},
            held_out=({"pixel_size_um": 0.25}, {"pixel_size_um": 1.0}),
        ),
        Family(
            "layout",
            full=lambda rng: {"layout": _choice(rng, ("stroma", "liver"))},
            train=None,
            held_out=({"layout": "stroma"}, {"layout": "liver"}),
        ),
    )
}

#: Probability that each family departs from the default style on a drawn training slide.
FAMILY_PROBABILITY = 0.35

#: The families the leave-family-out model never sees.
HELD_OUT_ENTIRELY = tuple(name for name, f in FAMILIES.items() if f.entirely)


def random_appearance(
    rng: np.random.Generator,
    *,
    exclude: tuple[str, ...] = (),
    p_each: float = FAMILY_PROBABILITY,
) -> tuple[Appearance, float]:
    """Draw a training style: each family departs from the default with probability `p_each`.

    Parameters
    ----------
    rng : numpy.random.Generator
    exclude : tuple of str
        Families held out of this training run: one held out entirely stays at its default;
        the others are drawn from their training range only, never their held-out values.
    p_each : float
        Probability that a family departs from the default on a slide.

    Returns
    -------
    appearance : Appearance
    pixel_size_um : float
    """
    values: dict = {}
    for name, fam in FAMILIES.items():
        if rng.random() >= p_each:
            continue
        draw = fam.full if name not in exclude else fam.train
        if draw is not None:
            values.update(draw(rng))
    px = float(values.pop("pixel_size_um", 0.5))
    return Appearance(**values), px


def held_out_cases() -> list[tuple[str, Appearance, float]]:
    """Every held-out evaluation case: (family name, appearance, pixel size um)."""
    out = []
    for name, fam in FAMILIES.items():
        for values in fam.held_out:
            v = dict(values)
            px = float(v.pop("pixel_size_um", 0.5))
            out.append((name, replace(Appearance(), **v), px))
    return out
