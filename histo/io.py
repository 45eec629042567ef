"""Reading and writing whole-slide images.

Reading: `open_slide` opens a slide lazily (nothing but the metadata and two small probe tiles
is read) and returns a `Slide`: its pyramid levels as Dask arrays of shape (C, Y, X), the
channel names, the role of each channel (DAPI, HER2, Ki67) and the level-0 pixel size in um.
Formats read:

- pyramidal OME-TIFF, sub-resolution levels stored as SubIFDs (what `write_ome_tiff` and
  Bio-Formats write) or as separate series (as some writers do);
- plain TIFF, tiled or stripped, single- or multi-page; a single-level image gets lazy
  2x2 block-mean levels down to below 1024 px, computed only when read;
- Aperio SVS and Hamamatsu NDPI as tifffile reads them (RGB samples become channels R, G, B;
  brightfield RGB needs an explicit ``channels=`` mapping);
- OME-Zarr (NGFF 0.4 and 0.5 ``multiscales``; channel names from ``omero.channels[].label``).

Every problem with an input file is raised as `histo.errors.InputError` naming the file, the
problem and the fix.

Writing: `write_ome_tiff` writes a tiled, compressed, pyramidal OME-TIFF (sub-resolution
levels as SubIFDs, as Bio-Formats, QuPath and tifffile expect) atomically.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import InputError

__all__ = [
    "CHANNEL_ALIASES",
    "Slide",
    "downsample_mean",
    "iter_overview",
    "open_slide",
    "pyramid_levels",
    "slide_name",
    "write_ome_tiff",
]

log = logging.getLogger(__name__)

TILE_PX = 512


def downsample_mean(image: np.ndarray, factor: int = 2) -> np.ndarray:
    """Block-mean downsampling of a (C, Y, X) image by an integer factor (edges cropped).

    Parameters
    ----------
    image : ndarray, shape (C, Y, X)
    factor : int

    Returns
    -------
    ndarray of the input dtype, shape (C, Y // factor, X // factor)
    """
    c, h, w = image.shape
    h2, w2 = h // factor, w // factor
    out = np.empty((c, h2, w2), image.dtype)
    for i in range(c):  # one channel at a time keeps the float temporary small
        blk = image[i, : h2 * factor, : w2 * factor].reshape(h2, factor, w2, factor)
        m = blk.mean(axis=(1, 3), dtype=np.float32)
        out[i] = m if image.dtype.kind == "f" else np.rint(m).astype(image.dtype)
    return out


def pyramid_levels(image: np.ndarray, min_size_px: int = 1024) -> list[np.ndarray]:
    """Level 0 and 2x-downsampled levels until the largest side is below `min_size_px`."""
    levels = [image]
    while max(levels[-1].shape[1:]) >= min_size_px:
        levels.append(downsample_mean(levels[-1], 2))
    return levels


def write_ome_tiff(
    path: str | os.PathLike,
    levels: Sequence[np.ndarray],
    *,
    channel_names: Sequence[str],
    pixel_size_um: float,
    compression: str = "zlib",
    compression_level: int | None = 1,
    tile_px: int = TILE_PX,
    maxworkers: int | None = None,
) -> Path:
    """Write a pyramidal, tiled, compressed OME-TIFF (axes CYX) atomically.

    Parameters
    ----------
    path : path-like
        Destination, usually ``*.ome.tif``.
    levels : sequence of ndarray, each (C, Y, X)
        Level 0 first; each further level is a sub-resolution stored as a SubIFD.
    channel_names : sequence of str
        One name per channel, written as OME ``Channel/@Name``.
    pixel_size_um : float
        Level-0 pixel size (``PhysicalSizeX/Y`` in um).
    compression : str
        A tifffile compression name; ``"zlib"`` (deflate) is read by every TIFF reader.
    compression_level : int, optional
        Level 1 writes about 5x faster than zlib's default 6 and costs ~3% in size on
        noisy fluorescence data.

    Returns
    -------
    Path
    """
    import tifffile

    if len(channel_names) != levels[0].shape[0]:
        raise ValueError(f"{len(channel_names)} channel names for {levels[0].shape[0]} channels")
    metadata = {
        "axes": "CYX",
        "PhysicalSizeX": pixel_size_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_size_um,
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": list(channel_names)},
    }
    opts = {
        "tile": (tile_px, tile_px),
        "compression": compression,
        "predictor": True,
        "compressionargs": {} if compression_level is None else {"level": compression_level},
        "photometric": "minisblack",
        "maxworkers": maxworkers,
    }
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **opts)
        for lev in levels[1:]:
            tif.write(lev, subfiletype=1, **opts)
    return Path(path)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

#: Channel roles and the names (lower case) that identify them. A channel is matched when its
#: whole name, or one token of it ("DAPI (405)", "HER2-AF488", "anti-Ki67"), is an alias.
CHANNEL_ALIASES: dict[str, tuple[str, ...]] = {
    "DAPI": ("dapi", "hoechst", "hoechst 33342", "nuclei", "dna"),
    "HER2": ("her2", "erbb2", "neu", "her-2", "cd340"),
    "Ki67": ("ki67", "ki-67", "mki67"),
}
REQUIRED_ROLES = ("DAPI", "HER2")

#: Smallest largest-side (px) of a lazily computed level: levels halve while the largest side
#: is at least this, like `pyramid_levels`.
MIN_LEVEL_SIZE_PX = 1024

#: A single stored level of more pixels than this (no pyramid) gets its coarse levels from one
#: pass over its stored tiles (`_OverviewReader`) instead of block means of the whole level,
#: which would read every pixel again for each coarse read.
GIANT_LEVEL_PX = 1 << 28

#: Largest side (px) of that overview: about 230 MB for three 16-bit channels at most.
OVERVIEW_MAX_SIDE_PX = 8192

#: Names of the slides lungmets reads (longest first, so `slide_name` strips the whole suffix).
SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".svs", ".ndpi", ".zarr")
_FORMATS_HINT = "lungmets reads OME-TIFF, TIFF, SVS, NDPI and OME-Zarr"
_CHANNELS_HINT = "e.g. --channels DAPI,HER2,Ki67 or --channels HER2=C1"
_PIXEL_SIZE_HINT = "pass --pixel-size-um (e.g. --pixel-size-um 0.5)"

# Length units of OME, OME-Zarr, ImageJ and TIFF metadata, in um (keys lower case).
_UNIT_UM = {
    "µm": 1.0,  # micro sign
    "μm": 1.0,  # Greek mu
    "um": 1.0,
    "\\u00b5m": 1.0,  # ImageJ writes the escape sequence literally
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "å": 1e-4,
    "angstrom": 1e-4,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}


def slide_name(path: str | os.PathLike) -> str:
    """The name of a slide: its file name without the slide suffix.

    ``.ome.tif``, ``.ome.tiff``, ``.tif``, ``.tiff``, ``.svs``, ``.ndpi``, ``.ome.zarr`` and
    ``.zarr`` are removed (case-insensitive); any other suffix is removed like `Path.stem`.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    str

    Examples
    --------
    >>> slide_name("data/lung_IAV_d15.ome.tif")
    'lung_IAV_d15'
    """
    name = Path(path).name
    for suffix in SLIDE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass(frozen=True, eq=False, repr=False)
class Slide:
    """An opened whole-slide image: lazy pyramid levels, channels and pixel size.

    Built by `open_slide`; nothing is read from the file until a level is computed or
    `read_region` is called.

    Attributes
    ----------
    path : Path
        The slide file (or OME-Zarr folder), absolute.
    levels : tuple of dask.array.Array
        Pyramid levels, each of shape (C, Y, X), level 0 (full resolution) first. Dask chunks
        follow the tiles (or strips, or Zarr chunks) of the file.
    channel_names : tuple of str
        One name per channel, in file order (after any renaming by ``channels=``).
    pixel_size_um : float
        Level-0 pixel size in um.
    format : str
        ``"ome-tiff"``, ``"tiff"``, ``"svs"``, ``"ndpi"`` or ``"ome-zarr"``.
    roles : dict
        Channel index of each role: ``"DAPI"`` and ``"HER2"`` always, ``"Ki67"`` when present.
    """

    path: Path
    levels: tuple
    channel_names: tuple[str, ...]
    pixel_size_um: float
    format: str
    roles: dict
    _readers: tuple = field(default=(), repr=False)
    _open_args: tuple = field(default=(), repr=False)

    @property
    def shape_px(self) -> tuple[int, int]:
        """(Y, X) size of level 0 in pixels."""
        return tuple(int(n) for n in self.levels[0].shape[1:])

    @property
    def n_levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.levels)

    @property
    def downsamples(self) -> tuple[float, ...]:
        """Downsample factor of each level: level-0 width / level width."""
        width0 = self.levels[0].shape[2]
        return tuple(width0 / level.shape[2] for level in self.levels)

    @property
    def extra_channels(self) -> tuple[tuple[str, int], ...]:
        """(name, index) of every channel that is not DAPI, HER2 or Ki67."""
        used = set(self.roles.values())
        return tuple((name, i) for i, name in enumerate(self.channel_names) if i not in used)

    @property
    def overview_level(self) -> int | None:
        """For a giant slide without a pyramid, the finest level read in one pass over its
        tiles (`iter_overview`); finer levels than this are block means of level 0, costly to
        read whole. None for other slides."""
        for i, reader in enumerate(self._readers):
            if isinstance(reader, _OverviewReader):
                return i
        return None

    def stored_mask(self, level: int) -> np.ndarray | None:
        """(Y, X) bool of `level`: where the file stores pixels, for a giant slide without a
        pyramid whose empty tiles were left out (`iter_overview`); None where it stores all
        (every other slide) or for levels finer than `overview_level`."""
        k = self.overview_level
        if k is None or level < k:
            return None
        reader = self._readers[k]
        reader.build()
        mask = reader.stored
        for _ in range(level - k):
            h, w = mask.shape[0] // 2, mask.shape[1] // 2
            mask = mask[: 2 * h, : 2 * w].reshape(h, 2, w, 2).any(axis=(1, 3))
        return None if mask.all() else mask

    def level_pixel_size_um(self, level: int) -> float:
        """Pixel size in um of `level` (level 0 times its downsample)."""
        return self.pixel_size_um * self.downsamples[level]

    def level_for_pixel_size(self, um: float) -> int:
        """Index of the coarsest level whose pixel size is at most `um` (0 if none is).

        Parameters
        ----------
        um : float
            Largest acceptable pixel size in um.

        Returns
        -------
        int
        """
        best = 0
        for i in range(self.n_levels):
            if self.level_pixel_size_um(i) <= um * (1 + 1e-6):
                best = i
        return best

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read pixels ``[y0:y1, x0:x1]`` of every channel of one level.

        Reads straight from the file (not through Dask), so it is cheap inside a Dask task and
        safe to call from several threads.

        Parameters
        ----------
        level : int
            Pyramid level, 0 = full resolution.
        y0, y1, x0, x1 : int
            Region in pixels of that level; ``0 <= y0 <= y1 <= Y`` and ``0 <= x0 <= x1 <= X``.

        Returns
        -------
        ndarray, shape (C, y1 - y0, x1 - x0)

        Raises
        ------
        ValueError
            If the level or the region lies outside the slide.
        InputError
            If the file cannot be decoded there (truncated or corrupt).
        """
        if not 0 <= level < self.n_levels:
            raise ValueError(f"level {level} out of range: {self.path.name} has {self.n_levels}")
        _, height, width = self.levels[level].shape
        if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width):
            raise ValueError(
                f"region y {y0}:{y1}, x {x0}:{x1} lies outside level {level} "
                f"({height} x {width} px) of {self.path.name}"
            )
        return self._readers[level][:, y0:y1, x0:x1]

    def __repr__(self) -> str:
        c, y, x = self.levels[0].shape
        return (
            f"Slide({str(self.path)!r}, format={self.format!r}, shape=({c}, {y}, {x}), "
            f"levels={self.n_levels}, pixel_size_um={self.pixel_size_um:g}, "
            f"channel_names={self.channel_names!r}, roles={self.roles!r})"
        )

    def __reduce__(self):
        # The file handles and Zarr stores cannot be pickled; another process reopens the
        # file (cheaply, through the cache of `open_slide`).
        return _reopen_slide, self._open_args


