"""Nuclei detection on a real fluorescence image with manual ground truth.

Run on demand (never in CI)::

    python3 -m pip install --no-deps --target /tmp/stardist_data stardist==0.9.2
    python3 tests/benchmarks/bench_real_nuclei.py --stardist /tmp/stardist_data [--write]

The image and its human-annotated instance mask ship inside the ``stardist`` wheel
(``stardist/data/images/img2d.tif`` and ``mask2d.tif``: 512 x 512, 125 nuclei, from the 2018
Data Science Bowl, BBBC038). They are read as files; stardist itself is not imported. Detections
match annotations at IoU >= 0.5 (one-to-one); F1 is reported for lungmets' classical nuclei
segmentation (`histo.detect.segment_nuclei`). The pixel size is not published; 0.35 um/px (a
median nucleus of 24 px is about 8 um) is assumed.

The network (`--method unet`) outputs HER2+ cancer-cell nuclei only, not every nucleus, so it
cannot be scored on a DAPI-only image of ordinary nuclei.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, write_section  # noqa: E402


def iou_f1(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Instance F1 at IoU 0.5 (a match above 0.5 is necessarily one-to-one)."""
    p_ids = np.unique(pred)[1:]
    t_ids = np.unique(truth)[1:]
    # Pixel overlaps of every (pred, truth) pair, from a joint histogram.
    joint = np.bincount(
        pred.ravel().astype(np.int64) * (truth.max() + 1) + truth.ravel(),
        minlength=(pred.max() + 1) * (truth.max() + 1),
    )
    joint = joint.reshape(pred.max() + 1, truth.max() + 1)
    area_p = joint.sum(axis=1)
    area_t = joint.sum(axis=0)
    inter = joint[np.ix_(p_ids, t_ids)]
    union = area_p[p_ids, None] + area_t[None, t_ids] - inter
    iou = inter / np.maximum(union, 1)
    tp = int((iou > 0.5).sum())
    precision = tp / max(len(p_ids), 1)
    recall = tp / max(len(t_ids), 1)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {
        "n_pred": len(p_ids),
        "n_truth": len(t_ids),
        "tp": tp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stardist",
        default="/tmp/stardist_data",
        help="folder where stardist==0.9.2 was installed with --no-deps --target",
    )
    ap.add_argument("--pixel-size-um", type=float, default=0.35)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import tifffile
    from skimage.segmentation import relabel_sequential

    from histo.config import AnalysisConfig
    from histo.detect import segment_nuclei
    from histo.tissue import glass_level

    root = Path(args.stardist) / "stardist" / "data" / "images"
    if not (root / "img2d.tif").exists():
        sys.exit(
            f"{root}: no img2d.tif; install the data first:\n"
            f"  python3 -m pip install --no-deps --target {args.stardist} stardist==0.9.2"
        )
    img = tifffile.imread(root / "img2d.tif").astype(np.float32)
    truth = relabel_sequential(tifffile.imread(root / "mask2d.tif"))[0]
    offset, _ = glass_level(img)
    dapi = img - offset
    nuclear = float(np.percentile(dapi, 99.0))
    rows = []
    for frac in (0.2, 0.3, 0.4):
        config = AnalysisConfig(nucleus_threshold=frac)
        pred = segment_nuclei(
            dapi, threshold=frac * nuclear, pixel_size_um=args.pixel_size_um, config=config
        )
        r = iou_f1(pred, truth)
        rows.append((frac, r))
        print(frac, r)
    lines = [
        machine_line(),
        "Command: `python3 -m pip install --no-deps --target /tmp/stardist_data stardist==0.9.2 "
        "&& python3 tests/benchmarks/bench_real_nuclei.py --stardist /tmp/stardist_data --write`"
        " (stardist 0.9.2's "
        "`img2d.tif`/`mask2d.tif`: DSB2018, 512 x 512, 125 annotated nuclei; assumed "
        f"{args.pixel_size_um} um/px).",
        "",
        "| detector | DAPI threshold (x nuclear level) | nuclei found | precision | recall "
        "| F1 at IoU 0.5 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for frac, r in rows:
        default = " (default)" if frac == AnalysisConfig().nucleus_threshold else ""
        lines.append(
            f"| classical `segment_nuclei` | {frac}{default} | {r['n_pred']} "
            f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |"
        )
    lines += ["", "The network finds HER2+ cancer-cell nuclei only, so it has no entry here."]
    print("\n".join(lines))
    if args.write:
        write_section("bench_real_nuclei", "Nuclei on a real image (DSB2018)", lines)


if __name__ == "__main__":
    main()
