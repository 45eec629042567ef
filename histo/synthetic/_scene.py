"""The layout of one synthetic lung section: tissue, structures, every object and its truth.

A `Scene` is everything about a slide that is decided *before* pixels are drawn:

- smooth *design fields* on a coarse grid (2 um spacing): the tissue mask of irregular lobes,
  the distance to the nearest alveolar septum, bronchiole and vessel walls and lumens, immune
  infiltrates;
- *instanced objects* drawn from a small bank of templates: ordinary nuclei along the septa,
  bronchiolar epithelium, lymphocytes of infiltrates, alveolar macrophages, red blood cells,
  debris;
- *sprites*: the HER2+ cancer lesions, each rendered once into its own small patch of image
  and label arrays;
- the truth tables of lesions, cancer cells and nuclei.

Coordinates are level-0 pixels with pixel centres at integers; ``x_um = x_px * pixel_size_um``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ._appearance import Appearance
from ._biology import DCC_DENSITY_PER_MM2, LesionModel, draw_lesion_sizes, lesion_model

DESIGN_UM = 2.0
DEFAULT_APPEARANCE = Appearance()
#: Channel order of the rendered image (Ki67 is dropped from the file when not imaged).
CHANNELS = ("DAPI", "HER2", "Ki67")
LABEL_CHANNELS = ("nuclei", "cells", "lesions")

# Kinds of labelled nuclei, as written to nuclei.csv.
NUCLEUS_KINDS = ("septal", "epithelial", "immune", "macrophage", "cancer", "hepatocyte")


@dataclass(frozen=True)
class SlideSpec:
    """What to generate: one section of one mouse.

    Attributes
    ----------
    width_px, height_px : int
        Level-0 size in pixels.
    pixel_size_um : float
        Level-0 pixel size in um.
    group : {"IAV", "PBS"}
        Infected or control mouse.
    dpi : int
        Days post infection.
    seed : int
        Seed of everything random in the slide.
    ki67 : bool
        Whether the Ki67 channel is imaged (written to the file).
    mouse_burden : float
        Multiplies the density of disseminated cells; shared by a mouse's sections.
    mouse_response : float
        Strength of this mouse's response to infection; shared by a mouse's sections.
    appearance : Appearance
        How the slide looks (staining pattern, autofluorescence, dynamic range, tissue
        layout ...); the default is the generator's original style.
    """

    width_px: int = 8192
    height_px: int = 6144
    pixel_size_um: float = 0.5
    group: str = "PBS"
    dpi: int = 15
    seed: int = 0
    ki67: bool = True
    mouse_burden: float = 1.0
    mouse_response: float = 1.0
    appearance: Appearance = field(default_factory=Appearance)

    def __post_init__(self):
        if self.width_px < 256 or self.height_px < 256:
            raise ValueError(
                f"slide size {self.width_px}x{self.height_px} px is too small; use at least 256x256"
            )
        if not 0.1 <= self.pixel_size_um <= 2.0:
            raise ValueError(f"pixel_size_um must be between 0.1 and 2.0, got {self.pixel_size_um}")
        if self.group.upper() not in ("IAV", "PBS"):
            raise ValueError(f"group must be 'IAV' or 'PBS', got {self.group!r}")
        object.__setattr__(self, "group", self.group.upper())
        if self.dpi < 0:
            raise ValueError(f"dpi must be >= 0, got {self.dpi}")


@dataclass
class Stain:
    """Per-slide staining and imaging parameters (counts above the camera offset)."""

    af: np.ndarray  # tissue autofluorescence per channel
    gain: np.ndarray  # stain and exposure gain per channel
    nucleus_dapi: float
    ki67_pos: float
    offset: float
    read_noise: float
    electrons_per_count: float
    blur_sigma_px: float
    fov_px: tuple[int, int]  # scanner field of view (height, width)
    fov_origin_px: tuple[int, int]
    fov_gain_seed: int


@dataclass
class Template:
    """A small stamp: pixel offsets from the object's centre, weights, and its label mask."""

    dy: np.ndarray
    dx: np.ndarray
    w: np.ndarray
    lab: np.ndarray
    radius_px: int


@dataclass
class Sprite:
    """A pre-rendered patch (one cancer lesion) with image and label arrays."""

    y0: int
    x0: int
    image: np.ndarray  # (3, h, w) float32
    cell_label: np.ndarray  # (h, w) int32
    nucleus_label: np.ndarray  # (h, w) int32
    lesion_id: int

    @property
    def y1(self) -> int:
        return self.y0 + self.image.shape[1]

    @property
    def x1(self) -> int:
        return self.x0 + self.image.shape[2]


@dataclass
class Scene:
    """Everything about one slide except its pixels (see module docstring)."""

    spec: SlideSpec
    model: LesionModel
    stain: Stain
    factor: float  # level-0 pixels per design pixel
    tissue: np.ndarray  # design grid, 0..1
    wall_dist_um: np.ndarray  # distance to the nearest wall midline
    wall_halfwidth_um: np.ndarray
    texture: np.ndarray  # multiplicative autofluorescence texture
    infiltrate: np.ndarray  # 0..1
    templates: list[Template]
    objects: dict[str, np.ndarray]  # y, x, tpl, amp (N, 3), label, sorted by y
    sprites: list[Sprite]  # sorted by y0
    lesions: pd.DataFrame
    cells: pd.DataFrame
    nuclei: pd.DataFrame
    tissue_area_mm2: float
    extras: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.height_px, self.spec.width_px


# ----------------------------------------------------------------------------- helpers


