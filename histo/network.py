"""The network detector (``method="unet"``): one tile of pixels in, a table of HER2+ cells out.

The same contract as `histo.detect.detect_cells`, so `histo.pipeline.analyze_tile` calls either.
The network (``models``) runs at its own resolution (1 um/px for the shipped model): the tile is
block-averaged to it, normalised by the slide's autofluorescence, and the network's maps are
turned into cells at the peaks of its nucleus-centre map. Each cell is then measured on the
block-averaged pixels: its region (a watershed of the cell map from the peaks), its HER2, its
nucleus (DAPI above the slide's nuclear threshold) and Ki67.

Screening: disseminated cells are rare, so most of a lung is empty alveoli. With ``screen=True``
the network only runs on its tiles near a *candidate cancer cell* (`screen_mask`): a nucleus
wrapped in HER2 that is not autofluorescence. Red blood cells (HER2-bright, no nucleus), the
autofluorescent walls and debris, and, where Ki67 was imaged, macrophages (bright in Ki67
wherever they are bright in HER2) are left out, so far fewer tiles are run; the screen keeps
what the dense pass finds (measured on held-out slides in BENCHMARKS.md).

torch is imported only inside these functions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .config import KI67_QUANTILES, AnalysisConfig
from .detect import _label_quantile
from .tissue import StainLevels, _mode

#: Coarsest slide pixel, as a multiple of the model's: beyond it cells are a few pixels wide.
MAX_UPSAMPLING = 2.0


def model_factor(model_um_per_px: float, pixel_size_um: float, path="") -> float:
    """How many slide pixels make one model pixel (any positive number, not only integers).

    A whole number (within 0.1%) is returned exactly, so the common 0.5 um/px slides are
    block-averaged; any other pixel size (0.65, 0.325, 0.8 um ...) is area-averaged to the
    model's resolution (`models.infer.resample_mean`).

    Raises
    ------
    InputError
        If the slide's pixels are more than twice as coarse as the model's.
    """
    from models.infer import integer_factor

    from .errors import InputError

    factor = model_um_per_px / pixel_size_um
    if factor < 1.0 / MAX_UPSAMPLING:
        raise InputError(
            f"{path}: pixel size {pixel_size_um} um is too coarse for the network "
            f"({model_um_per_px} um/px: cells would be a few pixels wide); use --method "
            "classical, or --pixel-size-um if the metadata is wrong"
        )
    f = integer_factor(factor)
    return float(f) if f is not None else float(factor)


#: A macrophage's band is bright in Ki67: at least this multiple of the Ki67 autofluorescence
#: (a Ki67-negative cancer cell's band sits near 1-1.5x, the tissue's own level).
MACROPHAGE_KI67_RATIO = 2.0
#: ... and brighter in Ki67 than the nucleus itself (a macrophage's nucleus is Ki67-negative,
#: its granules are not). At 0.3x of the nucleus, the rule took the cells of packed foci
#: where HER2 shows through the Ki67 filter (their HER2-bright bands are then bright in Ki67
#: too): the screen lost 105 of the dense pass's 404 cells on bench_markers' 0.25
#: bleed-through section at 28 dpi (seed 94015) and 6 of 58 at 12 dpi. A Ki67+ cancer cell's
#: own nucleus outshines its band, and the crops around it take in its neighbours. A macrophage
#: whose granules lie as bright over its nucleus as around it is now looked at (the network
#: decides, as in a dense pass): 0-4% more network pixels on the held-out slides.
MACROPHAGE_OVER_NUCLEUS = 1.0

#: The host tissue's nuclei are HER2-negative: the HER2 around them (the lowest mode of their
#: 4-um bands) is the tissue's own level. On every held-out family slide it sits at 0.14-0.8x
#: the measured HER2 autofluorescence; where it sits more than this many times below the screen's
#: threshold, the measured level is not the tissue's (near-zero autofluorescence: the only
#: HER2 the slide's reference could find was the cancer cells'), and the screen takes this
#: multiple of the host bands as its HER2 unit instead (measured: 0.002x on the 0.05x
#: autofluorescence slide, where the screen lost 55 of 389 cells the dense pass finds).
HOST_BAND_MULTIPLE = 10.0

#: A nucleus whose band holds this many times the host nuclei's HER2 is kept too, whatever the
#: autofluorescence: where it is high, cancer cells can be dimmer than it (0.5-0.9x on the
#: 4x-autofluorescence slides of bench_markers, at 2-3x the host bands) and the dense network
#: still finds them.
HOST_BAND_KEEP = 2.0

#: An object of more than this many times the median nucleus area is nuclei merged by the
#: 3-um smoothing (a packed focus): its own HER2 is measured too, not only its band.
MERGED_NUCLEI = 4.0


def screen_mask(
    x: np.ndarray,
    config: AnalysisConfig,
    *,
    nuclear_ratio: float,
    model_um_per_px: float = 1.0,
) -> np.ndarray:
    """Where the network should look: around nuclei wrapped in HER2 that is not autofluorescence.

    Parameters
    ----------
    x : ndarray, shape (4, Y, X)
        Network input (`models.infer.to_model_input`): log1p of DAPI, HER2 and Ki67 over their
        autofluorescence, and the Ki67-imaged plane.
    config : AnalysisConfig
        Uses the ``screen_*`` settings.
    nuclear_ratio : float
        The slide's nuclear DAPI level over its DAPI autofluorescence
        (``stain.nuclear[d] / stain.autofluorescence[d]``).
    model_um_per_px : float

    Returns
    -------
    ndarray of bool, shape (Y, X)

    Notes
    -----
    On 3-um local means (ratios to autofluorescence):

    1. nuclei: DAPI above `screen_nucleus_fraction` of the nuclear level, as connected objects;
    2. a nucleus is kept when the band of 4 um around it holds HER2: its mean is above
       `screen_her2_ratio`, or more than `screen_her2_coverage` of it is above 1.3x. Red blood
       cells have no nucleus, and a nucleus that merely touches one (or an autofluorescent
       wall) is lit on one side only;
    3. where Ki67 was imaged, a nucleus is dropped when its band is bright in Ki67 too (above
       `MACROPHAGE_KI67_RATIO`, `screen_autofluorescence_ratio` x its HER2 and the
       nucleus's own Ki67, `MACROPHAGE_OVER_NUCLEUS`): a macrophage's granules shine in every
       channel, while a cancer cell's Ki67 sits in its nucleus;
    4. the kept nuclei, grown by `screen_margin_um`.

    HER2 is in units of its autofluorescence unless the host nuclei's bands show that level to
    be far too high (`HOST_BAND_MULTIPLE`): then in units of those bands. Whatever the
    autofluorescence, a nucleus whose band holds `HOST_BAND_KEEP` times the host bands' HER2 is
    kept too, and so is an object of merged nuclei (`MERGED_NUCLEI`) whose inside does.

    Thresholds sit well below every cancer cell of the tuning slides (the dimmest are about
    1.5x autofluorescence); on held-out slides the screen keeps the dense pass's lesions
    (BENCHMARKS.md).

    Examples
    --------
    >>> x = np.zeros((4, 64, 64), np.float32)
    >>> screen_mask(x, AnalysisConfig(), nuclear_ratio=50.0).any()
    np.False_
    """
    um = model_um_per_px
    ratio = np.expm1(x[:3])
    smooth = max(1, int(round(3.0 / um)))
    dapi = ndi.uniform_filter(ratio[0], smooth)
    labels, n = ndi.label(dapi > config.screen_nucleus_fraction * nuclear_ratio)
    if n == 0:
        return np.zeros(labels.shape, bool)
    band_px = max(1, int(round(4.0 / um)))
    grown = ndi.grey_dilation(labels, size=2 * band_px + 1)
    band = np.where(labels == 0, grown, 0).ravel()
    # Sums over the bands' pixels only (the same sums, in the same order, as over all).
    in_band = np.flatnonzero(band)
    band = band[in_band]
    band_n = np.maximum(np.bincount(band, minlength=n + 1), 1)

    def band_mean(values):
        return np.bincount(band, weights=values.ravel()[in_band], minlength=n + 1) / band_n

    her2 = ndi.uniform_filter(ratio[1], smooth)
    her2_band = band_mean(her2)
    host = np.exp(_mode(np.log(np.maximum(her2_band[1:], 1e-9))))
    if HOST_BAND_MULTIPLE * host < config.screen_her2_ratio:
        scale = config.screen_her2_ratio / (HOST_BAND_MULTIPLE * host)
        her2, her2_band = her2 * scale, her2_band * scale
    coverage = band_mean(her2 > 1.3)
    keep = (her2_band > config.screen_her2_ratio) | (coverage > config.screen_her2_coverage)
    keep |= her2_band > HOST_BAND_KEEP * host
    in_object = np.flatnonzero(labels)
    flat = labels.ravel()[in_object]
    size = np.bincount(flat, minlength=n + 1)

    def object_mean(values):
        sums = np.bincount(flat, weights=values.ravel()[in_object], minlength=n + 1)
        return sums / np.maximum(size, 1)

    # Nuclei of a packed focus merge into one object: its HER2 lies between them, inside it.
    merged = size > MERGED_NUCLEI * np.median(size[1:])
    if merged.any():
        keep |= merged & (object_mean(her2) > HOST_BAND_KEEP * host)
    if x[3].max() > 0:  # Ki67 imaged
        ki67 = ndi.uniform_filter(ratio[2], smooth)
        ki67_band = band_mean(ki67)
        ki67_nucleus = object_mean(ki67)
        keep &= ~(
            (ki67_band > MACROPHAGE_KI67_RATIO)
            & (ki67_band > config.screen_autofluorescence_ratio * her2_band)
            & (ki67_band > MACROPHAGE_OVER_NUCLEUS * ki67_nucleus)
        )
    keep[0] = False
    mask = keep[labels]
    r = max(1, int(round(config.screen_margin_um / um)))
    return ndi.binary_dilation(mask, iterations=r) if mask.any() else mask


#: Share of each cell's pixels, the lowest in Ki67, over which HER2 is compared with
#: autofluorescence: a third kept every HER2+ cell of the held-out families' probe slides where
#: the half lost 12 of about 4,000 (Ki67+ nuclei that DAPI did not show, dense Ki67+ clusters),
#: and took out as many autofluorescent cells (92 of 100).
LOW_KI67_SHARE = 1 / 3


def detect_cells_unet(
    image: np.ndarray,
    *,
    roles: dict[str, int],
    stain: StainLevels,
    pixel_size_um: float,
    config: AnalysisConfig,
    origin_px: tuple[int, int] = (0, 0),
    extra_channels: tuple[tuple[str, int], ...] = (),
    downsample: int = 1,
) -> pd.DataFrame:
    """Find HER2+ cells in one tile with the network.

    Parameters and returned columns are those of `histo.detect.detect_cells`, plus
    ``centre_prob`` and ``cell_prob`` (the network's confidence at the cell's centre).
    `image` may also be level 0's `downsample` x `downsample` block means (a pyramid level
    that holds them), where `downsample` divides the model's whole-number factor; positions
    (`origin_px`, the returned ``x_px``/``y_px``) and `pixel_size_um` stay level 0's.
    """
    from models import load_model
    from models.infer import cells_from_maps, predict_maps, resample_mean, to_model_input

    model = load_model(config.model_path, config.device)
    # ONNX Runtime on the CPU (`models.runtime`) needs no PyTorch; its sessions have their
    # own thread counts.
    torch_runs = not getattr(
        model.inference_net(config.torch_threads, config.runtime), "runs_numpy", False
    )
    out_of_memory: tuple = ()
    if torch_runs:
        import torch

        out_of_memory = (torch.cuda.OutOfMemoryError,)
        if config.torch_threads > 0 and torch.get_num_threads() != config.torch_threads:
            torch.set_num_threads(config.torch_threads)
    factor = model_factor(model.config["input_um_per_px"], pixel_size_um)
    # `image`'s pixels per model pixel (the same as `factor` for level-0 pixels).
    binning = factor / downsample
    if downsample != 1 and binning != int(binning):
        raise ValueError(
            f"pixels binned by {downsample} do not divide the model's factor {factor:g}"
        )
    # Means at the model's resolution, once: the network's input and the measurements.
    blocks = {i: resample_mean(image[i], binning) for i in sorted(set(roles.values()))}
    x = to_model_input(image, roles, stain, binning, blocks=blocks)
    um = model.config["input_um_per_px"]
    screen = None
    if config.screen:
        d = roles["DAPI"]
        nuclear_ratio = stain.nuclear[d] / stain.autofluorescence[d]
        screen = screen_mask(x, config, nuclear_ratio=nuclear_ratio, model_um_per_px=um)
    tile = int(model.config.get("tile_px", 512))

    def run(loaded, batch_size):
        return predict_maps(
            loaded.inference_net(config.torch_threads, config.runtime),
            x,
            loaded.device,
            screen=screen,
            tile=tile,
            batch_size=batch_size,
            channels_last=True,
            float16=config.precision == "auto",
        )

    # What the chunk fell back to, if anything: recorded in summary.json ("fallbacks").
    fallback = None
    try:
        maps = run(model, config.batch_size)
    except out_of_memory:
        import logging

        log = logging.getLogger(__name__)
        log.warning("GPU out of memory with batch %d; retrying with batch 1", config.batch_size)
        torch.cuda.empty_cache()
        fallback = f"GPU out of memory with batch {config.batch_size}: ran with batch 1"
        try:
            maps = run(model, 1)
        except out_of_memory:
            log.warning("GPU out of memory with batch 1; running this chunk on the CPU")
            torch.cuda.empty_cache()
            fallback = "GPU out of memory even with batch 1: ran on the CPU"
            maps = run(load_model(config.model_path, "cpu"), 1)
    has_ki67 = "Ki67" in roles
    # The model's own operating point (calibrated on its validation slides; see its JSON).
    min_centre = float(model.config.get("centre_threshold", 0.3))
    cells = cells_from_maps(
        maps, factor=factor, origin_px=origin_px, has_ki67=has_ki67, min_centre=min_centre
    )
    if len(cells) == 0:
        from .detect import _empty

        empty = _empty(has_ki67, [f"{n}_mean" for n, _ in extra_channels])
        if fallback:
            empty.attrs["fallback"] = fallback
        return empty

    # Cell regions at model resolution: watershed of the cell map from the peaks.
    from skimage.segmentation import watershed

    h, w = x.shape[1:]
    py = np.clip(
        np.rint((cells["y_px"].to_numpy() - origin_px[0] - (factor - 1) / 2) / factor), 0, h - 1
    ).astype(int)
    px_ = np.clip(
        np.rint((cells["x_px"].to_numpy() - origin_px[1] - (factor - 1) / 2) / factor), 0, w - 1
    ).astype(int)
    markers = np.zeros((h, w), np.int32)
    markers[py, px_] = np.arange(1, len(cells) + 1)
    regions = watershed(-maps[1], markers, mask=maps[0] >= 0.5)
    n = len(cells)

    def block(ch):
        b = blocks[ch] if ch in blocks else resample_mean(image[ch], binning)
        return b - np.float32(stain.offset[ch])

    # Every label image below is zero outside the cells: sum over the cells' pixels only.
    in_cells = np.flatnonzero(regions)

    def means(values, labels):
        lab = labels.ravel()[in_cells]
        s = np.bincount(lab, weights=values.ravel()[in_cells], minlength=n + 1)[1:]
        c = np.bincount(lab, minlength=n + 1)[1:]
        return s / np.maximum(c, 1), c

    d_i, h_i = roles["DAPI"], roles["HER2"]
    dapi = block(d_i)
    nucleus = np.where(dapi > config.nucleus_threshold * stain.nuclear[d_i], regions, 0)
    her2 = block(h_i)
    her2_mean, cell_px = means(her2, regions)
    dapi_mean, nuc_px = means(dapi, nucleus)
    area = (factor * pixel_size_um) ** 2
    ki67_mean = her2_nucleus = ki67_cyto = her2_cyto = ki67_low = her2_low_ki67 = np.nan
    ki67_extra = {}
    if has_ki67:
        from scipy import ndimage as ndi

        # Ki67 is nuclear: its mean over the nucleus, or over the cell where no nucleus was seen.
        k = block(roles["Ki67"])
        ki67_mean = np.where(nuc_px > 0, means(k, nucleus)[0], means(k, regions)[0])
        q = KI67_QUANTILES[config.ki67_measure]
        if q is not None:  # over the nucleus, or the cell where no nucleus was seen, as above
            where = np.where(np.r_[False, nuc_px > 0][regions], nucleus, regions)
            ki67_q = _label_quantile(k, where, n, q)[1:].astype(np.float64)
            ki67_extra = {f"ki67_{config.ki67_measure}": np.where(np.isinf(ki67_q), 0.0, ki67_q)}
        her2_nucleus = np.where(nuc_px > 0, means(her2, nucleus)[0], np.nan)
        cyto = np.where(ndi.binary_dilation(nucleus > 0), 0, regions)
        ki67_cyto, cyto_px = means(k, cyto)
        her2_cyto = np.where(cyto_px > 0, means(her2, cyto)[0], np.nan)
        ki67_cyto = np.where(cyto_px > 0, ki67_cyto, np.nan)
        # The third of each cell lowest in Ki67 (away from a Ki67+ nucleus, found or not):
        # what autofluorescence is measured against
        # (`histo.markers.her2_over_autofluorescence`).
        k_cut = _label_quantile(k, regions, n, LOW_KI67_SHARE)
        low_regions = np.where((regions > 0) & (k <= k_cut[regions]), regions, 0)
        her2_low_ki67, low_px = means(her2, low_regions)
        ki67_low = np.where(low_px > 0, means(k, low_regions)[0], np.nan)
        her2_low_ki67 = np.where(low_px > 0, her2_low_ki67, np.nan)
    out = pd.DataFrame(
        {
            "x_px": cells["x_px"].to_numpy(),
            "y_px": cells["y_px"].to_numpy(),
            "her2_mean": her2_mean,
            "her2_ratio": her2_mean / stain.autofluorescence[h_i],
            "her2_coverage": np.nan,
            "ki67_mean": ki67_mean,
            "ki67_pos": cells["ki67_pos"].array,
            "dapi_mean": dapi_mean,
            "her2_nucleus_mean": her2_nucleus,
            "ki67_cytoplasm_mean": ki67_cyto,
            "her2_cytoplasm_mean": her2_cyto,
            "her2_low_ki67_mean": her2_low_ki67,
            "ki67_low_mean": ki67_low,
            "nucleus_area_um2": nuc_px * area,
            "cell_area_um2": cell_px * area,
            **ki67_extra,
        }
    )
    for name, ci in extra_channels:
        out[f"{name}_mean"] = means(block(ci), regions)[0]
    out["centre_prob"] = cells["centre_prob"].to_numpy()
    out["cell_prob"] = cells["cell_prob"].to_numpy()
    if fallback:
        out.attrs["fallback"] = fallback
    return out
