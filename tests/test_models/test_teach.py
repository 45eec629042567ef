"""Fine-tuning from reviews: targets from reviewed points, what a journal says, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from histo.batch import run_batch
from histo.config import AnalysisConfig
from histo.errors import InputError
from histo.review import ReviewSession
from histo.synthetic import generate_slide
from models import DEFAULT_MODEL, load_model, model_config
from models.teach import reviewed_slide, targets_for


def test_targets_from_points_match_the_hand_made_expectation():
    """A 40 x 40 px window at 1 um/px: a Ki67+ cell at (10, 10), a cell of unknown Ki67 at
    (30, 30), a deleted cell at (10, 30), and the left half of the bottom rows reviewed
    completely (rows 20-40, columns 0-20)."""
    target, weight = targets_for(
        (40, 40),
        np.array([[10.0, 10.0], [30.0, 30.0]]),
        np.array([1.0, np.nan]),
        np.array([[10.0, 30.0]]),
        [(20.0, 0.0, 40.0, 20.0)],
        px_um=1.0,
    )
    cell, centre, ki67 = target
    w_cell, w_centre, w_ki67 = weight
    # Kept nuclei: a unit bump on the centre map, the Ki67 bump only where Ki67+.
    assert centre[10, 10] == pytest.approx(1.0) and centre[30, 30] == pytest.approx(1.0)
    assert ki67[10, 10] == pytest.approx(1.0) and ki67[30, 30] == 0.0
    # The cell mask: 1 on the core (3 um), unknown from 3 to 6 um, nothing said beyond.
    assert cell[10, 10] == 1.0 and w_cell[10, 10] == 1.0 and w_cell[10, 12] == 1.0
    assert w_cell[10, 15] == 0.0 and w_centre[10, 15] == 1.0
    # Unknown Ki67: the Ki67 map is told nothing around that cell.
    assert w_ki67[30, 30] == 0.0 and w_ki67[10, 10] == 1.0
    # The deleted cell: nothing there, on all three maps.
    assert target[:, 10, 30].max() == 0.0 and weight[:, 10, 30].min() == 1.0
    # Away from every point: nothing known ...
    assert weight[:, 2, 20].max() == 0.0
    # ... except inside the complete region, where everything is (no cell there: all 0).
    assert weight[:, 35, 5].min() == 1.0 and target[:, 35, 5].max() == 0.0


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """Two analysed sections (the classical detector, fast), both reviewed: a cell added, one
    deleted, a lesion rejected, a region marked complete."""
    d = tmp_path_factory.mktemp("teach")
    slides = [
        generate_slide(
            d / f"lung{i}.ome.tif",
            size_px=(1024, 1024),
            group="IAV",
            dpi=15,
            seed=41 + i,
            labels=False,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = run_batch([s.path for s in slides], d / "results", AnalysisConfig(method="classical"))
    assert all(o.ok for o in outs)
    for o in outs:
        s = ReviewSession(o.out_dir)
        cells = s.cells
        s.add_cell(float(cells["x_um"].iloc[0]) + 40.0, float(cells["y_um"].iloc[0]) + 40.0)
        s.delete_cell(int(cells.index[-1]))
        s.reject(int(s.lesions.index[0]))
        s.mark_complete(0.0, 0.0, 200.0, 200.0)
    return [o.out_dir for o in outs]


def test_a_review_says_which_cells_are_kept_and_which_are_not(reviewed):
    folder = reviewed[0]
    s = ReviewSession(folder)
    rs = reviewed_slide(folder)
    live = s.cells[s.cells["review"] != "deleted"]
    rejected_lesion = s.lesions.index[s.lesions["status"] == "rejected"]
    in_rejected = live["lesion_id"].isin(rejected_lesion)
    # Positives: cells looked at and kept: the added one and its (edited) lesion, the cells in
    # the complete region; not the cells nobody looked at, nor those of the rejected lesion.
    edited = s.lesions.index[s.lesions["status"] == "edited"]
    in_box = live["x_um"].between(0, 200, inclusive="left") & live["y_um"].between(
        0, 200, inclusive="left"
    )
    expected = (live["lesion_id"].isin(edited) | in_box) & ~in_rejected
    assert len(rs.positives) == int(expected.sum())
    assert 0 < len(rs.positives) < len(live)
    added = live[live["review"] == "added"][["x_um", "y_um"]].to_numpy(float)
    assert np.any(np.all(np.isclose(rs.positives, added), axis=1))
    assert len(rs.negatives) == 1 + int(in_rejected.sum())  # the deleted cell, the rejected
    assert rs.boxes == [(0.0, 0.0, 200.0, 200.0)]
    assert rs.n_corrections == 4
    # Where the scientist changed something: the added and the deleted cell, the rejected cells.
    assert len(rs.focus) == 2 + int(in_rejected.sum())
    summary = json.loads((folder / "summary.json").read_text())
    assert rs.sha256 == summary["input"]["sha256"]


def test_a_folder_without_review_is_refused(tmp_path, reviewed):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(reviewed[0], bare)
    (bare / "corrections.jsonl").unlink()
    with pytest.raises(InputError, match="no review corrections"):
        reviewed_slide(bare)


@pytest.mark.slow
def test_fine_tuning_from_reviews_through_the_cli(reviewed, tmp_path):
    out = tmp_path / "taught.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "histo", "train", str(out), "--from-reviews", str(reviewed[0]),
         "--validate-on", str(reviewed[1]), "--steps", "3", "--synthetic-share", "0"],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation lung1: cell F1" in proc.stdout
    taught = load_model(out)  # loads, and its SHA-256 checks out
    cfg = taught.config
    parent = model_config(DEFAULT_MODEL)
    assert cfg["parent_sha256"] == parent["sha256"]
    assert cfg["centre_threshold"] == parent["centre_threshold"]
    (src,) = cfg["from_reviews"]
    summary = json.loads((reviewed[0] / "summary.json").read_text())
    assert src["slide_sha256"] == summary["input"]["sha256"]
    assert src["corrections"] == cfg["n_corrections"] == 4
    (val,) = cfg["validation"]
    for when in ("before", "after"):
        assert 0.0 <= val[when]["f1"] <= 1.0 and val[when]["n_reviewed"] > 0
    # Three small steps from the parent's weights: close to it, not equal.
    a, b = (
        dict(load_model(DEFAULT_MODEL).net.named_parameters()),
        dict(taught.net.named_parameters()),
    )
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < diff < 0.05
    # Training and validating on the same slide is refused.
    same = subprocess.run(
        [sys.executable, "-m", "histo", "train", str(tmp_path / "x.pt"), "--from-reviews",
         str(reviewed[0]), "--validate-on", str(reviewed[0])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert same.returncode != 0 and "must not be trained on" in same.stderr
    assert "Traceback" not in same.stderr