#: A stored level is taken for the area mean of level 0 when, on the regions checked, it lies
#: within this many counts of it everywhere (rounding to integers moves a mean by up to 0.5;
#: each further 2x level built from the rounded one adds up to 0.5) ...
BINNED_MAX_COUNTS = 1.0
#: ... and within this on average, while level 0 varies inside its blocks by more than it: a
#: level subsampled from level 0 (every d-th pixel) differs by the pixels' own noise.
BINNED_MEAN_COUNTS = 0.5


def binned_level(slide: Slide, factor: int, regions_px: Sequence[tuple[int, int, int, int]]) -> int:
    """The coarsest stored pyramid level that holds the area means of level 0 in blocks
    dividing `factor` (0 if none does, or if it cannot be told).

    A scanner's or converter's pyramid may be built by area averaging (then a chunk can be
    read there, a fraction of the pixels, instead of averaging level 0 after reading it) or by
    subsampling or other filters (then it must not). Each candidate level is compared with the
    block means of level 0 on `regions_px`.

    Parameters
    ----------
    slide : Slide
    factor : int
        Level-0 pixels per pixel of the resolution wanted (a level of downsample ``d`` is a
        candidate where ``d`` divides it).
    regions_px : sequence of (y0, y1, x0, x1)
        Level-0 boxes to compare on (tissue: glass may be too flat to tell a subsampled level).

    Returns
    -------
    int
        The level's index; 0 means read level 0.
    """
    readers = slide._readers
    if factor < 2 or not regions_px or not readers or not isinstance(readers[0], _LevelReader):
        return 0
    for level in range(slide.n_levels - 1, 0, -1):
        d = slide.downsamples[level]
        if not isinstance(readers[level], _LevelReader):
            continue  # levels computed here from level 0 save no decoding
        if abs(d - round(d)) > 1e-6 or factor % round(d):
            continue
        if _holds_block_means(slide, level, round(d), regions_px):
            return level
    return 0


