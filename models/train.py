"""Training the network on synthetic slides (and fine-tuning it on a user's annotations).

The recipe of the shipped weights (see ``models/weights/MODEL_CARD.md``):

- training slides from the generator, seeds 1000+ (validation: seeds 5000+, never trained on);
  infected and control lungs at 3-60 days post infection, Ki67 imaged or not;
- inputs at 1 um/px (level 1 of a 0.5 um/px slide), normalised by the slide's own
  autofluorescence (`models.infer.to_model_input`), patches of 128 px;
- augmentation wider than the generator's own variation: stain gain 0.3-3x per channel, offset,
  gamma, blur, noise, channel bleed-through, vignetting, flips and rotations, and Ki67 dropped;
- targets from the generator's truth: cell masks, Gaussian bumps at nucleus centres, the same
  for Ki67+ nuclei;
- fixed seeds; Adam with a cosine schedule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from histo.synthetic._appearance import FAMILY_PROBABILITY

log = logging.getLogger(__name__)

PATCH = 128
CENTRE_SIGMA_PX = 1.5
#: Stain and exposure gain per channel on top of the generator's: an error of the slide's
#: reference level. Wider (0.1-10x) teaches the network that HER2 at the level of
#: autofluorescence can be a cell: it then calls immune cells in infiltrates (measured: cell
#: precision 0.54-0.64 on held-out slides); slides with little or much autofluorescence come
#: from the generator's autofluorescence family instead.
GAIN_RANGE = (0.3, 3.0)
#: Share of training patches drawn at another scale, and the range of that scale.
ZOOM_PROBABILITY = 0.5
ZOOM_RANGE = (0.6, 1.7)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run."""

    steps: int = 3000
    batch_size: int = 8
    lr: float = 2e-3
    base: int = 16
    depth: int = 3
    seed: int = 0
    n_train_slides: int = 24
    n_val_slides: int = 4
    slide_size_px: int = 2048
    input_um_per_px: float = 1.0
    #: Draw each training slide's style from the generator's appearance families
    #: (`histo.synthetic.random_appearance`); False: the default style only.
    families: bool = True
    #: Families held out of training (entirely, or beyond their training range).
    exclude_families: tuple[str, ...] = ()
    #: Probability that each family departs from the default style on a training slide.
    family_probability: float = FAMILY_PROBABILITY
    #: Share of patches drawn at another scale (`ZOOM_RANGE`).
    zoom_probability: float = ZOOM_PROBABILITY
    #: A trained model to distil: its probabilities are a second target beside the truth
    #: (the same loss against each), so that a smaller network (`base`) learns what it learnt.
    teacher: str | None = None


# ----------------------------------------------------------------------------- data


@dataclass
class SlideData:
    """One slide ready for training: normalised-linear input and targets at model resolution."""

    linear: np.ndarray  # (3, H, W) float16: (counts - offset) / autofluorescence
    has_ki67: bool
    cell: np.ndarray  # (H, W) uint8
    centres: np.ndarray  # (N, 2) float, model pixels (y, x)
    ki67: np.ndarray  # (N,) bool


def slide_data(path, model_um_per_px: float = 1.0) -> SlideData:
    """Load a generated slide and its truth at the model's resolution (any pixel size)."""
    import tifffile

    from histo.config import AnalysisConfig
    from histo.io import open_slide
    from histo.pipeline import measure_background
    from histo.synthetic import load_truth

    from .infer import resample_mean

    slide = open_slide(path)
    factor = model_um_per_px / slide.pixel_size_um
    _, _, stain = measure_background(slide, AnalysisConfig())
    truth = load_truth(path)
    img = slide.read_region(0, 0, slide.shape_px[0], 0, slide.shape_px[1]).astype(np.float32)
    lin = None
    for k, role in enumerate(("DAPI", "HER2", "Ki67")):
        i = slide.roles.get(role)
        if i is None:
            continue
        ch = resample_mean(img[i], factor)
        if lin is None:
            lin = np.zeros((3, *ch.shape), np.float32)
        lin[k] = (ch - stain.offset[i]) / stain.autofluorescence[i]
    cells_lab = tifffile.imread(truth.truth_dir / "labels.ome.tif", key=1)
    cell = resample_mean((cells_lab > 0).astype(np.float32), factor) >= 0.5
    px = slide.pixel_size_um
    off = (factor - 1) / 2.0
    centres = np.c_[(truth.cells.y_um / px - off) / factor, (truth.cells.x_um / px - off) / factor]
    return SlideData(
        lin.astype(np.float16),
        "Ki67" in slide.roles,
        cell.astype(np.uint8),
        centres,
        truth.cells.ki67_pos.to_numpy(bool),
    )


