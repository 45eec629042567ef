"""The network: shapes, the shipped weights, what they compute, and training."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from histo.config import AnalysisConfig
from histo.errors import InputError
from histo.evaluate import evaluate_cells, evaluate_lesions
from histo.pipeline import analyze_slide
from histo.synthetic import generate_slide
from models import DEFAULT_MODEL, load_model, model_config
from models.infer import cells_from_maps, fast_inference_net, predict_maps, to_model_input
from models.train import (
    TrainConfig,
    golden_output,
    loss_fn,
    make_slides,
    pick_centre_threshold,
    sample_patch,
    save_model,
    slide_data,
    train,
)
from models.unet import UNet


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 96, 160), (1, 4, 256, 128)])
def test_forward_gives_three_maps_of_the_input_size(shape):
    net = UNet(base=8, depth=3).eval()
    with torch.no_grad():
        out = net(torch.zeros(shape))
    assert out.shape == (shape[0], 3, *shape[2:])
    assert out.dtype == torch.float32


def test_predict_maps_handles_any_size_and_keeps_values_in_0_1():
    net = UNet(base=8, depth=3).eval()
    x = np.random.default_rng(0).random((4, 300, 217), np.float32)
    maps = predict_maps(net, x, torch.device("cpu"), tile=128, margin=16)
    assert maps.shape == (3, 300, 217) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1


def test_screened_tiles_are_skipped():
    net = UNet(base=8, depth=3).eval()
    x = np.random.default_rng(0).random((4, 256, 256), np.float32)
    screen = np.zeros((256, 256), bool)
    screen[10:20, 10:20] = True
    maps = predict_maps(net, x, torch.device("cpu"), screen=screen, screen_margin=16)
    assert maps[:, :90, :90].max() > 0
    assert maps[:, 200:, 200:].max() == 0


def _disc(shape, cy, cx, r0, r1=None):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.hypot(yy - cy, xx - cx)
    return d <= r0 if r1 is None else (d > r0) & (d <= r1)


def test_screen_skips_red_blood_cells_and_macrophages_and_keeps_dim_cells():
    """At the model's 1 um/px, in ratios to autofluorescence (tissue is 1)."""
    from histo.network import screen_mask

    shape = (128, 128)
    ratio = np.ones((3, *shape), np.float32)  # DAPI, HER2, Ki67
    nuclear = 50.0
    # A red blood cell: HER2 5x, no nucleus.
    ratio[1][_disc(shape, 24, 24, 3.5)] = 5.0
    # A dim cancer cell: a nucleus (a quarter of the nuclear level) in a ring of HER2 at 2x.
    ratio[0][_disc(shape, 96, 96, 5)] = 0.25 * nuclear
    ratio[1][_disc(shape, 96, 96, 5, 8)] = 2.0
    # A macrophage: a pale, Ki67-negative nucleus among granules bright in HER2 and Ki67 alike.
    ratio[1][_disc(shape, 30, 96, 9)] = 4.0
    ratio[2][_disc(shape, 30, 96, 4, 9)] = 5.0
    ratio[0][_disc(shape, 30, 96, 4)] = 0.2 * nuclear
    x = np.concatenate([np.log1p(ratio), np.ones((1, *shape), np.float32)])
    mask = screen_mask(x, AnalysisConfig(), nuclear_ratio=nuclear)
    assert mask[96, 96] and mask[96, 104]  # the cell and its HER2 ring
    assert not mask[24, 24]
    assert not mask[30, 96]
    # A Ki67-negative cancer cell where the Ki67 channel's background is a little above the
    # autofluorescence (1.3x, as seen beside a cell the screen once dropped): it is kept.
    faint = ratio.copy()
    faint[2] = 1.3
    xf = np.concatenate([np.log1p(faint), np.ones((1, *shape), np.float32)])
    assert screen_mask(xf, AnalysisConfig(), nuclear_ratio=nuclear)[96, 96]
    # Granules as bright in Ki67 over the nucleus as around it: the band does not outshine the
    # nucleus, as around a cancer cell whose HER2 shows through the Ki67 filter; it is looked at
    # (the network decides, as in a dense pass).
    over = ratio.copy()
    over[2][_disc(shape, 30, 96, 9)] = 5.0
    xo = np.concatenate([np.log1p(over), np.ones((1, *shape), np.float32)])
    assert screen_mask(xo, AnalysisConfig(), nuclear_ratio=nuclear)[30, 96]
    # Without Ki67 a macrophage cannot be told from a cancer cell: it is looked at.
    x[2:] = 0
    assert screen_mask(x, AnalysisConfig(), nuclear_ratio=nuclear)[30, 96]


