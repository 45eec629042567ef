"""The slide's reference levels against the autofluorescence the generator drew.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_reference_levels.py [--sections 6] [--write]

Every threshold of lungmets, and the network's input, is relative to each channel's reference
level (`histo.pipeline.measure_background`, `histo.tissue.stain_levels`): the autofluorescence
of the alveolar walls. The generator knows what it drew (``slide.json``: autofluorescence times
the channel's gain), so the reference can be scored: measured / drawn, per channel, on the
sections of every case of ``bench_generalisation.py`` (the same slides, generated there if
missing) and of the bright autofluorescence style of ``bench_markers.py``. The walls are drawn
at the level times a texture and the scanner's illumination (0.8-1.1) and, on an uneven
section, times a field that varies several-fold from place to place, so 1 is the aim and
0.7-1.3 is as close as it gets. Cases in another dynamic range (8/12-bit, float) are left out:
their drawn levels are rescaled by the file's range. On near-zero autofluorescence the walls are
at the camera's noise (a few counts): there DAPI and Ki67 references stand far above the drawn
level (the figure to read there is HER2's, which `histo.tissue.HOST_NUCLEI_MULTIPLE` bounds).
``--write`` puts the table into BENCHMARKS.md between the ``bench_reference_levels`` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from histo.config import AnalysisConfig
from histo.io import open_slide
from histo.pipeline import measure_background
from histo.synthetic._appearance import Appearance, held_out_cases

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, write_section  # noqa: E402
from bench_generalisation import SECTIONS, case_name, case_slides  # noqa: E402
from bench_markers import style_slides  # noqa: E402

CHANNELS = ("DAPI", "HER2", "Ki67")


def ratios(path: Path) -> np.ndarray:
    """Measured / drawn reference level of each channel of one generated slide."""
    meta = json.loads(
        (path.parent / path.name.replace(".ome.tif", ".truth") / "slide.json").read_text()
    )
    st = meta["stain"]
    drawn = np.array([st["autofluorescence"][c] * st["gain"][c] for c in CHANNELS])
    _, _, stain = measure_background(open_slide(path), AnalysisConfig())
    return np.asarray(stain.autofluorescence) / drawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/lungmets_generalisation"))
    ap.add_argument("--markers-data", type=Path, default=Path("/tmp/lungmets_markers"))
    ap.add_argument("--sections", type=int, default=6, choices=range(1, len(SECTIONS) + 1))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    args.markers_data.mkdir(parents=True, exist_ok=True)
    cases = [("default", Appearance(), 0.5), *held_out_cases()]
    rows = []
    for index, (family, app, px) in enumerate(cases):
        if app.dtype != "uint16":
            continue
        paths = case_slides(args.data, index, app, px, args.sections)
        rows.append((case_name(family, app, px), np.array([ratios(p) for p in paths])))
        print(_row(*rows[-1]), flush=True)
    name = "autofluorescence 4"
    paths = style_slides(args.markers_data, name, args.sections)
    rows.append((f"bench_markers: {name}", np.array([ratios(p) for p in paths])))
    print(_row(*rows[-1]), flush=True)
    worst = max(
        (r for r in rows if "autofluorescence=0.05" not in r[0]),
        key=lambda r: float(np.abs(np.log(r[1])).max()),
    )
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/bench_reference_levels.py --sections "
        f"{args.sections} --write`. Measured / drawn reference level (walls' autofluorescence) "
        f"per channel, lowest and highest over {args.sections} sections per case (the sections "
        "of bench_generalisation and, last, of bench_markers' 4x autofluorescence style).",
        "",
        "| case | DAPI | HER2 | Ki67 |",
        "| --- | --- | --- | --- |",
        *[_row(n, r) for n, r in rows],
        "",
        f"Farthest from the drawn level (near-zero autofluorescence aside): {worst[0]} "
        f"({_range(worst[1]).replace(' | ', ', ')}).",
    ]
    if args.write:
        write_section("bench_reference_levels", "Reference levels against the drawn ones", lines)


def _range(r: np.ndarray) -> str:
    return " | ".join(f"{r[:, i].min():.2f}-{r[:, i].max():.2f}" for i in range(r.shape[1]))


def _row(name: str, r: np.ndarray) -> str:
    return f"| {name} | {_range(r)} |"


if __name__ == "__main__":
    main()