def _bumps(shape, pts, y0, x0, sigma=CENTRE_SIGMA_PX):
    out = np.zeros(shape, np.float32)
    if len(pts) == 0:
        return out
    r = int(3 * sigma) + 1
    for py, px in pts:
        cy, cx = py - y0, px - x0
        iy, ix = int(round(cy)), int(round(cx))
        ys = slice(max(iy - r, 0), min(iy + r + 1, shape[0]))
        xs = slice(max(ix - r, 0), min(ix + r + 1, shape[1]))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        yy = np.arange(ys.start, ys.stop)[:, None]
        xx = np.arange(xs.start, xs.stop)[None, :]
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        np.maximum(out[ys, xs], g, out=out[ys, xs])
    return out


def sample_patch(
    rng,
    sd: SlideData,
    patch: int = PATCH,
    augment: bool = True,
    zoom_probability: float = ZOOM_PROBABILITY,
):
    """One (input (4, P, P), target (3, P, P)) pair, half of them centred near a cancer cell."""
    from scipy import ndimage as ndi

    from .infer import normalise, resample_mean

    _, h, w = sd.linear.shape
    if len(sd.centres) and rng.random() < 0.5:
        cy, cx = sd.centres[rng.integers(len(sd.centres))] + rng.normal(0, patch / 5, 2)
    else:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    # Scale: cells from about 0.6x to 1.7x the generator's sizes (9-25 um cells, or a pixel
    # size the metadata gets wrong), so that the network counts nuclei, not one size of them.
    zoom = 1.0
    if augment and rng.random() < zoom_probability:
        zoom = float(np.exp(rng.uniform(np.log(ZOOM_RANGE[0]), np.log(ZOOM_RANGE[1]))))
    src = min(int(round(patch * zoom)), h, w)
    f = src / patch
    y0 = int(np.clip(cy - src / 2, 0, h - src))
    x0 = int(np.clip(cx - src / 2, 0, w - src))
    lin = sd.linear[:, y0 : y0 + src, x0 : x0 + src].astype(np.float32)
    cell = sd.cell[y0 : y0 + src, x0 : x0 + src].astype(np.float32)
    if src != patch:
        lin = np.stack([resample_mean(c, f) for c in lin])[:, :patch, :patch]
        cell = (resample_mean(cell, f) >= 0.5).astype(np.float32)[:patch, :patch]
    margin = 5 * f
    inside = (
        (sd.centres[:, 0] > y0 - margin)
        & (sd.centres[:, 0] < y0 + src + margin)
        & (sd.centres[:, 1] > x0 - margin)
        & (sd.centres[:, 1] < x0 + src + margin)
    )
    # Output pixel j's centre lies at input coordinate (j + 0.5) * f - 0.5.
    pts = (sd.centres[inside] - [y0, x0] + 0.5) / f - 0.5
    ki = sd.ki67[inside]
    centre = _bumps((patch, patch), pts, 0, 0)
    ki67 = _bumps((patch, patch), pts[ki], 0, 0)
    has_ki67 = sd.has_ki67
    if augment:
        # Stain and exposure far beyond the generator's own variation.
        lin *= np.exp(rng.uniform(np.log(GAIN_RANGE[0]), np.log(GAIN_RANGE[1]), (3, 1, 1))).astype(
            np.float32
        )
        lin += rng.uniform(-0.3, 0.3, (3, 1, 1)).astype(np.float32)
        if rng.random() < 0.5:  # bleed-through of DAPI into the other channels
            lin[1:] += rng.uniform(0, 0.15, (2, 1, 1)).astype(np.float32) * lin[:1]
        if rng.random() < 0.5:
            s = rng.uniform(0.3, 1.3)
            lin = ndi.gaussian_filter(lin, (0, s, s))
        if rng.random() < 0.5:
            lin += rng.normal(0, rng.uniform(0.05, 0.4), lin.shape).astype(np.float32)
        if rng.random() < 0.5:  # vignetting of a scanner field
            yy, xx = np.mgrid[0:patch, 0:patch] / patch - rng.uniform(0, 1, (2, 1, 1))
            lin *= (1 - rng.uniform(0, 0.35) * (yy**2 + xx**2)).astype(np.float32)
        if rng.random() < 0.5:
            gamma = rng.uniform(0.7, 1.4)
            lin = np.sign(lin) * np.abs(lin) ** gamma
        if has_ki67 and rng.random() < 0.25:
            has_ki67 = False
    x = np.zeros((4, patch, patch), np.float32)
    x[:3] = normalise(lin)
    if not has_ki67:
        x[2] = 0.0
    x[3] = 1.0 if has_ki67 else 0.0
    y = np.stack([cell, centre, ki67])
    if augment:
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, :, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y), has_ki67


