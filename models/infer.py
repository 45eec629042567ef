"""Running the network on pixels: normalisation, devices, tiles, and maps to cells.

`predict_maps` takes a level-0 tile (C, Y, X) of raw counts and returns the network's
probability maps at the model's resolution; `cells_from_maps` turns them into a cell table.
Both are pure functions of arrays, so `histo.pipeline.analyze_tile` runs them on a chunk, a
test on an array and napari on the current view alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.special import expit

log = logging.getLogger(__name__)

_DEVICE_LOCK = threading.Lock()
_warned: set[str] = set()


def normalise(linear: np.ndarray) -> np.ndarray:
    """Network input from signal over autofluorescence: ``log1p(max(x, 0))`` per channel."""
    return np.log1p(np.clip(linear, 0, None)).astype(np.float32)


def block_mean(plane: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each `factor` x `factor` block of a 2-D array, as float32 (edges that do not
    fill a block are dropped).

    Sums strided views instead of ``reshape(...).mean(axis=(1, 3))``: several times faster on
    the 2-4 Mpx chunks of a slide.
    """
    h, w = plane.shape[0] // factor, plane.shape[1] // factor
    if factor == 1:
        return plane[:h, :w].astype(np.float32)
    out = np.zeros((h, w), np.float32)
    for dy in range(factor):
        for dx in range(factor):
            out += plane[dy : h * factor : factor, dx : w * factor : factor]
    out *= 1.0 / (factor * factor)
    return out


def _area_weights(n_in: int, factor: float):
    """Sparse (n_out, n_in) matrix averaging input pixels over each output pixel's extent.

    Output pixel ``j`` covers input pixel edges ``[j * factor, (j + 1) * factor)``; each input
    pixel contributes the length of its overlap (area averaging, like block means for an
    integer factor). For ``factor < 1`` (upsampling) this is linear interpolation.
    """
    from scipy import sparse

    n_out = int(np.floor(n_in / factor + 1e-9))
    if factor < 1:
        pos = (np.arange(n_out) + 0.5) * factor - 0.5
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
        i1 = np.clip(i0 + 1, 0, n_in - 1)
        w1 = np.clip(pos - i0, 0, 1)
        rows = np.r_[np.arange(n_out), np.arange(n_out)]
        return sparse.csr_matrix(
            (np.r_[1 - w1, w1].astype(np.float32), (rows, np.r_[i0, i1])), shape=(n_out, n_in)
        )
    lo = np.arange(n_out) * factor
    hi = lo + factor
    first = np.floor(lo).astype(np.int64)
    span = int(np.ceil(factor)) + 1
    rows, cols, vals = [], [], []
    for k in range(span):
        i = first + k
        ov = np.minimum(hi, i + 1) - np.maximum(lo, i)
        ok = (ov > 1e-9) & (i < n_in)
        rows.append(np.flatnonzero(ok))
        cols.append(i[ok])
        vals.append(ov[ok] / factor)
    return sparse.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_out, n_in),
    )


def integer_factor(factor: float) -> int | None:
    """`factor` as an int when it is one (within 0.1%), else None."""
    f = int(round(factor))
    return f if f >= 1 and abs(factor - f) < 1e-3 * factor else None


def resample_mean(plane: np.ndarray, factor: float) -> np.ndarray:
    """A 2-D array at ``1 / factor`` of its resolution, by area averaging (float32).

    The output has ``floor(n / factor)`` pixels along each axis; output pixel ``j`` covers
    input pixels ``j * factor ... (j + 1) * factor`` (so its centre is at input coordinate
    ``(j + 0.5) * factor - 0.5``). An integer factor is exactly `block_mean`; any other (a
    0.65 um/px scan brought to 1 um/px: 1.538) averages the overlapping fractions of pixels.
    """
    f = integer_factor(factor)
    if f is not None:
        return block_mean(plane, f)
    ry = _area_weights(plane.shape[0], factor)
    rx = _area_weights(plane.shape[1], factor)
    tmp = ry @ plane.astype(np.float32)
    return np.ascontiguousarray((rx @ np.asarray(tmp).T).T, dtype=np.float32)


def to_model_input(
    pixels: np.ndarray, roles: dict, stain, factor: int, *, blocks: dict | None = None
) -> np.ndarray:
    """Level-0 raw counts (C, Y, X) -> network input (4, Y / factor, X / factor).

    Channels are divided by the slide's autofluorescence after the camera offset is taken
    off, area-averaged by `factor` (the model works at ``factor * pixel_size_um``; any factor,
    not only whole numbers: `resample_mean`), and
    log-compressed; the fourth plane says whether Ki67 was imaged. `blocks` (optional) maps
    channel indices to their block means (`block_mean`) already computed by the caller.
    """
    c, h, w = pixels.shape
    hh, ww = int(np.floor(h / factor + 1e-9)), int(np.floor(w / factor + 1e-9))
    out = np.zeros((4, hh, ww), np.float32)
    for k, role in enumerate(("DAPI", "HER2", "Ki67")):
        i = roles.get(role)
        if i is None:
            continue
        ch = blocks[i] if blocks and i in blocks else resample_mean(pixels[i], factor)
        out[k] = normalise((ch - stain.offset[i]) / stain.autofluorescence[i])
    out[3] = 1.0 if "Ki67" in roles else 0.0
    return out