def test_block_mean_matches_numpy():
    from models.infer import block_mean

    a = np.random.default_rng(0).integers(0, 4000, (9, 13)).astype(np.uint16)
    want = a[:8, :12].astype(np.float32).reshape(4, 2, 6, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(block_mean(a, 2), want, rtol=1e-6)
    np.testing.assert_array_equal(block_mean(a, 1), a.astype(np.float32))


def test_label_quantile_matches_numpy_per_label():
    from histo.network import _label_quantile

    rng = np.random.default_rng(5)
    values = rng.random((40, 50)).astype(np.float32)
    labels = rng.integers(0, 6, (40, 50))
    labels[labels == 4] = 0  # a label without pixels
    got = _label_quantile(values, labels, 5, 1 / 3)
    assert got[0] == -np.inf and got[4] == -np.inf
    for lab in (1, 2, 3, 5):
        v = np.sort(values[labels == lab])
        assert got[lab] == v[int((v.size - 1) / 3)]
        assert got[lab] == np.quantile(v, 1 / 3, method="lower")


def test_cells_from_maps_finds_bumps_at_level0_positions():
    maps = np.zeros((3, 64, 64), np.float32)
    yy, xx = np.mgrid[0:64, 0:64]
    maps[0] = 1.0
    for cy, cx in [(10.0, 20.0), (40.5, 33.0)]:
        maps[1] = np.maximum(maps[1], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.5))
    cells = cells_from_maps(maps, factor=2, origin_px=(100, 200))
    got = cells.sort_values("y_px")[["y_px", "x_px"]].to_numpy()
    # Model pixel j covers level-0 pixels 2j and 2j+1: its centre is 2j + 0.5.
    np.testing.assert_allclose(got, [[100 + 20.5, 200 + 40.5], [100 + 81.5, 200 + 66.5]], atol=0.3)


