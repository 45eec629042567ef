"""Public entry points of the generator: slides, cohorts, the bundled sample data, previews."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._version import __version__
from ..atomic import atomic_path, write_csv, write_json
from ..io import pyramid_levels, slide_name, write_ome_tiff
from ._appearance import Appearance
from ._render import file_dtype, render_counts, render_labels
from ._scene import CHANNELS, LABEL_CHANNELS, SlideSpec, build_scene

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

BAND_ROWS = 1024  # rows rendered at a time (a multiple of the noise block height)

#: Raised whenever the same seed and settings draw another slide (written to ``slide.json``,
#: so that a slide cached by an older generator is known as such). 1: until 2026-12-04.
#: 2: liver's red blood cells and sinusoidal nuclei lie in the sinusoids (other layouts and
#: the default style draw the same pixels).
GENERATOR_REVISION = 2


def slide_stem(path: str | os.PathLike) -> str:
    """File name without its slide suffix (``.ome.tif``, ``.tif``, ``.svs``, ``.zarr`` ...)."""
    return slide_name(path)


def truth_dir_for(slide_path: str | os.PathLike) -> Path:
    """The truth folder that belongs to a generated slide: ``<stem>.truth`` beside it."""
    p = Path(slide_path)
    return p.parent / f"{slide_stem(p)}.truth"


def slide_is_current(
    path: str | os.PathLike,
    *,
    appearance: Appearance | None = None,
    pixel_size_um: float | None = None,
) -> bool:
    """Whether `path` is a generated slide that today's generator would draw the same.

    True when the slide and its truth exist, its ``slide.json`` carries the current
    `GENERATOR_REVISION` and, where given, the same `appearance` and `pixel_size_um`. Caches of
    generated slides (training data, benchmarks) draw a slide again when this is False, rather
    than use one an older generator made or one drawn in a style that has since changed (a
    family's range moved, the same seed now draws another style).

    Parameters
    ----------
    path : str or os.PathLike
        The slide.
    appearance : Appearance, optional
        The style the caller would draw it in now.
    pixel_size_um : float, optional
        The pixel size the caller would draw it at now.

    Examples
    --------
    >>> slide_is_current("no_such_slide.ome.tif")
    False
    """
    import json

    path = Path(path)
    meta = truth_dir_for(path) / "slide.json"
    if not (path.exists() and meta.exists()):
        return False
    info = json.loads(meta.read_text())
    if info.get("generator_revision", 1) != GENERATOR_REVISION:
        return False
    spec = info.get("spec", {})
    if appearance is not None:
        try:
            if Appearance(**spec.get("appearance", {})) != appearance:
                return False
        except (TypeError, ValueError):  # written by a generator with other fields
            return False
    return pixel_size_um is None or math.isclose(
        float(spec.get("pixel_size_um", -1.0)), pixel_size_um, rel_tol=1e-9
    )


@dataclass
class SyntheticSlide:
    """A generated slide and its ground truth.

    Attributes
    ----------
    path : Path
        The OME-TIFF.
    truth_dir : Path
        Folder with the truth tables and label masks.
    lesions, cells, nuclei : pandas.DataFrame
        Truth tables (see the package docstring for columns).
    meta : dict
        Contents of ``slide.json``.
    """

    path: Path
    truth_dir: Path
    lesions: pd.DataFrame
    cells: pd.DataFrame
    nuclei: pd.DataFrame
    meta: dict


def _counts(lesions: pd.DataFrame, cells: pd.DataFrame) -> dict:
    by_class = lesions["class"].value_counts()
    return {
        "n_lesions": int(len(lesions)),
        "n_single": int(by_class.get("single", 0)),
        "n_cluster": int(by_class.get("cluster", 0)),
        "n_focus": int(by_class.get("focus", 0)),
        "n_dormant": int(lesions["dormant"].sum()),
        "n_her2_cells": int(len(cells)),
        "n_ki67_pos_cells": int(cells["ki67_pos"].sum()),
    }


def generate_slide(
    path: str | os.PathLike,
    *,
    size_px: tuple[int, int] = (8192, 6144),
    group: str = "PBS",
    dpi: int = 15,
    seed: int = 0,
    ki67: bool = True,
    mouse_burden: float = 1.0,
    mouse_response: float = 1.0,
    pixel_size_um: float = 0.5,
    appearance: Appearance | None = None,
    labels: bool = True,
    progress: Progress | None = None,
) -> SyntheticSlide:
    """Generate one synthetic lung section and its ground truth.

    Parameters
    ----------
    path : path-like
        Output OME-TIFF, e.g. ``lung.ome.tif``; the truth goes to ``lung.truth/`` beside it.
    size_px : (int, int)
        Width and height of level 0 in pixels.
    group : {"IAV", "PBS"}
        Infected (influenza A virus) or control mouse.
    dpi : int
        Days post infection.
    seed : int
        Same seed, same pixels and tables.
    ki67 : bool
        Image the Ki67 channel. Without it the file has DAPI and HER2 only; the truth still
        records each cell's (biological) Ki67 status.
    mouse_burden, mouse_response : float
        Per-mouse multipliers of the disseminated-cell density and of the response to
        infection (1 = average mouse); sections of one mouse share them.
    pixel_size_um : float
        Level-0 pixel size.
    appearance : Appearance, optional
        How the slide looks: HER2 pattern, nucleus visibility, packing, autofluorescence,
        bleed-through, tumour-dense tissue, dynamic range, tissue layout (`Appearance`; the
        default is the generator's original style).
    labels : bool
        Also write the instance label masks (``labels.ome.tif``).
    progress : callable(done, total, message), optional
        Called as the slide is rendered and written.

    Returns
    -------
    SyntheticSlide
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not path.name.lower().endswith((".ome.tif", ".ome.tiff")):
        from ..errors import InputError

        raise InputError(
            f"{path}: synthetic slides are written as OME-TIFF; "
            f"give a name ending in .ome.tif, e.g. {slide_stem(path)}.ome.tif"
        )
    width, height = (int(v) for v in size_px)
    spec = SlideSpec(
        width_px=width,
        height_px=height,
        pixel_size_um=pixel_size_um,
        group=group,
        dpi=int(dpi),
        seed=int(seed),
        ki67=ki67,
        mouse_burden=mouse_burden,
        mouse_response=mouse_response,
        appearance=appearance or Appearance(),
    )
    scene = build_scene(spec)
    t_scene = time.perf_counter() - t0
    n_bands = math.ceil(height / BAND_ROWS)
    n_label_bands = math.ceil(height / 512) * len(LABEL_CHANNELS) if labels else 0
    total = n_bands + 1 + n_label_bands + 1
    done = 0

    def tick(msg):
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, msg)

    channels = list(CHANNELS) if ki67 else list(CHANNELS[:2])
    image = np.empty((len(channels), height, width), file_dtype(scene))
    for b in range(n_bands):
        y0, y1 = b * BAND_ROWS, min(height, (b + 1) * BAND_ROWS)
        image[:, y0:y1] = render_counts(scene, y0, y1)[: len(channels)]
        tick("rendering")
    t_render = time.perf_counter() - t0 - t_scene

    truth_dir = truth_dir_for(path)
    truth_dir.mkdir(parents=True, exist_ok=True)
    if labels:
        _write_labels(scene, truth_dir / "labels.ome.tif", tick)
    meta = {
        "generator": "lungmets.synthetic",
        "version": __version__,
        "generator_revision": GENERATOR_REVISION,
        "slide": path.name,
        "spec": asdict(spec),
        "channels": channels,
        "pixel_size_um": pixel_size_um,
        "appearance": spec.appearance.to_dict(),
        "dtype": str(image.dtype),
        "size_px": [width, height],
        "tissue_area_mm2": scene.tissue_area_mm2,
        "counts": _counts(scene.lesions, scene.cells),
        "n_nuclei": int(len(scene.nuclei)),
        "n_dcc_seeded": scene.extras["n_dcc"],
        "n_dcc_placed": scene.extras["n_dcc_placed"],
        "lesion_model": asdict(scene.model),
        "stain": {
            "autofluorescence": dict(zip(CHANNELS, scene.stain.af.round(2).tolist(), strict=True)),
            "gain": dict(zip(CHANNELS, scene.stain.gain.round(4).tolist(), strict=True)),
            "offset": round(scene.stain.offset, 2),
            "read_noise": round(scene.stain.read_noise, 3),
            "blur_sigma_px": round(scene.stain.blur_sigma_px, 3),
        },
        "coordinates": "x_um = x_px * pixel_size_um, level-0 pixel centres at integers",
    }
    write_csv(scene.lesions, truth_dir / "lesions.csv", float_format="%.4f")
    write_csv(scene.cells, truth_dir / "cells.csv", float_format="%.4f")
    write_csv(scene.nuclei, truth_dir / "nuclei.csv", float_format="%.3f")
    # The slide is written last: its presence means the truth beside it is complete.
    levels = pyramid_levels(image)
    write_ome_tiff(path, levels, channel_names=channels, pixel_size_um=pixel_size_um)
    del levels, image
    tick("writing")
    meta["timings_s"] = {
        "scene": round(t_scene, 3),
        "render": round(t_render, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    write_json(meta, truth_dir / "slide.json")
    tick("done")
    log.info("wrote %s (%.1f s)", path, meta["timings_s"]["total"])
    return SyntheticSlide(
        path=path,
        truth_dir=truth_dir,
        lesions=scene.lesions,
        cells=scene.cells,
        nuclei=scene.nuclei,
        meta=meta,
    )


def _write_labels(scene, path: Path, tick) -> None:
    """Write the truth label masks band by band (memory bounded by one band)."""
    import tifffile

    H, W = scene.shape
    tile = 512

    def tiles():
        for which in LABEL_CHANNELS:
            for y0 in range(0, H, tile):
                band = render_labels(scene, which, y0, min(H, y0 + tile))
                tick(f"labels ({which})")
                for x0 in range(0, W, tile):
                    yield band[:, x0 : x0 + tile]

    px = scene.spec.pixel_size_um
    metadata = {
        "axes": "CYX",
        "PhysicalSizeX": px,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": px,
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": list(LABEL_CHANNELS)},
    }
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            tiles(),
            shape=(len(LABEL_CHANNELS), H, W),
            dtype=np.int32,
            tile=(tile, tile),
            compression="zlib",
            photometric="minisblack",
            metadata=metadata,
            ome=True,
            bigtiff=True,
        )


def load_truth(slide_path: str | os.PathLike) -> SyntheticSlide:
    """Read the truth tables written beside a generated slide.

    Raises
    ------
    histo.InputError
        If the slide has no truth folder (it was not made by the generator).
    """
    import json

    from ..errors import InputError

    slide_path = Path(slide_path)
    d = truth_dir_for(slide_path)
    if not (d / "lesions.csv").exists():
        raise InputError(
            f"{slide_path}: no ground truth found at {d}; only slides made by "
            "`lungmets synth` have one"
        )
    meta = json.loads((d / "slide.json").read_text()) if (d / "slide.json").exists() else {}
    return SyntheticSlide(
        path=slide_path,
        truth_dir=d,
        lesions=pd.read_csv(d / "lesions.csv"),
        cells=pd.read_csv(d / "cells.csv"),
        nuclei=pd.read_csv(d / "nuclei.csv"),
        meta=meta,
    )


# ----------------------------------------------------------------------------- cohorts


def _cohort_slide(args):
    path, kwargs = args
    s = generate_slide(path, **kwargs)
    return {**s.meta["counts"], "tissue_area_mm2": s.meta["tissue_area_mm2"]}


def generate_cohort(
    out_dir: str | os.PathLike,
    *,
    mice: int = 4,
    sections: int = 3,
    dpis: Sequence[int] = (3, 9, 15, 28),
    groups: Sequence[str] = ("IAV", "PBS"),
    size_px: tuple[int, int] = (4096, 3072),
    seed: int = 0,
    ki67: bool = True,
    jobs: int = 1,
    labels: bool = True,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Generate a study: infected and control mice at several days post infection.

    Every mouse has its own burden of disseminated cells and strength of response, which its
    sections share; each section is a separate slide with its own seed.

    Parameters
    ----------
    out_dir : path-like
        Folder for the slides, their truth folders, ``samples.csv`` and ``truth_slides.csv``.
    mice : int
        Mice per group and time point.
    sections : int
        Sections (slides) per mouse.
    dpis : sequence of int
        Days post infection.
    groups : sequence of str
        Groups to generate (``"IAV"`` and/or ``"PBS"``).
    size_px, seed, ki67, labels
        As in `generate_slide`; `seed` seeds the whole cohort.
    jobs : int
        Slides generated in parallel processes.
    progress : callable(done, total, message), optional
        Called after each slide.

    Returns
    -------
    pandas.DataFrame
        The sample sheet: slide (path relative to `out_dir`), mouse, group, dpi, section.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0407]))
    rows, tasks = [], []
    for dpi in dpis:
        for group in groups:
            group = group.upper()
            for m in range(1, mice + 1):
                burden = float(rng.lognormal(0, 0.3))
                response = float(rng.lognormal(0, 0.15))
                mouse = f"{group}-d{dpi}-m{m}"
                for s in range(1, sections + 1):
                    name = f"{group}_d{dpi:02d}_m{m}_s{s}.ome.tif"
                    slide_seed = int(rng.integers(2**31))
                    rows.append(
                        {
                            "slide": name,
                            "mouse": mouse,
                            "group": group,
                            "dpi": int(dpi),
                            "section": s,
                            "mouse_burden": round(burden, 4),
                            "mouse_response": round(response, 4),
                            "seed": slide_seed,
                        }
                    )
                    tasks.append(
                        (
                            out_dir / name,
                            {
                                "size_px": size_px,
                                "group": group,
                                "dpi": int(dpi),
                                "seed": slide_seed,
                                "ki67": ki67,
                                "mouse_burden": burden,
                                "mouse_response": response,
                                "labels": labels,
                            },
                        )
                    )
    results = []
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for i, r in enumerate(pool.map(_cohort_slide, tasks), start=1):
                results.append(r)
                if progress:
                    progress(i, len(tasks), "slides")
    else:
        for i, t in enumerate(tasks, start=1):
            results.append(_cohort_slide(t))
            if progress:
                progress(i, len(tasks), "slides")
    sheet = pd.DataFrame(rows)
    truth = pd.concat([sheet, pd.DataFrame(results)], axis=1)
    write_csv(truth, out_dir / "truth_slides.csv", float_format="%.5g")
    samples = sheet[["slide", "mouse", "group", "dpi", "section"]]
    write_csv(samples, out_dir / "samples.csv")
    return samples


