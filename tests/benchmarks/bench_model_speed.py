"""Speed of the default screened run with one network or another, against decoding the slide.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_model_speed.py --models v1=PATH,v2=PATH [--size 8192x6144] \\
        [--repeat 2] [--write]

One generated infected slide (dpi 15, seed 3, as in bench_network.py); in one run and in
separate processes, alternating the models so that neither gets a warmer machine: decoding its
full-resolution level once (the floor), then ``lungmets run`` (screened network, the
default) with each model. Reported: median seconds, peak memory, the ratio to the decode, and
the HER2+ cells each model found. ``--write`` puts the table into BENCHMARKS.md between the
``bench_model_speed`` markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DECODE, machine_line, measure, synth_slide, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="NAME=PATH,... ('default': shipped)")
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    models = dict(item.split("=", 1) for item in args.models.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        slide = synth_slide(Path(tmp) / "bench.ome.tif", args.size, seed=3)
        times = {"decode": [], **{m: [] for m in models}}
        rss = dict.fromkeys(times, 0.0)
        cells = {}
        for _ in range(args.repeat):
            t, r, _ = measure([sys.executable, "-c", DECODE, str(slide)])
            times["decode"].append(t)
            rss["decode"] = max(rss["decode"], r)
            for name, path in models.items():
                out = Path(tmp) / name
                cmd = [sys.executable, "-m", "histo", "run", str(slide), "--out", str(out)]
                cmd += ["--force"] + ([] if path == "default" else ["--model", path])
                t, r, rc = measure(cmd)
                if rc != 0:
                    raise SystemExit(f"{name}: lungmets run failed (exit {rc})")
                times[name].append(t)
                rss[name] = max(rss[name], r)
                summary = json.loads((out / "bench" / "summary.json").read_text())
                cells[name] = summary["counts"]["her2_cells"]
    decode = statistics.median(times["decode"])
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/bench_model_speed.py --models {args.models} "
        f"--size {args.size} --repeat {args.repeat} --write`; medians of {args.repeat} runs, "
        "models alternating in one run.",
        "",
        "| | seconds | x decode | peak memory (GB) | HER2+ cells |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| decode level 0 | {decode:.1f} | 1.0 | {rss['decode']:.2f} | |",
    ]
    for name in models:
        t = statistics.median(times[name])
        lines.append(
            f"| lungmets run, {name} | {t:.1f} | {t / decode:.1f} | {rss[name]:.2f} "
            f"| {cells[name]} |"
        )
    print("\n".join(lines))
    if args.write:
        write_section("bench_model_speed", "Network speed by model (screened run)", lines)


if __name__ == "__main__":
    main()