def test_save_and_load_round_trip(tmp_path):
    net = UNet(base=8, depth=2).eval()
    cfg = TrainConfig(base=8, depth=2)
    path = save_model(net, tmp_path / "m.pt", train_config=cfg)
    loaded = load_model(path, "cpu")
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), net(x))
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_or_altered_models_give_clear_errors(tmp_path):
    net = UNet(base=8, depth=2).eval()
    path = save_model(net, tmp_path / "m.pt", train_config=TrainConfig(base=8, depth=2))
    bad = tmp_path / "bad.pt"
    shutil.copy(path.with_suffix(".json"), bad.with_suffix(".json"))
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="SHA-256"):
        load_model(bad)
    # A config that does not fit the weights.
    cfg = json.loads(path.with_suffix(".json").read_text())
    cfg["architecture"]["base"] = 16
    wrong = tmp_path / "wrong.pt"
    shutil.copy(path, wrong)
    wrong.with_suffix(".json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="does not fit"):
        load_model(wrong)
    with pytest.raises(InputError, match="no such model"):
        load_model(tmp_path / "missing.pt")
    lonely = tmp_path / "lonely.pt"
    shutil.copy(path, lonely)
    with pytest.raises(InputError, match="config"):
        load_model(lonely)


def test_shipped_weights_load_and_match_their_sha256():
    cfg = model_config()
    assert DEFAULT_MODEL.stat().st_size < 5e6
    assert hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest() == cfg["sha256"]
    model = load_model()
    assert model.config["input_um_per_px"] == 1.0
    # Loading never unpickles code: the file is plain tensors.
    state = torch.load(DEFAULT_MODEL, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_shipped_weights_compute_what_was_recorded(tmp_path):
    """Golden output: the shipped model on a generated slide gives what it gave when saved."""
    model = load_model(device="cpu")
    recorded = model.config["golden"]
    now = golden_output(model.net, tmp_path)
    assert now["case"] == recorded["case"]
    np.testing.assert_allclose(now["map_means"], recorded["map_means"], rtol=1e-3, atol=1e-6)
    assert now["n_cells"] == recorded["n_cells"]


#: The held-out slide of these tests (seed never used in training); its published figures
#: come from `tests/benchmarks/bench_ci_accuracy.py` (BENCHMARKS.md).
HELD_OUT_SPEC = {"size_px": (2048, 1536), "group": "IAV", "dpi": 15, "seed": 70001}
#: The same without a Ki67 channel (another seed).
NO_KI67_SPEC = {"size_px": (1536, 1280), "group": "IAV", "dpi": 15, "seed": 70002, "ki67": False}

#: How far below a published figure the test still passes (F1: points of F1; count error:
#: points beyond the published error).
MARGIN = 0.02


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("unet")
    return generate_slide(d / "held_out.ome.tif", labels=False, **HELD_OUT_SPEC)


def accuracy_figures(slide, model_path=None) -> dict:
    """Cell precision/recall/F1, count error and lesion F1 of a model (default: shipped) on a
    generated slide, with the default analysis on the CPU."""
    config = AnalysisConfig(method="unet", device="cpu")
    if model_path is not None:
        config = config.replace(model_path=str(model_path))
    r = analyze_slide(slide.path, config)
    cells = evaluate_cells(r.cells, slide.cells)
    lesions = evaluate_lesions(r.lesions, slide.lesions)
    return {
        "precision": cells["precision"],
        "recall": cells["recall"],
        "f1": cells["f1"],
        "count_error": cells["count_error"],
        "lesion_f1": float(lesions.loc["all", "f1"]),
        "model_sha256": r.summary["model"]["sha256"],
    }


def published_figures(name: str = "held_out") -> dict:
    """The row `name` (``held_out``: `HELD_OUT_SPEC`, ``no_ki67``: `NO_KI67_SPEC`) of
    BENCHMARKS.md's "Accuracy on the CI tests' slides"."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "BENCHMARKS.md").read_text()
    section = text[text.index("<!-- bench_ci_accuracy:start -->") :]
    row = next(line for line in section.splitlines() if line.startswith(f"| test_unet {name} "))
    values = [float(v) for v in re.findall(r"\|\s*([+-]?\d+\.\d+)\s*(?=\|)", row)]
    keys = ["precision", "recall", "f1", "count_error", "lesion_f1"]
    return dict(zip(keys, values, strict=True))


def shortfalls(measured: dict, published: dict, margin: float = MARGIN) -> list[str]:
    """Figures that fall more than `margin` short of the published ones."""
    out = []
    for key in ("precision", "recall", "f1", "lesion_f1"):
        if measured[key] < published[key] - margin:
            out.append(f"{key} {measured[key]:.3f} < published {published[key]:.3f} - {margin}")
    if abs(measured["count_error"]) > abs(published["count_error"]) + margin:
        out.append(
            f"count error {measured['count_error']:+.3f} beyond published "
            f"{published['count_error']:+.3f} +- {margin}"
        )
    return out


def test_shipped_model_matches_its_published_accuracy_on_the_held_out_slide(held_out):
    measured = accuracy_figures(held_out)
    assert shortfalls(measured, published_figures()) == []
    assert measured["model_sha256"] == model_config()["sha256"]


def test_the_accuracy_test_fails_a_slightly_degraded_model(held_out, tmp_path):
    """The shipped weights with the cell-centre output lowered by 4.5 logits: a model that
    misses about 1 cell in 15 (measured with v5: recall 0.932, F1 0.965, count -6.8%, lesion F1
    0.947), which the former bounds (F1 >= 0.9, count within 10%, lesion F1 >= 0.85) let
    through. (Each version's centre peaks stand at their own height above its operating
    point: v4 missed as many lowered by 2.1 and half by 2.5; v5 still finds every cell lowered
    by 3.5 and only 7% of them by 5.5.)"""
    from models import DEFAULT_MODEL

    state = torch.load(DEFAULT_MODEL, map_location="cpu", weights_only=True)
    state["head.bias"] = state["head.bias"] - torch.tensor([0.0, 4.5, 0.0])  # cell, centre, Ki67
    path = tmp_path / "degraded.pt"
    torch.save(state, path)
    cfg = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    cfg["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(cfg))
    measured = accuracy_figures(held_out, model_path=path)
    assert shortfalls(measured, published_figures()) != []


def test_screened_and_dense_inference_agree(held_out):
    """The screened run (the network on crops around candidates only) finds the dense pass's
    cells: the same cells within 0.5 um with the same Ki67 call, and the same lesions."""
    from histo.evaluate import match_points

    dense = analyze_slide(held_out.path, AnalysisConfig(method="unet", device="cpu", screen=False))
    screened = analyze_slide(
        held_out.path, AnalysisConfig(method="unet", device="cpu", screen=True)
    )
    d, s = dense.cells, screened.cells
    assert len(d) >= 40
    si, di = match_points(s[["x_um", "y_um"]].to_numpy(), d[["x_um", "y_um"]].to_numpy(), 0.5)
    assert len(di) >= len(d) - 1 and len(s) <= len(d) + 1
    assert (s["ki67_pos"].to_numpy(bool)[si] == d["ki67_pos"].to_numpy(bool)[di]).mean() >= 0.99

    def table(lesions):
        return sorted(zip(lesions["n_cells"], lesions["class"], strict=True))

    assert table(screened.lesions) == table(dense.lesions)


def test_crops_cover_every_screened_pixel_on_the_pooling_grid():
    from models.infer import crop_boxes

    rng = np.random.default_rng(3)
    for trial in range(20):
        h, w = rng.integers(40, 700, 2)
        screen = np.zeros((h, w), bool)
        for _ in range(rng.integers(1, 30)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            r = rng.integers(1, 12 if trial % 2 else 200)
            screen[max(0, y - r) : y + r, max(0, x - r) : x + r] = True
        boxes = crop_boxes(screen, margin=32, pad=8, align=16, max_core=384)
        covered = np.zeros_like(screen)
        for y0, y1, x0, x1 in boxes:
            assert y0 % 16 == x0 % 16 == y1 % 16 == x1 % 16 == 0
            assert 0 < y1 - y0 <= 384 and 0 < x1 - x0 <= 384
            assert y1 - 16 < h and x1 - 16 < w  # past the edge by less than one step
            covered[y0:y1, x0:x1] = True
        assert covered[screen].all()
        # Never more network pixels than the same cores as a 128-px tile grid would cost.
        crop_px = sum((y1 - y0 + 64) * (x1 - x0 + 64) for y0, y1, x0, x1 in boxes)
        grid = [
            screen[y : y + 128, x : x + 128].any()
            for y in range(0, h, 128)
            for x in range(0, w, 128)
        ]
        assert crop_px <= 192 * 192 * sum(grid)
    assert crop_boxes(np.zeros((50, 50), bool)) == []


def test_onnx_runtime_and_pytorch_give_identical_cells(held_out):
    """The shipped model's ONNX export, run by ONNX Runtime (the CPU default), against the
    network as trained, on a whole generated slide through the pipeline."""
    from models.runtime import OnnxNet

    model = load_model(None, "cpu")
    assert isinstance(model.inference_net(1), OnnxNet)
    assert model.inference_net(1, "torch") is model.fast_net
    config = AnalysisConfig(torch_threads=1)
    fast = analyze_slide(held_out.path, config)
    ref = analyze_slide(held_out.path, config.replace(runtime="torch"))
    assert len(ref.cells) >= 30
    assert len(fast.cells) == len(ref.cells)
    np.testing.assert_allclose(
        fast.cells[["x_um", "y_um"]].to_numpy(), ref.cells[["x_um", "y_um"]].to_numpy(), atol=0.01
    )
    np.testing.assert_array_equal(fast.cells["ki67_pos"], ref.cells["ki67_pos"])
    assert fast.lesions["class"].tolist() == ref.lesions["class"].tolist()
    assert fast.lesions["n_cells"].tolist() == ref.lesions["n_cells"].tolist()


def test_an_onnx_export_that_does_not_belong_to_the_tensors_is_not_used(tmp_path, caplog):
    """A user's copy whose export was altered, or whose tensors are not the exported ones,
    runs in PyTorch (with a warning for the altered file): never the wrong network."""
    from models.runtime import OnnxNet

    def copy(folder, **onnx):
        folder.mkdir()
        for suffix in (".pt", ".json", ".onnx"):
            shutil.copy(DEFAULT_MODEL.with_suffix(suffix), folder / f"m{suffix}")
        cfg = json.loads((folder / "m.json").read_text())
        cfg["onnx"].update(file="m.onnx", **onnx)
        (folder / "m.json").write_text(json.dumps(cfg))
        return folder / "m.pt"

    assert isinstance(load_model(copy(tmp_path / "intact")).inference_net(1), OnnxNet)
    altered = copy(tmp_path / "altered")
    with open(altered.with_suffix(".onnx"), "r+b") as f:  # one byte changed
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    with caplog.at_level("WARNING"):
        net = load_model(altered).inference_net(1)
    assert not isinstance(net, OnnxNet) and "checksum does not match" in caplog.text
    other = copy(tmp_path / "other", exported_from="0" * 64)
    assert not isinstance(load_model(other).inference_net(1), OnnxNet)


def test_the_int8_runtime_finds_the_float_networks_cells_and_lesions(held_out):
    """`--runtime int8` (the shipped 8-bit quantisation of the export) against the float
    export on a whole generated slide: the same lesion table, the same cells within 0.5 um."""
    from histo.evaluate import match_points
    from models.runtime import OnnxNet

    model = load_model(None, "cpu")
    int8 = model.inference_net(1, "int8")
    assert isinstance(int8, OnnxNet) and int8.path.name.endswith(".int8.onnx")
    assert model.inference_net(1, "auto").path.name.endswith(f"{DEFAULT_MODEL.stem}.onnx")
    config = AnalysisConfig(torch_threads=1)
    ref = analyze_slide(held_out.path, config)
    fast = analyze_slide(held_out.path, config.replace(runtime="int8"))
    assert len(ref.cells) >= 30
    xy = ["x_um", "y_um"]
    fi, ri = match_points(fast.cells[xy].to_numpy(), ref.cells[xy].to_numpy(), 0.5)
    assert len(fi) == len(ref.cells) == len(fast.cells)
    assert sorted(zip(fast.lesions["n_cells"], fast.lesions["class"], strict=True)) == sorted(
        zip(ref.lesions["n_cells"], ref.lesions["class"], strict=True)
    )
    # It is a different network: its probabilities are not the float ones.
    assert not np.array_equal(
        fast.cells["centre_prob"].to_numpy()[fi], ref.cells["centre_prob"].to_numpy()[ri]
    )


def test_int8_is_part_of_the_run_key_and_falls_back_to_float_without_an_export(tmp_path, caplog):
    """Results of the 8-bit network are never taken for the float network's (a resumed batch
    reruns them), while PyTorch and ONNX Runtime share a key; a model without an 8-bit export
    runs the float one and says so."""
    from histo.batch import run_key
    from models.runtime import OnnxNet

    config = AnalysisConfig()
    keys = {r: run_key("0" * 64, config.replace(runtime=r)) for r in ("auto", "torch", "int8")}
    assert keys["auto"] == keys["torch"] != keys["int8"]
    folder = tmp_path / "user"
    folder.mkdir()
    for suffix in (".pt", ".json", ".onnx"):
        shutil.copy(DEFAULT_MODEL.with_suffix(suffix), folder / f"m{suffix}")
    cfg = json.loads((folder / "m.json").read_text())
    cfg["onnx"]["file"] = "m.onnx"
    del cfg["onnx_int8"]
    (folder / "m.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        net = load_model(folder / "m.pt").inference_net(1, "int8")
    assert isinstance(net, OnnxNet) and net.path.name == "m.onnx"
    assert "no 8-bit export" in caplog.text


def test_fast_and_reference_networks_give_identical_cells(held_out):
    """The fused, channels-last copy the pipeline runs (`fast_inference_net`) against the
    network as trained, on a generated slide at the model's resolution."""
    from histo.io import open_slide
    from histo.pipeline import measure_background

    model = load_model(None, "cpu")
    slide = open_slide(held_out.path)
    um = model.config["input_um_per_px"]
    factor = round(um / slide.pixel_size_um)
    pixels = slide.read_region(0, 0, slide.shape_px[0], 0, slide.shape_px[1])
    _, _, stain = measure_background(slide, AnalysisConfig())
    x = to_model_input(pixels, slide.roles, stain, factor)
    ref = predict_maps(model.net, x, model.device, tile=256, margin=32)
    fast = predict_maps(
        fast_inference_net(model.net), x, model.device, tile=256, margin=32, channels_last=True
    )
    assert np.abs(fast - ref).max() < 1e-4
    a = cells_from_maps(ref, factor=factor, origin_px=(0, 0), has_ki67=True, min_centre=0.9)
    b = cells_from_maps(fast, factor=factor, origin_px=(0, 0), has_ki67=True, min_centre=0.9)
    assert len(a) >= 30
    # The same cells: positions (sub-pixel, from the maps around each peak) within 0.01 px.
    assert len(a) == len(b)
    np.testing.assert_allclose(
        a[["y_px", "x_px"]].to_numpy(), b[["y_px", "x_px"]].to_numpy(), rtol=0, atol=0.01
    )
    np.testing.assert_array_equal(a["ki67_pos"].to_numpy(bool), b["ki67_pos"].to_numpy(bool))
    # The model keeps its own, trainable network unfused.
    assert isinstance(model.net.down[0][1], torch.nn.BatchNorm2d)


def test_reading_the_pyramid_gives_the_full_resolution_cells(held_out):
    """Chunks read from the slide's 1 um/px level (block means of level 0, rounded to the
    file's integers) against level 0 averaged here: the same cells within 0.5 um, the same
    Ki67 calls and lesion table."""
    from histo.evaluate import match_points

    cfg = AnalysisConfig(method="unet", device="cpu")
    full = analyze_slide(held_out.path, cfg.replace(read_pyramid=False))
    pyramid = analyze_slide(held_out.path, cfg)
    assert full.summary["chunks"]["read_level"] == 0
    assert pyramid.summary["chunks"]["read_level"] == 1
    assert pyramid.summary["chunks"]["read_um_per_px"] == 1.0
    a, b = full.cells, pyramid.cells
    assert len(a) >= 40 and len(a) == len(b)
    ai, bi = match_points(a[["x_um", "y_um"]].to_numpy(), b[["x_um", "y_um"]].to_numpy(), 0.5)
    assert len(ai) == len(a)
    assert (a["ki67_pos"].to_numpy(bool)[ai] == b["ki67_pos"].to_numpy(bool)[bi]).all()
    # Per-cell means move by the rounding, and where a cell's mask gains or loses an edge
    # pixel (v5: 3 cells of 44, the most by 0.3%), by that pixel's share.
    diff = np.abs(a["her2_mean"].to_numpy()[ai] - b["her2_mean"].to_numpy()[bi])
    assert np.median(diff) < 0.5, diff
    assert (diff / a["her2_mean"].to_numpy()[ai]).max() < 0.01, diff

    def table(lesions):
        return sorted(zip(lesions["n_cells"], lesions["class"], strict=True))

    assert table(pyramid.lesions) == table(full.lesions)


@pytest.mark.parametrize("chunk_size_px", [512, 1024])
def test_network_lesions_do_not_depend_on_chunk_size(held_out, chunk_size_px):
    a = analyze_slide(
        held_out.path, AnalysisConfig(method="unet", device="cpu", chunk_size_px=2048)
    )
    b = analyze_slide(
        held_out.path, AnalysisConfig(method="unet", device="cpu", chunk_size_px=chunk_size_px)
    )
    assert len(a.lesions) == len(b.lesions)
    np.testing.assert_array_equal(a.lesions.n_cells, b.lesions.n_cells)
    np.testing.assert_allclose(a.lesions[["x_um", "y_um"]], b.lesions[["x_um", "y_um"]], atol=0.01)


def test_the_operating_point_is_chosen_on_unrounded_figures():
    """One cell more on one of twenty slides near F1 1 decides, not the rounding (the means
    of 0.3 and 0.8 agree to four decimals here); exact ties go to the lower threshold, and a
    higher median beats a higher mean."""
    easy = [1.0] * 18
    per_slide = {
        0.3: [0.9987, 0.9988, *easy],
        0.8: [0.9996, 0.9988, *easy],
        0.85: [0.9996, 0.9988, *easy],
        0.95: [0.9987, 0.9976, *easy],
    }
    assert round(np.mean(per_slide[0.3]), 4) == round(np.mean(per_slide[0.8]), 4)
    assert pick_centre_threshold(per_slide) == 0.8
    assert pick_centre_threshold({0.5: [1.0, 0.9, 0.9], 0.7: [0.95, 0.95, 0.7]}) == 0.7


def test_a_distilled_model_keeps_its_teachers_operating_point_only_where_slides_cannot_tell():
    """Within one cell in two thousand of the best mean (and the same median) the teacher's
    threshold is kept; one cell in a thousand on one of twenty slides decides against it; a
    threshold that was not tried is not taken."""
    easy = [1.0] * 18
    per_slide = {0.85: [0.9996, 0.998, *easy], 0.95: [0.9991, 1.0, *easy]}
    assert pick_centre_threshold(per_slide) == 0.95
    assert pick_centre_threshold(per_slide, prefer=0.85) == 0.85
    worse = {0.85: [0.98, 0.998, *easy], 0.95: [0.9991, 1.0, *easy]}
    assert pick_centre_threshold(worse, prefer=0.85) == 0.95
    assert pick_centre_threshold(per_slide, prefer=0.6) == 0.95


def test_family_probability_is_part_of_the_training_slides_names(tmp_path):
    default = make_slides(tmp_path, [1000], 256, families=True, exclude_families=("layout",))
    other = make_slides(
        tmp_path, [1000], 256, families=True, exclude_families=("layout",), family_probability=0.5
    )
    assert default[0].name == "train_1000_fam-no-layout.ome.tif"
    assert other[0].name == "train_1000_fam-no-layout_p0.5.ome.tif"
    assert other[0].exists() and default[0].exists()


def test_a_tiny_training_run_lowers_the_loss(tmp_path):
    paths = make_slides(tmp_path, [1000], 768)
    data = [slide_data(p, 1.0) for p in paths]
    rng = np.random.default_rng(0)
    fixed = [sample_patch(rng, data[0], patch=64, augment=False) for _ in range(8)]
    x = torch.from_numpy(np.stack([b[0] for b in fixed]))
    y = torch.from_numpy(np.stack([b[1] for b in fixed]))
    hk = torch.tensor([float(b[2]) for b in fixed])
    cfg = TrainConfig(steps=80, batch_size=4, base=8, depth=2, lr=3e-3)
    torch.manual_seed(0)
    before = UNet(base=8, depth=2).eval()
    with torch.no_grad():
        loss_before = float(loss_fn(before(x), y, hk))
    model, hist = train(data, data, cfg)
    with torch.no_grad():
        loss_after = float(loss_fn(model(x), y, hk))
    assert loss_after < 0.7 * loss_before


def test_a_distilled_network_learns_its_teachers_maps(tmp_path):
    """With a teacher (`TrainConfig.teacher`), a small network trained as above ends closer to
    the shipped network's maps than the same run without one: the loss against the teacher's
    probabilities, less what it is for the teacher itself (a divergence), is lower."""
    paths = make_slides(tmp_path, [1000], 768)
    data = [slide_data(p, 1.0) for p in paths]
    rng = np.random.default_rng(1)
    fixed = [sample_patch(rng, data[0], patch=64, augment=False) for _ in range(8)]
    x = torch.from_numpy(np.stack([b[0] for b in fixed]))
    hk = torch.tensor([float(b[2]) for b in fixed])
    with torch.no_grad():
        taught = torch.sigmoid(load_model(DEFAULT_MODEL).net(x))
        floor = float(loss_fn(torch.logit(taught.clamp(1e-6, 1 - 1e-6)), taught, hk))
    away = {}
    for teacher in (None, str(DEFAULT_MODEL)):
        cfg = TrainConfig(steps=200, batch_size=4, base=8, depth=2, lr=3e-3, teacher=teacher)
        torch.manual_seed(0)
        model, _ = train(data, (), cfg)
        with torch.no_grad():
            away[teacher] = float(loss_fn(model(x), taught, hk)) - floor
    assert away[str(DEFAULT_MODEL)] < 0.9 * away[None], away


def test_cli_falls_back_to_the_cpu_with_a_message_when_no_gpu(tmp_path, held_out):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo",
            "run",
            str(held_out.path),
            "--out",
            str(tmp_path),
            "--method",
            "unet",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "using the CPU" in proc.stderr
    summary = json.loads((tmp_path / "held_out" / "summary.json").read_text())
    assert summary["method"] == "unet" and summary["counts"]["her2_cells"] > 0


def test_network_works_without_a_ki67_channel(tmp_path):
    s = generate_slide(tmp_path / "noki.ome.tif", labels=False, **NO_KI67_SPEC)
    r = analyze_slide(s.path, AnalysisConfig(method="unet", device="cpu"))
    assert r.cells["ki67_pos"].isna().all()
    assert r.lesions["dormant"].isna().all()
    assert shortfalls(accuracy_figures(s), published_figures("no_ki67")) == []


def test_fine_tuning_on_annotated_slides_from_the_cli(tmp_path):
    import subprocess
    import sys

    generate_slide(tmp_path / "mine.ome.tif", size_px=(768, 768), group="IAV", dpi=15, seed=3)
    # The first of the slides given is kept for validation (a fifth of them, at least one).
    val = generate_slide(tmp_path / "val.ome.tif", size_px=(768, 512), group="IAV", dpi=15, seed=4)
    out = tmp_path / "tuned.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo",
            "train",
            str(out),
            "--slides",
            str(val.path),
            str(tmp_path / "mine.ome.tif"),
            "--from-model",
            str(DEFAULT_MODEL),
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    tuned = load_model(out)
    cfg = tuned.config
    assert cfg["fine_tuned_from"] == str(DEFAULT_MODEL)
    assert cfg["training_slides"] == ["mine.ome.tif"]
    assert cfg["training"]["steps"] == 3
    # Its validation is computed by the training code, on the slide it did not train on.
    assert cfg["validation_slides"] == cfg["validation"]["slides"] == ["val.ome.tif"]
    r = analyze_slide(val.path, AnalysisConfig(model_path=str(out)))
    tp = evaluate_cells(r.cells, val.cells)["tp"]
    f1 = 2 * tp / (len(r.cells) + len(val.cells))
    assert cfg["validation"]["unet"]["cells_f1"] == round(f1, 4)
    assert set(cfg["validation"]) == {"unet", "classical", "slides"}
    # Fine-tuning started from the shipped weights: a few steps move them only a little.
    base = load_model()
    a = dict(base.net.state_dict())["head.weight"]
    b = dict(tuned.net.state_dict())["head.weight"]
    assert 0 < float((a - b).abs().max()) < 0.1


@pytest.mark.parametrize("method", ["unet", "classical"])
def test_a_lung_without_cancer_cells_gives_empty_tables(tmp_path, method):
    s = generate_slide(
        tmp_path / "clean.ome.tif",
        size_px=(1024, 768),
        group="PBS",
        seed=9,
        mouse_burden=0.0,
        labels=False,
    )
    assert len(s.cells) == 0
    r = analyze_slide(s.path, AnalysisConfig(method=method, device="cpu"))
    # Nothing is found (measured for both detectors; a stray false cell fails the test).
    assert len(r.cells) == 0 and len(r.lesions) == 0
    assert r.summary["counts"]["her2_cells"] == 0
    assert {"x_um", "y_um", "her2_mean", "ki67_pos"} <= set(r.cells.columns)


@pytest.mark.parametrize(
    "seed, appearance",
    [(94013, {"autofluorescence": 4.0}), (94015, {"bleed_through": 0.25})],
    ids=["high-autofluorescence", "her2-bleed-through"],
)
def test_the_screen_finds_the_dense_runs_cells_on_hard_sections(tmp_path, seed, appearance):
    """Two IAV 28 dpi sections of bench_markers where the screen lost cells the dense network
    finds. 4x autofluorescence (seed 94013): cancer cells stand 0.5-0.9x the autofluorescence,
    some in a packed focus (196 of 276 found before the screen kept cells by the host nuclei's
    HER2 and merged foci by their inside). 0.25 HER2 bleed-through (seed 94015): HER2 seen in
    Ki67 lights the bands of packed cells in Ki67, which the screen took for macrophages'
    (recall 0.757 against the dense run's 1.000 while a macrophage's band needed only 0.3x the
    nucleus's own Ki67, `histo.network.MACROPHAGE_OVER_NUCLEUS`)."""
    from histo.synthetic import Appearance

    s = generate_slide(
        tmp_path / "hard.ome.tif",
        size_px=(2048, 2048),
        group="IAV",
        dpi=28,
        seed=seed,
        appearance=Appearance(**appearance),
        labels=False,
    )
    screened = analyze_slide(s.path, AnalysisConfig(method="unet", device="cpu"))
    dense = analyze_slide(s.path, AnalysisConfig(method="unet", device="cpu", screen=False))
    found = evaluate_cells(screened.cells, s.cells)
    assert found["recall"] >= evaluate_cells(dense.cells, s.cells)["recall"] - 0.005
    assert found["recall"] >= 0.98