# ----------------------------------------------------------------------------- sample data

#: The bundled example slides: (file name, group, dpi, seed).
SAMPLE_SLIDES = (
    ("lung_IAV_d15.ome.tif", "IAV", 15, 41),
    ("lung_PBS_d15.ome.tif", "PBS", 15, 42),
)
#: Small enough to commit (about 4 MB a slide), large enough to hold every lesion class.
SAMPLE_SIZE_PX = (1280, 1024)


def generate_sample_data(
    out_dir: str | os.PathLike = "sample_data", *, progress: Progress | None = None
) -> list[Path]:
    """Write the two small example sections (infected and control) and their sample sheet.

    This is how ``sample_data/`` in the repository is made: ``lungmets synth sample-data``.

    Returns
    -------
    list of Path
        The slides written.
    """
    out_dir = Path(out_dir)
    paths, rows = [], []
    for i, (name, group, dpi, seed) in enumerate(SAMPLE_SLIDES, start=1):
        s = generate_slide(out_dir / name, size_px=SAMPLE_SIZE_PX, group=group, dpi=dpi, seed=seed)
        paths.append(s.path)
        rows.append(
            {"slide": name, "mouse": f"{group}-m1", "group": group, "dpi": dpi, "section": 1}
        )
        if progress:
            progress(i, len(SAMPLE_SLIDES), "slides")
    write_csv(pd.DataFrame(rows), out_dir / "samples.csv")
    return paths


