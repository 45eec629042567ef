"""Fine-tuning the network from a scientist's reviews (the corrections journals).

A review says, for the cells it touched, what the network should have seen: cells looked at
and kept (in lesions accepted, corrected or edited, or inside a region reviewed completely) or
added are HER2+ nuclei (their centres), deleted cells and the cells of rejected lesions are
not, a cell's Ki67 is what the scientist called it, and inside a region marked as reviewed
completely every cell is marked and nothing else is one. Points are enough: around each point
the network is told what to draw (a bump at a kept nucleus, nothing at a deleted one) and
elsewhere it is told nothing, except inside complete regions, where all is known.

Training windows are read from the slides around the points and regions only (never the
whole slide), at the model's resolution, normalised like the analysis does
(`models.infer.normalise` of signal over the slide's own autofluorescence). A share of the
patches comes from generated slides of the house style, fully labelled, so the network keeps
what it knew. `validate` measures the cell F1 of a model against reviewed slides that were not
used for training.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .train import CENTRE_SIGMA_PX, PATCH, _bumps

log = logging.getLogger(__name__)

#: Around each reviewed point, the network is told what to draw within this radius (um).
SUPERVISED_RADIUS_UM = 6.0
#: A kept nucleus' centre is certainly inside its cell within this radius (um); beyond it, up
#: to `SUPERVISED_RADIUS_UM`, the cell mask is not known from a point.
CELL_CORE_UM = 3.0
#: Windows read around each reviewed point (model pixels, at least a patch).
WINDOW_PX = 192
#: A predicted cell matches a reviewed one within this distance (um).
MATCH_UM = 5.0


@dataclass
class ReviewedSlide:
    """What a slide's review says about its cells (positions in um).

    Attributes
    ----------
    folder : Path
        The result folder (with ``corrections.jsonl``).
    slide_path : Path
    channels, pixel_size_um
        As the analysis opened the slide (``summary.json``).
    sha256 : str
        The slide's checksum, as the analysis recorded it.
    positives : ndarray (N, 2)
        x_um, y_um of the cells looked at and kept: added by hand, in a lesion accepted,
        corrected or edited, or inside a region reviewed completely (cells nobody looked at
        are left out: they may be the false cells the review is there to remove).
    positive_ki67 : ndarray (N,)
        1.0 Ki67+, 0.0 Ki67-, NaN unknown.
    negatives : ndarray (M, 2)
        Cells deleted, and the cells of rejected lesions.
    boxes : list of tuple
        Regions reviewed completely, ``(x0, y0, x1, y1)`` um.
    focus : ndarray (K, 2)
        Where the scientist changed something (cells added, deleted, re-called, rejected),
        where training looks most.
    n_corrections : int
        Corrections in force in the journal.
    has_ki67 : bool
    """

    folder: Path
    slide_path: Path
    channels: object
    pixel_size_um: float | None
    sha256: str | None
    positives: np.ndarray
    positive_ki67: np.ndarray
    negatives: np.ndarray
    boxes: list = field(default_factory=list)
    focus: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    n_corrections: int = 0
    has_ki67: bool = True


def reviewed_slide(folder) -> ReviewedSlide:
    """Read what a result folder's review says (`histo.review.ReviewSession`).

    Raises
    ------
    InputError
        If the folder is not a result folder, holds no review, or its slide is not where the
        analysis read it.
    """
    from histo.errors import InputError
    from histo.review import JOURNAL, ReviewSession

    folder = Path(folder)
    session = ReviewSession(folder)
    if not (folder / JOURNAL).is_file() or session.n_corrections == 0:
        raise InputError(
            f"{folder}: no review corrections (corrections.jsonl) to learn from; review the "
            "slide in napari (Review lesions) first"
        )
    summary = json.loads((folder / "summary.json").read_text())
    slide_path = Path(summary.get("path") or "")
    if not slide_path.is_file() and not slide_path.is_dir():
        raise InputError(
            f"{folder}: its slide {slide_path} is not there any more; put it back (or analyse "
            "it again from where it is now) to fine-tune on this review"
        )
    inputs = summary.get("run_key_inputs") or {}
    cells = session.cells
    live = cells[cells["review"] != "deleted"]
    status = session.lesions["status"]
    rejected = set(session.lesions.index[status == "rejected"])
    in_rejected = live["lesion_id"].isin(rejected).to_numpy()
    # Kept means looked at and kept: added by hand, in a lesion accepted, corrected or edited,
    # or inside a region reviewed completely. A cell nobody looked at teaches nothing (it may be
    # one of the false cells the review is there to remove).
    looked_at = set(session.lesions.index[status.isin(["accepted", "corrected", "edited"])])
    xy = live[["x_um", "y_um"]].to_numpy(float).reshape(-1, 2)
    in_box = np.zeros(len(live), bool)
    for x0, y0, x1, y1 in session.complete_regions:
        in_box |= (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    confirmed = (
        (live["review"] == "added").to_numpy()
        | live["lesion_id"].isin(looked_at).to_numpy()
        | in_box
    )
    kept = live[confirmed & ~in_rejected]
    ki67 = kept["ki67_pos"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    negatives = np.r_[
        cells.loc[cells["review"] == "deleted", ["x_um", "y_um"]].to_numpy(float),
        live.loc[in_rejected, ["x_um", "y_um"]].to_numpy(float),
    ].reshape(-1, 2)
    focus = [
        (c.x_um, c.y_um)
        for c, _ in session._history
        if c.action in ("add_cell", "delete_cell", "set_cell_ki67") and c.x_um is not None
    ]
    focus += [tuple(p) for p in live.loc[in_rejected, ["x_um", "y_um"]].to_numpy(float)]
    return ReviewedSlide(
        folder=folder,
        slide_path=slide_path,
        channels=inputs.get("channels"),
        pixel_size_um=inputs.get("pixel_size_um"),
        sha256=(summary.get("input") or {}).get("sha256"),
        positives=kept[["x_um", "y_um"]].to_numpy(float).reshape(-1, 2),
        positive_ki67=ki67 if session.has_ki67 else np.full(len(kept), np.nan),
        negatives=negatives,
        boxes=list(session.complete_regions),
        focus=np.asarray(focus, float).reshape(-1, 2),
        n_corrections=session.n_corrections,
        has_ki67=session.has_ki67,
    )


# ----------------------------------------------------------------------------- windows


@dataclass
class Window:
    """A piece of a reviewed slide at the model's resolution, with what is known there."""

    linear: np.ndarray  # (3, h, w) float16: signal over autofluorescence
    target: np.ndarray  # (3, h, w) float32: cell, centre, Ki67
    weight: np.ndarray  # (3, h, w) float32: 1 where the target is known, 0 elsewhere
    has_ki67: bool
    anchor: tuple  # (y, x) model px inside the window that training patches should contain


