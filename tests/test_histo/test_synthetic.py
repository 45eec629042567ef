"""The synthetic slide generator: determinism, truth consistency, file format, biology."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.measure import regionprops

from histo.atomic import atomic_path
from histo.synthetic import (
    SlideSpec,
    build_scene,
    generate_cohort,
    generate_slide,
    lesion_model,
    load_truth,
    render_preview,
)
from histo.synthetic._biology import draw_lesion_sizes
from histo.synthetic._render import render_counts

SIZE = (1280, 1024)  # width, height: three tile columns, two tile rows, two 1024-px bands


@pytest.fixture(scope="module")
def iav_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "iav.ome.tif"
    return generate_slide(out, size_px=SIZE, group="IAV", dpi=15, seed=41)


def test_same_seed_gives_identical_pixels_and_tables(iav_slide, tmp_path):
    again = generate_slide(tmp_path / "again.ome.tif", size_px=SIZE, group="IAV", dpi=15, seed=41)
    a = tifffile.imread(iav_slide.path)
    b = tifffile.imread(again.path)
    np.testing.assert_array_equal(a, b)
    for name in ("lesions.csv", "cells.csv", "nuclei.csv"):
        assert (iav_slide.truth_dir / name).read_bytes() == (again.truth_dir / name).read_bytes()
    np.testing.assert_array_equal(
        tifffile.imread(iav_slide.truth_dir / "labels.ome.tif"),
        tifffile.imread(again.truth_dir / "labels.ome.tif"),
    )


def test_other_seed_gives_other_slide(iav_slide, tmp_path):
    other = generate_slide(tmp_path / "other.ome.tif", size_px=SIZE, group="IAV", dpi=15, seed=42)
    a = tifffile.imread(iav_slide.path)
    b = tifffile.imread(other.path)
    assert np.mean(a != b) > 0.5
    assert not iav_slide.lesions[["x_um", "y_um"]].equals(other.lesions[["x_um", "y_um"]])


def test_pixels_do_not_depend_on_how_rows_are_banded():
    scene = build_scene(SlideSpec(width_px=900, height_px=800, group="IAV", dpi=15, seed=5))
    whole = render_counts(scene, 0, 800)
    banded = np.concatenate(
        [render_counts(scene, y0, min(800, y0 + 300)) for y0 in range(0, 800, 300)], axis=1
    )
    np.testing.assert_array_equal(whole, banded)


def test_ome_metadata_reads_back_through_tifffile(iav_slide):
    with tifffile.TiffFile(iav_slide.path) as tf:
        assert tf.is_ome
        series = tf.series[0]
        assert series.axes == "CYX"
        assert series.dtype == np.uint16
        assert series.shape == (3, SIZE[1], SIZE[0])
        shapes = [lev.shape for lev in series.levels]
        page = series.levels[0].keyframe
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        ome = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
    assert [c["Name"] for c in ome["Channel"]] == ["DAPI", "HER2", "Ki67"]
    assert ome["PhysicalSizeX"] == pytest.approx(0.5)
    assert ome["PhysicalSizeY"] == pytest.approx(0.5)
    # Each level halves the previous one, down to below 1024 px.
    assert shapes == [(3, 1024, 1280), (3, 512, 640)]
    low = tifffile.imread(iav_slide.path, level=1)
    assert low.shape == (3, 512, 640)


def test_without_ki67_the_file_has_two_channels(tmp_path):
    s = generate_slide(
        tmp_path / "noki.ome.tif",
        size_px=(600, 500),
        group="IAV",
        dpi=15,
        seed=3,
        ki67=False,
        labels=False,
    )
    with tifffile.TiffFile(s.path) as tf:
        ome = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
        assert tf.series[0].shape == (2, 500, 600)
    assert [c["Name"] for c in ome["Channel"]] == ["DAPI", "HER2"]
    meta = json.loads((s.truth_dir / "slide.json").read_text())
    assert meta["channels"] == ["DAPI", "HER2"]
    # Which generator drew it: a benchmark's cached slide of an older one is drawn again.
    from histo.synthetic import GENERATOR_REVISION

    assert meta["generator_revision"] == GENERATOR_REVISION >= 2


def test_truth_tables_agree_with_label_masks(iav_slide):
    truth = load_truth(iav_slide.path)
    labels = tifffile.imread(truth.truth_dir / "labels.ome.tif")
    nuclei_lab, cells_lab, lesions_lab = labels
    cells, lesions = truth.cells, truth.lesions
    px = 0.5
    assert len(cells) > 20 and set(lesions["class"]) == {"single", "cluster", "focus"}

    # Every truth cell has its cell mask and its nucleus mask, and nothing else is a cell.
    assert set(np.unique(cells_lab)) - {0} == set(cells.cell_id)
    cancer_nuclei = {r.label: r for r in regionprops(np.where(cells_lab > 0, nuclei_lab, 0))}
    assert set(cancer_nuclei) == set(cells.cell_id)
    for c in cells.itertuples():
        r = cancer_nuclei[c.cell_id]
        # Cell position = nucleus centre; the mask centroid agrees to a fraction of a pixel.
        assert r.centroid[1] * px == pytest.approx(c.x_um, abs=0.25)
        assert r.centroid[0] * px == pytest.approx(c.y_um, abs=0.25)
        assert r.area * px * px == pytest.approx(c.nucleus_area_um2)
    cell_area = np.bincount(cells_lab.ravel())[cells.cell_id] * px * px
    np.testing.assert_allclose(cell_area, cells.cell_area_um2)

    # Lesions: one label each, their cells inside, counts and classes consistent.
    assert set(np.unique(lesions_lab)) - {0} == set(lesions.lesion_id)
    for les in lesions.itertuples():
        mask = lesions_lab == les.lesion_id
        inside = set(np.unique(cells_lab[mask])) - {0}
        members = cells[cells.lesion_id == les.lesion_id]
        assert inside == set(members.cell_id)
        assert les.n_cells == len(members)
        assert les.n_ki67_pos == int(members.ki67_pos.sum())
        assert mask.sum() * px * px == pytest.approx(les.area_um2)
        assert les.x_um == pytest.approx(members.x_um.mean(), abs=1e-3)
        expected = "single" if les.n_cells == 1 else "cluster" if les.n_cells <= 4 else "focus"
        assert les._6 == expected  # the "class" column
        assert les.dormant == (les.n_cells == 1 and les.n_ki67_pos == 0)

    # Ordinary nuclei are labelled too, one label each, listed in nuclei.csv.
    other = set(np.unique(nuclei_lab)) - {0} - set(cells.cell_id)
    listed = set(truth.nuclei.nucleus_id) - set(cells.cell_id)
    assert len(other) > 500
    assert other <= listed
    # A few nuclei can be hidden entirely under later ones; nearly all must be visible.
    assert len(other) / len(listed) > 0.97


def test_cancer_cells_are_brighter_in_her2_than_tissue_but_some_are_dim(iav_slide):
    """Lesion brightness spans ~2x to ~15x the tissue autofluorescence, measured in pixels."""
    img = tifffile.imread(iav_slide.path).astype(float)
    labels = tifffile.imread(iav_slide.truth_dir / "labels.ome.tif")
    meta = iav_slide.meta
    offset = meta["stain"]["offset"]
    her2 = img[1] - offset
    cells_lab = labels[1]
    # Tissue autofluorescence: pixels brighter than glass that are neither cells nor nuclei.
    dapi = img[0] - offset
    background = (cells_lab == 0) & (labels[0] == 0) & (dapi < 50)
    glass = np.percentile(her2[background], 20)
    tissue_af = np.percentile(her2[background & (her2 > glass + 30)], 50)
    means = pd.Series(
        np.bincount(cells_lab.ravel(), her2.ravel()) / np.maximum(np.bincount(cells_lab.ravel()), 1)
    )
    cell_means = means[iav_slide.cells.cell_id.to_numpy()]
    ratio = cell_means / tissue_af
    assert ratio.median() > 3
    assert ratio.min() < 3  # dim cells exist: the detector must work for them too


def test_lesions_straddle_chunk_borders(iav_slide):
    cells = iav_slide.cells
    px = 0.5

    def straddles(grid):
        n = 0
        for _, members in cells.groupby("lesion_id"):
            for col in ("x_um", "y_um"):
                blocks = np.floor(members[col] / px / grid)
                n += blocks.nunique() > 1
        return n

    assert straddles(512) >= 2
    assert straddles(1024) >= 1


def test_infection_raises_her2_cells_several_fold_and_shifts_to_foci():
    """The biology model, over many simulated lungs (no pixels needed)."""
    rng = np.random.default_rng(0)
    n_dcc = 40_000

    def stats(group, dpi):
        sizes, awake = draw_lesion_sizes(rng, n_dcc, lesion_model(group, dpi))
        return sizes.sum() / n_dcc, np.mean(sizes >= 5), np.mean(sizes == 1)

    pbs_cells, pbs_foci, pbs_single = stats("PBS", 15)
    for dpi, min_fold in ((9, 2.0), (15, 4.0), (28, 4.0)):
        cells, foci, single = stats("IAV", dpi)
        assert cells / pbs_cells > min_fold, dpi
        assert foci > pbs_foci + 0.1
        assert single < pbs_single
    early_cells, _, _ = stats("IAV", 3)
    assert early_cells / pbs_cells < 1.5  # nothing much happens in the first days
    assert pbs_single > 0.9  # control lungs: mostly solitary dormant cells


@pytest.mark.parametrize(
    "cell_diameter_um, packing",
    [((12.0, 18.0), (0.86, 1.0)), ((9.0, 11.0), (0.7, 0.8)), ((21.0, 25.0), (0.7, 0.8))],
)
def test_each_true_lesion_is_one_lesion_under_the_linking_rule(cell_diameter_um, packing):
    """A lesion's cells touch: the analysis's linking (cells closer than 25 um are one lesion)
    gives back the generator's lesions whatever the cell size and packing. A cell that cannot
    be packed used to be dropped up to 2.2 radii outside the lesion, which made small- and
    large-cell foci split into satellites and the truth's classes disagree with the rule."""
    from histo.config import AnalysisConfig
    from histo.lesions import link_cells
    from histo.synthetic._appearance import Appearance
    from histo.synthetic._scene import _grow_lesion

    app = Appearance(cell_diameter_um=cell_diameter_um, packing=packing)
    link_um = AnalysisConfig().link_distance_um
    rng = np.random.default_rng(7)
    split = 0
    for n in (2, 3, 4, 6, 12, 40, 150):
        for _ in range(12):
            centres = _grow_lesion(rng, n, app)[0]
            cells = pd.DataFrame({"x_um": centres[:, 1], "y_um": centres[:, 0]})
            split += len(np.unique(link_cells(cells, link_um))) > 1
            gap = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
            np.fill_diagonal(gap, np.inf)
            # Touching: no cell further from its nearest neighbour than a cell diameter.
            assert gap.min(axis=1).max() <= cell_diameter_um[1] + 0.5
    assert split == 0


