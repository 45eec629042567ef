"""What a new user waits for: ``lungmets demo`` and the napari sample data, timed.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_demo.py [--write]

``lungmets demo`` (the README's first command, after the install) runs in a fresh process in an
empty folder: wall time and peak memory, and the headline it reports (the infected/control fold
change of HER2+ cells per mm² at each time point, read back from the report's ``stats.csv``).
Then the napari plugin's sample data (File > Open Sample) is generated into an empty cache, in a
fresh process: seconds per slide. ``--write`` puts the table into BENCHMARKS.md between the
``bench_demo`` markers; ``run_all.py`` quotes it in the README.
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

# Generates each sample slide into an empty cache, timing it inside the process (so the
# interpreter's start and the imports are not counted).
_SAMPLE = """
import json, os, sys, time
os.environ["LUNGMETS_CACHE"] = sys.argv[1]
from napari_plugin._sample_data import sample_slide_path
out = {}
for group in ("IAV", "PBS"):
    t = time.perf_counter()
    sample_slide_path(group)
    out[group] = time.perf_counter() - t
print(json.dumps(out))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lungmets_demo"
        seconds, peak_gb, rc = measure([sys.executable, "-m", "histo", "demo", "--out", str(out)])
        if seconds is None:
            raise SystemExit(f"lungmets demo failed (exit {rc})")
        stats = pd.read_csv(out / "report" / "stats.csv")
        her2 = stats[stats["metric"] == "her2_cells_per_mm2"].sort_values("dpi")
        n_slides = len(pd.read_csv(out / "cohort" / "samples.csv"))
        sample = json.loads(
            subprocess.run(
                [sys.executable, "-c", _SAMPLE, str(Path(tmp) / "cache")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    lines = [
        machine_line(),
        "Command: `python3 tests/benchmarks/bench_demo.py --write` (fresh processes, empty "
        "output folder and cache; the install not counted).",
        "",
        "| step | wall time (s) | peak memory (GB) |",
        "| --- | ---: | ---: |",
        f"| `lungmets demo` ({n_slides} slides generated, analysed and reported) "
        f"| {seconds:.0f} | {peak_gb:.2f} |",
        *(f"| napari sample data, {g} slide | {s:.1f} | |" for g, s in sample.items()),
        "",
        "The demo's headline, HER2+ cells per mm² (mouse = unit):",
        "",
        "| dpi | infected (mean) | control (mean) | fold change | 95% CI |",
        "| ---: | ---: | ---: | ---: | --- |",
        *(
            f"| {r.dpi} | {r.mean:.1f} | {r.mean_control:.1f} | {r.fold_change:.1f}x "
            f"| {r.fold_change_ci_low:.1f}-{r.fold_change_ci_high:.1f} |"
            for r in her2.itertuples()
        ),
    ]
    print("\n".join(lines))
    if args.write:
        write_section("bench_demo", "What a new user waits for", lines)


if __name__ == "__main__":
    main()
