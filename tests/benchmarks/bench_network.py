"""Speed of the network on CPU: dense vs screened inference, against decoding the slide.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_network.py [--size 8192x6144] [--repeats 3] [--write]

On one generated slide (infected, dpi 15): the time to decode its full-resolution level once
(the floor), then ``lungmets run --method unet`` dense (``--no-screen``) and screened
(``--screen``, the default; and screened with ``--runtime torch``, PyTorch instead of ONNX
Runtime, with ``--runtime int8``, the 8-bit quantised export, and with ``--no-pyramid``,
reading full resolution instead of the pyramid's 1 um/px level), and the classical detector
for reference, each in its own
process (wall time and peak memory), `--repeats` times in a rotating order (no method always
runs first, on a cold disk cache, or last); medians are reported. Throughput is megapixels of
tissue (level 0) per second. The screened lesion table is compared with the dense one
(recall of the dense lesions within 1 um). Then the cost per cell: the screened run on a
control lung, the infected one and a 60-dpi lung of the same size, time per 1,000 HER2+ cells
found. Then the screen alone on held-out slides (generator seeds 90001+, never used for
training, validation or tuning the screen; infected and control lungs, with and without Ki67,
as in bench_accuracy.py): the screened and dense lesions of each (in-process, CPU), whether
the 8-bit network's lesion table is the float one's, whether reading full resolution
(``read_pyramid=False``, the path before analysis revision 13) gives the same cells, and the
share of the field the screen selects (pixels) and that the network runs on (its crops with
their context, `models.infer.crop_boxes`, counted over the whole field at once: per chunk it
is a little more). ``--write`` puts the tables into BENCHMARKS.md between the
``bench_network`` markers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    DECODE,
    HELD_OUT,
    held_out_slides,
    lesion_table,
    machine_line,
    measure,
    median_run,
    rotating,
    run_outputs,
    same_cells,
    synth_slide,
    write_section,
)


def _recall(screened, dense) -> tuple[int, int]:
    """Dense lesions that the screened pass also finds (centroids within 1 um)."""
    from histo.evaluate import match_points

    pi, _ = match_points(
        screened[["x_um", "y_um"]].to_numpy(), dense[["x_um", "y_um"]].to_numpy(), 1.0
    )
    return len(pi), len(dense)


def _screen_share(path, config) -> tuple[float, float]:
    """Share of the field the screen selects, and the share of network pixels its crops
    (with their context) cost, as a fraction of the field."""

    from histo.io import open_slide
    from histo.network import screen_mask
    from histo.pipeline import measure_background
    from models.infer import SCREEN_CONTEXT_PX, crop_boxes, to_model_input

    slide = open_slide(path)
    _, _, stain = measure_background(slide, config)
    h, w = slide.shape_px
    x = to_model_input(slide.read_region(0, 0, h, 0, w), slide.roles, stain, 2)
    d = slide.roles["DAPI"]
    m = screen_mask(x, config, nuclear_ratio=stain.nuclear[d] / stain.autofluorescence[d])
    c2 = 2 * SCREEN_CONTEXT_PX
    net_px = sum((y1 - y0 + c2) * (x1 - x0 + c2) for y0, y1, x0, x1 in crop_boxes(m))
    return float(m.mean()), net_px / m.size


def held_out_rows(size: str) -> list[str]:
    """Screened vs dense lesions, and the screen's share of the field, on held-out slides."""
    import time

    from histo.config import AnalysisConfig
    from histo.pipeline import analyze_slide

    rows = []
    tot = [0, 0]
    tot8 = totp = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (group, dpi, ki67), s in held_out_slides(Path(tmp), size):
            cfg = AnalysisConfig(method="unet", device="cpu")
            t = time.perf_counter()
            dense = analyze_slide(s.path, cfg.replace(screen=False))
            t_dense = time.perf_counter() - t
            t = time.perf_counter()
            screened = analyze_slide(s.path, cfg)
            t_scr = time.perf_counter() - t
            int8 = analyze_slide(s.path, cfg.replace(runtime="int8"))
            same8 = lesion_table(int8.lesions) == lesion_table(screened.lesions)
            tot8 += same8
            full = analyze_slide(s.path, cfg.replace(read_pyramid=False))
            m, na, nb, ki = same_cells(screened.cells, full.cells)
            samep = lesion_table(full.lesions) == lesion_table(screened.lesions)
            samep = samep and m == na == nb and ki == 0
            totp += samep
            level = screened.summary["chunks"]["read_level"]
            kept, n = _recall(screened.lesions, dense.lesions)
            tot[0] += kept
            tot[1] += n
            px, net = _screen_share(s.path, cfg)
            name = f"{seed}: {group} d{dpi}{'' if ki67 else ' no Ki67'}"
            rows.append(
                f"| {name} | {n} | {kept} ({kept / max(n, 1):.1%}) | "
                f"{len(screened.cells)} / {len(dense.cells)} | {px:.1%} | {net:.0%} | "
                f"{t_dense:.1f} / {t_scr:.1f} ({t_dense / t_scr:.2f}x) | "
                f"{'identical' if same8 else 'DIFFERENT'} | level {level}: "
                f"{'identical' if samep else f'DIFFERENT ({m} of {na}/{nb} cells, {ki} Ki67)'} |"
            )
            print(rows[-1], flush=True)
    return [
        "",
        f"Held-out slides ({size}, seeds 90001-{90000 + len(HELD_OUT)}; dense and screened "
        "`analyze_slide` in one process, CPU):",
        "",
        "| slide | dense lesions | kept by the screened pass | cells screened / dense "
        "| field screened (pixels) | network pixels (crops with context) "
        "| time dense / screened (s) | int8 lesion table "
        "| read from the pyramid vs full resolution (cells within 0.5 um, Ki67, lesions) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        *rows,
        f"| all | {tot[1]} | {tot[0]} ({tot[0] / max(tot[1], 1):.1%}) | | | | "
        f"| {tot8} of {len(rows)} identical | {totp} of {len(rows)} identical |",
    ]


