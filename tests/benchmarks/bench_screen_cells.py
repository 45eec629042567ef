"""Per-cell recall of the network's screen itself, against the dense network's cells.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_screen_cells.py [--size 8192x6144] [--seed 3]

`bench_network.py` compares the screened and dense lesion tables; those agree even when the
screen misses a cell, if the cell's 192-px tile runs for a neighbour. This looks at the screen's
mask before tiling: the slide (the same generated infected lung as bench_network.py) is
analysed densely, then for every chunk the screen mask is computed as the network detector does
and each dense cell owned by the chunk is checked to lie inside it. Prints the count and the
cells outside, with their measurements.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import synth_slide  # noqa: E402


def screen_recall(path: Path):
    """(dense cells, boolean array: centre inside the screen mask)."""
    from histo.chunks import plan_chunks
    from histo.config import AnalysisConfig
    from histo.io import open_slide
    from histo.network import model_factor, screen_mask
    from histo.pipeline import analyze_slide, measure_background
    from models import model_config
    from models.infer import block_mean, to_model_input

    cfg = AnalysisConfig(device="cpu")
    dense = analyze_slide(path, cfg.replace(screen=False)).cells
    slide = open_slide(path)
    _, _, stain = measure_background(slide, cfg)
    d = slide.roles["DAPI"]
    nuclear_ratio = stain.nuclear[d] / stain.autofluorescence[d]
    um = model_config(None)["input_um_per_px"]
    factor = model_factor(um, slide.pixel_size_um)
    px = slide.pixel_size_um
    y = dense["y_um"].to_numpy() / px
    x = dense["x_um"].to_numpy() / px
    inside = np.zeros(len(dense), bool)
    for chunk in plan_chunks(slide.shape_px, cfg.chunk_size_px, cfg.halo_px):
        own = np.flatnonzero(chunk.owns(y, x))
        if len(own) == 0:
            continue
        y0, y1, x0, x1 = chunk.read
        pixels = slide.read_region(0, y0, y1, x0, x1)
        blocks = {i: block_mean(pixels[i], factor) for i in sorted(set(slide.roles.values()))}
        inp = to_model_input(pixels, slide.roles, stain, factor, blocks=blocks)
        mask = screen_mask(inp, cfg, nuclear_ratio=nuclear_ratio, model_um_per_px=um)
        my = np.clip(
            np.rint((y[own] - y0 - (factor - 1) / 2) / factor).astype(int), 0, mask.shape[0] - 1
        )
        mx = np.clip(
            np.rint((x[own] - x0 - (factor - 1) / 2) / factor).astype(int), 0, mask.shape[1] - 1
        )
        inside[own] = mask[my, mx]
    return dense, inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        slide = synth_slide(Path(tmp) / "lung.ome.tif", args.size, seed=args.seed)
        dense, inside = screen_recall(slide)
    print(
        f"{args.size} infected slide (seed {args.seed}): {inside.sum()} of {len(dense)} dense "
        f"cells ({inside.mean():.2%}) have their centre inside the screen mask"
    )
    cols = ["x_um", "y_um", "her2_mean", "her2_ratio", "dapi_mean", "ki67_mean", "centre_prob"]
    print(dense.loc[~inside, cols].to_string())


if __name__ == "__main__":
    main()
