"""HER2+ (tumour-marker+) cells on real multiplexed images with per-cell labels.

Run on demand (never in CI). The data are not in the repository: they are read from the paths
given on the command line (the commands below put them under /work/real_if_data).

What is measured
----------------
lungmets' real analysis (`histo.analyze_slide`, ``--method unet`` or ``classical``) runs on a
multichannel image; its cells (``x_um``, ``y_um``) are matched one-to-one to labelled cells: a
detection may match a labelled cell when it lies inside that cell's mask or within
``--match-um`` (5 um) of its centroid (Hungarian assignment; inside the mask is preferred). A
labelled cell is marker+ by the cell table (``--positive-column``: a boolean/0-1 column, a
category with ``--positive-values``, or a number with ``--positive-threshold``), or, without a
table, by gating its own mean marker intensity (``--positive-from-channel``, Otsu on
log1p(mean) unless ``--positive-threshold`` is given). Printed as a markdown row:

- labelled+ : labelled marker+ cells; detections : cells lungmets reported;
- matched+ : detections matched to a marker+ cell; recall = matched+ / labelled+;
- on marker- : detections matched to a labelled marker- cell; unmatched : detections on no
  labelled cell; precision = matched+ / detections; count ratio = detections / labelled+.

Sub-commands
------------
``run``          the benchmark (above).
``stack``        single-channel TIFFs -> one multichannel pyramidal OME-TIFF (`write_ome_tiff`).
``rds-masks``    integer label matrices saved by R (EBImage/cytomapper, e.g. simpleSeg's
                 ``tests/testthat/saved_masks.rds``) -> label TIFFs.
``label-table``  per-cell table of a label mask: centroid, area, mean of each channel (over the
                 cell, or the cell grown by ``--ring-um`` for nuclear masks) and an Otsu gate.
``calibrate``    one field reviewed completely from its labels (a simulated scientist), the
                 shipped model's operating point chosen on it (``lungmets train
                 --operating-point-only``), every field x marker scored before and after.

Data used (see /work/real_if_data/*/README.txt; nothing of it is in the repository)
---------------------------------------------------------------------------------
1. ``dcis_2203`` / ``dcis_2206`` -- SydneyBioX/simpleSeg (GPL-3), commit
   48b82bb52403ef0f1fa6bcc8041ec33a0eaef09e: ``inst/extdata/Point2203_pt1072_31606/*.tif`` and
   ``inst/extdata/Point2206_pt1116_31620/*.tif``, MIBI-TOF of ductal carcinoma in situ (Risom
   et al., Cell 2022), 1024 x 1024 uint8 ion counts per marker (HH3 = histone H3 as the nuclear
   channel, HER2, PanKRT, ECAD, Ki67, ...), and the nuclear masks the package tests with,
   ``tests/testthat/saved_masks.rds`` (simpleSeg's own segmentation: 625 and 1456 nuclei).
2. ``ark_fov8`` -- angelolab/ark-analysis (MIT), commit
   3558771dd12ebe0d7c3b1b3b53bb20ece0af1e71: ``data/example_dataset/input_data/
   single_channel_inputs/fov8/TIFs/*.tif`` (MIBI-TOF breast tumour, 1024 x 1024 uint8 counts;
   HH3, HER2, PanKeratin, ECadherin, Ki67, ...) and ``data/example_dataset/deepcell_output/
   fov8_feature_0.tif`` (DeepCell whole-cell mask, 272 cells). Its HER2 is at background
   (median cell mean 0.24 counts/px), so only PanKeratin is scored.

Neither comes with expert phenotypes: a cell is marker+ when its mean counts (over the cell, or
the nucleus grown by 2 um) pass an Otsu gate on log1p, computed on the raw counts
(``label-table``). Pixel sizes are not stated with the data; 0.5 um/px (a 500 um MIBI field at
1024 px) is assumed. Ion counts have no glass level and no autofluorescence, and lungmets finds
no tissue in them as they are; the ``stack`` step therefore also writes a fluorescence-like copy
(Gaussian sigma 1 px, x10, +100 as a glass level): the ``*_if.ome.tif`` images scored below.

Commands (repository root, venv active). ``fetch`` is the search tool's; it gives bare snapshots
under /work/.mirror, from which ``prepare`` takes the files above at their commits::

    # fetch github:SydneyBioX/simpleSeg and github:angelolab/ark-analysis, then
    python3 tests/benchmarks/bench_real_if.py prepare --data /work/real_if_data
    python3 tests/benchmarks/bench_real_if.py table --data /work/real_if_data --write
    # or, with every other benchmark: run_all.py --real-data /work (reads /work/real_if_data)

``table`` scores each field x marker (HER2 and pan-cytokeratin in the HER2 role) with the shipped
network (v5), v4, v2, v1 and the classical detector, and writes the section ``bench_real_if`` of
BENCHMARKS.md. One row by hand, e.g. on your own data::

    python3 tests/benchmarks/bench_real_if.py run --header --name dcis_2203 \
      --image $D/simpleseg_dcis_mibi/Point2203_pt1072_31606_if.ome.tif \
      --channels DAPI=HH3,HER2=HER2 --pixel-size-um 0.5 \
      --labels $D/simpleseg_dcis_mibi/Point2203_pt1072_31606.mask.tif \
      --cell-table $D/simpleseg_dcis_mibi/Point2203_pt1072_31606.cells.csv \
      --positive-column HER2_pos --method unet

Each run takes 2-6 s on one core (``--threads 1``, the default here).

Only public entry points are used: `histo.analyze_slide`, `histo.AnalysisConfig`,
`histo.open_slide`, `histo.io.write_ome_tiff` and `histo.io.pyramid_levels`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import PREVIOUS, PREVIOUS_PT, SHIPPED  # noqa: E402

# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def read_labels(path: str | Path) -> np.ndarray:
    """A 2-D integer label image (TIFF or .npy); 0 is background."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path)
    else:
        import tifffile

        arr = tifffile.imread(path)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        sys.exit(f"{path}: a label image must be 2-D, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.equal(np.mod(arr, 1), 0)):
        sys.exit(f"{path}: a float image with non-integer values is not a label image")
    return arr.astype(np.int64)


def cell_centroids(labels: np.ndarray) -> dict[int, tuple[float, float]]:
    """{label: (row, col)} of every labelled cell (pixel centres at integers)."""
    from scipy import ndimage as ndi

    ids = np.unique(labels)
    ids = ids[ids != 0]
    cents = ndi.center_of_mass(np.ones_like(labels, dtype=np.float32), labels, ids)
    return {int(i): (float(c[0]), float(c[1])) for i, c in zip(ids, cents, strict=True)}


def positive_ids(args, labels: np.ndarray, image_channels: dict | None) -> tuple[set, set]:
    """(marker+ ids, marker- ids) of the labelled cells, from the table or by gating."""
    all_ids = {int(i) for i in np.unique(labels) if i != 0}
    if args.cell_table:
        import pandas as pd

        table = pd.read_csv(args.cell_table)
        for col in (args.id_column, args.positive_column):
            if col not in table.columns:
                sys.exit(f"{args.cell_table}: no column {col!r} (columns: {list(table.columns)})")
        ids = table[args.id_column].astype(int).to_numpy()
        value = table[args.positive_column]
        if args.positive_values:
            wanted = {v.strip() for v in args.positive_values.split(",")}
            pos = value.astype(str).str.strip().isin(wanted).to_numpy()
        elif args.positive_threshold is not None:
            pos = value.astype(float).to_numpy() >= float(args.positive_threshold)
        else:
            text = value.astype(str).str.strip().str.lower()
            pos = text.isin({"true", "1", "1.0", "yes", "pos", "positive", "+"}).to_numpy()
        missing = set(ids) - all_ids
        if missing:
            print(
                f"warning: {len(missing)} table ids are not in the mask (ignored)", file=sys.stderr
            )
        pos_ids = {int(i) for i, p in zip(ids, pos, strict=True) if p and i in all_ids}
        neg_ids = {int(i) for i, p in zip(ids, pos, strict=True) if not p and i in all_ids}
        # cells in the mask but not in the table count as marker-
        neg_ids |= all_ids - pos_ids - neg_ids
        return pos_ids, neg_ids
    if not args.positive_from_channel:
        sys.exit("give --cell-table with --positive-column, or --positive-from-channel")
    stats = measure_cells(labels, image_channels, ring_um=args.ring_um, pixel_size_um=args.px)
    name = args.positive_from_channel
    if name not in stats["means"]:
        sys.exit(f"--positive-from-channel {name}: channels are {list(stats['means'])}")
    pos = gate(stats["means"][name], args.positive_threshold)
    pos_ids = {int(i) for i, p in zip(stats["ids"], pos, strict=True) if p}
    return pos_ids, all_ids - pos_ids


def measure_cells(labels, channels: dict, *, ring_um: float, pixel_size_um: float) -> dict:
    """Per-cell area and mean of each channel (over the cell grown by `ring_um`)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    grown = labels
    if ring_um > 0:
        grown = expand_labels(labels, distance=ring_um / pixel_size_um)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    area = ndi.sum(np.ones_like(labels, dtype=np.float64), labels, ids)
    means = {
        name: np.asarray(ndi.mean(img.astype(np.float64), grown, ids))
        for name, img in channels.items()
    }
    return {"ids": ids, "area_px": np.asarray(area), "means": means}


def gate(values: np.ndarray, threshold: float | None) -> np.ndarray:
    """Marker+ where the value reaches `threshold`, else Otsu on log1p(value)."""
    values = np.asarray(values, dtype=np.float64)
    if threshold is not None:
        return values >= threshold
    from skimage.filters import threshold_otsu

    logv = np.log1p(np.maximum(values, 0))
    if np.ptp(logv) == 0:
        return np.zeros(len(values), bool)
    return logv > threshold_otsu(logv)


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def match(det_rc: np.ndarray, labels: np.ndarray, cents: dict, max_px: float) -> dict[int, int]:
    """One-to-one {detection index: label id}.

    A pair is allowed when the detection lies inside the cell's mask or within `max_px` of its
    centroid; cost = distance to the centroid, less `max_px` when inside (inside is preferred).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    if len(det_rc) == 0 or not cents:
        return {}
    ids = np.array(list(cents))
    cxy = np.array([cents[i] for i in ids])
    tree = cKDTree(cxy)
    h, w = labels.shape
    rows, cols, costs = [], [], []
    index_of = {int(v): k for k, v in enumerate(ids)}
    for d, (r, c) in enumerate(det_rc):
        cand = set(tree.query_ball_point((r, c), max_px))
        ri, ci = int(round(r)), int(round(c))
        inside = int(labels[ri, ci]) if 0 <= ri < h and 0 <= ci < w else 0
        if inside:
            cand.add(index_of[inside])
        for k in cand:
            dist = float(np.hypot(*(cxy[k] - (r, c))))
            rows.append(d)
            cols.append(k)
            costs.append(dist - (max_px if ids[k] == inside else 0.0))
    if not rows:
        return {}
    big = 1e6
    ud, uc = sorted(set(rows)), sorted(set(cols))
    dpos = {d: i for i, d in enumerate(ud)}
    cpos = {k: j for j, k in enumerate(uc)}
    cost = np.full((len(ud), len(uc)), big)
    for d, k, v in zip(rows, cols, costs, strict=True):
        cost[dpos[d], cpos[k]] = min(cost[dpos[d], cpos[k]], v)
    ri, ci = linear_sum_assignment(cost)
    return {ud[i]: int(ids[uc[j]]) for i, j in zip(ri, ci, strict=True) if cost[i, j] < big}


# --------------------------------------------------------------------------------------------
# Sub-commands
# --------------------------------------------------------------------------------------------

HEADER = (
    "| data | method | marker (HER2 role) | labelled+ | labelled- | detections | matched+ "
    "| on marker- | unmatched | recall | precision | count ratio | time (s) |\n"
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def score(
    image,
    labels_path,
    *,
    channels: str | None,
    pixel_size_um: float | None,
    pos_ids: set | None = None,
    neg_ids: set | None = None,
    positive: argparse.Namespace | None = None,
    method: str = "unet",
    config: dict | None = None,
    threads: int = 1,
    match_um: float = 5.0,
) -> dict:
    """Run lungmets on `image` and score its cells against the labelled cells.

    The marker+ cells are `pos_ids`/`neg_ids`, or come from `positive` (the run options
    ``cell_table``, ``positive_column``, ... of `positive_ids`). Returns the row's figures
    (``failed`` holds the error when lungmets refused the image).
    """
    import histo

    labels = read_labels(labels_path)
    cfg = histo.AnalysisConfig(method=method, torch_threads=threads)
    if config:
        cfg = cfg.replace(**config)
    slide = histo.open_slide(image, channels=channels, pixel_size_um=pixel_size_um)
    px = slide.pixel_size_um
    if tuple(labels.shape) != tuple(slide.shape_px):
        sys.exit(f"{labels_path}: label shape {labels.shape} != image shape {slide.shape_px}")
    if pos_ids is None:
        positive.px = px
        image_channels = None
        if not positive.cell_table:
            names, lev0 = read_stack(image)
            image_channels = dict(zip(names, lev0, strict=True))
        pos_ids, neg_ids = positive_ids(positive, labels, image_channels)
    row = {
        "marker": slide.channel_names[slide.roles["HER2"]],
        "method": method,
        "labelled_pos": len(pos_ids),
        "labelled_neg": len(neg_ids),
        "failed": None,
    }
    t0 = time.perf_counter()
    try:
        result = histo.analyze_slide(
            image, cfg, channels=channels, pixel_size_um=pixel_size_um, threads=threads
        )
    except histo.InputError as err:  # e.g. no tissue found
        row["failed"] = str(err).split(": ", 1)[-1]
        return row
    row["seconds"] = time.perf_counter() - t0
    cells = result.cells
    det_rc = (
        np.stack([cells["y_um"].to_numpy() / px, cells["x_um"].to_numpy() / px], axis=1)
        if len(cells)
        else np.zeros((0, 2))
    )
    pairs = match(det_rc, labels, cell_centroids(labels), match_um / px)
    n_det, n_pos = len(det_rc), len(pos_ids)
    matched_pos = sum(1 for v in pairs.values() if v in pos_ids)
    row.update(
        detections=n_det,
        matched_pos=matched_pos,
        on_neg=sum(1 for v in pairs.values() if v in neg_ids),
        unmatched=n_det - len(pairs),
        recall=matched_pos / n_pos if n_pos else float("nan"),
        precision=matched_pos / n_det if n_det else float("nan"),
        count_ratio=n_det / n_pos if n_pos else float("nan"),
        pixel_size_um=px,
        stain_levels=result.summary.get("stain_levels"),
    )
    return row


def cmd_run(args) -> None:
    config = dict(_parse_kv(kv) for kv in args.config) if args.config else None
    row = score(
        args.image,
        args.labels,
        channels=args.channels,
        pixel_size_um=args.pixel_size_um,
        positive=args,
        method=args.method,
        config=config,
        threads=args.threads,
        match_um=args.match_um,
    )
    name = args.name or Path(args.image).name
    if args.header:
        print(HEADER)
    head = f"| {name} | {args.method} | {row['marker']} | {row['labelled_pos']} "
    head += f"| {row['labelled_neg']} "
    if row["failed"]:
        print(head + f"| failed: {row['failed'][:90]} | | | | | | | |")
        return
    print(
        head + f"| {row['detections']} | {row['matched_pos']} | {row['on_neg']} "
        f"| {row['unmatched']} | {row['recall']:.3f} | {row['precision']:.3f} "
        f"| {row['count_ratio']:.2f} | {row['seconds']:.1f} |"
    )
    if args.verbose:
        print(
            f"# pixel size {row['pixel_size_um']} um; stain levels {row['stain_levels']}",
            file=sys.stderr,
        )


def _parse_kv(text: str):
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def cmd_stack(args) -> None:
    import tifffile

    from histo.io import pyramid_levels, write_ome_tiff

    names, planes = [], []
    for item in args.channel:
        name, sep, path = item.partition("=")
        if not sep:
            sys.exit(f"{item}: give NAME=PATH")
        plane = np.squeeze(tifffile.imread(path))
        if plane.ndim != 2:
            sys.exit(f"{path}: expected one 2-D plane, got shape {plane.shape}")
        names.append(name)
        planes.append(plane)
    if len({p.shape for p in planes}) != 1:
        sys.exit(f"planes differ in shape: {[p.shape for p in planes]}")
    if args.smooth_sigma_px or args.scale != 1.0 or args.offset:
        # Ion counts (MIBI, IMC) -> a fluorescence-like image: shot noise smoothed, counts
        # scaled so that rounding keeps their dynamic range, and a constant "glass" level.
        from scipy import ndimage as ndi

        out = []
        for p in planes:
            v = p.astype(np.float32)
            if args.smooth_sigma_px:
                v = ndi.gaussian_filter(v, args.smooth_sigma_px)
            out.append(np.clip(np.rint(args.offset + args.scale * v), 0, 65535).astype(np.uint16))
        planes = out
    dtype = np.result_type(*[p.dtype for p in planes])
    image = np.stack([p.astype(dtype) for p in planes])
    write_ome_tiff(
        args.out,
        pyramid_levels(image),
        channel_names=names,
        pixel_size_um=args.pixel_size_um,
    )
    print(f"{args.out}: {image.shape} {image.dtype}, channels {names}")


def cmd_rds_masks(args) -> None:
    """Integer matrices of an R .rds (version-2/3 XDR serialisation) -> label TIFFs.

    Every INTSXP with a `dim` of two sides is taken as one mask, in file order; R stores a
    matrix column-major with the first dimension as x (EBImage), so it is transposed to
    (row, column).
    """
    import gzip
    import re
    import struct

    import tifffile

    raw = Path(args.rds).read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if not data.startswith(b"X\n"):
        sys.exit(f"{args.rds}: not an XDR R serialisation")
    # the dim attribute (an INTSXP of 2) of each matrix follows its values
    dim_tag = rb"\x00\x04\x00\x09\x00\x00\x00\x03dim\x00\x00\x00\x0d\x00\x00\x00\x02"
    shapes = {struct.unpack(">ii", data[m.end() : m.end() + 8]) for m in re.finditer(dim_tag, data)}
    found = []
    for a, b in shapes:
        # INTSXP header (low byte 13, attributes flag) followed by the length a * b
        for m in re.finditer(
            rb"(?s)\x00[\x00-\x03][\x02\x03]\x0d" + re.escape(struct.pack(">i", a * b)), data
        ):
            found.append((m.start(), m.end(), a, b))
    names = args.names.split(",") if args.names else []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k, (_, end, a, b) in enumerate(sorted(found)):
        values = np.frombuffer(data[end : end + 4 * a * b], ">i4").astype(np.int32)
        mask = values.reshape(a, b, order="F").T
        name = names[k] if k < len(names) else f"mask{k}"
        path = out / f"{name}.mask.tif"
        tifffile.imwrite(path, mask, compression="zlib")
        print(f"{path}: {mask.shape}, {len(np.unique(mask)) - 1} labels")


def read_stack(path) -> tuple[list[str], np.ndarray]:
    """Channel names and level-0 pixels (C, Y, X) of a multichannel TIFF / OME-TIFF."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        image = np.asarray(series.levels[0].asarray())
        axes = series.levels[0].axes
        names = []
        if tif.ome_metadata:
            meta = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            meta = meta[0] if isinstance(meta, list) else meta
            chans = meta["Pixels"].get("Channel", [])
            chans = chans if isinstance(chans, list) else [chans]
            names = [str(c.get("Name", f"C{i}")) for i, c in enumerate(chans)]
    if image.ndim == 2:
        image = image[None]
    elif axes[0] not in "CSI":
        image = np.moveaxis(image, -1, 0)  # YXS (RGB) -> SYX
    if len(names) != image.shape[0]:
        names = [f"C{i}" for i in range(image.shape[0])]
    return names, image


def cmd_label_table(args) -> None:
    import pandas as pd

    names, image = read_stack(args.image)
    labels = read_labels(args.labels)
    if labels.shape != image.shape[1:]:
        sys.exit(f"{args.labels}: label shape {labels.shape} != image {image.shape[1:]}")
    channels = dict(zip(names, image, strict=True))
    px = args.pixel_size_um
    if px is None and args.ring_um > 0:
        sys.exit("--ring-um needs --pixel-size-um")
    stats = measure_cells(labels, channels, ring_um=args.ring_um, pixel_size_um=px or 1.0)
    cents = cell_centroids(labels)
    table = pd.DataFrame(
        {
            "label": stats["ids"],
            "y_px": [cents[int(i)][0] for i in stats["ids"]],
            "x_px": [cents[int(i)][1] for i in stats["ids"]],
            "area_px": stats["area_px"],
        }
    )
    for name, mean in stats["means"].items():
        table[f"{name}_mean"] = mean
    for name in args.gate or []:
        if name not in stats["means"]:
            sys.exit(f"--gate {name}: channels are {list(stats['means'])}")
        table[f"{name}_pos"] = gate(stats["means"][name], args.threshold)
        print(f"{name}: {int(table[f'{name}_pos'].sum())} of {len(table)} cells gated +")
    table.to_csv(args.out, index=False)
    print(f"{args.out}: {len(table)} cells")


# --------------------------------------------------------------------------------------------
# The published table: prepare the data from the fetched snapshots, then score every row
# --------------------------------------------------------------------------------------------

SIMPLESEG = ("SydneyBioX+simpleSeg", "48b82bb52403ef0f1fa6bcc8041ec33a0eaef09e")
ARK = ("angelolab+ark-analysis", "3558771dd12ebe0d7c3b1b3b53bb20ece0af1e71")
DCIS_POINTS = ("Point2203_pt1072_31606", "Point2206_pt1116_31620")
ARK_TIFS = "data/example_dataset/input_data/single_channel_inputs/fov8/TIFs"
ARK_MASK = "data/example_dataset/deepcell_output/fov8_feature_0.tif"
#: Fluorescence-like copy of ion counts: Gaussian sigma (px), scale, glass offset.
IF_LIKE = ("--smooth-sigma-px", "1", "--scale", "10", "--offset", "100")
PIXEL_SIZE_UM = 0.5


def _git_show(git_dir: Path, commit: str, path: str, out: Path) -> None:
    import subprocess

    out.parent.mkdir(parents=True, exist_ok=True)
    blob = subprocess.run(
        ["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"],
        capture_output=True,
        check=False,
    )
    if blob.returncode:
        sys.exit(f"{git_dir}: cannot read {path} at {commit[:7]}: {blob.stderr.decode().strip()}")
    out.write_bytes(blob.stdout)


def cmd_prepare(args) -> None:
    """Files of the two snapshots at their commits -> the images, masks and cell tables."""
    mirror, data = Path(args.mirror), Path(args.data)
    for repo, _ in (SIMPLESEG, ARK):
        if not (mirror / repo / "repo").is_dir():
            sys.exit(
                f"{mirror / repo / 'repo'}: no snapshot; fetch github:{repo.replace('+', '/')} "
                "first (the search tool's fetch), or give --mirror"
            )
    px = str(PIXEL_SIZE_UM)
    # simpleSeg: two DCIS fields, nuclear masks in one .rds
    git, commit = mirror / SIMPLESEG[0] / "repo", SIMPLESEG[1]
    out = data / "simpleseg_dcis_mibi"
    _git_show(git, commit, "tests/testthat/saved_masks.rds", out / "raw" / "saved_masks.rds")
    main(
        [
            "rds-masks",
            str(out / "raw" / "saved_masks.rds"),
            "--out-dir",
            str(out),
            "--names",
            ",".join(DCIS_POINTS),
        ]
    )
    for point in DCIS_POINTS:
        raw = out / "raw" / point
        for ch in ("HH3", "HER2", "PanKRT", "ECAD", "Ki67"):
            _git_show(git, commit, f"inst/extdata/{point}/{ch}.tif", raw / f"{ch}.tif")
        chans = [f"{ch}={raw / ch}.tif" for ch in ("HH3", "HER2", "PanKRT", "ECAD", "Ki67")]
        main(["stack", "--out", str(out / f"{point}.ome.tif"), "--pixel-size-um", px, *chans])
        main(
            [
                "stack",
                "--out",
                str(out / f"{point}_if.ome.tif"),
                "--pixel-size-um",
                px,
                *IF_LIKE,
                *chans,
            ]
        )
        main(
            [
                "label-table",
                "--image",
                str(out / f"{point}.ome.tif"),
                "--labels",
                str(out / f"{point}.mask.tif"),
                "--pixel-size-um",
                px,
                "--ring-um",
                "2",
                "--gate",
                "HER2",
                "--gate",
                "PanKRT",
                "--gate",
                "ECAD",
                "--out",
                str(out / f"{point}.cells.csv"),
            ]
        )
    # ark-analysis: one breast-tumour field, DeepCell whole-cell mask
    git, commit = mirror / ARK[0] / "repo", ARK[1]
    out = data / "ark_fov8_mibi"
    raw = out / "raw"
    names = ("HH3", "HER2", "PanKeratin", "ECadherin", "Ki67")
    for ch in names:
        _git_show(git, commit, f"{ARK_TIFS}/{ch}.tif", raw / f"{ch}.tif")
    _git_show(git, commit, ARK_MASK, raw / "fov8_feature_0.tif")
    chans = [f"{ch}={raw / ch}.tif" for ch in names]
    main(["stack", "--out", str(out / "fov8.ome.tif"), "--pixel-size-um", px, *chans])
    main(["stack", "--out", str(out / "fov8_if.ome.tif"), "--pixel-size-um", px, *IF_LIKE, *chans])
    main(
        [
            "label-table",
            "--image",
            str(out / "fov8.ome.tif"),
            "--labels",
            str(raw / "fov8_feature_0.tif"),
            "--gate",
            "HER2",
            "--gate",
            "PanKeratin",
            "--gate",
            "ECadherin",
            "--out",
            str(out / "cells.csv"),
        ]
    )
    (data / "README.txt").write_text(
        "Prepared by tests/benchmarks/bench_real_if.py prepare from\n"
        f"  github:{SIMPLESEG[0].replace('+', '/')} at {SIMPLESEG[1]} (GPL-3)\n"
        f"  github:{ARK[0].replace('+', '/')} at {ARK[1]} (MIT)\n"
        "Third-party data: do not commit.\n"
    )
    print(f"{data}: prepared")


def table_fields(data: Path) -> list[dict]:
    """The rows of the published table: field, image, mask, cell table, markers scored."""
    dcis = data / "simpleseg_dcis_mibi"
    ark = data / "ark_fov8_mibi"
    fields = []
    for point in DCIS_POINTS:
        fields.append(
            {
                "field": f"DCIS {point[5:9]}",
                "image": dcis / f"{point}_if.ome.tif",
                "labels": dcis / f"{point}.mask.tif",
                "cells": dcis / f"{point}.cells.csv",
                "nuclear": "HH3",
                "markers": (("HER2", "HER2"), ("pan-CK", "PanKRT")),
            }
        )
    fields.append(
        {
            "field": "ark fov8",
            "image": ark / "fov8_if.ome.tif",
            "labels": ark / "raw" / "fov8_feature_0.tif",
            "cells": ark / "cells.csv",
            "nuclear": "HH3",
            # its HER2 is at background (median cell mean 0.24 counts/px): not scored
            "markers": (("pan-keratin", "PanKeratin"),),
        }
    )
    return fields


#: Detectors of the table: name, method, AnalysisConfig fields.
DETECTORS = (
    (SHIPPED, "unet", {}),
    (PREVIOUS, "unet", {"model_path": PREVIOUS_PT}),
    ("v2", "unet", {"model_path": "models/weights/lungmets_unet_v2.pt"}),
    ("v1", "unet", {"model_path": "models/weights/lungmets_unet_v1.pt"}),
    ("classical", "classical", {}),
)


TABLE_HEADER = (
    "| field | marker | labelled+ | labelled- | detector | detections | matched+ "
    "| on marker- | unmatched | recall | precision | count ratio |",
    "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
)


def _labelled(field: dict, channel: str) -> tuple[set, set]:
    """(marker+ ids, marker- ids) of a field's labelled cells, from its cell table."""
    import pandas as pd

    table = pd.read_csv(field["cells"])
    pos_ids = set(table["label"][table[f"{channel}_pos"].astype(bool)].astype(int).tolist())
    return pos_ids, set(table["label"].astype(int).tolist()) - pos_ids


def _table_row(field, label, channel, det, method, config, threads) -> str:
    """One row of the published table: a field x marker scored with a detector."""
    pos_ids, neg_ids = _labelled(field, channel)
    row = score(
        field["image"],
        field["labels"],
        channels=f"DAPI={field['nuclear']},HER2={channel}",
        pixel_size_um=PIXEL_SIZE_UM,
        pos_ids=pos_ids,
        neg_ids=neg_ids,
        method=method,
        config=config,
        threads=threads,
    )
    head = f"| {field['field']} | {label} | {len(pos_ids)} | {len(neg_ids)} | {det} "
    if row["failed"]:
        return head + f"| failed: {row['failed'][:80]} | | | | | | |"
    return (
        head + f"| {row['detections']} | {row['matched_pos']} | {row['on_neg']} "
        f"| {row['unmatched']} | {row['recall']:.3f} | {row['precision']:.3f} "
        f"| {row['count_ratio']:.2f} |"
    )


def cmd_calibrate(args) -> None:
    """Review one field completely from its labels (a simulated scientist), choose the shipped
    model's operating point on that review (`lungmets train --operating-point-only`), and
    score every field x marker with the model before and after."""
    import subprocess
    import tempfile

    from histo.evaluate import match_points
    from histo.review import ReviewSession

    fields = table_fields(Path(args.data))
    rows = [(f, lab, ch) for f in fields for lab, ch in f["markers"]]
    chosen = [r for r in rows if f"{r[0]['field']}:{r[1]}" == args.review]
    if not chosen:
        names = ", ".join(f"{f['field']}:{lab}" for f, lab, _ in rows)
        sys.exit(f"--review {args.review!r}: not a field:marker of the table ({names})")
    field, label, channel = chosen[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        cmd = [sys.executable, "-m", "histo", "run", str(field["image"]), "--out", str(results)]
        cmd += ["--channels", f"DAPI={field['nuclear']},HER2={channel}"]
        subprocess.run([*cmd, "--pixel-size-um", str(PIXEL_SIZE_UM)], check=True)
        folder = results / Path(field["image"]).name.split(".")[0]
        session = ReviewSession(folder, user="simulated")
        labels = read_labels(field["labels"])
        cents = cell_centroids(labels)
        pos_ids, _ = _labelled(field, channel)
        truth = (
            np.array([[cents[i][1], cents[i][0]] for i in sorted(pos_ids) if i in cents], float)
            * PIXEL_SIZE_UM
        )
        cells = session.cells
        pi, ti = match_points(cells[["x_um", "y_um"]].to_numpy(), truth, 5.0)
        missed = np.delete(truth, ti, axis=0)
        false = np.setdiff1d(np.arange(len(cells)), pi)
        for x, y in missed:
            session.add_cell(float(x), float(y), ki67_pos=False)
        for i in false:
            session.delete_cell(int(cells.index[i]))
        h, w = labels.shape
        session.mark_complete(0.0, 0.0, w * PIXEL_SIZE_UM, h * PIXEL_SIZE_UM)
        model = Path(tmp) / "calibrated.pt"
        cal = subprocess.run(
            [sys.executable, "-m", "histo", "train", str(model), "--from-reviews", str(folder),
             "--operating-point-only"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        print(cal.stdout, flush=True)
        lines = [
            f"Reviewed: {field['field']} with {label} as HER2 ({len(missed)} cells added, "
            f"{len(false)} deleted, the whole field marked reviewed completely).",
            *[
                line.replace(str(model), model.name)
                for line in cal.stdout.splitlines()
                if not line.startswith("use it")
            ],
            "",
            *TABLE_HEADER,
        ]
        for f, lab, ch in rows:
            for det, config in (
                (SHIPPED, {}),
                (f"{SHIPPED}, calibrated", {"model_path": str(model)}),
            ):
                lines.append(_table_row(f, lab, ch, det, "unet", config, args.threads))
                print(lines[-1], flush=True)
    lines[0:0] = [
        f"Command: `python3 tests/benchmarks/bench_real_if.py calibrate --data DIR --review "
        f"'{args.review}' --write` (threads {args.threads}).",
        "",
    ]
    if args.write:
        from _common import machine_line, write_section

        write_section(
            "bench_real_if_calibrated",
            "Real images: the operating point chosen on one reviewed field",
            [machine_line(), *lines],
        )


def cmd_table(args) -> None:

    data = Path(args.data)
    fields = table_fields(data)
    missing = [str(f[k]) for f in fields for k in ("image", "labels", "cells") if not f[k].exists()]
    if missing:
        sys.exit(
            f"{data}: missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
            f"run `python3 tests/benchmarks/bench_real_if.py prepare --data {data}` first"
        )
    detectors = [d for d in DETECTORS if not args.detectors or d[0] in args.detectors.split(",")]
    lines = list(TABLE_HEADER)
    for f in fields:
        for label, channel in f["markers"]:
            for det, method, config in detectors:
                lines.append(_table_row(f, label, channel, det, method, config, args.threads))
                print(lines[-1], flush=True)
    if args.write:
        from _common import machine_line, write_section

        lines += [
            "",
            f"Command: `python3 tests/benchmarks/bench_real_if.py prepare --data DIR && "
            f"python3 tests/benchmarks/bench_real_if.py table --data DIR --write` "
            f"(threads {args.threads}). {machine_line()}",
        ]
        write_section("bench_real_if", "Real multiplexed images with per-cell labels", lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run lungmets and score it against labelled cells")
    r.add_argument("--image", required=True, help="multichannel TIFF / OME-TIFF")
    r.add_argument("--channels", default=None, help="lungmets channel mapping, e.g. DAPI=0,HER2=5")
    r.add_argument("--pixel-size-um", type=float, default=None)
    r.add_argument("--labels", required=True, help="cell (or nucleus) instance mask, TIFF or .npy")
    r.add_argument("--cell-table", help="CSV with one row per labelled cell")
    r.add_argument("--id-column", default="label", help="mask label id column of the table")
    r.add_argument("--positive-column", help="column that says marker+ (bool/0-1, or see below)")
    r.add_argument("--positive-values", help="comma list of values of the column that are +")
    r.add_argument("--positive-threshold", type=float, default=None, help="numeric column >= T")
    r.add_argument(
        "--positive-from-channel",
        help="no table: Otsu-gate this channel's cell means, on the --image pixels as given "
        "(for a preprocessed image, gate the raw data with label-table instead)",
    )
    r.add_argument("--ring-um", type=float, default=0.0, help="grow labels by this for gating")
    r.add_argument("--match-um", type=float, default=5.0)
    r.add_argument("--method", choices=("unet", "classical"), default="unet")
    r.add_argument("--threads", type=int, default=1, help="threads (and torch threads)")
    r.add_argument("--config", action="append", help="AnalysisConfig field=value (repeatable)")
    r.add_argument("--name", help="data set name for the table row")
    r.add_argument("--header", action="store_true", help="print the table header first")
    r.add_argument("--verbose", action="store_true")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("stack", help="single-channel TIFFs -> one OME-TIFF")
    s.add_argument("--out", required=True)
    s.add_argument("--pixel-size-um", type=float, required=True)
    s.add_argument("--smooth-sigma-px", type=float, default=0.0, help="Gaussian of each plane")
    s.add_argument("--scale", type=float, default=1.0, help="multiply (then uint16)")
    s.add_argument("--offset", type=float, default=0.0, help="add a constant glass level")
    s.add_argument("channel", nargs="+", help="NAME=PATH, in channel order")
    s.set_defaults(func=cmd_stack)

    m = sub.add_parser("rds-masks", help="label matrices in an R .rds -> TIFFs")
    m.add_argument("rds")
    m.add_argument("--out-dir", required=True)
    m.add_argument("--names", help="comma list of output names, in file order")
    m.set_defaults(func=cmd_rds_masks)

    t = sub.add_parser("label-table", help="per-cell means and Otsu gates of a label mask")
    t.add_argument("--image", required=True)
    t.add_argument("--labels", required=True)
    t.add_argument("--pixel-size-um", type=float, default=None)
    t.add_argument("--ring-um", type=float, default=0.0)
    t.add_argument("--gate", action="append", help="channel to gate into <name>_pos")
    t.add_argument("--threshold", type=float, default=None, help="fixed gate (default Otsu)")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_label_table)

    pr = sub.add_parser("prepare", help="the published table's data, from fetched snapshots")
    pr.add_argument("--data", required=True, help="folder to write (outside the repository)")
    pr.add_argument("--mirror", default="/work/.mirror", help="where fetch put the snapshots")
    pr.set_defaults(func=cmd_prepare)

    tb = sub.add_parser("table", help="score every row of the published table")
    tb.add_argument("--data", required=True, help="the folder `prepare` wrote")
    tb.add_argument(
        "--detectors", default="", help="comma list of " + ",".join(d[0] for d in DETECTORS)
    )
    tb.add_argument("--threads", type=int, default=1)
    tb.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    tb.set_defaults(func=cmd_table)

    ca = sub.add_parser(
        "calibrate", help="the operating point chosen on one reviewed field, every row scored"
    )
    ca.add_argument("--data", required=True, help="the folder `prepare` wrote")
    ca.add_argument("--review", default="DCIS 2203:pan-CK", help="FIELD:MARKER to review")
    ca.add_argument("--threads", type=int, default=1)
    ca.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    ca.set_defaults(func=cmd_calibrate)

    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
