"""Benchmark of the whole-slide engine against the floor and against the naive approach.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_engine.py [--sizes 8192x6144,16384x12288] [--write]

For each generated slide, in one run and each in its own process (so that peak memory is that
process's own ``ru_maxrss``):

- **decode**: read the full-resolution level once with tifffile (the floor: no analysis can
  be faster than reading its input);
- **lungmets run**: the real command, default settings (chunks of 2048 px, threaded);
- **naive**: what a scientist would write: ``tifffile.imread`` of the whole level, then the same
  detector (scikit-image/scipy) on the whole array at once.

``--write`` puts the table into BENCHMARKS.md between the ``bench_engine`` markers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, measure, synth_slide, write_section  # noqa: E402

_DECODE = """
import sys, tifffile
tifffile.imread(sys.argv[1], level=0)
"""

# The naive approach: the whole level in memory, one call of the same detector.
_NAIVE = """
import sys, tifffile
from histo.config import AnalysisConfig
from histo.detect import detect_cells
from histo.io import open_slide
from histo.pipeline import measure_background
slide = open_slide(sys.argv[1])
_, _, stain = measure_background(slide, AnalysisConfig())
image = tifffile.imread(sys.argv[1], level=0)
cells = detect_cells(image, roles=slide.roles, stain=stain, pixel_size_um=slide.pixel_size_um)
print(len(cells))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8192x6144,16384x12288")
    p.add_argument(
        "--naive-limit-gb",
        type=float,
        default=20.0,
        help="address-space limit for the naive approach (this machine has 24 GB)",
    )
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = p.parse_args()
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            slide = Path(tmp) / f"lung_{size}.ome.tif"
            synth_slide(slide, size, seed=2)
            dec = measure([py, "-c", _DECODE, str(slide)])
            run = measure(
                [
                    py,
                    "-m",
                    "histo",
                    "run",
                    str(slide),
                    "--out",
                    str(Path(tmp) / "out"),
                    "--method",
                    "classical",
                ]
            )
            naive = measure([py, "-c", _NAIVE, str(slide)], limit_gb=args.naive_limit_gb)
            rows.append((size, dec, run, naive))
            print(size, dec, run, naive, flush=True)
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/bench_engine.py --sizes {args.sizes} --write` "
        "(generated infected lungs,"
        " classical detector, default chunks of 2048 px, threaded scheduler).",
        "",
        "| slide (px) | decode level 0 once: s / peak GB | `lungmets run`: s / peak GB "
        "| run / decode | naive (imread + detector): s / peak GB |",
        "| --- | --- | --- | ---: | --- |",
    ]

    def fmt(m):
        sec, gb, rc = m
        if sec is None:
            return f"failed (exit {rc}) / {gb:.2f} GB"
        return f"{sec:.1f} s / {gb:.2f} GB"

    for size, dec, run, naive in rows:
        ratio = f"{run[0] / dec[0]:.1f}x" if run[0] and dec[0] else "-"
        lines.append(f"| {size} | {fmt(dec)} | {fmt(run)} | {ratio} | {fmt(naive)} |")
    print("\n".join(lines))
    if args.write:
        write_section("bench_engine", "Whole-slide engine", lines)


if __name__ == "__main__":
    main()