def test_small_cell_slide_truth_follows_the_linking_rule(tmp_path):
    """On a drawn slide of 9-11 um cells, linking the true cells gives the true lesions."""
    from histo.lesions import group_lesions
    from histo.synthetic._appearance import Appearance

    app = Appearance(cell_diameter_um=(9.0, 11.0), packing=(0.7, 0.8))
    path = tmp_path / "small.ome.tif"
    generate_slide(
        path, size_px=(1536, 1280), group="IAV", dpi=28, seed=5, appearance=app, labels=False
    )
    truth = load_truth(path)
    assert (truth.lesions["class"] == "focus").sum() >= 2
    _, lesions = group_lesions(truth.cells.drop(columns=["cell_id", "lesion_id"]))
    got = sorted(zip(lesions["n_cells"], lesions["class"], strict=True))
    want = sorted(zip(truth.lesions["n_cells"], truth.lesions["class"], strict=True))
    assert got == want


@pytest.mark.slow
def test_cohort_sheet_truth_and_direction_of_effect(tmp_path):
    samples = generate_cohort(
        tmp_path,
        mice=3,
        sections=2,
        dpis=(3, 15),
        size_px=(1536, 1280),
        seed=7,
        labels=False,
        jobs=2,
    )
    assert list(samples.columns) == ["slide", "mouse", "group", "dpi", "section"]
    assert len(samples) == 2 * 2 * 3 * 2
    assert pd.read_csv(tmp_path / "samples.csv").equals(samples)
    for name in samples.slide:
        assert (tmp_path / name).exists()
    truth = pd.read_csv(tmp_path / "truth_slides.csv")
    # Sections of one mouse share that mouse's burden; mice differ.
    per_mouse = truth.groupby("mouse")["mouse_burden"]
    assert (per_mouse.nunique() == 1).all()
    assert truth.groupby("mouse")["mouse_burden"].first().nunique() == 12
    # Direction of the effect, per mouse (the unit of the statistics).
    truth["density"] = truth.n_her2_cells / truth.tissue_area_mm2
    mice = truth.groupby(["group", "dpi", "mouse"]).agg(
        density=("density", "mean"), foci=("n_focus", "sum"), lesions=("n_lesions", "sum")
    )
    late_iav = mice.loc[("IAV", 15)]
    late_pbs = mice.loc[("PBS", 15)]
    assert late_iav.density.mean() > 3 * late_pbs.density.mean()
    assert (late_iav.foci / late_iav.lesions).mean() > (late_pbs.foci / late_pbs.lesions).mean()
    early_ratio = mice.loc[("IAV", 3)].density.mean() / mice.loc[("PBS", 3)].density.mean()
    assert early_ratio < 2.0


