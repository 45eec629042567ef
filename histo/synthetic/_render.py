"""Pixels of a `Scene`, one horizontal band of rows at a time.

Every random number used here is drawn from row blocks of fixed height seeded by the block
index, so a band's pixels do not depend on how the slide is cut into bands: the image is the
same whether it is rendered in one piece or in many, and memory stays bounded by the band.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._scene import Scene

BLOCK_ROWS = 256


def _upsample_rows(field: np.ndarray, factor: float, y0: int, y1: int, width: int) -> np.ndarray:
    """Bilinear interpolation of a design-grid field onto level-0 rows [y0, y1)."""
    hd, wd = field.shape

    def axis(n0, n1, nd):
        pos = (np.arange(n0, n1) + 0.5) / factor - 0.5
        i0 = np.floor(pos).astype(np.int64)
        w = (pos - i0).astype(np.float32)
        return np.clip(i0, 0, nd - 1), np.clip(i0 + 1, 0, nd - 1), w

    ya, yb, wy = axis(y0, y1, hd)
    xa, xb, wx = axis(0, width, wd)
    rows_needed = np.unique(np.r_[ya, yb])
    sub = field[rows_needed]
    ya = np.searchsorted(rows_needed, ya)
    yb = np.searchsorted(rows_needed, yb)
    cols = sub[:, xa] * (1 - wx) + sub[:, xb] * wx
    return cols[ya] * (1 - wy[:, None]) + cols[yb] * wy[:, None]


def _block_normal(seed: int, tag: int, y0: int, y1: int, width: int, nchan: int) -> np.ndarray:
    """Standard-normal noise for rows [y0, y1), identical whatever the band boundaries."""
    out = np.empty((nchan, y1 - y0, width), np.float32)
    b0, b1 = y0 // BLOCK_ROWS, (y1 - 1) // BLOCK_ROWS
    for b in range(b0, b1 + 1):
        rng = np.random.default_rng([seed, tag, b])
        block = rng.standard_normal((nchan, BLOCK_ROWS, width), dtype=np.float32)
        r0, r1 = max(y0, b * BLOCK_ROWS), min(y1, (b + 1) * BLOCK_ROWS)
        out[:, r0 - y0 : r1 - y0] = block[:, r0 - b * BLOCK_ROWS : r1 - b * BLOCK_ROWS]
    return out


def _objects_in_rows(scene: Scene, y0: int, y1: int):
    o = scene.objects
    rmax = max(t.radius_px for t in scene.templates)
    lo, hi = np.searchsorted(o["y"], [y0 - rmax, y1 + rmax])
    return slice(int(lo), int(hi))


def _stamp_indices(scene: Scene, sel: slice, y0: int, y1: int, width: int):
    """Yield (object indices, flat pixel indices, template weights, label mask) per template."""
    o = scene.objects
    tpl = o["tpl"][sel]
    base = sel.start
    for t in np.unique(tpl):
        idx = base + np.flatnonzero(tpl == t)
        T = scene.templates[t]
        yy = o["y"][idx, None] + T.dy[None, :]
        xx = o["x"][idx, None] + T.dx[None, :]
        valid = (yy >= y0) & (yy < y1) & (xx >= 0) & (xx < width)
        flat = (yy - y0) * width + xx
        yield idx, flat, valid, T


def render_expected(scene: Scene, y0: int, y1: int) -> np.ndarray:
    """Noise-free expected counts (above offset) of rows [y0, y1), all three channels.

    Returns
    -------
    ndarray, shape (3, y1 - y0, width), float32
    """
    spec, stain = scene.spec, scene.stain
    W, H = spec.width_px, spec.height_px
    halo = int(np.ceil(4 * stain.blur_sigma_px)) + 1
    ya, yb = max(0, y0 - halo), min(H, y1 + halo)
    f = scene.factor
    tissue = _upsample_rows(scene.tissue, f, ya, yb, W)
    dist = _upsample_rows(scene.wall_dist_um, f, ya, yb, W)
    hw = _upsample_rows(scene.wall_halfwidth_um, f, ya, yb, W)
    tex = _upsample_rows(scene.texture, f, ya, yb, W)
    infl = _upsample_rows(scene.infiltrate, f, ya, yb, W)
    wall = np.clip((hw - dist) / 0.8 + 0.5, 0.0, 1.0)
    # Lung autofluorescence: bright elastic septa, faint interstitium, inflamed regions.
    density = tissue * (wall * tex + 0.06 + 0.35 * infl)
    if scene.extras.get("af_field") is not None:  # slow unevenness of autofluorescence
        density *= _upsample_rows(scene.extras["af_field"], f, ya, yb, W)
    img = stain.af[:, None, None].astype(np.float32) * density[None]
    del tissue, dist, hw, tex, infl, wall, density

    # Instanced objects (nuclei, red cells, macrophages, debris): additive, as fluorescence is.
    n = (yb - ya) * W
    sel = _objects_in_rows(scene, ya, yb)
    amp = scene.objects["amp"]
    flats, weights = [], [[], [], []]
    for idx, flat, valid, T in _stamp_indices(scene, sel, ya, yb, W):
        flats.append(flat[valid])
        for c in range(3):
            weights[c].append((T.w[None, :] * amp[idx, c, None])[valid])
    if flats:
        flat = np.concatenate(flats)
        for c in range(3):
            img[c] += np.bincount(flat, np.concatenate(weights[c]), minlength=n).reshape(yb - ya, W)

    # Cancer lesions.
    for s in scene.sprites:
        if s.y1 <= ya or s.y0 >= yb:
            continue
        r0, r1 = max(s.y0, ya), min(s.y1, yb)
        img[:, r0 - ya : r1 - ya, s.x0 : s.x1] += s.image[:, r0 - s.y0 : r1 - s.y0]

    img = ndi.gaussian_filter(img, (0, stain.blur_sigma_px, stain.blur_sigma_px), truncate=3.5)
    img = img[:, y0 - ya : y1 - ya]
    # Stain and exposure gain, and the scanner's per-field illumination.
    img *= stain.gain[:, None, None].astype(np.float32)
    img *= _illumination(scene, y0, y1)
    bleed = scene.spec.appearance.bleed_through
    if bleed > 0:  # emission of one dye seen through the next channel's filter
        img[2] += bleed * img[1]
        img[1] += bleed * img[0]
    return img


def _illumination(scene: Scene, y0: int, y1: int) -> np.ndarray:
    """Per-field gain and vignetting of a stitching scanner, shape (3, rows, width)."""
    stain, W = scene.stain, scene.spec.width_px
    fh, fw = stain.fov_px
    oy, ox = stain.fov_origin_px
    yy = np.arange(y0, y1) + oy
    xx = np.arange(W) + ox
    fy, fx = yy // fh, xx // fw
    u = (2 * ((yy % fh) + 0.5) / fh - 1).astype(np.float32)
    v = (2 * ((xx % fw) + 0.5) / fw - 1).astype(np.float32)
    rng = np.random.default_rng([stain.fov_gain_seed, 7])
    # Draw gains for the whole slide's grid so that they do not depend on the band.
    gy = (scene.spec.height_px + oy) // fh + 1
    gx = (W + ox) // fw + 1
    gain = rng.uniform(0.88, 1.12, (gy, gx))[None] * rng.lognormal(0, 0.03, (3, gy, gx))
    gain = gain.astype(np.float32)[:, fy]  # (3, rows, fields across)
    out = np.take(gain, fx, axis=2)
    out *= 1 - 0.09 * (u[:, None] ** 2 + v[None, :] ** 2)
    return out


def file_dtype(scene: Scene) -> np.dtype:
    """The numpy dtype of the slide's pixels (a 12-bit camera writes uint16)."""
    return np.dtype(
        {"uint8": "uint8", "float32": "float32"}.get(scene.spec.appearance.dtype, "uint16")
    )


