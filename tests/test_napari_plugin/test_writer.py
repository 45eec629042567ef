"""The lesions writer: CSV and QuPath GeoJSON of a lesions layer, review state included."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as PolygonPath

from histo.review import initial_review_class
from histo.synthetic import SlideSpec, build_scene
from napari_plugin._layers import lesions_layer
from napari_plugin._writer import write_lesions

PX = 0.5


@pytest.fixture(scope="module")
def scene():
    spec = SlideSpec(width_px=1280, height_px=1024, pixel_size_um=PX, group="IAV", dpi=15, seed=41)
    return build_scene(spec)


@pytest.fixture(scope="module")
def lesions(scene):
    """The truth lesions with a review in progress: one accepted, corrected, rejected each."""
    les = scene.lesions.copy()
    les["review_class"] = initial_review_class(les)
    les["status"] = "unreviewed"
    assert len(les) >= 4
    les.loc[0, "status"] = "accepted"
    les.loc[1, ["review_class", "status"]] = ["cluster", "corrected"]
    les.loc[2, "status"] = "rejected"
    return les


def _layer(lesions, folder=None):
    """(data, meta) as napari hands them to the writer: the points layer's attributes."""
    data, kwargs, layer_type = lesions_layer(lesions, folder=folder, pixel_size_um=PX, name="s")
    assert layer_type == "points"
    return data, kwargs


def _rings_px(fc):
    return {
        f["properties"]["name"]: np.asarray(f["geometry"]["coordinates"][0]) for f in fc["features"]
    }


def test_csv_holds_the_lesion_table_with_its_review(lesions, tmp_path):
    data, meta = _layer(lesions)
    path = tmp_path / "lesions.csv"
    assert write_lesions(str(path), data, meta) == [str(path)]
    back = pd.read_csv(path)
    assert list(back.columns) == list(lesions.columns)
    assert back["lesion_id"].tolist() == lesions["lesion_id"].tolist()
    for col in ("x_um", "y_um", "area_um2"):
        np.testing.assert_allclose(back[col], lesions[col], atol=1e-4)
    for col in ("n_cells", "n_ki67_pos", "class", "dormant", "review_class", "status"):
        assert back[col].tolist() == lesions[col].tolist(), col
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


def test_csv_positions_follow_moved_points(lesions, tmp_path):
    data, meta = _layer(lesions)
    moved = data.copy()
    moved[3] += (10.0, -4.0)  # (y_um, x_um)
    write_lesions(str(tmp_path / "l.csv"), moved, meta)
    back = pd.read_csv(tmp_path / "l.csv")
    assert back.loc[3, "y_um"] == pytest.approx(lesions.loc[3, "y_um"] + 10.0, abs=1e-4)
    assert back.loc[3, "x_um"] == pytest.approx(lesions.loc[3, "x_um"] - 4.0, abs=1e-4)


def test_geojson_without_cells_draws_each_lesion_as_a_circle_of_its_area(lesions, tmp_path):
    data, meta = _layer(lesions)
    path = tmp_path / "lesions.geojson"
    assert write_lesions(str(path), data, meta) == [str(path)]
    fc = json.loads(path.read_text())
    assert len(fc["features"]) == len(lesions)
    rings = _rings_px(fc)
    for (_, les), feature in zip(lesions.iterrows(), fc["features"], strict=True):
        props = feature["properties"]
        assert props["name"] == f"lesion {les.lesion_id}"
        assert props["measurements"]["n_cells"] == les.n_cells
        assert props["review_class"] == les.review_class and props["status"] == les.status
        expected = "rejected" if les.status == "rejected" else les.review_class
        assert props["classification"]["name"] == expected
        ring = rings[props["name"]]
        # QuPath pixel coordinates: pixel corners at integers, so a centre is at x_px + 0.5.
        centre = ring[:-1].mean(axis=0)
        np.testing.assert_allclose(centre, (les.x_um / PX + 0.5, les.y_um / PX + 0.5), atol=0.05)
        x, y = ring[:, 0], ring[:, 1]
        area_um2 = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) * PX**2
        # a 16-gon inscribed in the circle of the lesion's area: 2.6 % smaller
        assert area_um2 == pytest.approx(les.area_um2 * 16 * np.sin(np.pi / 8) / (2 * np.pi), 0.01)


def test_geojson_of_a_result_folder_outlines_each_lesion_around_its_cells(scene, lesions, tmp_path):
    scene.cells.to_csv(tmp_path / "cells.csv", index=False)
    data, meta = _layer(lesions, folder=tmp_path)
    write_lesions(str(tmp_path / "out.geojson"), data, meta)
    rings = _rings_px(json.loads((tmp_path / "out.geojson").read_text()))
    for lesion_id, cells in scene.cells.groupby("lesion_id"):
        centres = np.c_[cells.x_um / PX + 0.5, cells.y_um / PX + 0.5]
        hull = PolygonPath(rings[f"lesion {lesion_id}"])
        assert hull.contains_points(centres).all(), lesion_id


def test_a_points_layer_without_lesion_ids_is_refused(tmp_path):
    meta = {"name": "my points", "features": pd.DataFrame({"size": [1.0, 2.0]}), "metadata": {}}
    with pytest.raises(ValueError, match="not a lungmets lesions layer"):
        write_lesions(str(tmp_path / "p.csv"), np.zeros((2, 2)), meta)
    assert not list(tmp_path.iterdir())


def test_points_added_by_hand_are_refused(lesions, tmp_path):
    data, meta = _layer(lesions)
    # napari gives an added point the last row's features, lesion_id included.
    features = pd.concat([meta["features"], meta["features"].iloc[[-1]]], ignore_index=True)
    with pytest.raises(ValueError, match="repeated lesion ids"):
        write_lesions(
            str(tmp_path / "l.csv"), np.r_[data, [[1.0, 2.0]]], {**meta, "features": features}
        )


def test_geojson_needs_the_pixel_size(lesions, tmp_path):
    data, meta = _layer(lesions)
    meta = {**meta, "metadata": {**meta["metadata"], "lungmets_pixel_size_um": None}}
    with pytest.raises(ValueError, match="lungmets_pixel_size_um"):
        write_lesions(str(tmp_path / "l.geojson"), data, meta)


@pytest.mark.napari
def test_napari_saves_a_lesions_layer_through_the_plugin(make_napari_viewer, lesions, tmp_path):
    viewer = make_napari_viewer()
    data, meta = _layer(lesions)
    layer = viewer.add_points(data, **meta)
    written = layer.save(str(tmp_path / "saved.csv"), plugin="lungmets")
    assert written == [str(tmp_path / "saved.csv")]
    back = pd.read_csv(tmp_path / "saved.csv")
    assert back["lesion_id"].tolist() == lesions["lesion_id"].tolist()
    assert back["status"].tolist() == lesions["status"].tolist()