def make_slides(
    out_dir,
    seeds,
    size_px: int,
    progress=None,
    *,
    families: bool = False,
    exclude_families: tuple[str, ...] = (),
    family_probability: float = FAMILY_PROBABILITY,
) -> list[Path]:
    """Generate training or validation slides (varied group, dpi and Ki67) with truth.

    With `families`, each slide also gets a style drawn from the generator's appearance
    families (`histo.synthetic.random_appearance`, without `exclude_families`' held-out
    values); the slide then covers the same area in um as a ``size_px`` slide at 0.5 um/px.
    Each family departs from the default with probability `family_probability` (a value
    other than the default, `FAMILY_PROBABILITY`, is part of the file names).
    """
    from histo.synthetic import generate_slide, slide_is_current
    from histo.synthetic._appearance import Appearance, random_appearance

    out_dir = Path(out_dir)
    tag = ""
    if families:
        tag = "_fam" + ("-no-" + "-".join(sorted(exclude_families)) if exclude_families else "")
        if family_probability != FAMILY_PROBABILITY:
            tag += f"_p{family_probability:g}"
    paths = []
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        group = "IAV" if rng.random() < 0.7 else "PBS"
        dpi = int(rng.choice([3, 9, 15, 28, 60]))
        ki67 = bool(rng.random() < 0.85)
        app, px = Appearance(), 0.5
        if families:
            app, px = random_appearance(
                np.random.default_rng([seed, 0xFA]),
                exclude=tuple(exclude_families),
                p_each=family_probability,
            )
        side = int(round(size_px * 0.5 / px))
        path = out_dir / f"train_{seed}{tag}.ome.tif"
        # Missing, drawn by an older generator, or in a style the families no longer draw.
        if not slide_is_current(path, appearance=app, pixel_size_um=px):
            generate_slide(
                path,
                size_px=(side, side),
                group=group,
                dpi=dpi,
                seed=seed,
                ki67=ki67,
                pixel_size_um=px,
                appearance=app,
            )
        paths.append(path)
        if progress:
            progress(i + 1, len(seeds), "slides")
    return paths


# ----------------------------------------------------------------------------- training


def loss_fn(logits, target, has_ki67):
    """Weighted binary cross-entropy of the three outputs (Ki67 only where it was imaged)."""
    import torch
    import torch.nn.functional as F

    pw = torch.tensor(10.0, device=logits.device)
    cell = F.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0])
    centre = F.binary_cross_entropy_with_logits(logits[:, 1], target[:, 1], pos_weight=pw)
    k = F.binary_cross_entropy_with_logits(
        logits[:, 2], target[:, 2], pos_weight=pw, reduction="none"
    ).mean(dim=(1, 2))
    ki67 = (k * has_ki67).sum() / has_ki67.sum().clamp(min=1)
    return cell + centre + ki67


