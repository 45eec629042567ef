"""Exports other tools read (OME-Zarr labels), parallel batches, and `lungmets demo`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from test_io import write_ome_zarr

from histo.batch import run_batch
from histo.config import AnalysisConfig
from histo.io import open_slide
from histo.synthetic import generate_slide

CLASSICAL = AnalysisConfig(method="classical")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return [
        generate_slide(
            d / f"s{i}.ome.tif", size_px=(1280, 1024), group=g, dpi=15, seed=300 + i, labels=False
        )
        for i, g in enumerate(("IAV", "PBS", "IAV"))
    ]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_lesion_labels_into_an_ome_zarr_slide(slides, tmp_path, version):
    src = slides[0]
    with tifffile.TiffFile(src.path) as tf:
        levels = [np.asarray(lv.asarray()) for lv in tf.series[0].levels]
    zpath = write_ome_zarr(
        tmp_path / "s.ome.zarr", levels, ["DAPI", "HER2", "Ki67"], version=version
    )
    (out,) = run_batch([zpath], tmp_path / "res", CLASSICAL, labels_zarr=True)
    assert out.ok, out.message
    cells = pd.read_csv(out.out_dir / "cells.csv")
    assert len(cells) > 10
    root = zarr.open_group(zpath, mode="r")
    attrs = dict(root["labels"].attrs)
    names = attrs["labels"] if version == "0.4" else attrs["ome"]["labels"]
    assert names == ["lesions"]
    lab = root["labels/lesions"]
    meta = dict(lab.attrs) if version == "0.4" else dict(lab.attrs)["ome"]
    assert "image-label" in meta
    ms = meta["multiscales"][0]
    assert len(ms["datasets"]) == len(levels)
    for d, level in zip(ms["datasets"], levels, strict=True):
        arr = lab[d["path"]]
        assert arr.shape[-2:] == level.shape[-2:] and arr.ndim == (3 if version == "0.4" else 5)
    label0 = np.asarray(lab["0"]).reshape(levels[0].shape[-2:])
    y = np.rint(cells["y_um"] / 0.5).astype(int)
    x = np.rint(cells["x_um"] / 0.5).astype(int)
    hit = label0[y, x] == cells["lesion_id"].to_numpy()
    assert hit.mean() > 0.97  # a cell's centre carries its lesion (neighbours may overpaint)
    assert set(np.unique(label0)) - {0} == set(cells["lesion_id"])
    # The image itself is untouched and still opens; the labels do not change its checksum.
    slide = open_slide(zpath)
    assert slide.channel_names == ("DAPI", "HER2", "Ki67")
    (again,) = run_batch([zpath], tmp_path / "res", CLASSICAL, labels_zarr=True)
    assert again.status == "skipped"


def test_lesion_labels_beside_a_tiff_slide(slides, tmp_path):
    (out,) = run_batch([slides[1].path], tmp_path, CLASSICAL, labels_zarr=True)
    assert out.ok
    lab = zarr.open_group(out.out_dir / "lesion_labels.ome.zarr", mode="r")
    meta = dict(lab.attrs)["ome"]
    assert meta["multiscales"][0]["axes"][-1]["name"] == "x"
    assert lab["0"].shape == open_slide(slides[1].path).shape_px
    cells = pd.read_csv(out.out_dir / "cells.csv")
    label0 = np.asarray(lab["0"])
    y = np.rint(cells["y_um"] / 0.5).astype(int)
    x = np.rint(cells["x_um"] / 0.5).astype(int)
    assert (label0[y, x] == cells["lesion_id"].to_numpy()).mean() > 0.97


def test_parallel_slides_give_the_same_tables(slides, tmp_path):
    paths = [s.path for s in slides]
    seq = run_batch(paths, tmp_path / "seq", CLASSICAL)
    par = run_batch(paths, tmp_path / "par", CLASSICAL, parallel=2)
    assert [o.slide for o in par] == [str(p) for p in paths]
    for a, b in zip(seq, par, strict=True):
        assert a.ok and b.ok
        for t in ("cells.csv", "lesions.csv", "lesions.geojson"):
            assert (a.out_dir / t).read_bytes() == (b.out_dir / t).read_bytes()


def test_one_local_cluster_for_the_whole_batch(slides, tmp_path):
    outs = run_batch([s.path for s in slides[:2]], tmp_path, CLASSICAL, workers=2)
    assert all(o.ok for o in outs)
    schedulers = {json.loads((o.out_dir / "summary.json").read_text())["scheduler"] for o in outs}
    assert len(schedulers) == 1 and next(iter(schedulers)).startswith("tcp://")


def test_a_missing_and_a_duplicate_name_are_reported(slides, tmp_path):
    outs = run_batch([tmp_path / "nope.ome.tif", slides[0].path], tmp_path / "r", CLASSICAL)
    assert [o.status for o in outs] == ["failed", "ok"]
    assert "no such file" in outs[0].message
    from histo.errors import InputError

    other = tmp_path / "x"
    other.mkdir()
    (other / slides[0].path.name).write_bytes(slides[0].path.read_bytes())
    with pytest.raises(InputError, match="would both write"):
        run_batch([slides[0].path, other / slides[0].path.name], tmp_path / "r", CLASSICAL)


def test_demo_command(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "histo",
        "demo",
        "--out",
        str(out),
        "--mice",
        "3",
        "--sections",
        "1",
        "--dpi",
        "15",
        "--size",
        "768x640",
        "--method",
        "classical",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report:  {out / 'report' / 'report.html'}" in proc.stdout
    assert "dpi 15: IAV vs PBS, HER2+ cells per mm² of lung" in proc.stdout
    assert (out / "report" / "report.html").is_file()
    assert len(pd.read_csv(out / "report" / "mice.csv")) == 6
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "(6 slides already done)" in again.stdout