# ----------------------------------------------------------------------------- preview


def _composite(img: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """DAPI blue, HER2 green, Ki67 magenta; each channel stretched between percentiles."""
    colours = {"DAPI": (0.0, 0.25, 1.0), "HER2": (0.0, 1.0, 0.0), "Ki67": (1.0, 0.0, 1.0)}
    rgb = np.zeros(img.shape[1:] + (3,), np.float32)
    for c, name in enumerate(channels):
        ch = img[c].astype(np.float32)
        lo, hi = np.percentile(ch, [1.0, 99.7])
        ch = np.clip((ch - lo) / max(hi - lo, 1.0), 0, 1)
        rgb += ch[..., None] * np.array(colours.get(name, (1, 1, 1)), np.float32)
    return np.clip(rgb, 0, 1)


def _pick_region(lesions: pd.DataFrame, px: float, size_px: int, shape) -> tuple[int, int]:
    """Top-left of a window holding a focus, a cluster and a single cell if possible."""
    best, best_score = (0, 0), -1.0
    half = size_px / 2
    for _, les in lesions.iterrows():
        cy, cx = les.y_um / px, les.x_um / px
        y0 = int(np.clip(cy - half, 0, max(shape[0] - size_px, 0)))
        x0 = int(np.clip(cx - half, 0, max(shape[1] - size_px, 0)))
        inside = lesions[
            (lesions.y_um / px >= y0 + 20)
            & (lesions.y_um / px < y0 + size_px - 20)
            & (lesions.x_um / px >= x0 + 20)
            & (lesions.x_um / px < x0 + size_px - 20)
        ]
        classes = set(inside["class"])
        score = 10 * len(classes) + min(len(inside), 9)
        if score > best_score:
            best, best_score = (y0, x0), score
    return best


def render_preview(
    slide_path: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    region_px: tuple[int, int, int] | None = None,
    size_px: int = 800,
) -> Path:
    """Render a region of a generated slide beside its truth outlines to a PNG.

    Parameters
    ----------
    slide_path : path-like
        A slide written by `generate_slide`.
    out_png : path-like
        Output PNG.
    region_px : (y0, x0, size), optional
        Level-0 window; by default one that shows a focus, a cluster and a single cell.
    size_px : int
        Window size when `region_px` is not given.

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    truth = load_truth(slide_path)
    px = truth.meta.get("pixel_size_um", 0.5)
    with tifffile.TiffFile(slide_path) as tf:
        shape = tf.series[0].shape[1:]
    if region_px is None:
        y0, x0 = _pick_region(truth.lesions, px, size_px, shape)
        size = size_px
    else:
        y0, x0, size = region_px
    sel = (slice(None), slice(y0, y0 + size), slice(x0, x0 + size))
    img = tifffile.imread(slide_path, selection=sel)
    channels = truth.meta.get("channels", list(CHANNELS))
    rgb = _composite(img, channels)
    labels_path = truth.truth_dir / "labels.ome.tif"
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.8), constrained_layout=True)
    extent = (x0 * px, (x0 + img.shape[2]) * px, (y0 + img.shape[1]) * px, y0 * px)
    axes[0].imshow(rgb, extent=extent)
    axes[0].set_title(
        f"{Path(slide_path).name}: DAPI (blue), HER2 (green), Ki67 (magenta)", fontsize=10
    )
    over = rgb.copy()
    if labels_path.exists():
        cells = tifffile.imread(labels_path, selection=(1,) + sel[1:])
        lesions = tifffile.imread(labels_path, selection=(2,) + sel[1:])
        over[find_boundaries(cells, mode="inner")] = (1.0, 1.0, 1.0)
        colour = {"single": (1.0, 0.85, 0.0), "cluster": (1.0, 0.45, 0.0), "focus": (1.0, 0.1, 0.1)}
        cls = dict(zip(truth.lesions.lesion_id, truth.lesions["class"], strict=True))
        for lid in np.unique(lesions):
            if lid:
                mask = lesions == lid
                ring = ndi.binary_dilation(mask, iterations=3) & ~mask
                over[ring] = colour[cls[lid]]
    axes[1].imshow(over, extent=extent)
    axes[1].set_title("ground truth: cells (white), single / cluster / focus outlines", fontsize=10)
    win = truth.lesions[
        (truth.lesions.x_um >= extent[0])
        & (truth.lesions.x_um < extent[1])
        & (truth.lesions.y_um >= extent[3])
        & (truth.lesions.y_um < extent[2])
    ]
    for _, les in win.iterrows():
        tag = les["class"] + (" (dormant)" if les["dormant"] else "")
        tag += f"\n{les.n_cells} cells, {les.n_ki67_pos} Ki67+" if les.n_cells > 1 else ""
        right = les.x_um > 0.5 * (extent[0] + extent[1])
        axes[1].annotate(
            tag,
            (les.x_um, les.y_um),
            xytext=(-14 if right else 14, -14),
            textcoords="offset points",
            ha="right" if right else "left",
            color="white",
            fontsize=8,
            annotation_clip=True,
            bbox={"boxstyle": "round,pad=0.2", "fc": "black", "alpha": 0.6, "lw": 0},
        )
    for ax in axes:
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)