def train(
    train_slides,
    val_slides=(),
    config: TrainConfig | None = None,
    *,
    init_state=None,
    device: str = "auto",
    progress=None,
) -> tuple[object, dict]:
    """Train (or fine-tune, from `init_state`) a UNet; returns (model, history).

    Parameters
    ----------
    train_slides, val_slides : sequence of SlideData
    config : TrainConfig
    init_state : dict, optional
        A state dict to start from (fine-tuning).
    device : str
    progress : callable(done, total, message), optional
    """
    import torch

    from .infer import resolve_device
    from .unet import UNet

    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    dev = resolve_device(device)
    model = UNet(base=config.base, depth=config.depth).to(dev)
    teacher = None
    if config.teacher:
        from . import load_model

        teacher = load_model(config.teacher, str(dev)).net.eval()
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
    )
    history = {"step": [], "loss": [], "val_loss": []}
    val_rng = np.random.default_rng(12345)
    val_batch = (
        [sample_patch(val_rng, val_slides[i % len(val_slides)], augment=False) for i in range(32)]
        if val_slides
        else []
    )
    t0 = time.perf_counter()
    running = None
    for step in range(1, config.steps + 1):
        model.train()
        batch = [
            sample_patch(
                rng,
                train_slides[int(rng.integers(len(train_slides)))],
                zoom_probability=config.zoom_probability,
            )
            for _ in range(config.batch_size)
        ]
        x = torch.from_numpy(np.stack([b[0] for b in batch])).to(dev)
        y = torch.from_numpy(np.stack([b[1] for b in batch])).to(dev)
        hk = torch.tensor([float(b[2]) for b in batch], device=dev)
        logits = model(x)
        loss = loss_fn(logits, y, hk)
        if teacher is not None:
            with torch.no_grad():
                taught = torch.sigmoid(teacher(x))
            loss = loss + loss_fn(logits, taught, hk)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == config.steps:
            vl = float("nan")
            if val_batch:
                model.eval()
                with torch.no_grad():
                    vx = torch.from_numpy(np.stack([b[0] for b in val_batch])).to(dev)
                    vy = torch.from_numpy(np.stack([b[1] for b in val_batch])).to(dev)
                    vk = torch.tensor([float(b[2]) for b in val_batch], device=dev)
                    vl = float(loss_fn(model(vx), vy, vk))
            history["step"].append(step)
            history["loss"].append(round(running, 5))
            history["val_loss"].append(round(vl, 5))
            log.info(
                "step %d loss %.4f val %.4f (%.0f s)", step, running, vl, time.perf_counter() - t0
            )
        if progress:
            progress(step, config.steps, f"loss {running:.3f}")
    history["seconds"] = round(time.perf_counter() - t0, 1)
    model.eval()
    return model, history


def save_model(model, path, *, train_config: TrainConfig, extra: dict | None = None) -> Path:
    """Save weights (a plain state dict, loadable with ``weights_only=True``) and config JSON."""
    import hashlib

    import torch

    from histo._version import __version__
    from histo.atomic import atomic_path, write_json

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = {
        "format": "lungmets-model/1",
        "name": path.stem,
        "lungmets_version": __version__,
        "architecture": {
            "class": "UNet",
            "in_channels": 4,
            "out_channels": 3,
            "base": train_config.base,
            "depth": train_config.depth,
        },
        "inputs": ["DAPI", "HER2", "Ki67", "Ki67 imaged (0/1)"],
        "outputs": ["cell", "centre", "ki67"],
        "input_um_per_px": train_config.input_um_per_px,
        "normalisation": "log1p(max((counts - offset) / autofluorescence, 0)) per channel, "
        "offset and autofluorescence from histo.tissue.stain_levels",
        "tile_px": 512,
        "halo_um": 64.0,
        "centre_sigma_px": CENTRE_SIGMA_PX,
        "sha256": sha,
        "training": asdict(train_config),
        **(extra or {}),
    }
    write_json(cfg, path.with_suffix(".json"))
    return path


