"""Render docs/images/appearance_families.png: one lesion drawn in each appearance family.

python3 docs/render_families.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import tifffile

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from histo.synthetic import Appearance, generate_slide  # noqa: E402

CASES = [
    ("default", Appearance(), 0.5),
    ("HER2 over the nucleus", Appearance(her2_pattern="over_nucleus"), 0.5),
    ("granular HER2", Appearance(her2_pattern="granular"), 0.5),
    ("membrane only", Appearance(her2_pattern="membrane"), 0.5),
    ("dim nuclei, Ki67 masks DAPI", Appearance(nucleus_dapi=0.3, ki67_dapi=0.3), 0.5),
    ("bright nuclei, nucleoli", Appearance(nucleus_dapi=2.0, nucleoli=True), 0.5),
    ("9-11 um cells, tight", Appearance(cell_diameter_um=(9, 11), packing=(0.7, 0.8)), 0.5),
    ("21-25 um cells, tight", Appearance(cell_diameter_um=(21, 25), packing=(0.7, 0.8)), 0.5),
    ("autofluorescence x0.05", Appearance(autofluorescence=0.05), 0.5),
    ("autofluorescence x5, uneven", Appearance(autofluorescence=5, af_unevenness=0.8), 0.5),
    ("bleed-through 25%", Appearance(bleed_through=0.25), 0.5),
    ("tumour-dense (60%)", Appearance(tumour_fraction=0.6), 0.5),
    ("8-bit", Appearance(dtype="uint8"), 0.5),
    ("dense stroma", Appearance(layout="stroma"), 0.5),
    ("liver-like", Appearance(layout="liver"), 0.5),
    ("1.0 um/px", Appearance(), 1.0),
]


def main() -> None:
    fig, axes = plt.subplots(4, 4, figsize=(12, 12.6))
    with tempfile.TemporaryDirectory() as tmp:
        for ax, (name, app, px) in zip(axes.ravel(), CASES, strict=True):
            side = int(round(512 / px))
            s = generate_slide(
                Path(tmp) / "s.ome.tif",
                size_px=(side, side),
                group="IAV",
                dpi=28,
                seed=4242,
                pixel_size_um=px,
                appearance=app,
                labels=False,
            )
            img = tifffile.imread(s.path).astype(np.float32)
            lesion = s.lesions.sort_values("n_cells").iloc[len(s.lesions) // 2]
            cy, cx, r = int(lesion.y_um / px), int(lesion.x_um / px), int(60 / px)
            crop = img[:, max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r]
            rgb = np.zeros((*crop.shape[1:], 3))
            for ch, col in ((0, (0.1, 0.4, 1)), (1, (0, 1, 0)), (2, (1, 0, 1))):
                lo, hi = np.percentile(crop[ch], (1, 99.8))
                rgb += np.clip((crop[ch] - lo) / (hi - lo + 1e-9), 0, 1)[..., None] * col
            ax.imshow(np.clip(rgb, 0, 1))
            ax.set_title(name, fontsize=10)
            ax.axis("off")
    fig.suptitle("One generator, many styles (DAPI blue, HER2 green, Ki67 magenta; 120 um)")
    fig.tight_layout()
    out = Path(__file__).parent / "images" / "appearance_families.png"
    fig.savefig(out, dpi=45)
    print(out)


if __name__ == "__main__":
    main()
