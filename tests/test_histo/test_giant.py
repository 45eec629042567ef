"""A giant slide without a pyramid: one 200,000 x 200,000 tiled level, nearly all of it tiles
the file does not store (a few MB on disk), analysed through its overview with bounded memory;
a header that claims more pixels than the file holds is refused."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import tifffile

from histo.config import AnalysisConfig
from histo.errors import InputError
from histo.evaluate import evaluate_cells
from histo.io import open_slide
from histo.pipeline import analyze_slide
from histo.synthetic import generate_slide

SIDE = 200_000
TILE = 512
AT = (100 * TILE, 80 * TILE)  # where the section lies in the giant level (row, column)


@pytest.fixture(scope="module")
def giant(tmp_path_factory):
    """(giant path, the small slide it embeds): the small slide's tiles at `AT`, one scanned
    corner of glass at the origin, every other tile absent (byte count 0)."""
    folder = tmp_path_factory.mktemp("giant")
    small = generate_slide(
        folder / "section.ome.tif", size_px=(2048, 2048), group="IAV", dpi=15, seed=5
    )
    slide = open_slide(small.path)
    img = np.asarray(slide.levels[0])
    n = -(-SIDE // TILE)

    def tiles():
        for c in range(img.shape[0]):
            for ty in range(n):
                for tx in range(n):
                    y, x = ty * TILE - AT[0], tx * TILE - AT[1]
                    if 0 <= y < img.shape[1] and 0 <= x < img.shape[2]:
                        yield np.ascontiguousarray(img[c, y : y + TILE, x : x + TILE])
                    elif ty == 0 and tx == 0:
                        yield np.ascontiguousarray(img[c, :TILE, :TILE])
                    else:
                        yield None  # not stored

    path = folder / "giant.ome.tif"
    um = slide.pixel_size_um
    tifffile.imwrite(
        path,
        data=tiles(),
        shape=(img.shape[0], SIDE, SIDE),
        dtype=img.dtype,
        tile=(TILE, TILE),
        ome=True,
        bigtiff=True,
        metadata={
            "axes": "CYX",
            "Channel": {"Name": list(slide.channel_names)},
            "PhysicalSizeX": um,
            "PhysicalSizeY": um,
        },
    )
    return path, small


def test_the_giant_is_sparse_on_disk(giant):
    path, _ = giant
    assert os.path.getsize(path) < 50e6  # 3 x 200,000^2 x 2 bytes would be 240 GB
    slide = open_slide(path)
    assert slide.shape_px == (SIDE, SIDE)
    assert slide.overview_level is not None


def test_a_giant_single_level_slide_is_analysed_with_bounded_memory(giant, tmp_path):
    path, small = giant
    out = tmp_path / "out"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "histo", "run", str(path), "--out", str(out)]
            + ["--method", "classical"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        # Reading the whole level would take hours: give up (and fail) after 5 minutes.
        timer = threading.Timer(300, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak memory
        timer.cancel()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    # Level 0 would be 240 GB; the overview (6250 x 6250 x 3, 16 bit) is 0.23 GB.
    assert usage.ru_maxrss / 1e6 < 5.0  # GB (ru_maxrss is in kB on Linux)
    assert "no pyramid" in stderr and "pyramidal" in stderr  # the log line with the advice
    summary = json.loads((out / "giant" / "summary.json").read_text())
    assert summary["chunks"]["analysed"] <= 16  # only chunks of the stored tissue
    cells = pd.read_csv(out / "giant" / "cells.csv")
    um = summary["input"]["pixel_size_um"]
    shifted = cells.assign(x_um=cells["x_um"] - AT[1] * um, y_um=cells["y_um"] - AT[0] * um)
    giant_vs_truth = evaluate_cells(shifted, small.cells)
    own = analyze_slide(small.path, AnalysisConfig(method="classical"))
    small_vs_truth = evaluate_cells(own.cells, small.cells)
    assert giant_vs_truth["f1"] >= small_vs_truth["f1"] - 0.01
    assert abs(len(cells) - len(own.cells)) <= 0.02 * len(own.cells)


def test_a_header_claiming_more_pixels_than_the_file_holds_is_refused(tmp_path):
    path = tmp_path / "claims.tif"
    img = np.random.default_rng(0).integers(0, 1000, (3, 256, 256), dtype=np.uint16)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="minisblack", planarconfig="separate")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        where = [
            (page.tags[n].valueoffset, page.tags[n].dtype) for n in ("ImageWidth", "ImageLength")
        ]
    data = bytearray(path.read_bytes())
    for offset, dtype in where:  # claim 60,000 x 60,000 px, with the 12 tiles of 256 x 256
        struct.pack_into("<H" if int(dtype) == 3 else "<I", data, offset, 60_000)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="claims.tif.*(truncated|corrupt)"):
        open_slide(path, channels="DAPI,HER2,Ki67", pixel_size_um=0.5)