def publish_model(src, dst, *, parent=None, calibrate_on=(), teacher=None) -> Path:
    """Save a trained model under its release name (e.g. ``weights/lungmets_unet_v2.pt``).

    The weights are the same tensors; the JSON keeps the training record of `src` (recipe,
    history, golden output, slides) with the new name and SHA-256, and, with `parent`, the
    SHA-256 of the model it was fine-tuned from. With `calibrate_on` (slides with truth), the
    nucleus-centre threshold is calibrated on them (`calibrate_centre_threshold`) and stored
    as ``centre_threshold``, which `histo.network` then uses; with `teacher` (the model it was
    distilled from), the teacher's threshold where the slides cannot tell it from the best.
    The golden output is computed again with the code of the day.
    """
    import json

    from . import load_model

    loaded = load_model(src, "cpu")
    cfg = json.loads(Path(src).with_suffix(".json").read_text())
    keep = {
        k: v
        for k, v in cfg.items()
        if k not in ("format", "name", "lungmets_version", "sha256", "training", "architecture")
    }
    if parent is not None:
        keep["parent_sha256"] = load_model(parent, "cpu").sha256
        keep["fine_tuned_from"] = Path(parent).name
    if teacher is not None:
        keep["teacher_sha256"] = load_model(teacher, "cpu").sha256
        keep["distilled_from"] = Path(teacher).name
    if calibrate_on:
        prefer = None
        if teacher is not None:
            from . import model_config

            prefer = model_config(teacher).get("centre_threshold")
        cal = calibrate_centre_threshold(src, calibrate_on, prefer=prefer)
        keep["centre_threshold"] = cal["centre_threshold"]
        keep["centre_threshold_calibration"] = cal
    # What it computes with today's code (reference levels, resampling), for its test.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        keep["golden"] = golden_output(loaded.net, tmp)
    train_config = TrainConfig(
        **{
            k: (tuple(v) if isinstance(v, list) else v)
            for k, v in cfg["training"].items()
            if k in TrainConfig.__dataclass_fields__
        }
    )
    dst = save_model(loaded.net, dst, train_config=train_config, extra=keep)
    if calibrate_on:
        # At the operating point just chosen, with the code of the day.
        _record(dst, validation=validate_model(dst, calibrate_on))
    return dst


#: The nucleus-centre thresholds an operating point is chosen from.
CENTRE_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)


def calibrate_centre_threshold(
    model_path, slides, thresholds=CENTRE_THRESHOLDS, prefer: float | None = None
) -> dict:
    """The nucleus-centre probability above which a peak is a cell, chosen on `slides`.

    Runs the real analysis (`histo.analyze_slide`, default settings) with the model on slides
    with truth (validation slides: never trained on, never used for benchmarks) and picks the
    threshold of the highest median cell F1 over the slides (each slide weighs the same, so
    a few slides crowded with cells do not decide, and one slide on which something else
    fails, such as its reference levels, does not set the operating point for all; the mean
    breaks a tie, then the lower threshold); `prefer`, a distilled model's teacher's
    threshold, is kept where the slides cannot tell it from that (`pick_centre_threshold`).
    `model_path` must be a model without a ``centre_threshold`` of its own (a training run's
    output), or the thresholds below it cannot be seen.

    Returns
    -------
    dict
        ``{"centre_threshold": t, "f1": {t: median F1}, "f1_mean": {t: mean F1},
        "f1_per_slide": {t: [F1 of each slide]}, "slides": [names]}``
    """
    from histo.config import AnalysisConfig
    from histo.evaluate import evaluate_cells
    from histo.pipeline import analyze_slide
    from histo.synthetic import load_truth
    from models import model_config

    if model_config(model_path).get("centre_threshold", 0.0) > min(thresholds):
        raise ValueError(f"{model_path} already has a centre_threshold; calibrate its source")
    runs = []
    for path in slides:
        result = analyze_slide(path, AnalysisConfig(model_path=str(model_path)))
        runs.append((result.cells, load_truth(path).cells))
    per_slide = {
        t: [
            float(evaluate_cells(cells[cells["centre_prob"] >= t], truth)["f1"])
            for cells, truth in runs
        ]
        for t in thresholds
    }
    best = pick_centre_threshold(per_slide, prefer=prefer)
    f1 = {t: round(float(np.median(v)), 4) for t, v in per_slide.items()}
    mean = {t: round(float(np.mean(v)), 4) for t, v in per_slide.items()}
    per = {t: [round(v, 4) for v in values] for t, values in per_slide.items()}
    return {
        "centre_threshold": best,
        "f1": f1,
        "f1_mean": mean,
        "f1_per_slide": per,
        "slides": [Path(p).name for p in slides],
        "preferred": prefer,
    }


