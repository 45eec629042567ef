"""Speed of the network on CPU: dense vs screened inference, against decoding the slide.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_network.py [--size 8192x6144] [--write]

One run on one generated slide (infected, dpi 15): the time to decode its full-resolution
level once (the floor), then ``lungmets run --method unet`` dense (``--no-screen``) and
screened (``--screen``, the default), each in its own process for its peak memory, and the
classical detector for reference. Throughput is megapixels of tissue (level 0) per second.
The screened lesion table is compared with the dense one (recall of the dense lesions within
1 um). Then the screen alone on held-out slides (generator seeds 90001+, never used for training,
validation or tuning the screen; infected and control lungs, with and without Ki67, as in
bench_accuracy.py): the screened and dense lesions of each (in-process, CPU), and the share of
the field the screen selects (pixels, and tiles the network runs on). ``--write`` puts the
tables into BENCHMARKS.md between the ``bench_network`` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    HELD_OUT,
    held_out_slides,
    machine_line,
    measure,
    synth_slide,
    write_section,
)

_DECODE = "import sys, tifffile; tifffile.imread(sys.argv[1], level=0)"


def _recall(screened, dense) -> tuple[int, int]:
    """Dense lesions that the screened pass also finds (centroids within 1 um)."""
    from histo.evaluate import match_points

    pi, _ = match_points(
        screened[["x_um", "y_um"]].to_numpy(), dense[["x_um", "y_um"]].to_numpy(), 1.0
    )
    return len(pi), len(dense)


def _screen_share(path, config) -> tuple[float, float]:
    """Share of the field the screen selects: (pixels, tiles of the screened network pass)."""
    import numpy as np

    from histo.io import open_slide
    from histo.network import screen_mask
    from histo.pipeline import measure_background
    from models.infer import to_model_input

    slide = open_slide(path)
    _, _, stain = measure_background(slide, config)
    h, w = slide.shape_px
    x = to_model_input(slide.read_region(0, 0, h, 0, w), slide.roles, stain, 2)
    d = slide.roles["DAPI"]
    m = screen_mask(x, config, nuclear_ratio=stain.nuclear[d] / stain.autofluorescence[d])
    core = 128  # the core of a screened tile (192 px with 32 px of context)
    tiles = [
        m[y : y + core, x0 : x0 + core].any()
        for y in range(0, m.shape[0], core)
        for x0 in range(0, m.shape[1], core)
    ]
    return float(m.mean()), float(np.mean(tiles))


def held_out_rows(size: str) -> list[str]:
    """Screened vs dense lesions, and the screen's share of the field, on held-out slides."""
    import time

    from histo.config import AnalysisConfig
    from histo.pipeline import analyze_slide

    rows = []
    tot = [0, 0]
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (group, dpi, ki67), s in held_out_slides(Path(tmp), size):
            cfg = AnalysisConfig(method="unet", device="cpu")
            t = time.perf_counter()
            dense = analyze_slide(s.path, cfg.replace(screen=False))
            t_dense = time.perf_counter() - t
            t = time.perf_counter()
            screened = analyze_slide(s.path, cfg)
            t_scr = time.perf_counter() - t
            kept, n = _recall(screened.lesions, dense.lesions)
            tot[0] += kept
            tot[1] += n
            px, tiles = _screen_share(s.path, cfg)
            name = f"{seed}: {group} d{dpi}{'' if ki67 else ' no Ki67'}"
            rows.append(
                f"| {name} | {n} | {kept} ({kept / max(n, 1):.1%}) | "
                f"{len(screened.cells)} / {len(dense.cells)} | {px:.1%} | {tiles:.0%} | "
                f"{t_dense:.1f} / {t_scr:.1f} ({t_dense / t_scr:.2f}x) |"
            )
            print(rows[-1], flush=True)
    return [
        "",
        f"Held-out slides ({size}, seeds 90001-{90000 + len(HELD_OUT)}; dense and screened "
        "`analyze_slide` in one process, CPU):",
        "",
        "| slide | dense lesions | kept by the screened pass | cells screened / dense "
        "| field screened (pixels) | field screened (tiles) | time dense / screened (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        f"| all | {tot[1]} | {tot[0]} ({tot[0] / max(tot[1], 1):.1%}) | | | | |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--held-out-size", default="4096x3072")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "lung.ome.tif"
        synth_slide(slide, args.size, seed=3)
        dec = measure([py, "-c", _DECODE, str(slide)])
        runs = {}
        for name, extra in [
            ("unet dense", ["--method", "unet", "--no-screen"]),
            ("unet screened", ["--method", "unet", "--screen"]),
            ("classical", ["--method", "classical"]),
        ]:
            out = Path(tmp) / name.replace(" ", "_")
            m = measure(
                [py, "-m", "histo", "run", str(slide), "--out", str(out), "--device", "cpu", *extra]
            )
            summary = json.loads((out / "lung" / "summary.json").read_text())
            lesions = pd.read_csv(out / "lung" / "lesions.csv")
            runs[name] = (m, summary, lesions)
            print(name, m, flush=True)
    tissue_mpx = runs["classical"][1]["tissue_area_mm2"] * 1e6 / 0.25 / 1e6
    dense_les = runs["unet dense"][2]
    scr_les = runs["unet screened"][2]
    kept, _ = _recall(scr_les, dense_les)
    recall = kept / max(len(dense_les), 1)
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/bench_network.py --size {args.size} --write` "
        f"(one generated infected lung, {tissue_mpx:.0f} Mpx of tissue at level 0; CPU).",
        "",
        "| | wall time (s) | peak memory (GB) | tissue Mpx/s | time / decode | lesions |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| decode level 0 once | {dec[0]:.1f} | {dec[1]:.2f} | | 1.0x | |",
    ]
    for name, (m, _, lesions) in runs.items():
        sec, gb, _ = m
        lines.append(
            f"| `lungmets run` {name} | {sec:.1f} | {gb:.2f} | {tissue_mpx / sec:.2f} "
            f"| {sec / dec[0]:.1f}x | {len(lesions)} |"
        )
    lines += [
        "",
        f"Screened vs dense: {recall:.1%} of the dense pass's {len(dense_les)} lesions "
        f"kept (centroids within 1 um); speed-up "
        f"{runs['unet dense'][0][0] / runs['unet screened'][0][0]:.2f}x.",
    ]
    lines += held_out_rows(args.held_out_size)
    print("\n".join(lines))
    if args.write:
        write_section("bench_network", "Network speed (CPU)", lines)


if __name__ == "__main__":
    main()