def test_atomic_path_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a table")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_preview_png_shows_a_region(iav_slide, tmp_path):
    out = render_preview(iav_slide.path, tmp_path / "preview.png", size_px=600)
    from PIL import Image

    im = np.asarray(Image.open(out))
    assert im.shape[0] > 400 and im.shape[1] > 800
    assert im[..., :3].std() > 20  # not a blank canvas


def test_cli_synth_slide_writes_slide_and_truth(tmp_path):
    out = tmp_path / "cli.ome.tif"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo",
            "synth",
            "slide",
            str(out),
            "--size",
            "700x600",
            "--group",
            "iav",
            "--dpi",
            "15",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    truth = load_truth(out)
    assert truth.meta["spec"]["group"] == "IAV"
    assert f"{len(truth.cells)} HER2+" in proc.stdout


def test_cli_rejects_a_slide_name_that_is_not_ome_tiff(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo",
            "synth",
            "slide",
            str(tmp_path / "x.png"),
            "--size",
            "600x500",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "x.png" in proc.stderr and ".ome.tif" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bundled_sample_data_is_what_the_command_regenerates(tmp_path):
    from pathlib import Path

    from histo.synthetic import generate_sample_data

    bundled = Path(__file__).resolve().parents[2] / "sample_data"
    paths = generate_sample_data(tmp_path)
    assert [p.name for p in paths] == ["lung_IAV_d15.ome.tif", "lung_PBS_d15.ome.tif"]
    assert pd.read_csv(tmp_path / "samples.csv").equals(pd.read_csv(bundled / "samples.csv"))
    for p in paths:
        np.testing.assert_array_equal(tifffile.imread(p), tifffile.imread(bundled / p.name))
        fresh, kept = load_truth(p), load_truth(bundled / p.name)
        pd.testing.assert_frame_equal(fresh.lesions, kept.lesions)
        pd.testing.assert_frame_equal(fresh.cells, kept.cells)
    iav = load_truth(bundled / "lung_IAV_d15.ome.tif").lesions
    assert {"single", "cluster", "focus"} <= set(iav["class"])