#: A distilled model keeps its teacher's operating point where the validation slides cannot
#: tell it from the best one: the same median cell F1 and a mean at most this much lower (one
#: cell in two thousand). Calibration on slides the network gets right at every threshold is
#: decided by a cell or two, while the student learnt its probabilities from the teacher.
PREFER_TOLERANCE = 0.0005


def pick_centre_threshold(
    f1_per_slide: dict, prefer: float | None = None, tolerance: float = PREFER_TOLERANCE
) -> float:
    """The operating point `calibrate_centre_threshold` chooses from each threshold's F1 per
    slide: the highest median, then the highest mean, then the lowest threshold; or `prefer`
    (a distilled model's teacher's threshold) where its median is the highest and its mean
    within `tolerance` of the highest.

    The figures compared are the unrounded ones: with many slides near F1 1, means that differ
    by one cell on one slide round to the same four decimals, and the rounding, not the slides,
    would then send the choice to the lowest threshold.

    Parameters
    ----------
    f1_per_slide : dict
        ``{threshold: [cell F1 of each slide]}``, the same slides in the same order.

    Returns
    -------
    float
        The chosen threshold.
    """
    best = max(
        f1_per_slide,
        key=lambda t: (np.median(f1_per_slide[t]), np.mean(f1_per_slide[t]), -t),
    )
    if prefer is not None and prefer in f1_per_slide:
        p, b = f1_per_slide[prefer], f1_per_slide[best]
        if np.median(p) >= np.median(b) and np.mean(p) >= np.mean(b) - tolerance:
            return prefer
    return best


def calibration_inputs(slides, crops_per_slide: int = 8, size_px: int = 192, seed: int = 0):
    """Network inputs to calibrate the 8-bit quantisation on (`models.runtime.quantize_onnx`):
    crops of generated slides with truth (validation slides, never benchmark slides), half
    centred on a cancer cell, half anywhere, normalised as the pipeline normalises them
    (`models.infer.to_model_input`).

    Returns
    -------
    list of numpy.ndarray
        float32 batches (1, 4, `size_px`, `size_px`).
    """
    from .infer import normalise

    rng = np.random.default_rng(seed)
    half = size_px // 2
    out = []
    for path in slides:
        data = slide_data(path)
        _, h, w = data.linear.shape
        for k in range(crops_per_slide):
            if k % 2 == 0 and len(data.centres):
                cy, cx = data.centres[rng.integers(len(data.centres))]
            else:
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            y0 = int(np.clip(round(cy) - half, 0, max(h - size_px, 0)))
            x0 = int(np.clip(round(cx) - half, 0, max(w - size_px, 0)))
            x = np.zeros((1, 4, size_px, size_px), np.float32)
            crop = data.linear[:, y0 : y0 + size_px, x0 : x0 + size_px].astype(np.float32)
            x[0, :3, : crop.shape[1], : crop.shape[2]] = normalise(crop)
            x[0, 3] = 1.0 if data.has_ki67 else 0.0
            out.append(x)
    return out