def _holds_block_means(slide: Slide, level: int, d: int, regions_px) -> bool:
    """Whether `level` (downsample `d`) equals level 0's d x d block means on the regions."""
    integer = np.issubdtype(slide.levels[0].dtype, np.integer)
    h_l, w_l = slide.levels[level].shape[1:]
    told = False
    for y0, y1, x0, x1 in regions_px:
        y0, x0 = -(-y0 // d) * d, -(-x0 // d) * d
        y1, x1 = min(y1 // d, h_l) * d, min(x1 // d, w_l) * d
        if y1 - y0 < 4 * d or x1 - x0 < 4 * d:
            continue
        full = slide.read_region(0, y0, y1, x0, x1).astype(np.float32)
        stored = slide.read_region(level, y0 // d, y1 // d, x0 // d, x1 // d).astype(np.float32)
        c, h, w = stored.shape
        blocks = full.reshape(c, h, d, w, d)
        means = blocks.mean(axis=(2, 4))
        diff = np.abs(stored - means)
        scale = 1.0 if integer else max(float(np.abs(means).mean()), 1e-12) * 1e-3
        if diff.max() > BINNED_MAX_COUNTS * scale or diff.mean() > BINNED_MEAN_COUNTS * scale:
            return False
        spread = float(np.abs(blocks - means[:, :, None, :, None]).mean())
        told = told or spread > BINNED_MEAN_COUNTS * scale
    return told


def open_slide(
    path: str | os.PathLike,
    *,
    channels: str | Sequence[str] | Mapping[str, str | int] | None = None,
    pixel_size_um: float | None = None,
) -> Slide:
    """Open a whole-slide image lazily.

    Reads the metadata and one small tile of the first and the last level (to catch
    truncated or corrupt files early); pixels are read only when a level is computed or
    `Slide.read_region` is called. Opening the same unchanged file again in the same process
    is nearly free (the file is kept open in a small cache), so Dask worker processes call
    `open_slide` themselves.

    Parameters
    ----------
    path : path-like
        OME-TIFF, TIFF, SVS, NDPI file or OME-Zarr folder.
    channels : str, sequence of str or mapping, optional
        Which channel is DAPI, HER2 and Ki67, when the channel names do not tell. Either the
        roles of channels 0, 1, 2, ... in file order (``"DAPI,HER2,Ki67"`` or
        ``["DAPI", "HER2", "-"]``; ``"-"`` or ``""`` skips a channel, any other name renames
        it), or role assignments by channel name or index (``"DAPI=Hoechst,HER2=2"`` or
        ``{"HER2": "CY5"}``; roles not given are still found by name). By default the roles
        are found by channel name, see `CHANNEL_ALIASES`.
    pixel_size_um : float, optional
        Level-0 pixel size in um; overrides the metadata.

    Returns
    -------
    Slide

    Raises
    ------
    InputError
        If the file is missing, not a slide, truncated or corrupt, has Z planes or time
        points, lacks a pixel size, or has no DAPI or HER2 channel.

    Examples
    --------
    >>> slide = open_slide("lung.ome.tif")  # doctest: +SKIP
    >>> slide.roles  # doctest: +SKIP
    {'DAPI': 0, 'HER2': 1, 'Ki67': 2}
    >>> tile = slide.read_region(0, 0, 512, 0, 512)  # doctest: +SKIP
    """
    display = os.fspath(path)
    if pixel_size_um is not None:
        given, pixel_size_um = pixel_size_um, _positive(pixel_size_um)
        if pixel_size_um is None:
            raise InputError(
                f"{display}: pixel size {given!r} um is not a positive number; {_PIXEL_SIZE_HINT}"
            )
    source = _open_source(display)
    channels_key = _channels_key(channels, display)
    names, roles = _assign_roles(source, channels_key, display)
    if pixel_size_um is None:
        pixel_size_um = source.pixel_size_um
        if pixel_size_um is None:
            raise InputError(f"{display}: no pixel size in the metadata; {_PIXEL_SIZE_HINT}")
    return Slide(
        path=source.path,
        levels=source.levels,
        channel_names=names,
        pixel_size_um=pixel_size_um,
        format=source.format,
        roles=roles,
        _readers=source.readers,
        _open_args=(str(source.path), channels_key, pixel_size_um),
    )


def _reopen_slide(path: str, channels_key: Any, pixel_size_um: float) -> Slide:
    channels = dict(channels_key[1]) if channels_key and channels_key[0] == "map" else None
    if channels_key and channels_key[0] == "list":
        channels = list(channels_key[1])
    return open_slide(path, channels=channels, pixel_size_um=pixel_size_um)


# -- what is cached per file: readers, Dask levels and raw metadata ---------------------------


@dataclass(frozen=True, eq=False)
class _Source:
    path: Path
    format: str
    levels: tuple
    readers: tuple
    channel_names: tuple[str, ...]
    pixel_size_um: float | None
    brightfield: bool  # RGB brightfield (SVS, NDPI, 8-bit RGB TIFF): needs a channel mapping
    handle: Any = field(default=None, repr=False)  # keeps the TiffFile open


def _open_source(display: str) -> _Source:
    """Stat the path (cheap) and return the cached source of this version of the file."""
    p = Path(display)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError(
            f"{display}: no such file; check the path (and the folder it is relative to)"
        ) from None
    except OSError as exc:
        raise InputError(f"{display}: cannot be opened ({exc.strerror or exc})") from None
    mtime_ns, size = st.st_mtime_ns, st.st_size
    if p.is_dir():
        # a Zarr folder's own mtime misses edits of its metadata: add the metadata files'
        for meta in ("zarr.json", ".zattrs", ".zgroup"):
            with contextlib.suppress(OSError):
                mst = (p / meta).stat()
                mtime_ns, size = max(mtime_ns, mst.st_mtime_ns), size + mst.st_size
    return _open_source_cached(display, str(p.resolve()), mtime_ns, size)


@functools.lru_cache(maxsize=16)
def _open_source_cached(display: str, resolved: str, mtime_ns: int, size: int) -> _Source:
    path = Path(resolved)
    token = _token(resolved, mtime_ns, size)
    if path.is_dir():
        return _open_zarr(path, display, token)
    if size == 0:
        raise InputError(f"{display}: the file is empty (0 bytes); copy or export it again")
    with open(path, "rb") as f:
        magic = f.read(16)
    if magic[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return _open_tiff(path, display, size, token)
    raise InputError(
        f"{display}: not a TIFF or OME-Zarr slide ({_sniff(magic)}); {_FORMATS_HINT}: "
        f"convert it to OME-TIFF, e.g. with bfconvert or QuPath"
    )


def _sniff(magic: bytes) -> str:
    kinds = {
        b"\x89PNG": "it is a PNG image",
        b"\xff\xd8\xff": "it is a JPEG image",
        b"PK\x03\x04": "it is a ZIP archive",
        b"%PDF": "it is a PDF document",
        b"ZISRAWFILE": "it is a Zeiss CZI file",
        b"\x89HDF": "it is an HDF5 file",
    }
    for start, kind in kinds.items():
        if magic.startswith(start):
            return kind
    try:
        magic.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown file type"
    return "it is a text file"


class _LevelReader:
    """(C, Y, X) view of one stored level in any axis order, read with NumPy indexing.

    Z and T axes of size 1 are dropped and the channel axis (C, or the RGB samples S) moved
    first. Errors of the decoder become `InputError`, so that a corrupt tile reads as a
    message, not a traceback, also inside Dask.
    """

    def __init__(self, array, axes: str, display: str, level: int):
        self.array = array
        self._display = display
        self._level = level
        sizes = dict(zip(axes, array.shape, strict=True))
        self._c_axis = next((ax for ax in axes if ax not in "YX" and sizes[ax] > 1), None)
        kept = [ax for ax in axes if ax in "YX" or ax == self._c_axis]
        self._axes = axes
        self._kept = kept
        self.shape = (sizes.get(self._c_axis, 1), sizes["Y"], sizes["X"])
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3
        chunks = dict(zip(axes, _storage_chunks(array), strict=True))
        self.chunks_yx = (chunks["Y"], chunks["X"])

    def __getitem__(self, key) -> np.ndarray:
        cs, ys, xs = key
        index = []
        for ax in self._axes:
            if ax == "Y":
                index.append(ys)
            elif ax == "X":
                index.append(xs)
            elif ax == self._c_axis:
                index.append(cs)
            else:
                index.append(0)
        try:
            data = np.asarray(self.array[tuple(index)])
        except Exception as exc:
            raise InputError(
                f"{self._display}: cannot decode level {self._level} at y {ys.start}:{ys.stop}, "
                f"x {xs.start}:{xs.stop} ({type(exc).__name__}: {exc}); the file is truncated "
                f"or corrupt: copy or export it again"
            ) from exc
        src = list(self._kept)
        if self._c_axis is None:
            data = data[np.newaxis]
            src = ["C", *src]
        else:
            src = ["C" if ax == self._c_axis else ax for ax in src]
        return np.moveaxis(data, [src.index(ax) for ax in "CYX"], [0, 1, 2])

    def __reduce__(self):
        return _reader_for, (self._display, self._level)


class _DerivedReader:
    """A level computed from level 0 by `k` successive 2x2 block means (as `pyramid_levels`)."""

    def __init__(self, base: _LevelReader, k: int):
        self.base = base
        self.k = k
        c, h, w = base.shape
        for _ in range(k):
            h, w = h // 2, w // 2
        self.shape = (c, h, w)
        self.dtype = base.dtype
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        cs, ys, xs = key
        f = 2**self.k
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        data = self.base[cs, slice(y0 * f, y1 * f), slice(x0 * f, x1 * f)]
        for _ in range(self.k):
            data = _halve(data)
        return data

    def __reduce__(self):
        return _reader_for, (self.base._display, self.base._level + self.k)


class _OverviewReader:
    """Level `k` of a single stored giant level, built once by one pass over its tiles.

    Tiles the file does not hold (byte count 0: what scanners skip as glass, what a sparse
    writer leaves out) are not decoded; the blocks they cover get the lowest level of the
    blocks that were read (glass). The others are read one tile-aligned region at a time and
    block-averaged, so memory stays the overview's own size. Levels coarser than this one are
    computed from it (`_DerivedReader` on top).
    """

    def __init__(self, base: _LevelReader, k: int, empty: np.ndarray, tile_yx: tuple[int, int]):
        self.base = base
        self.k = k
        self.empty = empty  # (tile rows, tile columns) bool: no data stored there
        self.tile_yx = tile_yx
        c, h, w = base.shape
        self.shape = (c, h >> k, w >> k)
        self.dtype = base.dtype
        self.ndim = 3
        self._display = base._display
        self._level = base._level + k
        self._data: np.ndarray | None = None
        self.stored: np.ndarray | None = None  # (Y, X) bool: blocks with stored tiles
        self._lock = threading.Lock()

    def regions(self) -> list[tuple[int, int, int, int]]:
        """Level-0 boxes (y0, y1, x0, x1) to read: tile-aligned, whole blocks, not all empty."""
        f = 1 << self.k
        th, tw = self.tile_yx
        band_y, band_x = math.lcm(th, f), math.lcm(tw, f)
        _, hh, ww = self.shape
        h0, w0 = hh * f, ww * f
        out = []
        for y0 in range(0, h0, band_y):
            for x0 in range(0, w0, band_x):
                y1, x1 = min(h0, y0 + band_y), min(w0, x0 + band_x)
                tiles = self.empty[y0 // th : -(-y1 // th), x0 // tw : -(-x1 // tw)]
                if not tiles.all():
                    out.append((y0, y1, x0, x1))
        return out

    def build(self, progress=None) -> np.ndarray:
        """Read the overview (once; later calls return it). ``progress(done, total)`` is
        called after each region."""
        with self._lock:
            if self._data is not None:
                return self._data
            regions = self.regions()
            f = 1 << self.k
            c, hh, ww = self.shape
            log.warning(
                "%s: one %d x %d level and no pyramid: reading its overview from %d regions "
                "of stored tiles (of %d tiles, %d empty); write the slide as a pyramidal "
                "OME-TIFF (e.g. bfconvert -pyramid-resolutions) to skip this",
                self._display,
                *self.base.shape[1:],
                len(regions),
                self.empty.size,
                int(self.empty.sum()),
            )
            out = np.zeros(self.shape, self.dtype)
            read = np.zeros((hh, ww), bool)
            integer = np.issubdtype(self.dtype, np.integer)
            for i, (y0, y1, x0, x1) in enumerate(regions):
                block = self.base[slice(None), slice(y0, y1), slice(x0, x1)]
                by, bx = (y1 - y0) // f, (x1 - x0) // f
                means = block.reshape(c, by, f, bx, f).mean(axis=(2, 4), dtype=np.float64)
                out[:, y0 // f : y0 // f + by, x0 // f : x0 // f + bx] = (
                    np.rint(means) if integer else means
                )
                read[y0 // f : y0 // f + by, x0 // f : x0 // f + bx] = True
                if progress is not None:
                    progress(i + 1, len(regions))
            if read.any() and not read.all():
                # Blocks of tiles never stored: the glass level of the blocks read (their
                # lowest percent, from a sample of them).
                ys, xs = np.nonzero(read)
                step = max(1, ys.size // 1_000_000)
                sample = out[:, ys[::step], xs[::step]]
                glass = np.percentile(sample, 1.0, axis=1)
                for ch in range(c):
                    out[ch][~read] = np.rint(glass[ch]) if integer else glass[ch]
            self.stored = read
            self._data = out
            return self._data

    def __getitem__(self, key) -> np.ndarray:
        return self.build()[key].copy()

    def __reduce__(self):
        return _reader_for, (self._display, self._level)


def _empty_tiles(series, level: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """For a tiled or stripped TIFF level: which tile positions hold no data in any page or
    plane (byte count 0), and the tile size; None where the layout is not one grid."""
    pages = [p for p in series.levels[level].pages if p is not None]
    if not pages:
        return None
    key = pages[0].keyframe if hasattr(pages[0], "keyframe") else pages[0]
    h, w = key.imagelength, key.imagewidth
    if key.is_tiled:
        th, tw = key.tilelength, key.tilewidth
    else:
        th, tw = min(key.rowsperstrip or h, h), w
    grid = (-(-h // th), -(-w // tw))
    empty = np.ones(grid, bool)
    for page in pages:
        counts = np.asarray(page.databytecounts)
        if counts.size % (grid[0] * grid[1]):
            return None
        empty &= (counts.reshape(-1, *grid) == 0).all(axis=0)
    return empty, (th, tw)


def iter_overview(slide: Slide):
    """Read the overview of a giant single-level slide now, yielding ``(done, total,
    "overview")`` as its regions are read; nothing for other slides (a generator).

    Without this the overview is read the first time a coarse level is (`_OverviewReader`),
    with no progress to show.
    """
    from ._threads import iter_in_thread

    for reader in slide._readers:
        if isinstance(reader, _OverviewReader) and reader._data is None:

            def build(emit, reader=reader):
                reader.build(lambda done, total: emit((done, total, "overview")))

            yield from iter_in_thread(build, thread_name="lungmets-overview")


def _reader_for(display: str, level: int):
    return _open_source(display).readers[level]


def _halve(image: np.ndarray) -> np.ndarray:
    """2x2 block mean of (C, Y, X), cast back to the dtype (rounded for integers)."""
    if np.issubdtype(image.dtype, np.integer):
        return downsample_mean(image, 2)
    c, h, w = image.shape
    h2, w2 = h // 2, w // 2
    blocks = image[:, : h2 * 2, : w2 * 2].reshape(c, h2, 2, w2, 2)
    return blocks.mean(axis=(2, 4)).astype(image.dtype)


def _storage_chunks(array) -> tuple[int, ...]:
    shards = getattr(array, "shards", None)  # zarr v3: a shard is the unit read from disk
    return tuple(shards or array.chunks)


def _dask_chunks(shape: tuple[int, int, int], chunks_yx: tuple[int, int], target_px: int = 512):
    """Dask chunks of a (C, Y, X) level: all channels, whole storage chunks, >= target_px."""
    cy, cx = (max(1, c) for c in chunks_yx)
    cy *= math.ceil(target_px / cy)
    cx *= math.ceil(target_px / cx)
    return (shape[0], min(cy, shape[1]) or 1, min(cx, shape[2]) or 1)


def _build_levels(readers: list, display: str, token: str, tiles=None) -> tuple[tuple, tuple]:
    """Add lazy 2x2 levels to a single stored level; wrap every reader in a Dask array.

    `tiles` is `_empty_tiles` of that level: a giant level (`GIANT_LEVEL_PX`) gets its first
    level of at most `OVERVIEW_MAX_SIDE_PX` from `_OverviewReader`, the coarser ones from that.
    """
    import dask.array as da

    readers = list(readers)
    if len(readers) == 1:
        c, h, w = readers[0].shape
        giant = tiles is not None and h * w > GIANT_LEVEL_PX
        k = 0
        base, k_base = readers[0], 0
        while max(h, w) >= MIN_LEVEL_SIZE_PX:
            h, w, k = h // 2, w // 2, k + 1
            if giant and k_base == 0 and max(h, w) <= OVERVIEW_MAX_SIDE_PX:
                base, k_base = _OverviewReader(readers[0], k, *tiles), k
                readers.append(base)
            elif k_base:
                readers.append(_DerivedReader(base, k - k_base))
            else:
                readers.append(_DerivedReader(readers[0], k))
    base_chunks = _dask_chunks(readers[0].shape, readers[0].chunks_yx)
    levels = []
    for i, reader in enumerate(readers):
        if isinstance(reader, _DerivedReader | _OverviewReader):
            f = 2**i
            chunks = (
                reader.shape[0],
                min(max(128, base_chunks[1] // f), reader.shape[1]) or 1,
                min(max(128, base_chunks[2] // f), reader.shape[2]) or 1,
            )
        else:
            chunks = _dask_chunks(reader.shape, reader.chunks_yx)
        levels.append(
            da.from_array(
                reader,
                chunks=chunks,
                name=f"lungmets-level{i}-{token}",
                asarray=False,
                fancy=False,
                meta=np.empty((0, 0, 0), reader.dtype),
            )
        )
    return tuple(levels), tuple(readers)


def _check_channels(shape: tuple, display: str) -> None:
    if shape[0] < 2:
        raise InputError(
            f"{display}: a single-channel image ({shape[1]} x {shape[2]} px); lungmets needs "
            f"at least a DAPI and a HER2 channel: export all channels into one multi-channel "
            f"OME-TIFF"
        )


def _axis_problem(axes: str, shape: tuple, display: str) -> None:
    """Raise for Z stacks, time series and any other axis lungmets cannot analyse."""
    sizes = dict(zip(axes, shape, strict=True))
    if sizes.get("Z", 1) > 1:
        raise InputError(
            f"{display}: a Z stack ({sizes['Z']} planes, axes {axes}); lungmets analyses one "
            f"2-D section: save one plane or a maximum projection as OME-TIFF"
        )
    if sizes.get("T", 1) > 1:
        raise InputError(
            f"{display}: a time series ({sizes['T']} time points, axes {axes}); lungmets "
            f"analyses one 2-D section: save one time point as OME-TIFF"
        )
    if "Y" not in sizes or "X" not in sizes:
        raise InputError(
            f"{display}: no Y and X axes (axes {axes}, shape {shape}); {_FORMATS_HINT}"
        )
    if 0 in shape:
        raise InputError(f"{display}: an empty image (shape {shape}); copy or export it again")
    extra = [ax for ax in axes if ax not in "YX" and sizes[ax] > 1]
    if len(extra) > 1:
        dims = ", ".join(f"{ax}={sizes[ax]}" for ax in extra)
        raise InputError(
            f"{display}: unsupported dimensions ({dims}, axes {axes}); lungmets reads 2-D "
            f"multi-channel images (C, Y, X): save one 2-D multi-channel image as OME-TIFF"
        )


# -- TIFF --------------------------------------------------------------------------------------


class _CaptureLog(logging.Filter):
    """Collect (and silence) tifffile's log records of the current thread."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.records.append(record)
        return False


@contextlib.contextmanager
def _tifffile_log() -> Iterator[_CaptureLog]:
    logger = logging.getLogger("tifffile")
    capture = _CaptureLog()
    logger.addFilter(capture)
    try:
        yield capture
    finally:
        logger.removeFilter(capture)


def _open_tiff(path: Path, display: str, size: int, token: str) -> _Source:
    import tifffile

    corrupt = "the file is truncated or corrupt: copy or export it again"
    with _tifffile_log() as captured:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise InputError(f"{display}: cannot be read as TIFF ({exc}); {corrupt}") from exc
        try:
            source = _tiff_source(tif, path, display, size, token)
            errors = [r for r in captured.records if r.levelno >= logging.ERROR]
            if errors:
                # tifffile logs and skips what it cannot read (e.g. an IFD or the OME-XML
                # past the end of a truncated file) and falls back to a generic series
                raise InputError(f"{display}: {corrupt} (tifffile: {errors[0].getMessage()})")
        except InputError:
            tif.close()
            raise
        except Exception as exc:
            tif.close()
            raise InputError(
                f"{display}: cannot read the TIFF structure ({type(exc).__name__}: {exc}); "
                f"{corrupt}"
            ) from exc
    for record in captured.records:
        log.debug("%s: tifffile: %s", display, record.getMessage())
    return source


def _tiff_source(tif, path: Path, display: str, size: int, token: str) -> _Source:
    import zarr

    if not tif.series:
        raise InputError(f"{display}: a TIFF without images; copy or export it again")
    if tif.is_ome:
        fmt = "ome-tiff"
    elif tif.is_svs:
        fmt = "svs"
    elif tif.is_ndpi:
        fmt = "ndpi"
    else:
        fmt = "tiff"
    series0 = tif.series[0]
    # (series, level index) of every stored level
    stored = [(series0, i) for i in range(len(series0.levels))]
    if len(stored) == 1 and fmt not in ("svs", "ndpi"):
        for series in tif.series[1:]:
            if not _is_next_level(stored[-1][0], series, series0):
                break
            stored.append((series, 0))
    _axis_problem(series0.axes, series0.shape, display)

    for series, i in stored:
        for page in series.levels[i].pages:
            if page is None:
                continue
            ends = [
                o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True) if n > 0
            ]
            if ends and max(ends) > size:
                raise InputError(
                    f"{display}: the file is truncated: it has {size} bytes but its image data "
                    f"runs to byte {max(ends)}; copy or export it again"
                )

    readers = []
    for k, (series, i) in enumerate(stored):
        level = series.levels[i]
        array = zarr.open(series.aszarr(level=i), mode="r")
        if tuple(array.shape) != tuple(level.shape):
            raise InputError(
                f"{display}: level {k} has shape {tuple(array.shape)} in its tiles but "
                f"{tuple(level.shape)} in its metadata; the file is corrupt: export it again"
            )
        readers.append(_LevelReader(array, level.axes, display, k))
    _check_channels(readers[0].shape, display)
    _probe(readers, display)

    page0 = series0.keyframe
    n_channels = readers[0].shape[0]
    rgb = int(page0.photometric) in (2, 6) and page0.samplesperpixel >= 3  # RGB, YCbCr
    names = None
    pixel_size = None
    if fmt == "ome-tiff":
        names, pixel_size = _ome_xml_metadata(tif.ome_metadata, n_channels)
    if names is None and tif.is_imagej:
        labels = (tif.imagej_metadata or {}).get("Labels")
        if isinstance(labels, list) and len(labels) == n_channels:
            names = tuple(str(s) for s in labels)
    if names is None:
        if rgb and n_channels == 3 and page0.dtype == np.uint8:
            names = ("R", "G", "B")
        else:
            names = tuple(f"C{i}" for i in range(n_channels))
    if pixel_size is None and fmt == "svs":
        match = re.search(r"\bMPP\s*=\s*([0-9.]+(?:[eE][-+]?\d+)?)", page0.description or "")
        if match:
            pixel_size = _positive(match.group(1))
    if pixel_size is None:
        pixel_size = _tiff_resolution_um(tif, page0)
    brightfield = fmt in ("svs", "ndpi") or (rgb and page0.dtype == np.uint8)
    tiles = _empty_tiles(*stored[0]) if len(stored) == 1 else None
    levels, readers = _build_levels(readers, display, token, tiles)
    return _Source(
        path=path,
        format=fmt,
        levels=levels,
        readers=readers,
        channel_names=names,
        pixel_size_um=pixel_size,
        brightfield=brightfield,
        handle=tif,
    )


def _is_next_level(prev, series, first) -> bool:
    """Whether `series` is the next, smaller level of a pyramid stored as separate series."""
    if series.axes != first.axes or series.dtype != first.dtype:
        return False
    sizes0 = dict(zip(first.axes, first.shape, strict=True))
    sizes_prev = dict(zip(prev.axes, prev.shape, strict=True))
    sizes = dict(zip(series.axes, series.shape, strict=True))
    if any(sizes[ax] != sizes0[ax] for ax in sizes if ax not in "YX"):
        return False
    if not (sizes["Y"] < sizes_prev["Y"] and sizes["X"] < sizes_prev["X"]):
        return False
    factor = sizes0["X"] / sizes["X"]  # same aspect ratio, up to rounding
    return abs(sizes0["Y"] / factor - sizes["Y"]) <= 1.5


def _probe(readers: list, display: str) -> None:
    """Decode one small tile of the first and the last stored level."""
    for reader in {id(r): r for r in (readers[0], readers[-1])}.values():
        _, h, w = reader.shape
        cy, cx = reader.chunks_yx
        reader[slice(None), slice(0, min(h, cy, 256)), slice(0, min(w, cx, 256))]


def _ome_xml_metadata(xml: str | None, n_channels: int):
    """Channel names and pixel size (um) of the first image of an OME-XML document."""
    import xml.etree.ElementTree as ET

    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = root.find("{*}Image/{*}Pixels")
    if pixels is None:
        return None, None
    names = []
    for ch in pixels.findall("{*}Channel"):
        name = ch.get("Name") or ch.get("Fluor")
        samples = int(ch.get("SamplesPerPixel") or 1)
        names.extend([name] * samples if samples > 1 else [name])
    names = tuple(str(s) for s in names) if len(names) == n_channels and all(names) else None
    pixel_size = None
    value = _positive(pixels.get("PhysicalSizeX"))
    if value is not None:
        scale = _UNIT_UM.get((pixels.get("PhysicalSizeXUnit") or "µm").strip().lower())
        if scale is not None:
            pixel_size = value * scale
    return names, pixel_size


def _tiff_resolution_um(tif, page) -> float | None:
    """Pixel size from XResolution/ResolutionUnit (or ImageJ's unit); None when unset."""
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    try:
        num, den = tag.value
        pixels_per_unit = num / den
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(pixels_per_unit) and pixels_per_unit > 0):
        return None
    unit = int(page.resolutionunit)
    unit_um = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(unit)
    if unit == 1 and tif.is_imagej:  # ImageJ keeps the unit in its description
        unit_um = _UNIT_UM.get(str((tif.imagej_metadata or {}).get("unit", "")).lower())
    if unit_um is None:
        return None  # no unit: 1 pixel per unit is the default, not a calibration
    if unit == 2 and pixels_per_unit in (72.0, 96.0):
        return None  # screen resolution written by image editors, not a calibration
    return unit_um / pixels_per_unit


# -- OME-Zarr ----------------------------------------------------------------------------------


def _open_zarr(path: Path, display: str, token: str) -> _Source:
    import zarr

    try:
        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
    except Exception as exc:
        raise InputError(
            f"{display}: a folder that is not an OME-Zarr image ({type(exc).__name__}: "
            f"{exc}); {_FORMATS_HINT}"
        ) from exc
    ome = attrs.get("ome", attrs)  # NGFF 0.5 keeps its metadata under "ome"
    if "multiscales" not in ome and "bioformats2raw.layout" in ome and "0" in root:
        root = root["0"]  # bioformats2raw: the first image is the group "0"
        attrs = dict(root.attrs)
        ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise InputError(
            f"{display}: a Zarr folder without OME-Zarr 'multiscales' metadata; "
            f"{_FORMATS_HINT}: write it as OME-Zarr (NGFF 0.4 or 0.5) or OME-TIFF"
        )
    try:
        ms = multiscales[0]
        axes_meta = (
            ms.get("axes") or ["t", "c", "z", "y", "x"][-root[ms["datasets"][0]["path"]].ndim :]
        )
        axes, units = [], []
        for ax in axes_meta:
            name = ax if isinstance(ax, str) else ax.get("name", "")
            kind = "" if isinstance(ax, str) else ax.get("type", "")
            name = "C" if kind == "channel" else "T" if kind == "time" else name.upper()
            axes.append(name)
            units.append(None if isinstance(ax, str) else ax.get("unit"))
        axes = "".join(a if len(a) == 1 else "Q" for a in axes)
        arrays = [root[d["path"]] for d in ms["datasets"]]
        scale = _ngff_scale(ms["datasets"][0], ms, len(axes))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{display}: invalid OME-Zarr metadata ({type(exc).__name__}: {exc}); "
            f"write it again as OME-Zarr (NGFF 0.4 or 0.5)"
        ) from exc
    _axis_problem(axes, tuple(arrays[0].shape), display)
    readers = [_LevelReader(a, axes, display, k) for k, a in enumerate(arrays)]
    _check_channels(readers[0].shape, display)
    _probe(readers, display)

    n_channels = readers[0].shape[0]
    labels = [c.get("label") for c in (ome.get("omero") or {}).get("channels", [])]
    if len(labels) == n_channels and all(labels):
        names = tuple(str(s) for s in labels)
    else:
        names = tuple(f"C{i}" for i in range(n_channels))
    pixel_size = None
    ix = axes.index("X")
    if scale is not None:
        unit = units[ix]
        if unit is None:
            unit_um = 1.0 if scale[ix] != 1.0 else None  # unitless 1.0 is a placeholder
        else:
            unit_um = _UNIT_UM.get(str(unit).lower())
        if unit_um is not None and scale[ix] > 0:
            pixel_size = scale[ix] * unit_um
    levels, readers = _build_levels(readers, display, token)
    return _Source(
        path=path,
        format="ome-zarr",
        levels=levels,
        readers=readers,
        channel_names=names,
        pixel_size_um=pixel_size,
        brightfield=False,
    )


def _ngff_scale(dataset: dict, multiscale: dict, ndim: int) -> list[float] | None:
    """Scale of a dataset times the multiscale-wide scale, or None."""
    scale = None
    for transforms in (
        dataset.get("coordinateTransformations"),
        multiscale.get("coordinateTransformations"),
    ):
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", ())) == ndim:
                s = [float(v) for v in t["scale"]]
                scale = s if scale is None else [a * b for a, b in zip(scale, s, strict=True)]
    return scale


# -- channels ----------------------------------------------------------------------------------


def _tokens(name: str) -> set[str]:
    """The lower-case name, its words and the parts of hyphenated words."""
    name = name.strip().lower()
    words = [w for w in re.split(r"[\s_/,;:|()\[\]{}]+", name) if w]
    parts = {p for w in words for p in w.split("-") if p}
    return {name, *words, *parts}


def _role_of(name: str, *, exact: bool = False) -> str | None:
    """The role whose alias is the whole name (exact) or one token of it."""
    norm = name.strip().lower()
    for role, aliases in CHANNEL_ALIASES.items():
        if norm == role.lower() or norm in aliases:
            return role
    if exact:
        return None
    tokens = _tokens(name)
    for role, aliases in CHANNEL_ALIASES.items():
        if tokens & {role.lower(), *aliases}:
            return role
    return None


def _channels_key(channels, display: str):
    """Hashable, validated form of `channels`: None, ("list", entries) or ("map", pairs)."""
    if channels is None:
        return None
    if isinstance(channels, Mapping):
        return "map", tuple((str(k), v) for k, v in channels.items())
    if isinstance(channels, str):
        items = [s.strip() for s in channels.split(",")]
    elif isinstance(channels, Sequence):
        items = [str(s).strip() for s in channels]
    else:
        raise InputError(
            f"{display}: --channels must be a list of roles or ROLE=CHANNEL pairs, not "
            f"{type(channels).__name__}; {_CHANNELS_HINT}"
        )
    with_eq = ["=" in s for s in items]
    if items and all(with_eq):
        return "map", tuple(tuple(s.split("=", 1)) for s in items)
    if any(with_eq):
        raise InputError(
            f"{display}: --channels {','.join(items)!s} mixes roles in order with ROLE=CHANNEL "
            f"pairs; use one or the other, {_CHANNELS_HINT}"
        )
    return "list", tuple(items)


def _assign_roles(source: _Source, channels_key, display: str):
    """Channel names and the {role: index} dict of a slide."""
    names = list(source.channel_names)
    found = ", ".join(names)
    roles: dict[str, int] = {}
    skipped: set[int] = set()
    if channels_key is None and source.brightfield:
        raise InputError(
            f"{display}: an RGB brightfield image (channels {found}, e.g. H&E); lungmets needs "
            f"immunofluorescence channels (DAPI, HER2, Ki67). If the file really is "
            f"fluorescence, pass --channels to map them, e.g. --channels DAPI,HER2,-"
        )
    if channels_key is not None and channels_key[0] == "list":
        entries = channels_key[1]
        if len(entries) > len(names):
            raise InputError(
                f"{display}: --channels gives {len(entries)} channels but the slide has "
                f"{len(names)} ({found}); give at most {len(names)}, {_CHANNELS_HINT}"
            )
        for i, entry in enumerate(entries):
            if entry in ("", "-"):
                skipped.add(i)
                continue
            role = _role_of(entry, exact=True)
            if role is None:
                names[i] = entry  # a name for a channel without a role, e.g. CD4
                skipped.add(i)
                continue
            if role in roles:
                raise InputError(
                    f"{display}: --channels gives {role} twice (channels {roles[role]} and {i}); "
                    f"give each role once, {_CHANNELS_HINT}"
                )
            roles[role] = i
            names[i] = role
    elif channels_key is not None:
        for key, target in channels_key[1]:
            role = _role_of(str(key), exact=True)
            if role is None:
                raise InputError(
                    f"{display}: --channels names an unknown role {key!r}; roles are DAPI, "
                    f"HER2 and Ki67, e.g. --channels DAPI=Hoechst,HER2=2"
                )
            index = _find_channel(target, names, display, role)
            if index in roles.values():
                other = next(r for r, j in roles.items() if j == index)
                raise InputError(
                    f"{display}: --channels maps both {other} and {role} to channel {index} "
                    f"({names[index]}); give each role its own channel"
                )
            roles[role] = index
    # roles not given by the user are found by name
    taken = set(roles.values()) | skipped
    for exact in (True, False):
        for role in CHANNEL_ALIASES:
            if role in roles:
                continue
            for i, name in enumerate(names):
                if i not in taken and _role_of(name, exact=exact) == role:
                    roles[role] = i
                    taken.add(i)
                    break
    missing = [r for r in REQUIRED_ROLES if r not in roles]
    if missing:
        unassigned = [n for i, n in enumerate(names) if i not in roles.values()]
        pairs = ",".join(f"{r}={n}" for r, n in zip(missing, unassigned, strict=False))
        example = f" or --channels {pairs}" if len(unassigned) >= len(missing) else ""
        raise InputError(
            f"{display}: no channel named {' or '.join(missing)} (found: {found}); pass "
            f"--channels, e.g. --channels DAPI,HER2,Ki67{example}"
        )
    ordered = {r: roles[r] for r in CHANNEL_ALIASES if r in roles}
    return tuple(names), ordered


def _find_channel(target, names: list[str], display: str, role: str) -> int:
    """Index of the channel `target` names (an index, or a channel name or token)."""
    text = str(target).strip()
    if isinstance(target, int) or re.fullmatch(r"\d+", text):
        index = int(text)
        if not 0 <= index < len(names):
            raise InputError(
                f"{display}: --channels {role}={index}: no channel {index}, the slide has "
                f"{len(names)} (0 to {len(names) - 1}: {', '.join(names)})"
            )
        return index
    lowered = [n.strip().lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    for i, name in enumerate(names):
        if text.lower() in _tokens(name):
            return i
    raise InputError(
        f"{display}: --channels {role}={text}: no channel named {text} "
        f"(found: {', '.join(names)}); give a channel name or index"
    )


# -- small helpers -----------------------------------------------------------------------------


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _token(*parts) -> str:
    from dask.base import tokenize

    return tokenize(*parts)
