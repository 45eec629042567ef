"""Accuracy of the detectors against the generator's truth on held-out slides.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_accuracy.py [--size 4096x3072] [--write]

The slides use generator seeds 90001+ (never used for tuning or training), infected and control
lungs at several days post infection, with and without the Ki67 channel. Lesions are matched
by centroid within 6 um (half the lesion radius for large foci) and must have the same class;
cells within 5 um. Counts are pooled over all slides. ``--write`` puts the table into
BENCHMARKS.md between the ``bench_accuracy`` markers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from histo.config import AnalysisConfig
from histo.evaluate import CLASSES, evaluate_cells, evaluate_lesions
from histo.pipeline import analyze_slide

sys.path.insert(0, str(Path(__file__).parent))
from _common import HELD_OUT, ROOT, held_out_slides, machine_line, write_section  # noqa: E402


def _f1(tp, n_pred, n_truth):
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_truth if n_truth else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _perturbed(s, name: str, tmp: Path):
    """A copy of slide `s` with HER2 and DAPI scaled (``scaleF``; the reference levels scale
    with them, so this checks that they do, not robustness) or its noise's standard deviation
    multiplied (``noiseF``)."""
    import dataclasses

    import numpy as np
    import tifffile

    from histo.io import pyramid_levels, write_ome_tiff

    img = tifffile.imread(s.path).astype(np.float32)
    off = s.meta["stain"]["offset"]
    if name.startswith("scale"):
        f = float(name[5:])
        img[:2] = off + (img[:2] - off) * f
    elif name.startswith("noise"):
        # The slide's own noise (shot noise at the generator's middle gain, 1.8 electrons per
        # count (it draws 1.2-2.5), and its read noise) times F: independent noise of
        # sqrt(F^2 - 1) times that standard deviation is added.
        f = float(name[5:])
        rng = np.random.default_rng(0)
        read = s.meta["stain"]["read_noise"]
        sd = np.sqrt(np.clip(img - off, 0, None) / 1.8 + read**2)
        img += rng.normal(0, 1, img.shape).astype(np.float32) * sd * np.sqrt(f**2 - 1)
    else:
        raise ValueError(name)
    out = tmp / f"{s.path.name[:-8]}_{name}.ome.tif"
    data = np.clip(np.rint(img), 0, 65535).astype(np.uint16)
    write_ome_tiff(
        out,
        pyramid_levels(data),
        channel_names=s.meta["channels"],
        pixel_size_um=s.meta["pixel_size_um"],
    )
    return dataclasses.replace(s, path=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4096x3072")
    ap.add_argument("--methods", default="classical,unet")
    ap.add_argument(
        "--perturb",
        default="none,scale0.5,scale2,noise2",
        help="variants: HER2 and DAPI scaled (scaleF), or the noise's standard deviation "
        "multiplied (noiseF)",
    )
    ap.add_argument("--model", default=None, help="network weights (default: the shipped ones)")
    ap.add_argument(
        "--sample-data",
        action="store_true",
        help="score the two bundled sample slides (sample_data/) instead of held-out ones",
    )
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.sample_data:
            from histo.synthetic import load_truth

            slides = [load_truth(p) for p in sorted((ROOT / "sample_data").glob("*.ome.tif"))]
        else:
            slides = [s for _, _, s in held_out_slides(Path(tmp), args.size)]
        variants = {}
        for name in args.perturb.split(","):
            variants[name] = (
                slides if name == "none" else [_perturbed(s, name, Path(tmp)) for s in slides]
            )
        for name, method in [(v, m) for v in variants for m in args.methods.split(",")]:
            slides_v = variants[name]
            lesion_tot = {c: [0, 0, 0] for c in (*CLASSES, "all")}
            cell_tot = [0, 0, 0]
            n_pred = n_truth = ki_pred = ki_truth = 0
            t0 = time.perf_counter()
            for s in slides_v:
                r = analyze_slide(s.path, AnalysisConfig(method=method, model_path=args.model))
                le = evaluate_lesions(r.lesions, s.lesions)
                for c in lesion_tot:
                    lesion_tot[c][0] += int(le.loc[c, "tp"])
                    lesion_tot[c][1] += int(le.loc[c, "n_pred"])
                    lesion_tot[c][2] += int(le.loc[c, "n_truth"])
                ce = evaluate_cells(r.cells, s.cells)
                cell_tot[0] += ce["tp"]
                cell_tot[1] += ce["n_pred"]
                cell_tot[2] += ce["n_truth"]
                n_pred += len(r.cells)
                n_truth += len(s.cells)
                if s.meta["spec"]["ki67"]:
                    ki_pred += int(r.cells["ki67_pos"].sum())
                    ki_truth += int(s.cells["ki67_pos"].sum())
            seconds = time.perf_counter() - t0
            row = {"method": f"{method} ({name})" if name != "none" else method}
            for c, (tp, npred, ntruth) in lesion_tot.items():
                p, rc, f = _f1(tp, npred, ntruth)
                row[f"{c} P/R/F1 (n)"] = f"{p:.3f} / {rc:.3f} / {f:.3f} ({ntruth})"
            p, rc, f = _f1(*cell_tot)
            row["HER2+ cells P/R/F1"] = f"{p:.3f} / {rc:.3f} / {f:.3f}"
            row["HER2+ count error"] = f"{(n_pred - n_truth) / n_truth:+.1%}"
            row["Ki67+ count error"] = f"{(ki_pred - ki_truth) / max(ki_truth, 1):+.1%}"
            row["time (s)"] = f"{seconds:.0f}"
            rows.append(row)
            print(row, flush=True)
    df = pd.DataFrame(rows).set_index("method").T
    lines = [
        machine_line(),
        f"Command: `python3 tests/benchmarks/bench_accuracy.py --size {args.size} "
        f"--methods {args.methods} --perturb {args.perturb}"
        + (f" --model {args.model}" if args.model else "")
        + (
            " --sample-data --write`; the two bundled sample slides."
            if args.sample_data
            else " --write`; "
        )
        + (
            ""
            if args.sample_data
            else f"{len(HELD_OUT)} held-out slides (seeds 90001-{90000 + len(HELD_OUT)}): "
            + ", ".join(f"{g} d{d}{'' if k else ' no Ki67'}" for g, d, k in HELD_OUT)
            + "."
        ),
        "",
        "| | " + " | ".join(df.columns) + " |",
        "| --- |" + " --- |" * len(df.columns),
        *(
            "| " + idx + " | " + " | ".join(str(v) for v in vals) + " |"
            for idx, vals in zip(df.index, df.to_numpy(), strict=True)
        ),
    ]
    print("\n".join(lines))
    if args.write and args.sample_data:
        write_section("bench_accuracy_sample", "Detector accuracy on the sample data", lines)
    elif args.write:
        write_section("bench_accuracy", "Detector accuracy", lines)


if __name__ == "__main__":
    main()