def _disk(shape, cy, cx, r):
    y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, shape[0])
    x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def targets_for(
    shape: tuple[int, int],
    positives_px: np.ndarray,
    positive_ki67: np.ndarray,
    negatives_px: np.ndarray,
    boxes_px: list,
    *,
    px_um: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and weights of the network's three outputs from reviewed points.

    Parameters
    ----------
    shape : (h, w)
        The window, in model pixels.
    positives_px, negatives_px : ndarray (N, 2)
        (y, x) in model pixels of the window.
    positive_ki67 : ndarray (N,)
        1, 0 or NaN (unknown: the Ki67 output is not told anything there).
    boxes_px : list of (y0, x0, y1, x1)
        Regions reviewed completely, in model pixels of the window.
    px_um : float
        Model pixel size.

    Returns
    -------
    target, weight : ndarray (3, h, w)
        cell, centre, Ki67: bumps at kept nuclei (Ki67 only at Ki67+ ones), the cell mask
        within `CELL_CORE_UM` of them; weight 1 within `SUPERVISED_RADIUS_UM` of every point
        (the cell mask only on the core) and everywhere inside complete regions (except the
        cell mask beyond the core of kept cells, whose extent a point does not give).
    """
    h, w = shape
    target = np.zeros((3, h, w), np.float32)
    weight = np.zeros((3, h, w), np.float32)
    r_sup, r_core = SUPERVISED_RADIUS_UM / px_um, CELL_CORE_UM / px_um
    for y0, x0, y1, x1 in boxes_px:
        ys = slice(max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), h))
        xs = slice(max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), w))
        weight[:, ys, xs] = 1.0
    target[1] = _bumps((h, w), positives_px, 0, 0, sigma=CENTRE_SIGMA_PX)
    pos_ki67 = positives_px[np.nan_to_num(positive_ki67, nan=0.0) > 0.5]
    target[2] = _bumps((h, w), pos_ki67, 0, 0, sigma=CENTRE_SIGMA_PX)
    for (py, px), k in zip(positives_px, positive_ki67, strict=True):
        d = _disk((h, w), py, px, r_sup)
        if d is not None:
            sl, inside = d
            weight[1][sl][inside] = 1.0
            if np.isfinite(k):
                weight[2][sl][inside] = 1.0
            weight[0][sl][inside] = 0.0  # the cell's extent beyond its core: unknown
    for py, px in positives_px:
        d = _disk((h, w), py, px, r_core)
        if d is not None:
            sl, inside = d
            target[0][sl][inside] = 1.0
            weight[0][sl][inside] = 1.0
    for py, px in negatives_px:
        d = _disk((h, w), py, px, r_sup)
        if d is not None:
            sl, inside = d
            weight[:, sl[0], sl[1]][:, inside] = 1.0
    return target, weight


def review_windows(rs: ReviewedSlide, model_um_per_px: float = 1.0, max_windows: int = 400):
    """Windows of a reviewed slide around its corrections, some kept cells and its complete
    regions (`Window`), read at the model's resolution."""
    from histo.config import AnalysisConfig
    from histo.io import open_slide
    from histo.pipeline import measure_background

    from .infer import resample_mean

    slide = open_slide(rs.slide_path, channels=rs.channels, pixel_size_um=rs.pixel_size_um)
    _, _, stain = measure_background(slide, AnalysisConfig())
    px = slide.pixel_size_um
    factor = model_um_per_px / px
    off = (factor - 1) / 2.0
    H, W = slide.shape_px

    def to_model(xy_um):  # (x_um, y_um) -> (y, x) model px of the whole slide
        xy = np.asarray(xy_um, float).reshape(-1, 2)
        return np.c_[(xy[:, 1] / px - off) / factor, (xy[:, 0] / px - off) / factor]

    rng = np.random.default_rng(0)
    anchors = list(to_model(rs.focus))
    kept = to_model(rs.positives)
    # Kept cells too (what the network already does right), as many as the corrections.
    n_kept = min(len(kept), max(len(anchors), 20))
    anchors += list(kept[rng.choice(len(kept), n_kept, replace=False)]) if n_kept else []
    boxes = [to_model([(b[0], b[1]), (b[2], b[3])]) for b in rs.boxes]
    for b in boxes:  # a window per window-sized piece of each complete region
        (y0, x0), (y1, x1) = b.min(axis=0), b.max(axis=0)
        for cy in np.arange(y0 + WINDOW_PX / 4, max(y1, y0 + 1), WINDOW_PX / 2):
            for cx in np.arange(x0 + WINDOW_PX / 4, max(x1, x0 + 1), WINDOW_PX / 2):
                anchors.append(np.array([min(cy, y1), min(cx, x1)]))
    if len(anchors) > max_windows:
        anchors = [anchors[i] for i in rng.choice(len(anchors), max_windows, replace=False)]
    neg = to_model(rs.negatives)
    boxes_px = [np.r_[b.min(axis=0), b.max(axis=0)] for b in boxes]
    mh, mw = int(H / factor), int(W / factor)
    windows = []
    for cy, cx in anchors:
        y0 = int(np.clip(round(cy) - WINDOW_PX // 2, 0, max(mh - WINDOW_PX, 0)))
        x0 = int(np.clip(round(cx) - WINDOW_PX // 2, 0, max(mw - WINDOW_PX, 0)))
        y1, x1 = min(y0 + WINDOW_PX, mh), min(x0 + WINDOW_PX, mw)
        if y1 - y0 < PATCH or x1 - x0 < PATCH:
            continue
        ly0, lx0 = int(round(y0 * factor)), int(round(x0 * factor))
        ly1 = min(int(round(y1 * factor)), H)
        lx1 = min(int(round(x1 * factor)), W)
        img = slide.read_region(0, ly0, ly1, lx0, lx1).astype(np.float32)
        lin = np.zeros((3, y1 - y0, x1 - x0), np.float32)
        for k, role in enumerate(("DAPI", "HER2", "Ki67")):
            i = slide.roles.get(role)
            if i is None:
                continue
            ch = resample_mean(img[i], factor)[: y1 - y0, : x1 - x0]
            lin[k, : ch.shape[0], : ch.shape[1]] = (ch - stain.offset[i]) / stain.autofluorescence[
                i
            ]

        def local(p, y0=y0, x0=x0, y1=y1, x1=x1):
            m = (p[:, 0] > y0 - 8) & (p[:, 0] < y1 + 8) & (p[:, 1] > x0 - 8) & (p[:, 1] < x1 + 8)
            return p[m] - [y0, x0], m

        pos, m = local(kept)
        ng, _ = local(neg)
        bx = [b - [y0, x0, y0, x0] for b in boxes_px]
        target, weight = targets_for(
            (y1 - y0, x1 - x0),
            pos,
            rs.positive_ki67[m],
            ng,
            [tuple(b) for b in bx],
            px_um=model_um_per_px,
        )
        windows.append(
            Window(
                lin.astype(np.float16),
                target,
                weight,
                "Ki67" in slide.roles,
                (float(cy - y0), float(cx - x0)),
            )
        )
    return windows


def sample_window_patch(rng, win: Window, patch: int = PATCH):
    """One (input (4, P, P), target (3, P, P), weight (3, P, P), has_ki67) from a window:
    a patch holding its anchor, rotated and flipped, with a mild gain jitter."""
    from .infer import normalise

    _, h, w = win.linear.shape
    ay, ax = win.anchor
    y0 = int(np.clip(ay - rng.uniform(16, patch - 16), 0, h - patch))
    x0 = int(np.clip(ax - rng.uniform(16, patch - 16), 0, w - patch))
    sl = (slice(None), slice(y0, y0 + patch), slice(x0, x0 + patch))
    lin = win.linear[sl].astype(np.float32)
    lin *= np.exp(rng.uniform(np.log(0.7), np.log(1.4), (3, 1, 1))).astype(np.float32)
    x = np.zeros((4, patch, patch), np.float32)
    x[:3] = normalise(lin)
    x[3] = 1.0 if win.has_ki67 else 0.0
    if not win.has_ki67:
        x[2] = 0.0
    y, wt = win.target[sl], win.weight[sl]
    k = int(rng.integers(4))
    x, y, wt = (np.rot90(a, k, axes=(1, 2)) for a in (x, y, wt))
    if rng.random() < 0.5:
        x, y, wt = x[:, :, ::-1], y[:, :, ::-1], wt[:, :, ::-1]
    return (np.ascontiguousarray(a) for a in (x, y, wt))


def masked_loss(logits, target, weight):
    """Binary cross-entropy of the three outputs where the target is known (`weight`),
    nuclei weighted up as in training (`models.train.loss_fn`)."""
    import torch
    import torch.nn.functional as F

    pw = torch.tensor(10.0, device=logits.device)
    total = 0.0
    for c in range(3):
        bce = F.binary_cross_entropy_with_logits(
            logits[:, c], target[:, c], pos_weight=None if c == 0 else pw, reduction="none"
        )
        total = total + (bce * weight[:, c]).sum() / weight[:, c].sum().clamp(min=1.0)
    return total


# ----------------------------------------------------------------------------- fine-tuning


@dataclass
class TeachResult:
    """What `teach` wrote and measured."""

    model_path: Path
    n_corrections: int
    n_windows: int
    seconds: float
    validation: list = field(default_factory=list)
    compare: dict | None = None


def teach(out, folders, *, progress=None, **kwargs) -> TeachResult:
    """Fine-tune a model on the reviews of `folders` and save it to `out` (.pt + .json);
    `progress(done, total, message)` is called as it goes. Takes the arguments of
    `iter_teach`."""
    from histo._threads import run_reporting

    return run_reporting(iter_teach(out, folders, **kwargs), progress)


def iter_teach(
    out,
    folders,
    *,
    init_model=None,
    steps: int = 300,
    lr: float = 3e-4,
    batch_size: int = 8,
    seed: int = 0,
    synthetic_share: float = 0.25,
    data_dir=None,
    validate_on=(),
    reanalyse=None,
    device: str = "auto",
):
    """Fine-tune a model on the reviews of `folders` and save it to `out` (.pt + .json);
    yields ``(done, total, message)`` as it goes (stop iterating to cancel: nothing is
    written then), returns a `TeachResult`.

    Parameters
    ----------
    out : path-like
    folders : sequence of path-like
        Result folders whose ``corrections.jsonl`` hold the reviews.
    init_model : path-like, optional
        The model to start from (default: the shipped one).
    steps, lr, batch_size, seed
        Optimisation (Adam, one-cycle schedule).
    synthetic_share : float
        Share of each batch from generated slides of the house style (fully labelled), so the
        network keeps what it knew; 0 for none.
    data_dir : path-like, optional
        Cache of those generated slides (default: ``lungmets_training_data``).
    validate_on : sequence of path-like
        Reviewed result folders not used for training: the cell F1 of the starting model and of
        the new one against their reviews (`validate`).
    reanalyse : path-like, optional
        A slide's result folder: its slide is analysed again with the new model (results in
        ``<out stem>_results/`` beside the model) and the counts compared
        (``TeachResult.compare``): as the analysis found them, as reviewed, with the new model.

    Returns
    -------
    TeachResult
    """
    import tempfile

    import torch

    from histo.errors import InputError

    from . import DEFAULT_MODEL, load_model, model_config
    from .infer import resolve_device
    from .train import TrainConfig, golden_output, make_slides, sample_patch, save_model, slide_data
    from .unet import UNet

    t0 = time.perf_counter()
    out = Path(out)
    folders = [Path(f) for f in folders]
    overlap = {f.resolve() for f in folders} & {Path(f).resolve() for f in validate_on}
    if overlap:
        raise InputError(
            "slides to validate on must not be trained on: "
            + ", ".join(sorted(str(f) for f in overlap))
        )
    parent = Path(init_model) if init_model else DEFAULT_MODEL
    parent_cfg = model_config(parent)
    um = float(parent_cfg.get("input_um_per_px", 1.0))
    reviews = [reviewed_slide(f) for f in folders]
    windows = []
    for i, rs in enumerate(reviews):
        windows += review_windows(rs, um)
        yield (i + 1, len(reviews), "reading reviewed slides")
    if not windows:
        raise InputError("the reviews hold no cells or regions to learn from")
    synthetic = []
    if synthetic_share > 0:
        d = Path(data_dir) if data_dir else Path("lungmets_training_data")
        paths = make_slides(d, range(1000, 1004), 1024)
        synthetic = [slide_data(p, um) for p in paths]

    loaded = load_model(parent, "cpu")
    arch = parent_cfg["architecture"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = resolve_device(device)
    net = UNet(base=arch["base"], depth=arch["depth"]).to(dev)
    net.load_state_dict(loaded.net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_syn = int(round(batch_size * synthetic_share)) if synthetic else 0
    history = {"step": [], "loss": []}
    running = None
    for step in range(1, steps + 1):
        net.train()
        xs, ys, ws = [], [], []
        for _ in range(batch_size - n_syn):
            x, y, w = sample_window_patch(rng, windows[int(rng.integers(len(windows)))])
            xs.append(x), ys.append(y), ws.append(w)
        for _ in range(n_syn):
            x, y, _ = sample_patch(rng, synthetic[int(rng.integers(len(synthetic)))])
            xs.append(x), ys.append(y), ws.append(np.ones_like(y))
        x = torch.from_numpy(np.stack(xs)).to(dev)
        y = torch.from_numpy(np.stack(ys)).to(dev)
        w = torch.from_numpy(np.stack(ws)).to(dev)
        loss = masked_loss(net(x), y, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0 or step == steps:
            history["step"].append(step)
            history["loss"].append(round(running, 5))
        yield (step, steps, f"fine-tuning, loss {running:.3f}")
    net = net.cpu().eval()
    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, base=arch["base"], depth=arch["depth"],
        seed=seed, n_train_slides=len(reviews), n_val_slides=len(validate_on),
        input_um_per_px=um, families=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        golden = golden_output(net, tmp)
    extra = {
        "history": history,
        "golden": golden,
        "fine_tuned_from": str(parent),
        "parent_sha256": loaded.sha256,
        "from_reviews": [
            {
                "results": str(rs.folder),
                "slide": rs.slide_path.name,
                "slide_sha256": rs.sha256,
                "corrections": rs.n_corrections,
                "cells": int(len(rs.positives)),
                "negatives": int(len(rs.negatives)),
                "complete_regions": len(rs.boxes),
            }
            for rs in reviews
        ],
        "n_corrections": int(sum(rs.n_corrections for rs in reviews)),
        "synthetic_share": synthetic_share,
        "torch_version": torch.__version__,
        # The parent's operating point: a few hundred points cannot calibrate a new one.
        "centre_threshold": parent_cfg.get("centre_threshold"),
        "centre_threshold_calibration": "inherited from the parent model",
    }
    path = save_model(net, out, train_config=config, extra=extra)
    result = TeachResult(
        model_path=path,
        n_corrections=extra["n_corrections"],
        n_windows=len(windows),
        seconds=round(time.perf_counter() - t0, 1),
    )
    for i, folder in enumerate(validate_on):
        yield (i, len(validate_on), "validating")
        before = validate(parent, folder)
        after = validate(path, folder)
        result.validation.append({"results": str(folder), "before": before, "after": after})
    if result.validation:
        cfg = json.loads(path.with_suffix(".json").read_text())
        cfg["validation"] = result.validation
        from histo.atomic import write_json

        write_json(cfg, path.with_suffix(".json"))
    if reanalyse is not None:
        yield (0, 1, "analysing the slide again with the new model")
        result.compare = compare_on(path, reanalyse)
    return result


def compare_on(model_path, folder) -> dict:
    """Analyse a reviewed slide again with a model and compare the counts.

    The new results go to ``<model stem>_results/<slide>/`` beside the model.

    Returns
    -------
    dict
        ``analysed`` (the counts of the slide's results), ``reviewed`` (after the review),
        ``new_model`` (with `model_path`), each as in summary.json, and ``results`` (the new
        result folder).
    """
    from histo.config import AnalysisConfig
    from histo.outputs import write_results
    from histo.pipeline import analyze_slide
    from histo.review import ReviewSession

    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    inputs = summary.get("run_key_inputs") or {}
    params = dict(summary.get("parameters") or {})
    params.update(method="unet", model_path=str(model_path))
    known = AnalysisConfig.__dataclass_fields__
    config = AnalysisConfig(**{k: v for k, v in params.items() if k in known})
    result = analyze_slide(
        summary["path"],
        config,
        channels=inputs.get("channels"),
        pixel_size_um=inputs.get("pixel_size_um"),
    )
    model_path = Path(model_path)
    out = write_results(result, model_path.parent / f"{model_path.stem}_results")
    return {
        "analysed": summary.get("counts"),
        "reviewed": ReviewSession(folder).counts(),
        "new_model": result.summary["counts"],
        "results": str(out),
    }


def _reviewed_and_found(model_path, rs: ReviewedSlide):
    """The reviewed cells and the model's cells on a reviewed slide, over its complete regions
    (or all of it when none was marked): (reviewed x/y um (N, 2), found cells table)."""
    import pandas as pd

    from histo.config import AnalysisConfig
    from histo.pipeline import analyze_slide

    config = AnalysisConfig(model_path=str(model_path))
    kw = {"channels": rs.channels, "pixel_size_um": rs.pixel_size_um}
    truth, found = [], []
    for box in rs.boxes or [None]:
        if box is None:
            result = analyze_slide(rs.slide_path, config, **kw)
            truth.append(rs.positives)
            found.append(result.cells)
            continue
        x0, y0, x1, y1 = box
        px = _pixel_size(rs)
        region = (int(y0 / px), int(np.ceil(y1 / px)), int(x0 / px), int(np.ceil(x1 / px)))
        result = analyze_slide(rs.slide_path, config, region_px=region, **kw)
        p = rs.positives
        truth.append(p[(p[:, 0] >= x0) & (p[:, 0] < x1) & (p[:, 1] >= y0) & (p[:, 1] < y1)])
        c = result.cells
        x, y = c["x_um"].to_numpy(float), c["y_um"].to_numpy(float)
        found.append(c[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)])
    return np.concatenate(truth).reshape(-1, 2), pd.concat(found, ignore_index=True)


def _f1(found_xy: np.ndarray, truth_xy: np.ndarray) -> dict:
    from histo.evaluate import match_points

    pi, _ = match_points(found_xy, truth_xy, MATCH_UM)
    tp = len(pi)
    precision = tp / max(len(found_xy), 1)
    recall = tp / max(len(truth_xy), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    return {
        "f1": round(f1, 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "n_reviewed": int(len(truth_xy)),
        "n_found": int(len(found_xy)),
        "count_error": round(len(found_xy) / max(len(truth_xy), 1) - 1, 4),
    }


def validate(model_path, folder) -> dict:
    """Cell F1 of a model against a reviewed slide: the slide (its complete regions, or all of
    it) analysed with the model, cells matched within `MATCH_UM` to the reviewed ones.

    Returns
    -------
    dict
        f1, precision, recall, n_reviewed, n_found, count_error (found / reviewed - 1).
    """
    truth, found = _reviewed_and_found(model_path, reviewed_slide(folder))
    return _f1(found[["x_um", "y_um"]].to_numpy(float).reshape(-1, 2), truth)


#: The fewest cells in regions reviewed completely that `calibrate_on_reviews` chooses an
#: operating point from (fewer, and one cell more or less decides it).
MIN_REVIEWED_CELLS = 50


def calibrate_on_reviews(out, folders, *, progress=None, **kwargs) -> dict:
    """Choose a model's operating point on reviewed slides and write the copy (see
    `iter_calibrate_on_reviews`, whose arguments it takes); `progress(done, total, message)`
    is called as it goes."""
    from histo._threads import run_reporting

    return run_reporting(iter_calibrate_on_reviews(out, folders, **kwargs), progress)


def iter_calibrate_on_reviews(out, folders, *, init_model=None, reanalyse=None):
    """Choose a model's operating point (its nucleus-centre threshold) on your reviewed slides,
    keeping its tensors: a copy of the model with that threshold, for a study whose images the
    network's peaks are less (or more) sure of than on the slides it was calibrated on.

    Only regions marked *reviewed completely* count (there every cell is known, so false
    cells are too). Each reviewed slide is analysed with the model at the lowest threshold of
    `models.train.CENTRE_THRESHOLDS`; each threshold's cell F1 against the review is computed
    per slide, and the threshold chosen as `models.train.pick_centre_threshold` chooses it.

    Parameters
    ----------
    out : str or Path
        The model to write (.pt; its .json and ONNX exports beside it).
    folders : list of Path
        Reviewed result folders (`lungmets run` outputs with a corrections journal).
    init_model : str or Path, optional
        The model to calibrate (default: the shipped one).
    reanalyse : path-like, optional
        A result folder analysed again with the new model afterwards (`compare_on`).

    Yields
    ------
    tuple
        ``(done, total, message)`` progress.

    Returns
    -------
    dict
        ``centre_threshold`` (chosen), ``parent`` (the model's own), ``f1`` per threshold
        (median over slides), ``f1_per_slide``, ``n_reviewed``, ``model_path``, and with
        `reanalyse` ``compare`` (`compare_on`).

    Raises
    ------
    InputError
        If no complete region was marked, or fewer than `MIN_REVIEWED_CELLS` cells lie in them.
    """
    import tempfile

    import pandas as pd

    from histo.errors import InputError

    from . import DEFAULT_MODEL, model_config
    from .train import CENTRE_THRESHOLDS, pick_centre_threshold

    parent = Path(init_model or DEFAULT_MODEL)
    reviews = [reviewed_slide(f) for f in folders]
    if not any(rs.boxes for rs in reviews):
        raise InputError(
            "no region marked 'reviewed completely' in these reviews: an operating point needs "
            "regions where every cell is known (mark them in napari's Review widget)"
        )
    reviews = [rs for rs in reviews if rs.boxes]
    low = min(CENTRE_THRESHOLDS)
    per_slide = {t: [] for t in CENTRE_THRESHOLDS}
    n_reviewed = 0
    with tempfile.TemporaryDirectory() as tmp:
        probe = _copy_model(parent, Path(tmp) / parent.name, centre_threshold=low)
        for i, rs in enumerate(reviews):
            yield (i, len(reviews), "analysing reviewed slides")
            truth, found = _reviewed_and_found(probe, rs)
            n_reviewed += len(truth)
            # (a region where nothing was found has the detectors' empty table: no centre_prob)
            prob = found.get("centre_prob", pd.Series(np.nan, index=found.index))
            for t in CENTRE_THRESHOLDS:
                keep = found[prob.to_numpy(float) >= t]
                per_slide[t].append(_f1(keep[["x_um", "y_um"]].to_numpy(float), truth)["f1"])
    if n_reviewed < MIN_REVIEWED_CELLS:
        raise InputError(
            f"only {n_reviewed} cells lie in the regions reviewed completely; an operating point "
            f"needs at least {MIN_REVIEWED_CELLS} (mark more regions as reviewed completely)"
        )
    best = pick_centre_threshold(per_slide)
    own = model_config(parent).get("centre_threshold")
    calibration = {
        "centre_threshold": best,
        "f1": {t: round(float(np.median(v)), 4) for t, v in per_slide.items()},
        "f1_per_slide": per_slide,
        "slides": [rs.slide_path.name for rs in reviews],
        "n_reviewed": n_reviewed,
        "from_reviews": [str(rs.folder) for rs in reviews],
    }
    path = _copy_model(
        parent,
        out,
        centre_threshold=best,
        centre_threshold_calibration=calibration,
        operating_point_of=parent.name,
    )
    yield (len(reviews), len(reviews), "analysing reviewed slides")
    result = {**calibration, "parent": own, "model_path": path}
    if reanalyse is not None:
        yield (0, 1, "analysing the slide with the new operating point")
        result["compare"] = compare_on(path, reanalyse)
        yield (1, 1, "analysing the slide with the new operating point")
    return result


def _copy_model(src: Path, dst, **fields) -> Path:
    """The model `src` (tensors, ONNX exports) copied to `dst` with `fields` set in its JSON;
    the tensors, and so the SHA-256, are the same. Each file is written atomically, the JSON
    last."""
    import shutil

    from histo.atomic import atomic_path, write_json

    from . import model_config

    def copy(a: Path, b: Path) -> None:
        with atomic_path(b) as tmp:
            shutil.copyfile(a, tmp)

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cfg = dict(model_config(src))
    copy(src, dst)
    for kind, suffix in (("onnx", ".onnx"), ("onnx_int8", ".int8.onnx")):
        entry = cfg.get(kind)
        export = src.with_name(entry["file"]) if entry else None
        if export is None or not export.is_file():
            cfg.pop(kind, None)
            continue
        copy(export, dst.with_suffix(suffix))
        cfg[kind] = {**entry, "file": dst.with_suffix(suffix).name}
    cfg.update(fields)
    write_json(cfg, dst.with_suffix(".json"))
    return dst


def _pixel_size(rs: ReviewedSlide) -> float:
    summary = json.loads((rs.folder / "summary.json").read_text())
    return float(summary["input"]["pixel_size_um"])