def validate_model(model_path, slides, methods=("unet", "classical")) -> dict:
    """The model's accuracy on validation slides, and the classical detector's beside it.

    Runs the real analysis (`histo.analyze_slide`, default settings) on `slides` (with truth,
    never trained on) and pools over them: HER2+ cell F1 (matched within 5 um), the relative
    error of the HER2+ count, and lesion F1 by class (strict: a match needs the same class)
    and over all lesions. This is the ``validation`` block of a model's JSON: `run_training`
    and `publish_model` write it, `revalidate` recomputes it with the code of the day.

    Returns
    -------
    dict
        ``{method: {"cells_f1", "count_error", "lesions_single_f1", "lesions_cluster_f1",
        "lesions_focus_f1", "lesions_all_f1"}, "slides": [names]}``
    """
    from histo.config import AnalysisConfig
    from histo.evaluate import CLASSES, evaluate_cells, evaluate_lesions, precision_recall_f1
    from histo.pipeline import analyze_slide
    from histo.synthetic import load_truth

    def f1(tp, n_pred, n_truth):
        return precision_recall_f1(tp, n_pred, n_truth)["f1"]

    truths = [load_truth(p) for p in slides]
    out: dict = {}
    for method in methods:
        cell = np.zeros(3)
        les = {c: np.zeros(3) for c in (*CLASSES, "all")}
        for path, truth in zip(slides, truths, strict=True):
            config = AnalysisConfig(method=method, model_path=str(model_path))
            result = analyze_slide(path, config)
            ce = evaluate_cells(result.cells, truth.cells)
            cell += (ce["tp"], ce["n_pred"], ce["n_truth"])
            le = evaluate_lesions(result.lesions, truth.lesions)
            for c in les:
                les[c] += le.loc[c, ["tp", "n_pred", "n_truth"]].to_numpy(float)
        out[method] = {
            "cells_f1": round(f1(*cell), 4),
            "count_error": round((cell[1] - cell[2]) / max(cell[2], 1), 4),
            **{f"lesions_{c}_f1": round(f1(*v), 4) for c, v in les.items()},
        }
    out["slides"] = [Path(p).name for p in slides]
    return out


def _record(model_path, **fields) -> None:
    """Add `fields` to the JSON beside `model_path` (atomically; the tensors are untouched)."""
    import json

    from histo.atomic import write_json

    path = Path(model_path).with_suffix(".json")
    write_json({**json.loads(path.read_text()), **fields}, path)


def revalidate(model_path, data_dir) -> dict:
    """Recompute a model's ``validation`` block with today's code, on its own validation slides.

    The slides are generated again into `data_dir` from the recipe in the model's JSON (the
    same seeds, size and appearance families, so the same names as its
    ``validation_slides``), and `validate_model` runs on them.
    """
    import json

    cfg = json.loads(Path(model_path).with_suffix(".json").read_text())
    tr = cfg["training"]
    seeds = range(5000, 5000 + int(tr["n_val_slides"]))
    paths = make_slides(
        data_dir,
        seeds,
        int(tr["slide_size_px"]),
        families=bool(tr.get("families", False)),
        exclude_families=tuple(tr.get("exclude_families", ())),
        family_probability=float(tr.get("family_probability", FAMILY_PROBABILITY)),
    )
    names = [p.name for p in paths]
    if names != cfg.get("validation_slides", names):
        raise ValueError(
            f"{model_path}: its validation slides {cfg['validation_slides']} are not what its "
            f"recipe generates today ({names})"
        )
    validation = validate_model(model_path, paths)
    _record(model_path, validation=validation)
    return validation


def golden_case() -> dict:
    """The fixed input on which `save_model` records what a model computes (see its test)."""
    return {"size_px": [768, 768], "group": "IAV", "dpi": 15, "seed": 777}


def golden_output(model, workdir) -> dict:
    """Map means and cell count of `model` on the golden slide (generated, deterministic)."""
    from histo.config import AnalysisConfig
    from histo.io import open_slide
    from histo.pipeline import measure_background
    from histo.synthetic import generate_slide

    from .infer import cells_from_maps, predict_maps, to_model_input

    case = golden_case()
    path = Path(workdir) / "golden.ome.tif"
    generate_slide(
        path,
        size_px=tuple(case["size_px"]),
        group=case["group"],
        dpi=case["dpi"],
        seed=case["seed"],
        labels=False,
    )
    slide = open_slide(path)
    _, _, stain = measure_background(slide, AnalysisConfig())
    x = to_model_input(
        slide.read_region(0, 0, *slide.shape_px[:1], 0, slide.shape_px[1]), slide.roles, stain, 2
    )
    import torch

    maps = predict_maps(model, x, torch.device("cpu"))
    cells = cells_from_maps(maps, factor=2)
    return {"case": case, "map_means": [float(m.mean()) for m in maps], "n_cells": int(len(cells))}


