"""Where the time of a screened network run goes, stage by stage (cProfile).

Run on demand (never in CI)::

    python3 tests/benchmarks/profile_run.py [--size 8192x6144] [--method unet] [--write]

The benchmark slide of ``bench_network.py`` (generated infected lung, dpi 15, seed 3) is
analysed by the library's own functions in the order `histo.pipeline.iter_analyze_slide`
calls them, but one chunk after the other in this process (Dask's threads would hide the
chunks from the profiler): `measure_background`, every chunk's `_chunk_task` (read, network,
measurements), `marker_thresholds`, `group_lesions`, `write_result_folder`. Torch uses every
core, as one task of the local scheduler does when the chunks run in threads of one process.
Each stage's time is the cumulative time of the functions named in the table (inclusive,
so "network forward" is inside "network: tiling and batches"); "measurements" is what the
chunk's detector spends outside input, screen, network, peaks and cell regions. The same slide
is also decoded once and run through `lungmets run` (a fresh process) in the same run, so the
stages can be read against both. ``--write`` puts the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DECODE, machine_line, measure, synth_slide, write_section  # noqa: E402

#: (stage, (file suffix, function name) whose cumulative time it is, or None: computed).
STAGES = [
    ("tissue mask and stain levels", ("histo/pipeline.py", "measure_background")),
    ("chunks (all of the below)", ("histo/pipeline.py", "_chunk_task")),
    ("read chunk pixels", ("histo/io.py", "read_region")),
    ("detector, whole", ("histo/network.py", "detect_cells_unet")),
    ("input at model resolution", ("models/infer.py", "to_model_input")),
    ("screen", ("histo/network.py", "screen_mask")),
    ("network: tiling and batches", ("models/infer.py", "predict_maps")),
    # PyTorch's forward, or ONNX Runtime's session (`models.runtime.OnnxNet.run`, the CPU
    # default).
    ("network forward", (("models/unet.py", "forward"), ("models/runtime.py", "run"))),
    ("peaks (cells from maps)", ("models/infer.py", "cells_from_maps")),
    ("cell regions (watershed)", ("skimage/segmentation/_watershed.py", "watershed")),
    ("measurements", None),
    (
        "marker thresholds, bleed-through, autofluorescence",
        ("histo/pipeline.py", "marker_thresholds"),
    ),
    ("lesions (linking)", ("histo/lesions.py", "group_lesions")),
    ("summary (input checksum)", ("histo/pipeline.py", "_summary")),
    ("writing the results", ("histo/outputs.py", "write_result_folder")),
]


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of the functions `name` in files ending with `suffix`."""
    total = 0.0
    for (file, _, func), (_, _, _, ct, _) in stats.stats.items():
        if func == name and file.replace("\\", "/").endswith(suffix):
            total += ct
    return total


def profile_slide(path: Path, method: str, out: Path):
    """Analyse `path` stage by stage under cProfile; (wall seconds, stage -> seconds, cells,
    the `pstats.Stats`)."""
    from histo import pipeline
    from histo.chunks import plan_chunks
    from histo.config import AnalysisConfig
    from histo.io import open_slide
    from histo.lesions import group_lesions
    from histo.outputs import write_result_folder

    config = AnalysisConfig(method=method)
    # Once per process, not per slide (a batch pays it once): imports and the model's weights.
    t_setup = time.perf_counter()
    import skimage.segmentation  # noqa: F401

    if method == "unet":
        from models import load_model

        # What the chunks' forward passes run in (ONNX Runtime on the CPU: no PyTorch).
        load_model(config.model_path, config.device).inference_net(0, config.runtime)
    t_setup = time.perf_counter() - t_setup
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    slide = open_slide(path)
    mask, mask_px, stain = pipeline.measure_background(slide, config)
    if method == "unet":
        from models import model_config

        halo_um = float(model_config(None).get("halo_um", 0.0))
        config = config.replace(
            halo_px=max(config.halo_px, int(-(-halo_um // slide.pixel_size_um)))
        )
    chunks = plan_chunks(
        slide.shape_px,
        config.chunk_size_px,
        config.halo_px,
        tissue=mask,
        tissue_downsample=mask_px / slide.pixel_size_um,
    )
    level = pipeline._read_level(slide, config, chunks, stain)
    parts = [pipeline._chunk_task(str(path), None, None, level, c, config, stain) for c in chunks]
    import pandas as pd

    cells = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    markers, cells = pipeline.marker_thresholds(slide, mask, mask_px, stain, config, cells)
    from histo.markers import apply_thresholds

    cells = apply_thresholds(cells, markers)
    cells, lesions = group_lesions(cells, config)
    tissue_mm2 = float(mask.sum() * mask_px**2 * 1e-6)
    plan = {"analysed": len(chunks), "total": len(chunks), "read_level": level}
    summary = pipeline._summary(slide, config, stain, cells, lesions, tissue_mm2, plan, "profile")
    summary["markers"] = {m: t.to_dict() for m, t in markers.items()}
    result = pipeline.AnalysisResult(
        slide_path=Path(path),
        cells=cells,
        lesions=lesions,
        summary=summary,
        tissue_mask=mask,
        tissue_pixel_size_um=mask_px,
    )
    write_result_folder(result, out)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    stages = {}
    for stage, where in STAGES:
        if where is not None:
            places = where if isinstance(where[0], tuple) else (where,)
            stages[stage] = sum(_cumulative(stats, *w) for w in places)
    if method == "unet":
        inner = (
            "input at model resolution",
            "screen",
            "network: tiling and batches",
            "peaks (cells from maps)",
            "cell regions (watershed)",
        )
        stages["measurements"] = stages["detector, whole"] - sum(stages[k] for k in inner)
    stages["(before: imports and model, once per process)"] = t_setup
    return wall, stages, len(cells), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--method", default="unet", choices=("unet", "classical"))
    ap.add_argument("--top", type=int, default=0, help="also print the N costliest functions")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        slide = synth_slide(Path(tmp) / "bench.ome.tif", args.size, seed=3)
        decode, _, _ = measure([sys.executable, "-c", DECODE, str(slide)])
        cmd = [sys.executable, "-m", "histo", "run", str(slide), "--out", str(Path(tmp) / "cli")]
        cli, cli_gb, rc = measure(cmd + ["--method", args.method])
        if rc != 0:
            raise SystemExit(f"lungmets run failed (exit {rc})")
        wall, stages, n_cells, stats = profile_slide(slide, args.method, Path(tmp) / "profiled")
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/profile_run.py --size {args.size} --method "
        f"{args.method} --write` (generated infected lung, dpi 15, seed 3; chunks one after "
        f"the other under cProfile, the network on every core). In the same run: decoding level 0 "
        f"once {decode:.1f} s; `lungmets run --method {args.method}` (Dask threads, fresh "
        f"process) {cli:.1f} s = {cli / decode:.1f}x the decode, peak {cli_gb:.2f} GB; "
        f"profiled stage by stage {wall:.1f} s (cProfile adds its own overhead), "
        f"{n_cells} HER2+ cells.",
        "",
        "| stage | seconds | share of the profiled run | x decode |",
        "| --- | ---: | ---: | ---: |",
    ]
    for stage in [s for s, _ in STAGES] + ["(before: imports and model, once per process)"]:
        if stage not in stages:
            continue
        s = stages[stage]
        lines.append(f"| {stage} | {s:.1f} | {s / wall:.0%} | {s / decode:.1f} |")
    print("\n".join(lines))
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)
    if args.write:
        write_section("profile_run", "Where the time of a run goes (profile)", lines)


if __name__ == "__main__":
    main()