#: Device files that exist where a GPU driver PyTorch could use is loaded: NVIDIA's (Linux),
#: WSL2's GPU bridge, AMD ROCm's. Where none exists, CUDA cannot be available.
_GPU_DRIVER_FILES = (
    "/proc/driver/nvidia",
    "/dev/nvidiactl",
    "/dev/nvidia0",
    "/dev/dxg",
    "/dev/kfd",
)


def _no_gpu_here() -> bool:
    """True where no GPU PyTorch could use can be present (judged without importing torch):
    Linux without any GPU driver's device file. Elsewhere (macOS's MPS, Windows) False: ask
    PyTorch."""
    import sys

    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return False
    return not any(Path(f).exists() for f in _GPU_DRIVER_FILES)


def device_name(device: str = "auto") -> str:
    """`resolve_device`'s choice as a name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``),
    without importing PyTorch where the answer is the CPU anyway (``"cpu"``, or ``"auto"`` on
    a Linux machine without a GPU driver): a CPU run through ONNX Runtime then never loads it.
    """
    name = (device or "auto").lower()
    if name == "cpu" or (name == "auto" and _no_gpu_here()):
        return "cpu"
    return str(resolve_device(device))


def resolve_device(device: str = "auto"):
    """A torch device from ``auto|cpu|cuda|cuda:N|mps``, falling back to CPU with a warning."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _warn_once(f"--device {device} asked for, but no CUDA GPU is available; using the CPU")
        return torch.device("cpu")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        _warn_once("--device mps asked for, but MPS is not available; using the CPU")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        from histo.errors import InputError

        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def fast_inference_net(net):
    """A copy of a `models.unet.UNet` for inference only, with the same maps, faster.

    Every convolution is fused with its batch norm and ReLU (one pass over the activations
    instead of three) and the weights are stored channels-last, the memory order oneDNN's CPU
    convolutions run fastest in: 1.5x faster forward passes on this project's 2-core machine
    (tests/benchmarks/profile_run.py), maps equal to the original's within 1e-5 (logits).
    Use it with ``predict_maps(..., channels_last=True)``. The original is not changed and
    stays the one to train.
    """
    import copy

    import torch
    from torch.ao.quantization import fuse_modules

    fast = copy.deepcopy(net).eval()
    for block in [*fast.down, *fast.fuse]:
        fuse_modules(block, [["0", "1", "2"], ["3", "4", "5"]], inplace=True)
    return fast.to(memory_format=torch.channels_last)


#: Context (px at the model's resolution) each screened crop reads around its core: with 24 the
#: screened run's cells and lesions were those of 32 on 11 held-out family slides (16 added a
#: cell in liver); the dense pass reads 48.
SCREEN_CONTEXT_PX = 24


def crop_boxes(
    screen: np.ndarray,
    *,
    margin: int = SCREEN_CONTEXT_PX,
    pad: int = 8,
    align: int = 16,
    max_core: int = 384,
) -> list[tuple[int, int, int, int]]:
    """Where to run the network on a screened input: few crops that cover every True pixel.

    Parameters
    ----------
    screen : ndarray of bool, shape (H, X)
        Pixels the network must see (`histo.network.screen_mask`).
    margin : int
        Context each crop reads around its core (px); it costs network pixels too.
    pad : int
        Extra core kept around each group of True pixels (px), so that the cell map of a cell
        whose nucleus is screened in is complete around it.
    align : int
        Cores start and end on multiples of this (a multiple of the network's total
        downsampling), so every crop sees the same pooling grid as a dense pass.
    max_core : int
        Longest side of a core: larger groups (a big focus, tumour-dense tissue) are cut into
        pieces of at most this size.

    Returns
    -------
    list of (y0, y1, x0, x1)
        Cores in input pixels; ``y1``/``x1`` may run past the input's edge by less than
        `align` (the caller crops them). Every True pixel of `screen` lies in one of them.

    Notes
    -----
    Each 8-connected group of True pixels gets the bounding box of its pixels grown by
    `pad`; then two cores are merged whenever the crop of their union (core plus `margin` on
    each side) costs no more network pixels than the two crops apart. Singles stay small
    crops, a focus and its neighbours become one.

    Examples
    --------
    >>> screen = np.zeros((256, 256), bool)
    >>> screen[40:50, 40:50] = screen[200:210, 30:40] = True
    >>> crop_boxes(screen)
    [(32, 64, 32, 64), (192, 224, 16, 48)]
    """
    h, w = screen.shape
    labels, n = ndi.label(screen, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    boxes = []
    for sl in ndi.find_objects(labels):
        y0 = max(0, sl[0].start - pad) // align * align
        x0 = max(0, sl[1].start - pad) // align * align
        y1 = -(-min(h, sl[0].stop + pad) // align) * align
        x1 = -(-min(w, sl[1].stop + pad) // align) * align
        for ys in range(y0, y1, max_core):
            for xs in range(x0, x1, max_core):
                boxes.append((ys, min(y1, ys + max_core), xs, min(x1, xs + max_core)))
    b = np.array(boxes, np.int64)
    m2 = 2 * margin
    while len(b) > 1:
        cost = (b[:, 1] - b[:, 0] + m2) * (b[:, 3] - b[:, 2] + m2)
        uy0 = np.minimum.outer(b[:, 0], b[:, 0])
        uy1 = np.maximum.outer(b[:, 1], b[:, 1])
        ux0 = np.minimum.outer(b[:, 2], b[:, 2])
        ux1 = np.maximum.outer(b[:, 3], b[:, 3])
        saving = cost[:, None] + cost[None, :] - (uy1 - uy0 + m2) * (ux1 - ux0 + m2)
        saving[(uy1 - uy0 > max_core) | (ux1 - ux0 > max_core)] = -1
        np.fill_diagonal(saving, -1)
        i, j = np.unravel_index(np.argmax(saving), saving.shape)
        if saving[i, j] < 0:
            break
        b[i] = (uy0[i, j], uy1[i, j], ux0[i, j], ux1[i, j])
        b = np.delete(b, j, axis=0)
    return [tuple(int(v) for v in row) for row in b[np.lexsort((b[:, 2], b[:, 0]))]]


@contextlib.contextmanager
def _forward_passes(model, device, channels_last: bool, float16: bool):
    """A function from a numpy batch (N, 4, Y, X) to probabilities (N, 3, Y, X), for the time
    of the ``with`` block: ONNX Runtime's session as it is, or a PyTorch network under
    `torch.inference_mode` (see `predict_maps`)."""
    if getattr(model, "runs_numpy", False):  # ONNX Runtime (`models.runtime`)
        yield lambda batch: expit(model.run(batch).astype(np.float32, copy=False))
        return
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    use_amp = cuda and float16
    # In float32 on a GPU, cuDNN's convolutions would otherwise round through TF32.
    arithmetic = (
        torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
        if cuda and not float16
        else contextlib.nullcontext()
    )

    def forward(batch):
        t = torch.from_numpy(batch)
        t = t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", enabled=use_amp):
            logits = model(t)
        return torch.sigmoid(logits.float()).cpu().numpy()

    with torch.inference_mode(), arithmetic:
        yield forward


def predict_maps(
    model,
    x: np.ndarray,
    device,
    *,
    tile: int = 512,
    margin: int = 48,
    batch_size: int = 4,
    screen: np.ndarray | None = None,
    screen_margin: int | None = None,
    channels_last: bool = False,
    float16: bool = True,
) -> np.ndarray:
    """Probability maps (3, H, W) of the network on an input (4, H, W) of any size.

    Without a screen the input is cut into tiles of `tile` px that overlap by `margin` px of
    context on each side (the network's receptive field), and each tile keeps only its
    centre, so results barely depend on where tiles fall. With a boolean `screen` map (H, W)
    the network runs only on crops that cover its True pixels (`crop_boxes`, with
    `screen_margin` px of context); elsewhere the maps stay 0. Crops of one shape go through
    the network together, `batch_size` at a time.
    Runs under `torch.inference_mode`; on CUDA with autocast (float16), or with `float16`
    False in float32 with TF32 off (the CPU's arithmetic), each batch copied from pinned
    memory without waiting; with `channels_last` the batches are handed over in
    channels-last memory order (for `fast_inference_net`).
    `model` may also be an ONNX Runtime network (`models.runtime.OnnxNet`), given numpy
    batches (PyTorch is then not imported). `device` is a torch device or its name.
    """
    _, h, w = x.shape
    if screen is not None:
        margin = SCREEN_CONTEXT_PX if screen_margin is None else screen_margin
        cores = crop_boxes(screen, margin=margin)
        groups: dict[tuple[int, int], list] = {}
        for box in cores:
            groups.setdefault((box[1] - box[0], box[3] - box[2]), []).append(box)
        batches = [
            boxes[i : i + batch_size]
            for boxes in groups.values()
            for i in range(0, len(boxes), batch_size)
        ]
        span = max(max(k) for k in groups) if groups else 0
    else:
        core = tile - 2 * margin
        boxes = [
            (y, min(h, y + core), xx, min(w, xx + core))
            for y in range(0, h, core)
            for xx in range(0, w, core)
        ]
        # Tiles at the right and bottom edges read past the input (reflected); they keep
        # only their part inside it.
        boxes = [(y0, y0 + core, x0, x0 + core) for y0, _, x0, _ in boxes]
        batches = [boxes[i : i + batch_size] for i in range(0, len(boxes), batch_size)]
        span = core
    log.debug("network on %d crops", sum(len(b) for b in batches))
    out = np.zeros((3, h, w), np.float32)
    if not batches:
        return out
    pad = margin
    xp = np.pad(x, ((0, 0), (pad, pad + span), (pad, pad + span)), mode="reflect")
    with _forward_passes(model, device, channels_last, float16) as forward:
        for group in batches:
            batch = np.stack(
                [xp[:, y0 : y1 + 2 * margin, x0 : x1 + 2 * margin] for y0, y1, x0, x1 in group]
            )
            prob = forward(batch)
            for (y0, y1, x0, x1), p in zip(group, prob, strict=True):
                y1, x1 = min(y1, h), min(x1, w)
                out[:, y0:y1, x0:x1] = p[:, margin : margin + y1 - y0, margin : margin + x1 - x0]
    return out


def cells_from_maps(
    maps: np.ndarray,
    *,
    factor: int,
    origin_px: tuple[int, int] = (0, 0),
    min_centre: float = 0.3,
    min_cell: float = 0.5,
    min_ki67: float = 0.3,
    min_distance_px: int = 3,
    has_ki67: bool = True,
) -> pd.DataFrame:
    """Cells from probability maps: peaks of the centre map inside the cell mask.

    Positions are refined to sub-pixel by the weighted centroid of the 3x3 neighbourhood and
    returned in level-0 pixels (``x_px``, ``y_px``); a model pixel ``j`` covers level-0 pixels
    ``j * factor ... j * factor + factor - 1``.
    """
    cell, centre, ki67 = maps
    peak = centre >= ndi.maximum_filter(centre, size=2 * min_distance_px + 1) - 1e-7
    peak &= (centre >= min_centre) & (cell >= min_cell)
    lab, n = ndi.label(peak)
    if n == 0:
        return pd.DataFrame(
            {
                "x_px": [],
                "y_px": [],
                "centre_prob": [],
                "cell_prob": [],
                "ki67_prob": [],
                "ki67_pos": pd.array([], dtype="boolean"),
            }
        )
    # Each peak's centre of mass (a plateau of equal maxima: its mean pixel), over the peak
    # pixels only (`ndi.center_of_mass` passes over the whole map three times).
    py, px = np.nonzero(lab)
    owner = lab[py, px]
    size = np.bincount(owner, minlength=n + 1)[1:].astype(np.float64)
    pos = np.stack(
        [
            np.bincount(owner, weights=py, minlength=n + 1)[1:] / size,
            np.bincount(owner, weights=px, minlength=n + 1)[1:] / size,
        ],
        axis=1,
    )
    iy = np.clip(np.rint(pos[:, 0]).astype(int), 0, centre.shape[0] - 1)
    ix = np.clip(np.rint(pos[:, 1]).astype(int), 0, centre.shape[1] - 1)
    # Sub-pixel refinement: a parabola through the log of the map along each axis (exact for
    # the Gaussian bumps the network is trained to draw).
    lc = np.log(np.clip(centre, 1e-6, None))

    def refine(i0, i1, axis):
        n_ax = centre.shape[axis]
        lo = np.clip((i0 if axis == 0 else i1) - 1, 0, n_ax - 1)
        hi = np.clip((i0 if axis == 0 else i1) + 1, 0, n_ax - 1)
        if axis == 0:
            a, b, c = lc[lo, i1], lc[i0, i1], lc[hi, i1]
        else:
            a, b, c = lc[i0, lo], lc[i0, i1], lc[i0, hi]
        den = a - 2 * b + c
        off = np.where(den < -1e-9, 0.5 * (a - c) / np.where(den < -1e-9, den, -1.0), 0.0)
        return np.clip(off, -0.5, 0.5)

    y = iy + refine(iy, ix, 0)
    x = ix + refine(iy, ix, 1)
    scale_off = (factor - 1) / 2.0
    ki = ki67[iy, ix]
    return pd.DataFrame(
        {
            "x_px": x * factor + scale_off + origin_px[1],
            "y_px": y * factor + scale_off + origin_px[0],
            "centre_prob": centre[iy, ix],
            "cell_prob": cell[iy, ix],
            "ki67_prob": ki,
            "ki67_pos": pd.array(ki >= min_ki67 if has_ki67 else [pd.NA] * n, dtype="boolean"),
        }
    )
