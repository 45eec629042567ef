"""The whole-slide engine: no seams, any scheduler, accuracy against the generator's truth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from histo.chunks import plan_chunks
from histo.config import AnalysisConfig
from histo.evaluate import evaluate_cells, evaluate_lesions
from histo.io import open_slide, write_ome_tiff
from histo.outputs import write_results
from histo.pipeline import analyze_slide, analyze_tile, measure_background
from histo.synthetic import generate_slide, load_truth

# The engine is tested with the classical detector (fast); tests/test_models covers the network.
CLASSICAL = AnalysisConfig(method="classical")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """An infected lung, 2560 x 2048 px: several 512-px chunk borders cross its lesions."""
    out = tmp_path_factory.mktemp("engine") / "lung.ome.tif"
    return generate_slide(out, size_px=(2560, 2048), group="IAV", dpi=15, seed=21)


@pytest.fixture(scope="module")
def reference(slide):
    return analyze_slide(slide.path, CLASSICAL.replace(chunk_size_px=2048))


def _assert_same_lesions(a: pd.DataFrame, b: pd.DataFrame):
    assert len(a) == len(b)
    np.testing.assert_array_equal(a["n_cells"].to_numpy(), b["n_cells"].to_numpy())
    np.testing.assert_array_equal(a["class"].to_numpy(), b["class"].to_numpy())
    np.testing.assert_allclose(
        a[["x_um", "y_um"]].to_numpy(), b[["x_um", "y_um"]].to_numpy(), atol=0.01
    )


def test_test_slide_has_lesions_straddling_chunk_borders(slide):
    cells = slide.cells
    crossing = 0
    for _, members in cells.groupby("lesion_id"):
        for col in ("x_um", "y_um"):
            crossing += np.floor(members[col] / 0.5 / 512).nunique() > 1
    assert crossing >= 3


@pytest.mark.parametrize("chunk_size_px", [512, 1024])
def test_lesion_table_is_identical_for_any_chunk_size(slide, reference, chunk_size_px):
    result = analyze_slide(slide.path, CLASSICAL.replace(chunk_size_px=chunk_size_px))
    assert result.summary["chunks"]["analysed"] > 1
    _assert_same_lesions(result.lesions, reference.lesions)
    np.testing.assert_allclose(
        result.cells[["x_um", "y_um"]], reference.cells[["x_um", "y_um"]], atol=0.01
    )


@pytest.mark.slow
def test_processes_and_a_local_cluster_give_the_same_lesions(slide, reference):
    from distributed import LocalCluster

    config = CLASSICAL.replace(chunk_size_px=1024)
    by_processes = analyze_slide(slide.path, config, workers=2)
    _assert_same_lesions(by_processes.lesions, reference.lesions)
    assert "LocalCluster" in by_processes.summary["scheduler"]
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
    ) as cluster:
        on_cluster = analyze_slide(slide.path, config, scheduler=cluster.scheduler_address)
    _assert_same_lesions(on_cluster.lesions, reference.lesions)


def test_progress_counts_every_chunk(slide):
    seen = []
    analyze_slide(
        slide.path,
        CLASSICAL.replace(chunk_size_px=1024),
        progress=lambda done, total, msg: seen.append((done, total)),
    )
    total = seen[-1][1]
    assert total >= 4
    assert [d for d, _ in seen] == list(range(0, total + 1))


def test_classical_detector_finds_the_truth(slide, reference):
    truth = load_truth(slide.path)
    cells = evaluate_cells(reference.cells, truth.cells)
    assert cells["f1"] > 0.9
    assert abs(cells["count_error"]) < 0.1
    assert cells["ki67_agreement"] > 0.95
    lesions = evaluate_lesions(reference.lesions, truth.lesions)
    assert lesions.loc["focus", "f1"] > 0.8
    assert lesions.loc["all", "recall"] > 0.85


def test_tissue_area_matches_the_truth(slide, reference):
    truth_mm2 = slide.meta["tissue_area_mm2"]
    assert reference.summary["tissue_area_mm2"] == pytest.approx(truth_mm2, rel=0.08)


def test_glass_is_never_analysed(tmp_path, slide):
    # The right half of the slide replaced by empty glass: its chunks are left out.
    img = tifffile.imread(slide.path)
    rng = np.random.default_rng(1)
    offset = slide.meta["stain"]["offset"]
    img[:, :, 1280:] = rng.normal(offset, 2.0, img[:, :, 1280:].shape).astype(np.uint16)
    path = tmp_path / "half.ome.tif"
    write_ome_tiff(path, [img], channel_names=["DAPI", "HER2", "Ki67"], pixel_size_um=0.5)
    r = analyze_slide(path, CLASSICAL.replace(chunk_size_px=512))
    assert r.summary["chunks"]["total"] == 20
    assert r.summary["chunks"]["analysed"] <= 12  # 2 of 5 columns, plus halos
    assert (r.cells["x_um"] < 1280 * 0.5).all()


def test_analyze_tile_on_a_whole_array_equals_the_chunked_slide(slide, reference):
    sl = open_slide(slide.path)
    _, _, stain = measure_background(sl, AnalysisConfig())
    pixels = tifffile.imread(slide.path)
    cells = analyze_tile(
        pixels,
        (0, 0),
        CLASSICAL,
        roles=sl.roles,
        stain=stain,
        pixel_size_um=sl.pixel_size_um,
    )
    cells = cells.sort_values(["y_um", "x_um"]).reset_index(drop=True)
    np.testing.assert_allclose(
        cells[["x_um", "y_um"]], reference.cells[["x_um", "y_um"]], atol=0.01
    )


@settings(max_examples=50, deadline=None)
@given(
    h=st.integers(300, 3000),
    w=st.integers(300, 3000),
    size=st.sampled_from([128, 512, 700]),
    y=st.floats(-0.5, 2999.4),
    x=st.floats(-0.5, 2999.4),
)
def test_every_centre_is_owned_by_exactly_one_chunk(h, w, size, y, x):
    y, x = min(y, h - 0.51), min(x, w - 0.51)
    chunks = plan_chunks((h, w), size, 32)
    owners = [c for c in chunks if c.owns(np.array([y]), np.array([x]))[0]]
    assert len(owners) == 1


def test_without_ki67_the_ki67_columns_are_empty_not_zero(tmp_path):
    s = generate_slide(
        tmp_path / "noki.ome.tif",
        size_px=(1536, 1280),
        group="IAV",
        dpi=15,
        seed=5,
        ki67=False,
        labels=False,
    )
    r = analyze_slide(s.path, CLASSICAL)
    assert len(r.cells) > 10
    assert r.cells["ki67_pos"].isna().all()
    assert r.lesions["n_ki67_pos"].isna().all()
    assert r.lesions["dormant"].isna().all()
    assert r.summary["counts"]["dormant"] is None
    assert r.summary["counts"]["ki67_pos_cells"] is None


def test_further_channels_are_measured_per_cell(tmp_path, slide):
    img = tifffile.imread(slide.path)
    cd4 = (img[1] // 2).astype(np.uint16)  # a made-up marker that follows HER2
    path = tmp_path / "panel.ome.tif"
    write_ome_tiff(
        path,
        [np.concatenate([img, cd4[None]])],
        channel_names=["DAPI", "HER2", "Ki67", "CD4"],
        pixel_size_um=0.5,
    )
    r = analyze_slide(path, CLASSICAL)
    assert "CD4_mean" in r.cells.columns
    ratio = r.cells["CD4_mean"] / r.cells["her2_mean"]
    assert ratio.median() == pytest.approx(0.5, abs=0.15)


def test_results_are_written_with_the_documented_columns(tmp_path, slide, reference):
    folder = write_results(reference, tmp_path)
    assert folder.name == "lung"
    lesions = pd.read_csv(folder / "lesions.csv")
    cells = pd.read_csv(folder / "cells.csv")
    assert list(lesions.columns) == [
        "lesion_id",
        "x_um",
        "y_um",
        "n_cells",
        "n_ki67_pos",
        "class",
        "dormant",
        "area_um2",
        "her2_mean",
    ]
    assert list(cells.columns[:7]) == [
        "cell_id",
        "lesion_id",
        "x_um",
        "y_um",
        "ki67_pos",
        "her2_mean",
        "nucleus_area_um2",
    ]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["counts"]["her2_cells"] == len(cells)
    assert summary["counts"]["focus"] == int((lesions["class"] == "focus").sum())
    assert summary["input"]["sha256"] and summary["input"]["size_bytes"] > 0
    assert summary["densities_per_mm2"]["her2_cells"] == pytest.approx(
        len(cells) / summary["tissue_area_mm2"], rel=1e-3
    )
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files


def test_a_slide_of_empty_glass_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    glass = rng.normal(100, 3, (3, 1024, 1024)).astype(np.uint16)
    path = tmp_path / "glass.ome.tif"
    write_ome_tiff(path, [glass], channel_names=["DAPI", "HER2", "Ki67"], pixel_size_um=0.5)
    from histo.errors import InputError

    with pytest.raises(InputError, match="no tissue"):
        analyze_slide(path, CLASSICAL)


def test_cli_run_goes_on_after_a_bad_slide(tmp_path, slide):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not an image")
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo",
            "run",
            str(bad),
            str(slide.path),
            "--out",
            str(out),
            "--chunk-size",
            "1024",
            "--method",
            "classical",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "notes.tif" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "lung" / "summary.json").exists()
    assert not (out / "notes").exists()
    assert "1 of 2 slides analysed" in proc.stdout


@pytest.mark.parametrize("method", ["classical", "unet"])
def test_a_region_of_glass_gives_empty_tables(slide, method):
    """The napari view, or a region reviewed completely, over glass only: no chunk has tissue,
    and the tables are empty with their columns (it raised an IndexError)."""
    s = open_slide(slide.path)
    mask, mask_px, stain = measure_background(s, AnalysisConfig())
    k = int(np.ceil(100 / mask_px))  # a 100 um box of glass, found on the tissue mask
    ys, xs = np.nonzero(~np.lib.stride_tricks.sliding_window_view(mask, (k, k)).any(axis=(2, 3)))
    assert len(ys), "the section has no glass"
    f = mask_px / s.pixel_size_um
    region = (int(ys[0] * f), int((ys[0] + k) * f), int(xs[0] * f), int((xs[0] + k) * f))
    result = analyze_slide(slide.path, AnalysisConfig(method=method), region_px=region)
    assert len(result.cells) == 0 and len(result.lesions) == 0
    whole = analyze_tile(
        s.read_region(0, 0, 512, 0, 512), (0, 0), AnalysisConfig(method=method),
        roles=s.roles, stain=stain,
        pixel_size_um=s.pixel_size_um,
    )  # fmt: skip
    assert set(whole.columns) <= set(result.cells.columns) | {"x_px", "y_px"}
    assert result.summary["counts"]["her2_cells"] == 0


def test_a_region_reports_the_whole_slide_cells_inside_it(slide, reference):
    """The napari 'current view': the same cells as the whole slide, only those inside."""
    h, w = reference.summary["input"]["shape_px"][1:]
    region = (h // 5, h // 5 + 1100, w // 4, w // 4 + 1300)
    part = analyze_slide(slide.path, CLASSICAL.replace(chunk_size_px=512), region_px=region)
    px = reference.summary["input"]["pixel_size_um"]
    y = reference.cells["y_um"] / px
    x = reference.cells["x_um"] / px
    inside = reference.cells[
        (y >= region[0] - 0.5)
        & (y < region[1] - 0.5)
        & (x >= region[2] - 0.5)
        & (x < region[3] - 0.5)
    ]
    assert len(inside) > 5
    got = part.cells.sort_values(["y_um", "x_um"]).reset_index(drop=True)
    want = inside.sort_values(["y_um", "x_um"]).reset_index(drop=True)
    np.testing.assert_allclose(
        got[["y_um", "x_um", "her2_mean"]], want[["y_um", "x_um", "her2_mean"]], atol=1e-6
    )
    assert part.summary["input"]["region_px"] == list(region)
    assert 0 < part.summary["tissue_area_mm2"] < reference.summary["tissue_area_mm2"]