def run_training(
    out: str | Path,
    *,
    data_dir: str | Path,
    config: TrainConfig | None = None,
    slides: list | None = None,
    init_model: str | Path | None = None,
    progress=None,
) -> Path:
    """Train on generated slides (or on a user's annotated slides) and save the model.

    Parameters
    ----------
    out : path-like
        Weights file to write (``.pt``; the config goes to ``.json`` beside it).
    data_dir : path-like
        Where generated training slides are cached.
    config : TrainConfig
    slides : list of path-like, optional
        Annotated slides to train on instead of generated ones: each with a truth folder in
        the generator's format (``<name>.truth/cells.csv`` and ``labels.ome.tif``).
    init_model : path-like, optional
        Start from this model (fine-tuning), e.g. the shipped one.
    progress : callable(done, total, message), optional
    """
    import tempfile

    import torch

    from . import model_config

    config = config or TrainConfig()
    init_state = None
    if init_model is not None:
        from . import load_model

        loaded = load_model(init_model, "cpu")
        init_state = loaded.net.state_dict()
        config = TrainConfig(
            **{
                **asdict(config),
                "base": loaded.config["architecture"]["base"],
                "depth": loaded.config["architecture"]["depth"],
            }
        )
    if slides:
        paths = [Path(p) for p in slides]
        cut = max(1, len(paths) // 5) if len(paths) > 1 else 0
        tr_paths, va_paths = paths[cut:], paths[:cut]
    else:
        fam = {
            "families": config.families,
            "exclude_families": config.exclude_families,
            "family_probability": config.family_probability,
        }
        tr_paths = make_slides(
            data_dir, range(1000, 1000 + config.n_train_slides), config.slide_size_px, **fam
        )
        va_paths = make_slides(
            data_dir, range(5000, 5000 + config.n_val_slides), config.slide_size_px, **fam
        )
    trd = [slide_data(p, config.input_um_per_px) for p in tr_paths]
    vad = [slide_data(p, config.input_um_per_px) for p in va_paths]
    model, hist = train(trd, vad, config, init_state=init_state, progress=progress)
    model = model.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        golden = golden_output(model, tmp)
    extra = {
        "history": hist,
        "golden": golden,
        "training_slides": [p.name for p in tr_paths],
        "validation_slides": [p.name for p in va_paths],
        "fine_tuned_from": str(init_model) if init_model else None,
        "parent_sha256": loaded.sha256 if init_model else None,
        "teacher_sha256": model_config(config.teacher)["sha256"] if config.teacher else None,
        "torch_version": torch.__version__,
    }
    out = save_model(model, out, train_config=config, extra=extra)
    if va_paths:
        if progress is not None:
            progress(config.steps, config.steps, "validating")
        _record(out, validation=validate_model(out, va_paths))
    return out


def main(argv=None) -> None:  # pragma: no cover - run by hand to make the shipped weights
    import argparse

    p = argparse.ArgumentParser(description="train the lungmets U-Net on synthetic slides")
    p.add_argument("--data", default="/tmp/lungmets_train")
    p.add_argument("--out", default="lungmets_unet.pt")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--from-model", default=None, help="fine-tune this model")
    p.add_argument(
        "--teacher", default=None, help="distil this model (its maps as a second target)"
    )
    p.add_argument("--base", type=int, default=TrainConfig.base, help="channels of the first block")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="initial weights and patches")
    p.add_argument("--slides", type=int, default=TrainConfig.n_train_slides)
    p.add_argument(
        "--exclude-families",
        default="",
        help="comma-separated appearance families held out (leave-family-out evaluation)",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--zoom-probability", type=float, default=TrainConfig.zoom_probability)
    p.add_argument("--no-families", action="store_true")
    p.add_argument(
        "--family-probability",
        type=float,
        default=TrainConfig.family_probability,
        help="probability that each appearance family departs from the default on a slide",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    exclude = tuple(f for f in args.exclude_families.split(",") if f)
    config = TrainConfig(
        steps=args.steps,
        n_train_slides=args.slides,
        exclude_families=exclude,
        lr=args.lr,
        zoom_probability=args.zoom_probability,
        families=not args.no_families,
        family_probability=args.family_probability,
        base=args.base,
        teacher=args.teacher,
        seed=args.seed,
    )
    path = run_training(args.out, data_dir=args.data, config=config, init_model=args.from_model)
    print(path)


if __name__ == "__main__":  # pragma: no cover
    main()
