"""Speed of the network on CPU: dense vs screened inference, against decoding the slide.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_network.py [--size 8192x6144] [--write]

One run on one generated slide (infected, dpi 15): the time to decode its full-resolution
level once (the floor), then ``lungmets run --method unet`` dense (``--no-screen``) and
screened (``--screen``, the default), each in its own process for its peak memory, and the
classical detector for reference. Throughput is megapixels of tissue (level 0) per second.
The screened lesion table is compared with the dense one (recall of the dense lesions within
1 um). ``--write`` puts the table into BENCHMARKS.md between the ``bench_network`` markers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, measure, write_section  # noqa: E402

_DECODE = "import sys, tifffile; tifffile.imread(sys.argv[1], level=0)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    from histo.evaluate import match_points

    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "lung.ome.tif"
        subprocess.run(
            [
                py,
                "-m",
                "histo",
                "synth",
                "slide",
                str(slide),
                "--size",
                args.size,
                "--group",
                "IAV",
                "--dpi",
                "15",
                "--seed",
                "3",
                "--no-labels",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
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
    pi, _ = match_points(
        scr_les[["x_um", "y_um"]].to_numpy(), dense_les[["x_um", "y_um"]].to_numpy(), 1.0
    )
    recall = len(pi) / max(len(dense_les), 1)
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
    print("\n".join(lines))
    if args.write:
        write_section("bench_network", "Network speed (CPU)", lines)


if __name__ == "__main__":
    main()