def _smooth_noise(rng, shape, sigma, *, mode="wrap"):
    """Gaussian-filtered white noise with unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode=mode)
    return f / (f.std() + 1e-12)


def _coarse_field(rng, shape, coarse_um, sigma_um, design_um=DESIGN_UM):
    """Smooth noise made on a coarse grid and upsampled to `shape` (cheap for large sigma)."""
    step = coarse_um / design_um
    cshape = (max(2, math.ceil(shape[0] / step) + 2), max(2, math.ceil(shape[1] / step) + 2))
    f = _smooth_noise(rng, cshape, sigma_um / coarse_um, mode="reflect")
    yy = (np.arange(shape[0]) + 0.5) / step
    xx = (np.arange(shape[1]) + 0.5) / step
    return ndi.map_coordinates(f, np.meshgrid(yy, xx, indexing="ij"), order=1).astype(np.float32)


def _sample_from_weights(rng, weights, n):
    """Draw `n` flat indices with probability proportional to `weights` (with replacement)."""
    w = weights.ravel().astype(np.float64)
    c = np.cumsum(w)
    if n <= 0 or c[-1] <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.searchsorted(c, rng.random(n) * c[-1], side="right").clip(0, w.size - 1)


def _design_to_px(rng, flat, design_shape, factor):
    """Design-grid flat indices -> jittered integer level-0 pixel coordinates (y, x)."""
    yd, xd = np.unravel_index(flat, design_shape)
    y = np.floor((yd + rng.random(yd.size)) * factor).astype(np.int64)
    x = np.floor((xd + rng.random(xd.size)) * factor).astype(np.int64)
    return y, x


# ----------------------------------------------------------------------------- stain


def _draw_stain(rng, spec: SlideSpec) -> Stain:
    fov_h = int(round(400 / spec.pixel_size_um))
    fov_w = int(round(500 / spec.pixel_size_um))
    return Stain(
        af=np.array([45.0, 200.0, 80.0]) * rng.lognormal(0, 0.2, 3),
        gain=rng.lognormal(0, 0.25, 3),
        nucleus_dapi=2000.0 * rng.lognormal(0, 0.2),
        ki67_pos=1500.0 * rng.lognormal(0, 0.25),
        offset=float(rng.uniform(90, 120)),
        read_noise=float(rng.uniform(1.5, 3.0)),
        electrons_per_count=float(rng.uniform(1.2, 2.5)),
        blur_sigma_px=float(rng.uniform(0.7, 1.1)) * 0.5 / spec.pixel_size_um,
        fov_px=(fov_h, fov_w),
        fov_origin_px=(int(rng.integers(0, fov_h)), int(rng.integers(0, fov_w))),
        fov_gain_seed=int(rng.integers(2**31)),
    )


# ----------------------------------------------------------------------------- templates


def _ellipse_template(rng, a_px, b_px, theta, edge_px, texture, rim=None):
    r = int(math.ceil(max(a_px, b_px) + 2 * edge_px + 1))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    c, s = math.cos(theta), math.sin(theta)
    u = (xx * c + yy * s) / a_px
    v = (-xx * s + yy * c) / b_px
    rho = np.sqrt(u * u + v * v)
    mean_r = 0.5 * (a_px + b_px)
    soft = 1.0 / (1.0 + np.exp(-(1.0 - rho) * mean_r / edge_px))
    w = soft.copy()
    if texture > 0:
        tex = _smooth_noise(rng, w.shape, 1.2, mode="reflect")
        w *= np.clip(1.0 + texture * tex, 0.2, 2.0)
    if rim is not None:
        w *= rim(rho)
    keep = soft > 0.02
    return Template(
        dy=yy[keep].astype(np.int64),
        dx=xx[keep].astype(np.int64),
        w=w[keep].astype(np.float32),
        lab=(rho[keep] < 1.0),
        radius_px=r,
    )


def _blob_template(rng, radius_px, n_blobs, edge_px):
    """Irregular debris or granular cytoplasm: a union of small Gaussian blobs."""
    r = int(math.ceil(radius_px * 1.6 + 2))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    w = np.zeros_like(yy)
    for _ in range(n_blobs):
        cy, cx = rng.normal(0, radius_px * 0.45, 2)
        s = radius_px * rng.uniform(0.2, 0.5) + edge_px
        w += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    w /= w.max()
    keep = w > 0.02
    return Template(
        dy=yy[keep].astype(np.int64),
        dx=xx[keep].astype(np.int64),
        w=w[keep].astype(np.float32),
        lab=np.zeros(int(keep.sum()), bool),
        radius_px=r,
    )


def _build_templates(rng, px_um):
    """The template bank; returns (templates, {kind: array of template indices})."""
    tpls: list[Template] = []
    kinds: dict[str, list[int]] = {}
    edge = 0.35 / px_um

    def add(kind, t):
        kinds.setdefault(kind, []).append(len(tpls))
        tpls.append(t)

    for _ in range(48):  # septal / interstitial nuclei, flattened along walls
        a = rng.uniform(2.6, 4.0) / px_um
        add(
            "septal",
            _ellipse_template(
                rng, a, a * rng.uniform(0.45, 0.95), rng.uniform(0, math.pi), edge, 0.25
            ),
        )
    for _ in range(16):  # bronchiolar epithelium: elongated
        a = rng.uniform(3.5, 4.8) / px_um
        add(
            "epithelial",
            _ellipse_template(
                rng, a, a * rng.uniform(0.4, 0.6), rng.uniform(0, math.pi), edge, 0.2
            ),
        )
    for _ in range(16):  # lymphocytes: small, round, dense chromatin
        a = rng.uniform(2.1, 2.8) / px_um
        add(
            "immune",
            _ellipse_template(
                rng, a, a * rng.uniform(0.85, 1.0), rng.uniform(0, math.pi), edge, 0.15
            ),
        )
    for _ in range(16):  # macrophage nuclei: kidney-ish, pale
        a = rng.uniform(3.5, 4.5) / px_um
        add(
            "macrophage",
            _ellipse_template(
                rng, a, a * rng.uniform(0.6, 0.8), rng.uniform(0, math.pi), edge, 0.3
            ),
        )
    for _ in range(16):  # macrophage bodies: granular autofluorescent cytoplasm
        add("macrophage_body", _blob_template(rng, rng.uniform(6, 9) / px_um, 9, edge))
    for _ in range(12):  # red blood cells: biconcave discs without a nucleus
        a = rng.uniform(3.2, 3.9) / px_um
        add(
            "rbc",
            _ellipse_template(
                rng,
                a,
                a * rng.uniform(0.75, 1.0),
                rng.uniform(0, math.pi),
                edge,
                0.05,
                rim=lambda rho: 0.55 + 0.45 * np.clip(rho, 0, 1) ** 2,
            ),
        )
    for _ in range(12):  # debris and dust
        add("debris", _blob_template(rng, rng.uniform(1.0, 4.0) / px_um, 3, edge))
    return tpls, {k: np.array(v) for k, v in kinds.items()}


# ----------------------------------------------------------------------------- structure


def _tissue_field(rng, design_shape, frame_um):
    """Soft (0..1) tissue mask of 2-4 irregular lobes filling about half the field."""
    hd, wd = design_shape
    yy = (np.arange(hd, dtype=np.float32) + 0.5) / hd
    xx = (np.arange(wd, dtype=np.float32) + 0.5) / wd
    Y, X = np.meshgrid(yy, xx, indexing="ij")
    f = np.zeros(design_shape, np.float32)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.28, 0.72, 2)
        ay, ax = rng.uniform(0.18, 0.36, 2)
        th = rng.uniform(0, math.pi)
        dy, dx = Y - cy, X - cx
        u = (dx * math.cos(th) + dy * math.sin(th)) / ax
        v = (-dx * math.sin(th) + dy * math.cos(th)) / ay
        f = np.maximum(f, np.exp(-(u * u + v * v)))
    scale = max(frame_um) / 4000.0  # structure scales with the field, within reason
    f += 0.28 * _coarse_field(rng, design_shape, 16.0, 260.0 * max(scale, 0.25))
    f += 0.10 * _coarse_field(rng, design_shape, 8.0, 40.0)
    # Keep the section inside the frame, as a scanner's region of interest would.
    border = np.minimum.reduce([Y, 1 - Y, X, 1 - X])
    f -= 2.0 * np.clip(0.06 - border, 0, None) / 0.06
    target = rng.uniform(0.45, 0.55)
    thr = np.quantile(f, 1.0 - target)
    edge_um = 2.0
    # Scale so the soft edge is ~edge_um wide at the local gradient of f.
    gy, gx = np.gradient(f)
    g = (
        float(np.median(np.hypot(gy, gx)[np.abs(f - thr) < 0.02]))
        if np.any(np.abs(f - thr) < 0.02)
        else 0.01
    )
    g = max(g, 1e-4) / DESIGN_UM  # per um
    return np.clip((f - thr) / (g * edge_um) + 0.5, 0, 1).astype(np.float32)


def _jittered_seeds(rng, design_shape, spacing, jitter):
    """Voronoi seeds (um): a grid of `spacing` over the design field, each moved by up to
    `jitter` x spacing."""
    hd, wd = design_shape
    gy = np.arange(0, hd * DESIGN_UM + spacing, spacing)
    gx = np.arange(0, wd * DESIGN_UM + spacing, spacing)
    sy, sx = np.meshgrid(gy, gx, indexing="ij")
    return np.c_[sy.ravel(), sx.ravel()] + rng.uniform(-jitter, jitter, (sy.size, 2)) * spacing


def _septa(rng, design_shape, tissue):
    """Distance (um) to the nearest alveolar-septum midline, and the septum half-width."""
    spacing = rng.uniform(32.0, 42.0)
    seeds = _jittered_seeds(rng, design_shape, spacing, 0.45)
    tree = cKDTree(seeds)
    dist = np.full(design_shape, 1e3, np.float32)
    inside = tissue > 0
    iy, ix = np.nonzero(inside)
    pts = np.c_[(iy + 0.5) * DESIGN_UM, (ix + 0.5) * DESIGN_UM]
    # A smooth warp of space bends the straight Voronoi walls into rounded alveoli.
    warp = 0.18 * spacing
    pts[:, 0] += warp * _coarse_field(rng, design_shape, 6.0, 14.0)[iy, ix]
    pts[:, 1] += warp * _coarse_field(rng, design_shape, 6.0, 14.0)[iy, ix]
    d, _ = tree.query(pts, k=2, workers=-1)
    dist[iy, ix] = 0.5 * (d[:, 1] - d[:, 0])
    halfwidth = (2.6 + 0.8 * _coarse_field(rng, design_shape, 8.0, 60.0)).clip(1.5, 5.0)
    return dist, halfwidth.astype(np.float32)


def _ellipse_rho(design_shape, cy_um, cx_um, a_um, b_um, theta, pad_um):
    """Elliptical normalised radius on the bounding box of an ellipse; returns (slices, rho)."""
    r = max(a_um, b_um) + pad_um
    y0 = max(int((cy_um - r) / DESIGN_UM), 0)
    y1 = min(int((cy_um + r) / DESIGN_UM) + 1, design_shape[0])
    x0 = max(int((cx_um - r) / DESIGN_UM), 0)
    x1 = min(int((cx_um + r) / DESIGN_UM) + 1, design_shape[1])
    if y1 <= y0 or x1 <= x0:
        return None, None
    yy = (np.arange(y0, y1) + 0.5)[:, None] * DESIGN_UM - cy_um
    xx = (np.arange(x0, x1) + 0.5)[None, :] * DESIGN_UM - cx_um
    u = (xx * math.cos(theta) + yy * math.sin(theta)) / a_um
    v = (-xx * math.sin(theta) + yy * math.cos(theta)) / b_um
    return (slice(y0, y1), slice(x0, x1)), np.sqrt(u * u + v * v)


def _structures(rng, design_shape, tissue, dist, halfwidth, area_mm2):
    """Carve bronchioles and vessels; returns masks of epithelium rings, vessel lumens, cuffs."""
    epithelium = np.zeros(design_shape, np.float32)
    vessel_lumen = np.zeros(design_shape, bool)
    cuff = np.zeros(design_shape, np.float32)
    core = np.flatnonzero(tissue.ravel() > 0.99)
    if core.size == 0:
        return epithelium, vessel_lumen, cuff
    n_bronchi = rng.poisson(0.8 * area_mm2)

    def carve(cy, cx, a, b, th, wall_um, lumen_is_vessel):
        sl, rho = _ellipse_rho(design_shape, cy, cx, a, b, th, wall_um + 40.0)
        if sl is None:
            return
        t = wall_um / (0.5 * (a + b))
        lumen = rho < 1.0
        wall = (rho >= 1.0) & (rho < 1.0 + t)
        d = dist[sl]
        d[lumen] = 1e3
        d[wall] = 0.0
        hw = halfwidth[sl]
        hw[wall] = np.maximum(hw[wall], 3.0)
        if lumen_is_vessel:
            vessel_lumen[sl] |= lumen & (tissue[sl] > 0.5)
        else:
            ring = (rho >= 1.0) & (rho < 1.0 + 0.6 * t)
            epithelium[sl] = np.maximum(epithelium[sl], ring.astype(np.float32))
            c = (rho >= 1.0 + t) & (rho < 1.0 + t + 30.0 / (0.5 * (a + b)))
            cuff[sl] = np.maximum(cuff[sl], c.astype(np.float32))

    for _ in range(n_bronchi):
        yd, xd = np.unravel_index(core[rng.integers(core.size)], design_shape)
        cy, cx = (yd + 0.5) * DESIGN_UM, (xd + 0.5) * DESIGN_UM
        a = rng.uniform(40, 120)
        b = a * rng.uniform(0.45, 1.0)
        th = rng.uniform(0, math.pi)
        carve(cy, cx, a, b, th, rng.uniform(12, 20), False)
        # The companion artery of the bronchovascular bundle.
        phi = rng.uniform(0, 2 * math.pi)
        av = a * rng.uniform(0.45, 0.8)
        off = a + av + 25
        carve(
            cy + off * math.sin(phi),
            cx + off * math.cos(phi),
            av,
            av * rng.uniform(0.6, 1.0),
            rng.uniform(0, math.pi),
            rng.uniform(5, 9),
            True,
        )
    for _ in range(rng.poisson(1.5 * area_mm2)):  # small veins and venules
        yd, xd = np.unravel_index(core[rng.integers(core.size)], design_shape)
        a = rng.uniform(15, 45)
        carve(
            (yd + 0.5) * DESIGN_UM,
            (xd + 0.5) * DESIGN_UM,
            a,
            a * rng.uniform(0.5, 1.0),
            rng.uniform(0, math.pi),
            rng.uniform(3, 5),
            True,
        )
    return epithelium, vessel_lumen, cuff


# ----------------------------------------------------------------------------- cancer lesions


def _against_outside(ang, centres, r_cells, nuc_offs, a_nucs, r_cell, nuc_off, a_nuc, overlap):
    """The first place, walking out from the lesion's centroid along `ang`, where a new cell
    fits (cell and nucleus spacing as in packing): it touches the lesion, so the lesion stays
    one lesion under any linking distance longer than a cell (a cell dropped further out would
    be a satellite lesion of its own, not part of this one)."""
    ray = np.array([math.sin(ang), math.cos(ang)])
    origin = centres.mean(axis=0)
    t = np.arange(0.0, np.hypot(*(centres - origin).T).max() + 4 * r_cell + 2.0, 0.25)
    cand = origin + t[:, None] * ray
    d_c = np.hypot(*(cand[:, None, :] - centres[None]).transpose(2, 0, 1))
    nuc = cand + nuc_off
    d_n = np.hypot(*(nuc[:, None, :] - (centres + nuc_offs)[None]).transpose(2, 0, 1))
    fits = np.all(d_c >= overlap * (r_cells + r_cell), axis=1) & np.all(
        d_n >= a_nucs + a_nuc + 0.6, axis=1
    )
    return cand[int(np.argmax(fits))]


def _grow_lesion(rng, n, app: Appearance = DEFAULT_APPEARANCE):
    """Cell centres (um, relative), cell radii, nucleus centres, semi-axes and angles."""
    d_lo, d_hi = app.cell_diameter_um
    size = 0.5 * (d_lo + d_hi) / 15.0  # nuclei scale with the cells (1 for the default)
    p_lo, p_hi = app.packing
    r_cell = rng.uniform(0.5 * d_lo, 0.5 * d_hi, n)
    a_nuc = np.minimum(rng.uniform(4.5 * size, 6.0 * size, n), r_cell - 1.5 * size)
    b_nuc = a_nuc * rng.uniform(0.75, 1.0, n)
    th = rng.uniform(0, math.pi, n)
    off = rng.uniform(0, 1, n)[:, None] * 0.12 * r_cell[:, None]
    phi = rng.uniform(0, 2 * math.pi, n)
    nuc_off = off * np.c_[np.sin(phi), np.cos(phi)]
    centres = np.zeros((n, 2))
    placed = 1
    for k in range(1, n):
        best, best_d = None, np.inf
        tries = 0
        while tries < 60 and (best is None or tries < 12):
            tries += 1
            j = int(rng.integers(placed))
            ang = rng.uniform(0, 2 * math.pi)
            dist = (r_cell[j] + r_cell[k]) * rng.uniform(p_lo, p_hi)
            cand = centres[j] + dist * np.array([math.sin(ang), math.cos(ang)])
            d_c = np.hypot(*(centres[:placed] - cand).T)
            if np.any(d_c < min(0.84, 0.98 * p_lo) * (r_cell[:placed] + r_cell[k])):
                continue
            nuc = cand + nuc_off[k]
            d_n = np.hypot(*(centres[:placed] + nuc_off[:placed] - nuc).T)
            if np.any(d_n < a_nuc[:placed] + a_nuc[k] + 0.6):
                continue
            # Compact foci: keep the candidate nearest the centroid.
            dc = np.hypot(*(cand - centres[:placed].mean(axis=0)))
            if dc < best_d:
                best, best_d = cand, dc
        if best is None:  # could not pack: put it against the outside of the lesion
            best = _against_outside(
                rng.uniform(0, 2 * math.pi),
                centres[:placed],
                r_cell[:placed],
                nuc_off[:placed],
                a_nuc[:placed],
                r_cell[k],
                nuc_off[k],
                a_nuc[k],
                min(0.84, 0.98 * p_lo),
            )
        centres[k] = best
        placed += 1
    centres -= centres.mean(axis=0)
    return centres, r_cell, centres + nuc_off, a_nuc, b_nuc, th


def _render_lesion(
    rng,
    px_um,
    cy_px,
    cx_px,
    cells,
    her2_means,
    ki67_pos,
    dapi_amp,
    ki67_amp,
    first_cell_id,
    lesion_id,
    app: Appearance = DEFAULT_APPEARANCE,
    r_app=None,
):
    """Render one lesion into a sprite; returns (sprite, nucleus centres px, areas).

    `r_app` draws what only a non-default `app` needs (the default's random stream, and so its
    pixels, stay as they were before appearance families existed).
    """
    centres_um, r_cell, nuc_um, a_nuc, b_nuc, th = cells
    n = len(r_cell)
    c_px = centres_um / px_um + [cy_px, cx_px]
    nuc_px = nuc_um / px_um + [cy_px, cx_px]
    r_px = r_cell / px_um
    pad = int(math.ceil(r_px.max() + 4 / px_um))
    y0 = int(math.floor(c_px[:, 0].min())) - pad
    x0 = int(math.floor(c_px[:, 1].min())) - pad
    y1 = int(math.ceil(c_px[:, 0].max())) + pad + 1
    x1 = int(math.ceil(c_px[:, 1].max())) + pad + 1
    h, w = y1 - y0, x1 - x0
    yy, xx = np.mgrid[y0:y1, x0:x1]
    pts = np.c_[yy.ravel(), xx.ravel()].astype(np.float64)
    k = min(4, n)
    d, idx = cKDTree(c_px).query(pts, k=k)
    if k == 1:
        d, idx = d[:, None], idx[:, None]
    # Irregular outlines: each cell's radius wobbles with angle.
    harm = rng.normal(0, 0.05, (n, 3, 2))
    ang = np.arctan2(pts[:, 0, None] - c_px[idx, 0], pts[:, 1, None] - c_px[idx, 1])
    wob = np.ones_like(ang)
    for m in range(3):
        wob += harm[idx, m, 0] * np.cos((m + 2) * ang) + harm[idx, m, 1] * np.sin((m + 2) * ang)
    r_eff = r_px[idx] * wob
    score = d - r_eff  # additively weighted Voronoi: the cell whose edge is nearest wins
    order = np.argsort(score, axis=1)
    rows = np.arange(len(pts))
    own = idx[rows, order[:, 0]]
    s1 = score[rows, order[:, 0]]
    inside = s1 < 0
    outer = -s1
    if k > 1:
        inner = 0.5 * (score[rows, order[:, 1]] - s1)
        bdist = np.minimum(outer, inner)
    else:
        bdist = outer
    bdist_um = (bdist * px_um).reshape(h, w)
    outer_um = (outer * px_um).reshape(h, w)
    inside = inside.reshape(h, w)
    own = own.reshape(h, w)
    cell_label = np.where(inside, own + first_cell_id, 0).astype(np.int32)

    # Nuclei.
    nucleus_soft = np.zeros((h, w), np.float32)
    dapi_soft = nucleus_soft if app.ki67_dapi == 1.0 and not app.nucleoli else None
    if dapi_soft is None:
        dapi_soft = np.zeros((h, w), np.float32)
    nucleus_label = np.zeros((h, w), np.int32)
    ki67_tex = np.zeros((h, w), np.float32)
    speckle = np.clip(_smooth_noise(rng, (h, w), 0.9 / px_um * 0.5, mode="reflect"), -2, 3)
    chrom = _smooth_noise(rng, (h, w), 1.0, mode="reflect")
    edge = 0.35 / px_um
    for i in range(n):
        a, b = a_nuc[i] / px_um, b_nuc[i] / px_um
        r = int(math.ceil(1.7 * a)) + 1
        cy, cx = int(round(nuc_px[i, 0])) - y0, int(round(nuc_px[i, 1])) - x0
        sy = slice(max(cy - r, 0), min(cy + r + 1, h))
        sx = slice(max(cx - r, 0), min(cx + r + 1, w))
        dy = (np.arange(sy.start, sy.stop) + y0 - nuc_px[i, 0])[:, None]
        dx = (np.arange(sx.start, sx.stop) + x0 - nuc_px[i, 1])[None, :]
        u = (dx * math.cos(th[i]) + dy * math.sin(th[i])) / a
        v = (-dx * math.sin(th[i]) + dy * math.cos(th[i])) / b
        rho = np.sqrt(u * u + v * v)
        soft = (1.0 / (1.0 + np.exp(-(1.0 - rho) * 0.5 * (a + b) / edge))).astype(np.float32)
        np.maximum(nucleus_soft[sy, sx], soft, out=nucleus_soft[sy, sx])
        if dapi_soft is not nucleus_soft:
            d = soft * (app.ki67_dapi if ki67_pos[i] else 1.0)
            if app.nucleoli:  # 1-3 DAPI-dim nucleoli of about 1.5 um
                for _ in range(int(r_app.integers(1, 4))):
                    ny, nx = r_app.uniform(-0.45, 0.45, 2) * (a, b)
                    s2 = 2 * (0.75 / px_um) ** 2
                    d = d * (1 - 0.75 * np.exp(-((dy - ny) ** 2 + (dx - nx) ** 2) / s2))
            np.maximum(dapi_soft[sy, sx], d.astype(np.float32), out=dapi_soft[sy, sx])
        lab = rho < 1.0
        nucleus_label[sy, sx][lab] = first_cell_id + i
        cell_label[sy, sx][lab] = first_cell_id + i  # the nucleus belongs to its own cell
        if ki67_pos[i]:
            if app.ki67_pattern == "diffuse":
                k = soft
            elif app.ki67_pattern == "speckled":
                k = soft * 1.6 * np.clip(speckle[sy, sx], 0.0, None) ** 1.5
            else:
                k = soft * (0.55 + 0.45 * speckle[sy, sx])
            np.maximum(ki67_tex[sy, sx], k, out=ki67_tex[sy, sx])
        elif app.ki67_background > 0:
            k = soft * app.ki67_background
            np.maximum(ki67_tex[sy, sx], k, out=ki67_tex[sy, sx])

    # HER2: membrane-bright, cytoplasmic, weak over the nucleus, granular.
    membrane = np.exp(-((bdist_um / 0.9) ** 2))
    cyto_tex = np.clip(1.0 + 0.3 * _smooth_noise(rng, (h, w), 1.5, mode="reflect"), 0.3, 2.0)
    pattern = _her2_pattern(app, membrane, cyto_tex, nucleus_soft, r_app, px_um)
    body = 1.0 / (1.0 + np.exp(-np.clip(outer_um, -5, 5) / 0.3))
    pattern = pattern * body
    cells_mean = np.bincount(
        cell_label.ravel(), weights=pattern.ravel(), minlength=first_cell_id + n
    )
    cells_n = np.bincount(cell_label.ravel(), minlength=first_cell_id + n)
    unit_mean = cells_mean[first_cell_id:] / np.maximum(cells_n[first_cell_id:], 1)
    scale_per_cell = her2_means / np.maximum(unit_mean, 1e-6)
    # Outside-cell halo pixels take the scale of the nearest cell.
    her2 = pattern * scale_per_cell[own].astype(np.float32)

    image = np.zeros((3, h, w), np.float32)
    image[0] = dapi_amp * dapi_soft * np.clip(1.0 + 0.25 * chrom, 0.3, 2.0)
    image[1] = her2
    image[2] = ki67_amp * ki67_tex
    lesion_label = cell_label > 0
    sprite = Sprite(
        y0=y0,
        x0=x0,
        image=image,
        cell_label=cell_label,
        nucleus_label=nucleus_label,
        lesion_id=lesion_id,
    )
    cell_area = cells_n[first_cell_id:] * px_um**2
    nuc_area = (
        np.bincount(nucleus_label.ravel(), minlength=first_cell_id + n)[first_cell_id:] * px_um**2
    )
    return sprite, nuc_px, cell_area, nuc_area, float(lesion_label.sum() * px_um**2)


def _her2_pattern(app, membrane, cyto_tex, nucleus_soft, r_app, px_um):
    """Relative HER2 over a lesion's patch for the appearance's staining pattern."""
    p = app.her2_pattern
    if p == "default":
        return (0.45 * cyto_tex + 1.1 * membrane) * (1.0 - 0.7 * nucleus_soft)
    if p == "membrane":
        return (0.06 * cyto_tex + 1.3 * membrane) * (1.0 - 0.9 * nucleus_soft)
    if p == "cytoplasmic":
        return (0.9 * cyto_tex + 0.25 * membrane) * (1.0 - 0.6 * nucleus_soft)
    if p == "over_nucleus":  # the whole cell body, the nucleus included: no dark hole
        return (0.8 * cyto_tex + 0.45 * membrane) * (1.0 + 0.1 * nucleus_soft)
    if p == "weak_membrane":
        return (1.0 * cyto_tex + 0.12 * membrane) * (1.0 - 0.7 * nucleus_soft)
    # granular: punctate granules of about 1 um in the cytoplasm, a faint membrane
    dots = _smooth_noise(r_app, membrane.shape, 0.5 / px_um, mode="reflect")
    granules = np.clip(dots - 0.8, 0, None) * 2.5
    return (0.1 + granules + 0.3 * membrane) * (1.0 - 0.6 * nucleus_soft)


def _tumour_regions(rng, dshape, tissue, fraction, px_um, app):
    """Solid tumour covering `fraction` of the tissue: cells on a jittered hexagonal lattice.

    Returns ``(lesions, region)``: the tumour's lesions, each ``(centre_px (2,), cells tuple as
    `_grow_lesion`)``, and the tumour's mask on the design grid (None when there is none).
    A lesion is what the analysis calls one (`histo.lesions`): the cells whose nuclei are
    linked by steps shorter than the default ``link_distance_um``, so two patches of tumour a
    few um apart are one lesion, as a scientist counting the slide would see them.
    """
    from ..config import AnalysisConfig

    field = _coarse_field(rng, dshape, 8.0, 70.0)
    inner = ndi.binary_erosion(tissue > 0.98, iterations=3)
    if not inner.any():
        return [], None
    thr = np.quantile(field[inner], 1.0 - fraction)
    region = inner & (field > thr)
    if not region.any():
        return [], None
    d_lo, d_hi = app.cell_diameter_um
    p_lo, p_hi = app.packing
    spacing = 0.5 * (d_lo + d_hi) * 0.5 * (p_lo + p_hi)  # um between neighbouring centres
    size = 0.5 * (d_lo + d_hi) / 15.0
    hd, wd = dshape
    ys = np.arange(0, hd * DESIGN_UM, spacing * math.sqrt(3) / 2)
    pts = []
    for r, y in enumerate(ys):
        xs = np.arange((r % 2) * spacing / 2, wd * DESIGN_UM, spacing)
        pts.append(np.c_[np.full(xs.size, y), xs])
    pts = np.concatenate(pts) + rng.normal(0, 0.08 * spacing, (sum(len(p) for p in pts), 2))
    iy = np.clip((pts[:, 0] / DESIGN_UM).astype(int), 0, hd - 1)
    ix = np.clip((pts[:, 1] / DESIGN_UM).astype(int), 0, wd - 1)
    c = pts[region[iy, ix]]
    m = len(c)
    if m == 0:
        return [], region
    r_cell = np.full(m, spacing / 2 / max(0.5 * (p_lo + p_hi), 0.5)) * rng.uniform(0.92, 1.08, m)
    a_nuc = np.minimum(rng.uniform(4.5 * size, 6.0 * size, m), 0.42 * spacing)
    b_nuc = a_nuc * rng.uniform(0.75, 1.0, m)
    th = rng.uniform(0, math.pi, m)
    phi = rng.uniform(0, 2 * math.pi, m)
    off = rng.uniform(0, 0.08, m)[:, None] * spacing * np.c_[np.sin(phi), np.cos(phi)]
    # Lesions: connected groups of nuclei closer than the analysis' linking distance.
    nuclei = c + off
    pairs = cKDTree(nuclei).query_pairs(AnalysisConfig().link_distance_um, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m))
    comp = connected_components(graph, directed=False)[1]
    out = []
    for k in np.unique(comp):
        sel = comp == k
        centre_um = c[sel].mean(axis=0)
        rel = c[sel] - centre_um
        cells = (rel, r_cell[sel], rel + off[sel], a_nuc[sel], b_nuc[sel], th[sel])
        out.append((centre_um / px_um, cells))
    return out, region


def _liver_field(rng, dshape, tissue):
    """Liver-like parenchyma: polygonal hepatocytes (~24 um) with sinusoids between them.

    Returns (distance-like field, half-width, hepatocyte centres in um) in the form
    `render_expected` draws as walls: bright cytoplasm inside each cell, dark at its edges.
    """
    spacing = rng.uniform(21.0, 26.0)
    seeds = _jittered_seeds(rng, dshape, spacing, 0.3)
    iy, ix = np.nonzero(tissue > 0)
    pts = np.c_[(iy + 0.5) * DESIGN_UM, (ix + 0.5) * DESIGN_UM]
    d, _ = cKDTree(seeds).query(pts, k=2, workers=-1)
    edge = np.full(dshape, 1e3, np.float32)
    edge[iy, ix] = 0.5 * (d[:, 1] - d[:, 0])
    dist = np.clip(2.2 - edge, 0.0, None).astype(np.float32)  # 0 inside a cell, > 0 at edges
    halfwidth = np.full(dshape, 1.0, np.float32)
    return dist, halfwidth, seeds


def _stroma_texture(rng, dshape):
    """Fibrous texture of dense stroma: bundles elongated along a slowly turning direction."""
    a = _smooth_noise(rng, dshape, (0.6, 5.0), mode="reflect")
    b = _smooth_noise(rng, dshape, (5.0, 0.6), mode="reflect")
    w = np.clip(0.5 + 0.5 * _coarse_field(rng, dshape, 8.0, 120.0), 0, 1)
    return np.clip(1.0 + 0.5 * (w * a + (1 - w) * b), 0.2, 2.2).astype(np.float32)


# ----------------------------------------------------------------------------- the scene


def build_scene(spec: SlideSpec) -> Scene:
    """Decide everything about a slide except its pixels.

    Parameters
    ----------
    spec : SlideSpec

    Returns
    -------
    Scene
    """
    ss = np.random.SeedSequence([spec.seed, 0x1A9E7])
    r_stain, r_tpl, r_tissue, r_struct, r_obj, r_les, r_render = (
        np.random.default_rng(s) for s in ss.spawn(7)
    )
    px = spec.pixel_size_um
    factor = DESIGN_UM / px
    H, W = spec.height_px, spec.width_px
    dshape = (math.ceil(H / factor), math.ceil(W / factor))
    frame_um = (H * px, W * px)
    model = lesion_model(spec.group, spec.dpi, spec.mouse_response)
    app = spec.appearance
    # Everything only a non-default appearance needs comes from its own stream, so that the
    # default style's pixels do not change.
    r_app = np.random.default_rng([spec.seed, 0xA991])
    stain = _draw_stain(r_stain, spec)
    af_base = stain.af.copy()
    stain.af = stain.af * app.autofluorescence
    templates, kinds = _build_templates(r_tpl, px)
    if app.layout == "liver":  # hepatocyte nuclei: large, round, pale chromatin
        kinds["hepatocyte"] = np.arange(len(templates), len(templates) + 12)
        for _ in range(12):
            a = r_app.uniform(3.6, 4.6) / px
            templates.append(
                _ellipse_template(
                    r_app,
                    a,
                    a * r_app.uniform(0.85, 1.0),
                    r_app.uniform(0, math.pi),
                    0.35 / px,
                    0.2,
                )
            )

    tissue = _tissue_field(r_tissue, dshape, frame_um)
    # Tissue area counts level-0 pixels inside the frame only.
    tissue_area_mm2 = float(tissue.sum() * DESIGN_UM**2 * 1e-6)
    dist, halfwidth = _septa(r_tissue, dshape, tissue)
    hepatocytes = None
    if app.layout == "stroma":  # no airspaces: fibrous tissue everywhere
        dist = np.where(tissue > 0, 0.0, 1e3).astype(np.float32)
        halfwidth = np.full(dshape, 3.0, np.float32)
    elif app.layout == "liver":
        dist, halfwidth, hepatocytes = _liver_field(r_app, dshape, tissue)
    epithelium, vessel_lumen, cuff = _structures(
        r_struct, dshape, tissue, dist, halfwidth, tissue_area_mm2
    )
    texture = np.clip(1.0 + 0.25 * _coarse_field(r_tissue, dshape, 4.0, 6.0), 0.4, 1.8)
    if app.layout == "stroma":
        texture = _stroma_texture(r_app, dshape)
    elif app.layout == "liver":  # granular hepatocyte cytoplasm (lipofuscin)
        texture = np.clip(1.0 + 0.35 * _smooth_noise(r_app, dshape, 0.8), 0.3, 2.0)
    af_field = None
    if app.af_unevenness > 0:
        af_field = np.exp(app.af_unevenness * _coarse_field(r_app, dshape, 16.0, 150.0))

    # Virus-driven immune infiltrates: peribronchiolar cuffs and patchy pneumonia.
    infiltrate = np.zeros(dshape, np.float32)
    if model.infiltrate > 0.02:
        patches = _coarse_field(r_struct, dshape, 16.0, 90.0)
        thr = np.quantile(patches, 1.0 - 0.22 * model.infiltrate)
        infiltrate = np.clip((patches - thr) * 3.0, 0, 1) * model.infiltrate
        infiltrate = np.maximum(infiltrate, cuff * model.infiltrate)
        infiltrate *= tissue
        halfwidth += 3.0 * infiltrate  # thickened, inflamed septa

    wall = np.clip((halfwidth - dist) / 1.0 + 0.5, 0, 1) * tissue
    # Where blood runs and the cells that line it sit: the walls' capillaries in lung and
    # stroma; in liver the sinusoids between hepatocytes (their cytoplasm holds neither).
    capillary = tissue * (1.0 - wall) if app.layout == "liver" else wall

    obj_y, obj_x, obj_t, obj_amp, obj_kind, obj_ki67 = [], [], [], [], [], []

    def place(kind, tkind, flat, dapi, her2, ki67, ki67_frac):
        n = flat.size
        if n == 0:
            return
        y, x = _design_to_px(r_obj, flat, dshape, factor)
        ok = (y < H) & (x < W)
        y, x = y[ok], x[ok]
        n = y.size
        t = kinds[tkind][r_obj.integers(0, len(kinds[tkind]), n)]
        pos = r_obj.random(n) < ki67_frac
        amp = np.zeros((n, 3), np.float32)
        amp[:, 0] = dapi * r_obj.lognormal(0, 0.22, n)
        amp[:, 1] = her2 * r_obj.lognormal(0, 0.3, n)
        amp[:, 2] = np.where(
            pos, stain.ki67_pos * r_obj.lognormal(0, 0.35, n), ki67 * r_obj.lognormal(0, 0.3, n)
        )
        if app.ki67_background > 0 and kind is not None:  # non-specific nuclear background
            bg = app.ki67_background * stain.ki67_pos * r_app.lognormal(0, 0.3, n)
            amp[:, 2] = np.where(pos, amp[:, 2], amp[:, 2] + bg)
        obj_y.append(y), obj_x.append(x), obj_t.append(t), obj_amp.append(amp)
        obj_kind.append(np.full(n, -1 if kind is None else NUCLEUS_KINDS.index(kind)))
        obj_ki67.append(pos)

    um2 = DESIGN_UM**2
    nd = stain.nucleus_dapi
    af = stain.af
    ki67_normal = 0.02 + 0.06 * model.infiltrate
    # Septal and interstitial nuclei along the walls (about one per 45 um² of wall).
    # (one per 110 um² in dense stroma; only sinusoidal cells between hepatocytes)
    um2_per_nucleus = {"alveolar": 45.0, "stroma": 110.0, "liver": 600.0}[app.layout]
    n_sept = r_obj.poisson(wall.sum() * um2 / um2_per_nucleus)
    place(
        "septal",
        "septal",
        _sample_from_weights(r_obj, capillary, n_sept),
        nd,
        0.15 * af[1],
        0.3 * af[2],
        ki67_normal,
    )
    if hepatocytes is not None:
        hy = (hepatocytes[:, 0] / DESIGN_UM).astype(int)
        hx = (hepatocytes[:, 1] / DESIGN_UM).astype(int)
        ok = (hy >= 0) & (hy < dshape[0]) & (hx >= 0) & (hx < dshape[1])
        flat = np.ravel_multi_index((hy[ok], hx[ok]), dshape)
        flat = flat[tissue.ravel()[flat] > 0.5]
        place("hepatocyte", "hepatocyte", flat, 0.7 * nd, 0.1 * af[1], 0.3 * af[2], 0.02)
    n_epi = r_obj.poisson(epithelium.sum() * um2 / 28.0)
    place(
        "epithelial",
        "epithelial",
        _sample_from_weights(r_obj, epithelium, n_epi),
        0.9 * nd,
        0.2 * af[1],
        0.3 * af[2],
        ki67_normal,
    )
    if infiltrate.any():
        n_imm = r_obj.poisson(infiltrate.sum() * um2 / 22.0)
        place(
            "immune",
            "immune",
            _sample_from_weights(r_obj, infiltrate, n_imm),
            1.4 * nd,
            0.1 * af[1],
            0.3 * af[2],
            0.35,
        )
    # Alveolar macrophages sit in the airspaces: autofluorescent in every channel.
    air = tissue * (1.0 - wall) * (dist < 900)
    n_mac = r_obj.poisson(tissue_area_mm2 * (25.0 + 80.0 * model.infiltrate))
    mac_flat = _sample_from_weights(r_obj, air, n_mac)
    place("macrophage", "macrophage", mac_flat, 0.7 * nd, 0.2 * af[1], 0.3 * af[2], 0.0)
    n_m = len(obj_y[-1]) if mac_flat.size else 0
    if n_m:  # bodies centred on the same pixels as the macrophage nuclei
        y, x = obj_y[-1] + r_obj.integers(-3, 4, n_m), obj_x[-1] + r_obj.integers(-3, 4, n_m)
        t = kinds["macrophage_body"][r_obj.integers(0, len(kinds["macrophage_body"]), n_m)]
        amp = np.c_[
            0.12 * nd * r_obj.lognormal(0, 0.3, n_m),
            af[1] * r_obj.uniform(2.5, 8.0, n_m),
            af[2] * r_obj.uniform(4.0, 12.0, n_m),
        ].astype(np.float32)
        obj_y.append(y), obj_x.append(x), obj_t.append(t), obj_amp.append(amp)
        obj_kind.append(np.full(n_m, -1)), obj_ki67.append(np.zeros(n_m, bool))
    # Red blood cells: packed in vessel lumens, scattered in septal capillaries. HER2-bright.
    lumen_fill = r_obj.uniform(0.1, 0.7)
    n_rbc_v = r_obj.poisson(vessel_lumen.sum() * um2 * lumen_fill / 40.0)
    n_rbc_c = r_obj.poisson(tissue_area_mm2 * 300.0)
    for flat in (
        _sample_from_weights(r_obj, vessel_lumen.astype(np.float32), n_rbc_v),
        _sample_from_weights(r_obj, capillary, n_rbc_c),
    ):
        place(None, "rbc", flat, 0.0, 0.0, 0.0, 0.0)
        if flat.size:
            m = len(obj_y[-1])
            obj_amp[-1][:, 1] = af[1] * r_obj.uniform(2.0, 6.0, m)
            obj_amp[-1][:, 2] = af[2] * r_obj.uniform(0.8, 2.5, m)
    # Debris and dust, on tissue and glass alike: bright in every channel.
    n_deb = r_obj.poisson(frame_um[0] * frame_um[1] * 1e-6 * 12.0)
    deb = r_obj.integers(0, dshape[0] * dshape[1], n_deb)
    place(None, "debris", deb, 0.0, 0.0, 0.0, 0.0)
    if n_deb:
        m = len(obj_y[-1])
        obj_amp[-1][:] = (af * r_obj.uniform(3.0, 25.0, (m, 1))).astype(np.float32)
        obj_amp[-1][:, 0] += nd * r_obj.uniform(0.1, 1.0, m)

    # ---------------------------------------------------------------- cancer lesions
    n_dcc = r_les.poisson(DCC_DENSITY_PER_MM2 * spec.mouse_burden * tissue_area_mm2)
    sizes, awake = draw_lesion_sizes(r_les, n_dcc, model)
    order = np.argsort(-sizes, kind="stable")
    sizes, awake = sizes[order], awake[order]
    grown = [_grow_lesion(r_les, int(s), app) for s in sizes]
    radii_um = [float(np.hypot(*g[0].T).max() + g[1].max()) for g in grown]
    inner = tissue > 0.98
    nests = []
    tumour_gap_um = None
    if app.tumour_fraction > 0:
        # Solid tumour first; the other lesions keep 30 um (edge to edge) away from it.
        nests, region = _tumour_regions(r_app, dshape, tissue, app.tumour_fraction, px, app)
        if region is not None:
            inner = inner & ~ndi.binary_dilation(region, iterations=int(30 / DESIGN_UM) + 1)
            tumour_gap_um = ndi.distance_transform_edt(~region) * DESIGN_UM
    candidates = np.flatnonzero(ndi.binary_erosion(inner, iterations=2).ravel())
    placed_c: list[np.ndarray] = []
    placed_r: list[float] = []
    keep = []
    chunk_grid = [512, 1024, 2048]
    for i, rad in enumerate(radii_um):
        ok = False
        for attempt in range(200):
            if candidates.size == 0:
                break
            yd, xd = np.unravel_index(candidates[r_les.integers(candidates.size)], dshape)
            c = np.array([(yd + r_les.random()) * factor, (xd + r_les.random()) * factor])
            if attempt < 100 and r_les.random() < 0.5:
                # Straddle a chunk border on purpose (also a tile border): seams must not matter.
                g = chunk_grid[int(r_les.integers(3))]
                ax = int(r_les.integers(2))
                c[ax] = round(c[ax] / g) * g + r_les.uniform(-0.3, 0.3) * rad / px
            rad_px = rad / px + 4 / px
            if not (rad_px < c[0] < H - 1 - rad_px and rad_px < c[1] < W - 1 - rad_px):
                continue
            cyd, cxd = int(c[0] / factor), int(c[1] / factor)
            if not inner[min(cyd, dshape[0] - 1), min(cxd, dshape[1] - 1)]:
                continue
            if (
                tumour_gap_um is not None
                and tumour_gap_um[min(cyd, dshape[0] - 1), min(cxd, dshape[1] - 1)] < rad + 30.0
            ):
                continue
            if placed_c:
                dd = np.hypot(*(np.array(placed_c) - c).T) * px
                if np.any(dd < np.array(placed_r) + rad + 30.0):
                    continue
            placed_c.append(c)
            placed_r.append(rad)
            ok = True
            break
        if ok:
            keep.append(i)

    sprites: list[Sprite] = []
    lesion_rows, cell_rows = [], []
    next_cell = 1
    her2_af = af_base[1]  # cells keep their brightness whatever the autofluorescence

    def add_lesion(rng, lid, c, grown_cells, kpos, level, her2_means, dapi_amp, ki67_amp):
        nonlocal next_cell
        n = len(kpos)
        sprite, nuc_px, cell_area, nuc_area, les_area = _render_lesion(
            rng,
            px,
            c[0],
            c[1],
            grown_cells,
            her2_means,
            kpos,
            dapi_amp,
            ki67_amp,
            next_cell,
            lid,
            app,
            r_app,
        )
        sprites.append(sprite)
        ids = np.arange(next_cell, next_cell + n)
        next_cell += n
        cls = "single" if n == 1 else ("cluster" if n <= 4 else "focus")
        lesion_rows.append(
            dict(
                lesion_id=lid,
                x_um=float(nuc_px[:, 1].mean() * px),
                y_um=float(nuc_px[:, 0].mean() * px),
                n_cells=n,
                n_ki67_pos=int(kpos.sum()),
                **{"class": cls},
                dormant=bool(n == 1 and not kpos[0]),
                area_um2=les_area,
                her2_level=level,
            )
        )
        for j in range(n):
            cell_rows.append(
                {
                    "cell_id": int(ids[j]),
                    "lesion_id": lid,
                    "x_um": float(nuc_px[j, 1] * px),
                    "y_um": float(nuc_px[j, 0] * px),
                    "ki67_pos": bool(kpos[j]),
                    "her2_mean": float(her2_means[j]),
                    "cell_area_um2": float(cell_area[j]),
                    "nucleus_area_um2": float(nuc_area[j]),
                }
            )

    for lid, i in enumerate(keep, start=1):
        n = int(sizes[i])
        if awake[i]:
            kpos = r_les.random(n) < model.ki67_fraction
            if n == 1:
                kpos[:] = True  # an awakened single cell is cycling
        else:
            kpos = r_les.random(n) < model.dormant_ki67_fraction
        # Lesion brightness from about 2x to 15x the tissue autofluorescence.
        level = math.exp(r_les.uniform(*map(math.log, app.her2_level)))
        her2_means = her2_af * level * r_les.lognormal(0, 0.15, n)
        dapi_amp = app.nucleus_dapi * nd * r_les.lognormal(0, 0.1)
        ki67_amp = stain.ki67_pos * r_les.lognormal(0, 0.25)
        c = placed_c[keep.index(i)]
        add_lesion(r_les, lid, c, grown[i], kpos, level, her2_means, dapi_amp, ki67_amp)
    for lid, (c, grown_cells) in enumerate(nests, start=len(keep) + 1):
        n = len(grown_cells[1])
        kpos = r_app.random(n) < 0.5
        level = math.exp(r_app.uniform(*map(math.log, app.her2_level)))
        her2_means = her2_af * level * r_app.lognormal(0, 0.15, n)
        dapi_amp = app.nucleus_dapi * nd * r_app.lognormal(0, 0.1)
        ki67_amp = stain.ki67_pos * r_app.lognormal(0, 0.25)
        add_lesion(r_app, lid, c, grown_cells, kpos, level, her2_means, dapi_amp, ki67_amp)
    sprites.sort(key=lambda s: s.y0)
    lesions = pd.DataFrame(
        lesion_rows,
        columns=[
            "lesion_id",
            "x_um",
            "y_um",
            "n_cells",
            "n_ki67_pos",
            "class",
            "dormant",
            "area_um2",
            "her2_level",
        ],
    )
    cells = pd.DataFrame(
        cell_rows,
        columns=[
            "cell_id",
            "lesion_id",
            "x_um",
            "y_um",
            "ki67_pos",
            "her2_mean",
            "cell_area_um2",
            "nucleus_area_um2",
        ],
    )

    # ---------------------------------------------------------------- assemble objects
    y = np.concatenate(obj_y) if obj_y else np.zeros(0, np.int64)
    x = np.concatenate(obj_x) if obj_x else np.zeros(0, np.int64)
    t = np.concatenate(obj_t) if obj_t else np.zeros(0, np.int64)
    amp = np.concatenate(obj_amp) if obj_amp else np.zeros((0, 3), np.float32)
    kind = np.concatenate(obj_kind) if obj_kind else np.zeros(0, np.int64)
    ki67 = np.concatenate(obj_ki67) if obj_ki67 else np.zeros(0, bool)
    # Cancer cells displace the ordinary cells where they sit.
    if len(cells):
        tree = cKDTree(cells[["y_um", "x_um"]].to_numpy() / px)
        d, _ = tree.query(np.c_[y, x], k=1)
        rad = np.array([templates[i].radius_px for i in t])
        free = d > (9.5 / px + 0.6 * rad)
        y, x, t, amp, kind, ki67 = y[free], x[free], t[free], amp[free], kind[free], ki67[free]
    order = np.argsort(y, kind="stable")
    y, x, t, amp, kind, ki67 = y[order], x[order], t[order], amp[order], kind[order], ki67[order]
    label = np.zeros(y.size, np.int64)
    is_nuc = kind >= 0
    first = next_cell
    label[is_nuc] = np.arange(first, first + int(is_nuc.sum()))
    nuclei_normal = pd.DataFrame(
        {
            "nucleus_id": label[is_nuc],
            "x_um": x[is_nuc] * px,
            "y_um": y[is_nuc] * px,
            "kind": np.array(NUCLEUS_KINDS)[kind[is_nuc]],
            "ki67_pos": ki67[is_nuc],
        }
    )
    nuclei_cancer = pd.DataFrame(
        {
            "nucleus_id": cells["cell_id"].to_numpy(),
            "x_um": cells["x_um"].to_numpy(),
            "y_um": cells["y_um"].to_numpy(),
            "kind": "cancer",
            "ki67_pos": cells["ki67_pos"].to_numpy(),
        }
    )
    nuclei = pd.concat([nuclei_cancer, nuclei_normal], ignore_index=True)
    objects = {"y": y, "x": x, "tpl": t, "amp": amp, "label": label}

    return Scene(
        spec=spec,
        model=model,
        stain=stain,
        factor=factor,
        tissue=tissue,
        wall_dist_um=dist,
        wall_halfwidth_um=halfwidth,
        texture=texture.astype(np.float32),
        infiltrate=infiltrate,
        templates=templates,
        objects=objects,
        sprites=sprites,
        lesions=lesions,
        cells=cells,
        nuclei=nuclei,
        tissue_area_mm2=tissue_area_mm2,
        extras={
            "render_seed": int(r_render.integers(2**31)),
            "af_field": af_field,
            "n_dcc": int(n_dcc),
            "n_dcc_placed": len(keep),
        },
    )