def _run(slide: Path, out: Path, extra: list[str]):
    """`lungmets run` in a fresh process: ((seconds, peak GB, rc), summary, lesions)."""
    py = sys.executable
    m = measure(
        [py, "-m", "histo", "run", str(slide), "--out", str(out), "--device", "cpu", *extra]
    )
    summary, _, lesions = run_outputs(out, slide)
    return m, summary, lesions


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--held-out-size", default="4096x3072")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    methods = [
        ("unet dense", ["--method", "unet", "--no-screen"]),
        ("unet screened", ["--method", "unet", "--screen"]),
        ("unet screened, PyTorch", ["--method", "unet", "--screen", "--runtime", "torch"]),
        ("unet screened, int8", ["--method", "unet", "--screen", "--runtime", "int8"]),
        ("unet screened, full resolution", ["--method", "unet", "--screen", "--no-pyramid"]),
        ("classical", ["--method", "classical"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "lung.ome.tif"
        synth_slide(slide, args.size, seed=3)
        times: dict[str, list] = {"decode": []}
        runs = {}
        for rep, (name, extra) in rotating([("decode", None), *methods], args.repeats):
            if name == "decode":
                times["decode"].append(measure([py, "-c", DECODE, str(slide)])[:2])
                continue
            out = Path(tmp) / f"{name.replace(' ', '_')}_{rep}"
            m, summary, lesions = _run(slide, out, extra)
            times.setdefault(name, []).append(m[:2])
            runs[name] = (summary, lesions)
            print(name, rep, m, flush=True)

        def med(name):
            return median_run(times[name])

        dec = med("decode")
        # Time per 1,000 HER2+ cells: the same field with few, some and many cells.
        per_cells = []
        for group, dpi, seed in [("PBS", 15, 4), ("IAV", 15, 3), ("IAV", 60, 5)]:
            path = slide
            if (group, dpi) != ("IAV", 15):
                path = synth_slide(
                    Path(tmp) / f"lung_{group}_{dpi}.ome.tif", args.size, seed, group, dpi
                )
            m, summary, _ = _run(path, Path(tmp) / f"cells_{group}_{dpi}", ["--method", "unet"])
            per_cells.append((f"{group} {dpi} dpi", m[0], summary["counts"]["her2_cells"]))
            print(per_cells[-1], flush=True)
    tissue_mpx = runs["classical"][0]["tissue_area_mm2"] * 1e6 / 0.25 / 1e6
    dense_les = runs["unet dense"][1]
    scr_les = runs["unet screened"][1]
    kept, _ = _recall(scr_les, dense_les)
    recall = kept / max(len(dense_les), 1)
    same = lesion_table(scr_les) == lesion_table(dense_les)
    torch_les = runs["unet screened, PyTorch"][1]
    same_runtime = lesion_table(scr_les) == lesion_table(torch_les)
    same_int8 = lesion_table(scr_les) == lesion_table(runs["unet screened, int8"][1])
    full_les = runs["unet screened, full resolution"][1]
    same_full = lesion_table(scr_les) == lesion_table(full_les)
    level = runs["unet screened"][0]["chunks"].get("read_level", 0)
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/bench_network.py --size {args.size} --repeats "
        f"{args.repeats} --write` (one generated infected lung, {tissue_mpx:.0f} Mpx of tissue "
        f"at level 0; CPU; medians of {args.repeats} runs in rotating order, peak memory the "
        "largest).",
        "",
        "| | wall time (s) | peak memory (GB) | tissue Mpx/s | time / decode | lesions |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| decode level 0 once | {dec[0]:.2f} | {dec[1]:.2f} | | 1.0x | |",
    ]
    for name, _ in methods:
        sec, gb = med(name)
        lines.append(
            f"| `lungmets run` {name} | {sec:.1f} | {gb:.2f} | {tissue_mpx / sec:.2f} "
            f"| {sec / dec[0]:.1f}x | {len(runs[name][1])} |"
        )
    lines += [
        "",
        f"Screened vs dense: {recall:.1%} of the dense pass's {len(dense_les)} lesions "
        f"kept (centroids within 1 um); lesion table (cells and class of each lesion) "
        f"{'identical' if same else 'DIFFERENT'}; speed-up "
        f"{med('unet dense')[0] / med('unet screened')[0]:.2f}x.",
        "",
        "The network's forward passes run in ONNX Runtime by default on the CPU "
        "(`models.runtime`); with `--runtime torch` in PyTorch: lesion table "
        f"{'identical' if same_runtime else 'DIFFERENT'}, ONNX Runtime "
        f"{med('unet screened, PyTorch')[0] / med('unet screened')[0]:.2f}x faster. With "
        "`--runtime int8` (the export quantised to 8 bits, `models.runtime.quantize_onnx`): "
        f"lesion table {'identical' if same_int8 else 'DIFFERENT'}, "
        f"{med('unet screened')[0] / med('unet screened, int8')[0]:.2f}x faster than the "
        "float export.",
        "",
        f"The screened run read its chunks from pyramid level {level} (the area means of full "
        "resolution, `histo.io.binned_level`); with `--no-pyramid` (full resolution, "
        f"averaged here) the lesion table is {'identical' if same_full else 'DIFFERENT'}, and "
        f"the pyramid {med('unet screened, full resolution')[0] / med('unet screened')[0]:.2f}x "
        "faster.",
        "",
        f"Time per 1,000 HER2+ cells (screened run, {args.size}, one run each):",
        "",
        "| lung | HER2+ cells | wall time (s) | s per 1,000 cells |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {name} | {n} | {sec:.1f} | {1000 * sec / max(n, 1):.1f} |"
            for name, sec, n in per_cells
        ),
    ]
    if len(per_cells) >= 2 and per_cells[-1][2] != per_cells[0][2]:
        (_, s0, n0), (_, s1, n1) = per_cells[0], per_cells[-1]
        lines += [
            "",
            f"Marginal cost: {1000 * (s1 - s0) / (n1 - n0):.2f} s per 1,000 more cells "
            f"(from the {per_cells[0][0]} to the {per_cells[-1][0]} lung).",
        ]
    lines += held_out_rows(args.held_out_size)
    print("\n".join(lines))
    if args.write:
        write_section("bench_network", "Network speed (CPU)", lines)


if __name__ == "__main__":
    main()
