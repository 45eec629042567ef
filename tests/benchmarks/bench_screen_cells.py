"""Per-cell recall of the network's screen itself, against the dense network's cells.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_screen_cells.py [--size 8192x6144] [--seed 3]

`bench_network.py` compares the screened and dense lesion tables; those agree even when the
screen misses a cell, if the cell's 192-px tile runs for a neighbour. This looks at the screen's
mask before tiling: the slide (the same generated infected lung as bench_network.py) is
analysed densely, then for every chunk the screen mask is computed as the network detector does
and each dense cell owned by the chunk is checked to lie inside it. Prints the count and the
cells outside, with their measurements.

With ``--markers-seed SEED`` (94000: bench_markers' own sections; 96000, 98000: the other sets
of ``bench_markers.py --seed``) it instead runs the screened and the dense `analyze_slide` on
every section of every Ki67 style of bench_markers (6 sections, generated into ``--data`` if
absent): cells of the dense run found by the screened one (centres within 1 um) and lesion
tables (cells and class of each lesion) that differ, per style and in all. ``--write`` puts
that table into BENCHMARKS.md (``bench_screen_styles_SEED``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import lesion_table, synth_slide  # noqa: E402


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


def screened_vs_dense(path: Path) -> tuple[int, int, bool]:
    """(dense cells, of them found by the screened run within 1 um, lesion tables equal)."""
    from scipy.spatial import cKDTree

    from histo.config import AnalysisConfig
    from histo.pipeline import analyze_slide

    dense = analyze_slide(path, AnalysisConfig(screen=False))
    screened = analyze_slide(path, AnalysisConfig())
    d = dense.cells[["x_um", "y_um"]].to_numpy()
    s = screened.cells[["x_um", "y_um"]].to_numpy()
    found = int((cKDTree(s).query(d)[0] < 1.0).sum()) if len(s) and len(d) else 0
    return len(d), found, lesion_table(dense.lesions) == lesion_table(screened.lesions)


def markers_styles(seed: int, data: Path, write: bool, size: str = "2048x2048") -> None:
    """The screen against the dense run on every section of bench_markers' styles."""
    import bench_markers
    from _common import machine_line, write_section

    bench_markers.SEED = seed
    if seed != bench_markers.PUBLISHED_SEED:
        data = data / f"seed{seed}"
    size_px = tuple(int(v) for v in size.split("x"))
    if size_px != bench_markers.SIZE_PX:  # as bench_markers keeps other sizes apart
        data = data / size
    data.mkdir(parents=True, exist_ok=True)
    rows, total = [], [0, 0, 0, 0]
    for name in bench_markers.STYLES:
        n = found = differ = 0
        paths = bench_markers.style_slides(data, name, 6, size_px)
        for path in paths:
            nd, nf, same = screened_vs_dense(path)
            n, found, differ = n + nd, found + nf, differ + (not same)
        total = [total[0] + n, total[1] + found, total[2] + differ, total[3] + len(paths)]
        rows.append(f"| {name} | {found} / {n} | {differ} of {len(paths)} |")
        print(rows[-1], flush=True)
    size_option = "" if size == "2048x2048" else f"--markers-size {size} "
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/bench_screen_cells.py --markers-seed {seed} "
        f"{size_option}--write`. bench_markers' Ki67 styles, 6 sections each (seeds "
        f"{seed}+), each analysed "
        "dense and screened (the default): the dense run's cells the screened run finds "
        "(centres within 1 um), and the sections whose lesion tables differ.",
        "",
        "| style | dense cells found screened | lesion tables different |",
        "| --- | ---: | ---: |",
        *rows,
        f"| all | {total[1]} / {total[0]} ({total[1] / max(total[0], 1):.4f}) "
        f"| {total[2]} of {total[3]} |",
    ]
    print("\n".join(lines))
    if write:
        write_section(
            f"bench_screen_styles_{seed}", "The screen against the dense run, per Ki67 style", lines
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--markers-seed", type=int, default=None)
    ap.add_argument("--markers-size", default="2048x2048", help="section size (WxH px)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/lungmets_markers"))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.markers_seed is not None:
        markers_styles(args.markers_seed, args.data, args.write, args.markers_size)
        return
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
