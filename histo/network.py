"""The network detector (``method="unet"``): one tile of pixels in, a table of HER2+ cells out.

The same contract as `histo.detect.detect_cells`, so `histo.pipeline.analyze_tile` calls either.
The network (``models``) runs at its own resolution (1 um/px for the shipped model): the tile is
block-averaged to it, normalised by the slide's autofluorescence, and the network's maps are
turned into cells at the peaks of its nucleus-centre map. Each cell is then measured on the
block-averaged pixels: its region (a watershed of the cell map from the peaks), its HER2, its
nucleus (DAPI above the slide's nuclear threshold) and Ki67.

Screening: disseminated cells are rare, so most of a lung is empty alveoli. With ``screen=True``
the network only runs on its tiles that hold HER2 signal clearly above the autofluorescence
(the cheap test below); every HER2+ cell is such signal, so the screen loses nothing the dense
pass would find (measured in BENCHMARKS.md).

torch is imported only inside these functions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .config import AnalysisConfig
from .tissue import StainLevels


def model_factor(model_um_per_px: float, pixel_size_um: float, path="") -> int:
    """Integer block size that brings the slide's pixels to the model's resolution."""
    from .errors import InputError

    f = max(1, int(round(model_um_per_px / pixel_size_um)))
    if abs(f * pixel_size_um - model_um_per_px) > 0.25 * model_um_per_px:
        raise InputError(
            f"{path}: pixel size {pixel_size_um} um cannot be brought to the model's "
            f"{model_um_per_px} um/px by whole-pixel binning; use --method classical or "
            "--pixel-size-um if the metadata is wrong"
        )
    return f


def screen_mask(her2_ratio: np.ndarray, config: AnalysisConfig, model_um_per_px: float):
    """Where the network should look: HER2, averaged over about a cell (9 um), above
    `screen_her2_ratio` x autofluorescence, grown by `screen_margin_um`.

    On validation slides this keeps every true cancer cell (the dimmest are about 2x the
    autofluorescence) while covering 2-7% of the field.
    """
    size = max(1, int(round(9.0 / model_um_per_px)))
    bright = ndi.uniform_filter(her2_ratio, size) > config.screen_her2_ratio
    r = max(1, int(round(config.screen_margin_um / model_um_per_px)))
    return ndi.binary_dilation(bright, iterations=r) if bright.any() else bright


def detect_cells_unet(
    image: np.ndarray,
    *,
    roles: dict[str, int],
    stain: StainLevels,
    pixel_size_um: float,
    config: AnalysisConfig,
    origin_px: tuple[int, int] = (0, 0),
    extra_channels: tuple[tuple[str, int], ...] = (),
) -> pd.DataFrame:
    """Find HER2+ cells in one tile with the network.

    Parameters and returned columns are those of `histo.detect.detect_cells`, plus
    ``centre_prob`` and ``cell_prob`` (the network's confidence at the cell's centre).
    """
    import torch

    from models import load_model
    from models.infer import cells_from_maps, predict_maps, to_model_input

    if config.torch_threads > 0 and torch.get_num_threads() != config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    model = load_model(config.model_path, config.device)
    factor = model_factor(model.config["input_um_per_px"], pixel_size_um)
    x = to_model_input(image, roles, stain, factor)
    her2_ratio = np.expm1(x[1])
    um = model.config["input_um_per_px"]
    screen = screen_mask(her2_ratio, config, um) if config.screen else None
    tile = int(model.config.get("tile_px", 512))
    try:
        maps = predict_maps(
            model.net, x, model.device, screen=screen, tile=tile, batch_size=config.batch_size
        )
    except torch.cuda.OutOfMemoryError:
        import logging

        log = logging.getLogger(__name__)
        log.warning("GPU out of memory with batch %d; retrying with batch 1", config.batch_size)
        torch.cuda.empty_cache()
        try:
            maps = predict_maps(model.net, x, model.device, screen=screen, tile=tile, batch_size=1)
        except torch.cuda.OutOfMemoryError:
            log.warning("GPU out of memory with batch 1; running this chunk on the CPU")
            torch.cuda.empty_cache()
            cpu = load_model(config.model_path, "cpu")
            maps = predict_maps(cpu.net, x, cpu.device, screen=screen, tile=tile, batch_size=1)
    has_ki67 = "Ki67" in roles
    cells = cells_from_maps(maps, factor=factor, origin_px=origin_px, has_ki67=has_ki67)
    if len(cells) == 0:
        from .detect import _empty

        return _empty(has_ki67, [f"{n}_mean" for n, _ in extra_channels])

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
        c = image[ch, : h * factor, : w * factor].astype(np.float32)
        return c.reshape(h, factor, w, factor).mean(axis=(1, 3)) - stain.offset[ch]

    def means(values, labels):
        s = np.bincount(labels.ravel(), weights=values.ravel(), minlength=n + 1)[1:]
        c = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        return s / np.maximum(c, 1), c

    d_i, h_i = roles["DAPI"], roles["HER2"]
    dapi = block(d_i)
    nucleus = np.where(dapi > config.nucleus_threshold * stain.nuclear[d_i], regions, 0)
    her2_mean, cell_px = means(block(h_i), regions)
    dapi_mean, nuc_px = means(dapi, nucleus)
    area = (factor * pixel_size_um) ** 2
    ki67_mean = np.nan
    if has_ki67:
        # Ki67 is nuclear: its mean over the nucleus, or over the cell where no nucleus was seen.
        k = block(roles["Ki67"])
        ki67_mean = np.where(nuc_px > 0, means(k, nucleus)[0], means(k, regions)[0])
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
            "nucleus_area_um2": nuc_px * area,
            "cell_area_um2": cell_px * area,
        }
    )
    for name, ci in extra_channels:
        out[f"{name}_mean"] = means(block(ci), regions)[0]
    out["centre_prob"] = cells["centre_prob"].to_numpy()
    out["cell_prob"] = cells["cell_prob"].to_numpy()
    return out
