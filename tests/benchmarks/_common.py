"""Shared helpers of the benchmark scripts: measuring a command, writing BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _short_name(weights_file: str) -> str:
    """A model's short name in the tables: "v5" for ``lungmets_unet_v5.pt``."""
    return Path(weights_file).stem.rsplit("_", 1)[-1]


def _shipped() -> tuple[str, str, str]:
    from models import DEFAULT_MODEL, model_config

    parent = model_config(DEFAULT_MODEL)["fine_tuned_from"]
    return _short_name(DEFAULT_MODEL.name), _short_name(parent), f"models/weights/{parent}"


#: The shipped network's short name in the tables, and the one it was fine-tuned from (its
#: JSON's ``fine_tuned_from``), shown beside it where a table compares them, with its path.
SHIPPED, PREVIOUS, PREVIOUS_PT = _shipped()

# Runs a command as its child and reports its exit code, wall time and peak resident memory.
_CHILD = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
dt = time.perf_counter() - t
print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def measure(cmd: list[str], limit_gb: float | None = None) -> tuple[float | None, float, int]:
    """Run `cmd` in a fresh process: (seconds, or None if it failed; peak RSS in GB; exit code).

    With `limit_gb`, the command runs under that address-space limit (``prlimit --as``).
    """
    pre = ["prlimit", f"--as={int(limit_gb * 1024**3)}"] if limit_gb else []
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *pre, *cmd], capture_output=True, text=True, check=True
    ).stdout.split()
    rc, seconds, rss = int(out[0]), float(out[1]), int(out[2]) / 1024**2
    return (seconds if rc == 0 else None), rss, rc


#: A fresh process that decodes a slide's full-resolution level once: the floor of a run.
DECODE = "import sys, tifffile; tifffile.imread(sys.argv[1], level=0)"


def rotating(items: list, repeats: int):
    """(repeat, item) for every item in every repeat, the order rotated by one each repeat,
    so that no item always runs first (on a cold disk cache) or last."""
    for rep in range(repeats):
        k = rep % len(items)
        for item in items[k:] + items[:k]:
            yield rep, item


def median_run(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """(median seconds, largest peak GB) of `measure` results (seconds, GB)."""
    import statistics

    return statistics.median(t for t, _ in runs), max(gb for _, gb in runs)


def run_outputs(out: Path, slide: Path):
    """(summary dict, cells, lesions) that `lungmets run SLIDE --out OUT` wrote."""
    import json

    import pandas as pd

    folder = Path(out) / Path(slide).name.split(".")[0]
    return (
        json.loads((folder / "summary.json").read_text()),
        pd.read_csv(folder / "cells.csv"),
        pd.read_csv(folder / "lesions.csv"),
    )


def machine_line() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GB, Python "
        f"{platform.python_version()} ({time.strftime('%Y-%m-%d')})."
    )


#: Environment variable naming the file the benchmarks write into instead of BENCHMARKS.md
#: (``run_all.py --quick`` points it at a copy, so quick figures never replace published ones).
BENCHMARKS_ENV = "LUNGMETS_BENCHMARKS_MD"


def benchmarks_path() -> Path:
    """The file `write_section` writes: ``$LUNGMETS_BENCHMARKS_MD``, else BENCHMARKS.md."""
    return Path(os.environ.get(BENCHMARKS_ENV) or ROOT / "BENCHMARKS.md")


def write_section(key: str, title: str, lines: list[str]) -> str:
    """Put `lines` into BENCHMARKS.md between the markers of `key` (a new section if absent)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    table = "\n".join([start, *lines, end])
    path = benchmarks_path()
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        text = text[: text.index(start)] + table + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + table + "\n"
    path.write_text(text)
    return table


#: Held-out generated slides (group, dpi, Ki67 imaged), seeds 90001 on: never used for
#: training, validation or tuning the screen.
HELD_OUT = [
    ("IAV", 9, True),
    ("IAV", 15, True),
    ("IAV", 28, True),
    ("IAV", 15, False),
    ("PBS", 15, True),
    ("PBS", 28, False),
]
HELD_OUT_SEED = 90001


def held_out_slides(folder: Path, size: str):
    """Generate the `HELD_OUT` slides (``WxH``) into `folder`; yields (seed, spec, slide)."""
    from histo.synthetic import generate_slide

    w, h = (int(v) for v in size.split("x"))
    for i, (group, dpi, ki67) in enumerate(HELD_OUT):
        s = generate_slide(
            Path(folder) / f"held_{i}.ome.tif",
            size_px=(w, h),
            group=group,
            dpi=dpi,
            seed=HELD_OUT_SEED + i,
            ki67=ki67,
            labels=False,
        )
        yield HELD_OUT_SEED + i, (group, dpi, ki67), s


def lesion_table(lesions) -> list:
    """A lesion table as what must agree between two runs: (cells, class) of each lesion."""
    return sorted(zip(lesions["n_cells"], lesions["class"], strict=True))


def same_cells(a, b, distance_um: float = 0.5) -> tuple[int, int, int, int]:
    """Two runs' cell tables cell by cell: (cells matched one to one within `distance_um`,
    len(a), len(b), matched cells with another Ki67 call; calls missing without a Ki67
    channel count as negative in both)."""
    from histo.evaluate import match_points

    pi, ti = match_points(
        a[["x_um", "y_um"]].to_numpy(), b[["x_um", "y_um"]].to_numpy(), distance_um
    )
    ka, kb = (t["ki67_pos"].astype("boolean").fillna(False).to_numpy(bool) for t in (a, b))
    return len(pi), len(a), len(b), int((ka[pi] != kb[ti]).sum())


def synth_slide(path: Path, size: str, seed: int, group: str = "IAV", dpi: int = 15) -> Path:
    """A slide (infected, dpi 15 by default) written by the real ``lungmets synth slide``."""
    cmd = [sys.executable, "-m", "histo", "synth", "slide", str(path), "--size", size]
    cmd += ["--group", group, "--dpi", str(dpi), "--seed", str(seed), "--no-labels"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path