def _dynamic_range(scene: Scene) -> tuple[float, float]:
    """Scale from 16-bit camera counts to the file's values, and the largest value."""
    dtype = scene.spec.appearance.dtype
    if dtype == "uint8":  # an 8-bit export: ordinary nuclei near 180, the brightest saturate
        return 180.0 / float(scene.stain.nucleus_dapi * scene.stain.gain[0]), 255.0
    if dtype == "uint12":
        return 0.5, 4095.0
    if dtype == "float32":  # intensities as fractions of the 16-bit range
        return 1.0 / 65535.0, np.inf
    return 1.0, 65535.0


def render_counts(scene: Scene, y0: int, y1: int) -> np.ndarray:
    """Pixel values of rows [y0, y1): expected signal plus shot and read noise.

    Shot noise uses the Gaussian approximation of the Poisson distribution (its variance is
    the signal in electrons), which is exact enough at these counts and much faster. The
    values are 16-bit camera counts (uint16), or what the appearance's dynamic range makes of
    them (`file_dtype`): scaled and rounded to 8 or 12 bits, or scaled floats.
    """
    stain = scene.stain
    sig = render_expected(scene, y0, y1)
    np.clip(sig, 0, None, out=sig)
    z = _block_normal(scene.extras["render_seed"], 1, y0, y1, scene.spec.width_px, 3)
    var = sig / stain.electrons_per_count + stain.read_noise**2
    sig += np.sqrt(var) * z + stain.offset
    scale, top = _dynamic_range(scene)
    dtype = file_dtype(scene)
    if scale != 1.0:
        sig *= np.float32(scale)
    np.clip(sig, 0, top, out=sig)
    return sig.astype(dtype) if dtype.kind == "f" else np.rint(sig).astype(dtype)


def render_labels(scene: Scene, which: str, y0: int, y1: int) -> np.ndarray:
    """Instance labels of rows [y0, y1): ``"nuclei"``, ``"cells"`` or ``"lesions"`` (int32)."""
    W = scene.spec.width_px
    out = np.zeros((y1 - y0, W), np.int32)
    if which == "nuclei":
        flat_all = out.ravel()
        sel = _objects_in_rows(scene, y0, y1)
        lab = scene.objects["label"]
        for idx, flat, valid, T in _stamp_indices(scene, sel, y0, y1, W):
            m = valid & T.lab[None, :] & (lab[idx, None] > 0)
            vals = np.broadcast_to(lab[idx, None], flat.shape)[m]
            flat_all[flat[m]] = vals
    for s in scene.sprites:
        if s.y1 <= y0 or s.y0 >= y1:
            continue
        r0, r1 = max(s.y0, y0), min(s.y1, y1)
        src = {
            "nuclei": s.nucleus_label,
            "cells": s.cell_label,
            "lesions": np.where(s.cell_label > 0, s.lesion_id, 0),
        }[which]
        src = src[r0 - s.y0 : r1 - s.y0]
        dst = out[r0 - y0 : r1 - y0, s.x0 : s.x1]
        np.copyto(dst, src, where=src > 0)
    return out
