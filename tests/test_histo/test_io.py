"""Tests of `histo.io.open_slide` and `histo.io.Slide` on real files.

Every input is a real file written with tifffile or zarr into a temporary folder (or a slide
from `histo.synthetic`); nothing is mocked. Error tests check that the message is an
`InputError` that names the file.
"""

from __future__ import annotations

import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from histo.errors import InputError
from histo.io import binned_level, downsample_mean, open_slide, slide_name, write_ome_tiff
from histo.synthetic import generate_slide, slide_stem

RNG = np.random.default_rng(7)


# -- writers -----------------------------------------------------------------------------------


def random_image(c: int, h: int, w: int, dtype=np.uint16) -> np.ndarray:
    return RNG.integers(0, 4000, (c, h, w)).astype(dtype)


def write_ome(
    path: Path,
    data: np.ndarray,
    names: list[str] | None,
    *,
    pixel_size_um: float | None = 0.5,
    unit: str = "µm",
    axes: str = "CYX",
    tile: tuple[int, int] | None = (256, 256),
) -> Path:
    metadata: dict = {"axes": axes}
    if names is not None:
        metadata["Channel"] = {"Name": names}
    if pixel_size_um is not None:
        metadata.update(
            PhysicalSizeX=pixel_size_um,
            PhysicalSizeY=pixel_size_um,
            PhysicalSizeXUnit=unit,
            PhysicalSizeYUnit=unit,
        )
    tifffile.imwrite(path, data, ome=True, photometric="minisblack", tile=tile, metadata=metadata)
    return path


def write_ome_zarr(
    path: Path,
    levels: list[np.ndarray],
    names: list[str],
    *,
    scale: float = 0.5,
    unit: str = "micrometer",
    version: str = "0.4",
) -> Path:
    """OME-Zarr as NGFF 0.4 (Zarr v2, axes c, y, x) or 0.5 (Zarr v3, axes t, c, z, y, x)."""
    root = zarr.open_group(path, mode="w", zarr_format=2 if version == "0.4" else 3)
    space = [
        {"name": "y", "type": "space", "unit": unit},
        {"name": "x", "type": "space", "unit": unit},
    ]
    if version == "0.4":
        axes = [{"name": "c", "type": "channel"}, *space]
    else:
        axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}]
        axes += [{"name": "z", "type": "space", "unit": unit}, *space]
    datasets = []
    for i, level in enumerate(levels):
        data = level if version == "0.4" else level[np.newaxis, :, np.newaxis]
        root.create_array(str(i), data=data, chunks=(1,) * (data.ndim - 2) + (256, 256))
        factor = scale * 2**i
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * (data.ndim - 2) + [factor, factor]}
                ],
            }
        )
    multiscale = {"name": path.name, "axes": axes, "datasets": datasets}
    omero = {"channels": [{"label": n, "color": "FFFFFF"} for n in names]}
    if version == "0.4":
        root.attrs.update({"multiscales": [{"version": "0.4", **multiscale}], "omero": omero})
    else:
        root.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}})
    return path


def write_svs_like(path: Path, rgb: np.ndarray, mpp: float = 0.252) -> Path:
    """Baseline, thumbnail and one reduced level, with Aperio descriptions, as SVS files have."""
    h, w, _ = rgb.shape
    desc = f"Aperio Image Library v12.0.15 \n{w}x{h} [0,0 {w}x{h}] (256x256) RGB|AppMag = 20"
    with tifffile.TiffWriter(path) as tw:
        opts = {"photometric": "rgb", "metadata": None}
        tw.write(rgb, tile=(256, 256), description=f"{desc}|MPP = {mpp}", **opts)
        tw.write(rgb[::8, ::8].copy(), description=f"{desc} -> thumbnail", **opts)
        tw.write(rgb[::4, ::4].copy(), tile=(256, 256), description=f"{desc} -> level", **opts)
    return path


def assert_input_error(path, *fragments: str, **kwargs) -> str:
    """Open `path`; assert an InputError (not a library's) naming the file and `fragments`."""
    with pytest.raises(InputError) as info:
        open_slide(path, **kwargs)
    message = str(info.value)
    assert type(info.value) is InputError
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- generated slides ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "lung.ome.tif"
    generate_slide(path, size_px=(1280, 1024), group="IAV", dpi=15, seed=3, labels=False)
    return path


@pytest.fixture(scope="module")
def generated_pixels(generated) -> list[np.ndarray]:
    return [tifffile.imread(generated, level=i) for i in range(2)]


def test_generated_slide_opens_lazily_with_levels_channels_and_pixel_size(generated):
    slide = open_slide(generated)
    assert slide.format == "ome-tiff"
    assert slide.path == generated.resolve()
    assert slide.channel_names == ("DAPI", "HER2", "Ki67")
    assert slide.roles == {"DAPI": 0, "HER2": 1, "Ki67": 2}
    assert slide.extra_channels == ()
    assert slide.pixel_size_um == 0.5
    assert slide.shape_px == (1024, 1280)
    assert slide.n_levels == 2
    assert slide.downsamples == (1.0, 2.0)
    assert [lev.shape for lev in slide.levels] == [(3, 1024, 1280), (3, 512, 640)]
    for level in slide.levels:
        assert isinstance(level, da.Array)
        assert level.dtype == np.uint16
        # lazy: see test_corrupt_tile_is_found_at_first_read_not_at_open
    # chunks follow the 512 px tiles of the generator and hold all channels
    assert slide.levels[0].chunks == ((3,), (512, 512), (512, 512, 256))


def test_read_region_and_dask_levels_equal_tifffile(generated, generated_pixels):
    slide = open_slide(generated)
    full0, full1 = generated_pixels
    np.testing.assert_array_equal(
        slide.read_region(0, 100, 700, 300, 1250), full0[:, 100:700, 300:1250]
    )
    np.testing.assert_array_equal(slide.read_region(1, 0, 512, 600, 640), full1[:, :, 600:640])
    np.testing.assert_array_equal(slide.levels[1].compute(), full1)
    np.testing.assert_array_equal(
        slide.levels[0][:, 500:530, 1000:1100].compute(), full0[:, 500:530, 1000:1100]
    )


def test_concurrent_read_region_from_two_threads_returns_correct_pixels(
    generated, generated_pixels
):
    slide = open_slide(generated)
    full0 = generated_pixels[0]
    rng = np.random.default_rng(0)
    regions = []
    for _ in range(40):
        y0, x0 = int(rng.integers(0, 900)), int(rng.integers(0, 1150))
        regions.append((y0, y0 + int(rng.integers(1, 124)), x0, x0 + int(rng.integers(1, 130))))
    threads = set()

    def read(region):
        threads.add(threading.get_ident())
        y0, y1, x0, x1 = region
        return slide.read_region(0, y0, y1, x0, x1)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(read, regions))
    for (y0, y1, x0, x1), got in zip(regions, results, strict=True):
        np.testing.assert_array_equal(got, full0[:, y0:y1, x0:x1])
    assert len(threads) == 2


def test_dask_threaded_compute_equals_tifffile(generated, generated_pixels):
    slide = open_slide(generated)
    got = slide.levels[0].rechunk((3, 256, 256)).compute(scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(got, generated_pixels[0])


def test_opening_again_is_cached_and_a_changed_file_is_reopened(tmp_path):
    path = write_ome(tmp_path / "a.ome.tif", random_image(2, 64, 64), ["DAPI", "HER2"])
    first = open_slide(path)
    assert open_slide(path).levels[0] is first.levels[0]
    assert open_slide(path, pixel_size_um=0.25).pixel_size_um == 0.25
    new = random_image(2, 64, 80)
    write_ome(path, new, ["DAPI", "HER2"])
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    again = open_slide(path)
    assert again.shape_px == (64, 80)
    np.testing.assert_array_equal(again.read_region(0, 0, 64, 0, 80), new)


def test_slide_pickles_by_reopening_the_file(generated):
    slide = open_slide(generated, pixel_size_um=0.25)
    copy = pickle.loads(pickle.dumps(slide))
    assert copy.roles == slide.roles and copy.pixel_size_um == 0.25
    np.testing.assert_array_equal(
        copy.read_region(1, 0, 10, 0, 10), slide.read_region(1, 0, 10, 0, 10)
    )
    level = pickle.loads(pickle.dumps(slide.levels[1][:, :20, :20]))
    np.testing.assert_array_equal(level.compute(), slide.read_region(1, 0, 20, 0, 20))


def test_slide_without_ki67_has_no_ki67_role(tmp_path):
    path = tmp_path / "noki.ome.tif"
    generate_slide(path, size_px=(512, 512), group="PBS", seed=2, ki67=False, labels=False)
    slide = open_slide(path)
    assert slide.channel_names == ("DAPI", "HER2")
    assert slide.roles == {"DAPI": 0, "HER2": 1}
    assert slide.n_levels == 1  # below 1024 px: no lower level


def test_read_region_outside_the_level_raises_value_error(generated):
    slide = open_slide(generated)
    with pytest.raises(ValueError, match="outside"):
        slide.read_region(0, 0, 1025, 0, 10)
    with pytest.raises(ValueError, match="outside"):
        slide.read_region(1, -1, 10, 0, 10)
    with pytest.raises(ValueError, match="level 2"):
        slide.read_region(2, 0, 1, 0, 1)
    assert slide.read_region(0, 5, 5, 0, 3).shape == (3, 0, 3)


def test_level_for_pixel_size_picks_the_coarsest_level_fine_enough(generated):
    slide = open_slide(generated)
    assert slide.level_for_pixel_size(0.3) == 0
    assert slide.level_for_pixel_size(0.5) == 0
    assert slide.level_for_pixel_size(0.99) == 0
    assert slide.level_for_pixel_size(1.0) == 1
    assert slide.level_for_pixel_size(8.0) == 1


# -- other layouts -------------------------------------------------------------------------------


def test_pyramid_stored_as_separate_series_opens_with_all_levels(tmp_path):
    path = tmp_path / "series.ome.tif"
    image = random_image(3, 600, 800)
    levels = [image, downsample_mean(image), downsample_mean(downsample_mean(image))]
    with tifffile.TiffWriter(path, ome=True) as tw:
        for i, level in enumerate(levels):
            meta = {"axes": "CYX"}
            if i == 0:
                meta.update(Channel={"Name": ["DAPI", "HER2", "Ki67"]}, PhysicalSizeX=0.5)
            tw.write(level, tile=(256, 256), photometric="minisblack", metadata=meta)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 3  # the layout under test
    slide = open_slide(path)
    assert slide.n_levels == 3
    assert slide.downsamples == (1.0, 2.0, 4.0)
    assert slide.pixel_size_um == 0.5
    for i, level in enumerate(levels):
        np.testing.assert_array_equal(slide.levels[i].compute(), level)
        np.testing.assert_array_equal(
            slide.read_region(i, 10, 100, 20, 140), level[:, 10:100, 20:140]
        )


def test_single_level_tiff_gets_lazy_block_mean_levels(tmp_path):
    path = tmp_path / "plain.tif"
    image = random_image(3, 1030, 2101)
    tifffile.imwrite(
        path,
        image,
        photometric="minisblack",
        tile=(256, 256),
        resolution=(2e4, 2e4),  # pixels per cm: 0.5 um
        resolutionunit="CENTIMETER",
    )
    slide = open_slide(path, channels="DAPI,HER2,Ki67")
    assert slide.format == "tiff"
    assert slide.pixel_size_um == pytest.approx(0.5)
    assert slide.channel_names == ("DAPI", "HER2", "Ki67")
    # halves until the largest side is below 1024 px, as pyramid_levels does
    assert [lev.shape for lev in slide.levels] == [(3, 1030, 2101), (3, 515, 1050), (3, 257, 525)]
    assert all(isinstance(lev, da.Array) for lev in slide.levels)
    assert all(c % 256 == 0 for c in slide.levels[0].chunks[2][:-1])  # whole tiles per chunk
    # Expected levels computed here, independently of histo.io's own downsampling.
    level1 = _block_mean(image, 2)
    level2 = _block_mean(level1, 2)  # each level from the one above, rounded at each
    np.testing.assert_array_equal(slide.levels[1].compute(), level1)
    np.testing.assert_array_equal(slide.levels[2].compute(), level2)
    np.testing.assert_array_equal(slide.read_region(1, 3, 301, 7, 777), level1[:, 3:301, 7:777])
    np.testing.assert_array_equal(slide.read_region(2, 100, 257, 500, 525), level2[:, 100:, 500:])
    # a block mean rounds to the nearest integer
    block = image[:, :2, :2].astype(np.float64).mean(axis=(1, 2))
    np.testing.assert_array_equal(level1[:, 0, 0], np.rint(block))


def test_stripped_tiff_reads_like_a_tiled_one(tmp_path):
    path = tmp_path / "strips.tif"
    image = random_image(2, 1100, 700)
    tifffile.imwrite(path, image, photometric="minisblack", rowsperstrip=7)
    slide = open_slide(path, channels=["DAPI", "HER2"], pixel_size_um=0.65)
    assert slide.n_levels == 2
    assert slide.levels[0].chunks[1][0] % 7 == 0  # whole strips per chunk
    np.testing.assert_array_equal(slide.read_region(0, 3, 1050, 11, 690), image[:, 3:1050, 11:690])
    np.testing.assert_array_equal(slide.levels[0].compute(), image)
    np.testing.assert_array_equal(slide.levels[1].compute(), _block_mean(image, 2))


def _block_mean(image: np.ndarray, n: int) -> np.ndarray:
    """Means of n x n blocks (edges cropped), rounded half to even, in float64: the expected
    value of a stored level, written without histo.io."""
    c, h, w = image.shape
    blocks = image[:, : h // n * n, : w // n * n].astype(np.float64)
    means = blocks.reshape(c, h // n, n, w // n, n).mean(axis=(2, 4))
    return np.rint(means).astype(image.dtype)


@pytest.mark.parametrize(
    ("version", "unit", "scale", "expected_um"),
    [("0.4", "micrometer", 0.5, 0.5), ("0.5", "nanometer", 325.0, 0.325)],
)
def test_ome_zarr_opens_with_pixel_size_names_and_pixels(
    tmp_path, version, unit, scale, expected_um
):
    image = random_image(3, 700, 900)
    levels = [image, downsample_mean(image), downsample_mean(downsample_mean(image))]
    path = write_ome_zarr(
        tmp_path / "slide.ome.zarr",
        levels,
        ["Hoechst", "HER2", "Ki67"],
        scale=scale,
        unit=unit,
        version=version,
    )
    slide = open_slide(path)
    assert slide.format == "ome-zarr"
    assert slide.pixel_size_um == pytest.approx(expected_um)
    assert slide.channel_names == ("Hoechst", "HER2", "Ki67")
    assert slide.roles == {"DAPI": 0, "HER2": 1, "Ki67": 2}
    assert slide.downsamples == (1.0, 2.0, 4.0)
    for i, level in enumerate(levels):
        np.testing.assert_array_equal(slide.levels[i].compute(), level)
    np.testing.assert_array_equal(
        slide.read_region(0, 250, 600, 10, 890), image[:, 250:600, 10:890]
    )
    assert slide_name(path) == "slide"


def test_svs_rgb_needs_a_channel_mapping_and_then_opens(tmp_path):
    rgb = RNG.integers(0, 255, (1024, 1536, 3), dtype=np.uint8)
    path = write_svs_like(tmp_path / "he.svs", rgb)
    message = assert_input_error(path, "--channels", "immunofluorescence", "R, G, B")
    assert "brightfield" in message
    slide = open_slide(path, channels=["DAPI", "HER2", "-"])
    assert slide.format == "svs"
    assert slide.channel_names == ("DAPI", "HER2", "B")
    assert slide.roles == {"DAPI": 0, "HER2": 1}
    assert slide.extra_channels == (("B", 2),)
    assert slide.pixel_size_um == pytest.approx(0.252)
    assert slide.n_levels == 2 and slide.downsamples == (1.0, 4.0)
    np.testing.assert_array_equal(
        slide.read_region(0, 100, 300, 200, 900), np.moveaxis(rgb[100:300, 200:900], 2, 0)
    )
    np.testing.assert_array_equal(slide.levels[1].compute(), np.moveaxis(rgb[::4, ::4], 2, 0))


# -- channels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ["Hoechst 33342", "ErbB2", "MKI67"],
        ["DAPI (405)", "HER2-AF488", "Ki-67 (AF647)"],
        ["nuclei", "anti-Neu", "ki67"],
        ["dapi", "CD340", "MKI67-AF555"],
    ],
)
def test_channel_aliases_find_the_roles(tmp_path, names):
    path = write_ome(
        tmp_path / "alias.ome.tif", random_image(3, 32, 32)[[1, 2, 0]], names[1:] + names[:1]
    )
    slide = open_slide(path)
    assert slide.roles == {"DAPI": 2, "HER2": 0, "Ki67": 1}
    assert slide.channel_names == (*names[1:], names[0])


def test_user_maps_roles_by_name_and_by_index(tmp_path):
    path = write_ome(tmp_path / "cy.ome.tif", random_image(3, 32, 32), ["CY3", "CY5", "FITC"])
    by_spec = open_slide(path, channels="DAPI=CY3,HER2=2")
    assert by_spec.roles == {"DAPI": 0, "HER2": 2}
    assert by_spec.channel_names == ("CY3", "CY5", "FITC")
    assert by_spec.extra_channels == (("CY5", 1),)
    by_dict = open_slide(path, channels={"HER2": "cy5", "DAPI": 0, "Ki67": "FITC"})
    assert by_dict.roles == {"DAPI": 0, "HER2": 1, "Ki67": 2}
    in_order = open_slide(path, channels="HER2, DAPI")
    assert in_order.roles == {"DAPI": 1, "HER2": 0}
    assert in_order.channel_names == ("HER2", "DAPI", "FITC")
    named = open_slide(path, channels=["DAPI", "HER2", "CD4"])
    assert named.extra_channels == (("CD4", 2),)


def test_a_mapping_fills_only_the_missing_role(tmp_path):
    path = write_ome(tmp_path / "m.ome.tif", random_image(3, 32, 32), ["DAPI", "CY5", "CY3"])
    assert open_slide(path, channels="HER2=CY5").roles == {"DAPI": 0, "HER2": 1}


def test_skipping_a_position_drops_its_role(tmp_path):
    path = write_ome(tmp_path / "s.ome.tif", random_image(3, 32, 32), ["DAPI", "HER2", "Ki67"])
    slide = open_slide(path, channels="DAPI,HER2,-")
    assert slide.roles == {"DAPI": 0, "HER2": 1}
    assert slide.extra_channels == (("Ki67", 2),)


def test_extra_channels_are_listed(tmp_path):
    path = write_ome(
        tmp_path / "x.ome.tif", random_image(4, 32, 32), ["DAPI", "HER2", "Ki67", "CD4"]
    )
    slide = open_slide(path)
    assert slide.roles == {"DAPI": 0, "HER2": 1, "Ki67": 2}
    assert slide.extra_channels == (("CD4", 3),)


@pytest.mark.parametrize(
    ("channels", "fragments"),
    [
        ("DAPI=CY3,HER2=CY9", ["no channel named CY9", "CY3, CY5, FITC"]),
        ("DAPI=0,HER2=3", ["no channel 3"]),
        ("DAPI=0,CD8=1", ["unknown role 'CD8'"]),
        ("DAPI=0,HER2=0", ["both DAPI and HER2"]),
        ("DAPI,HER2,Ki67,CD4", ["4 channels", "has 3"]),
        ("DAPI,HER2=1", ["mixes"]),
        ("DAPI,DAPI", ["DAPI twice"]),
    ],
)
def test_bad_channel_mappings_are_explained(tmp_path, channels, fragments):
    path = write_ome(tmp_path / "cy.ome.tif", random_image(3, 32, 32), ["CY3", "CY5", "FITC"])
    assert_input_error(path, "--channels", *fragments, channels=channels)


def test_missing_her2_lists_the_channels_found(tmp_path):
    path = write_ome(tmp_path / "noher2.ome.tif", random_image(3, 32, 32), ["DAPI", "CY5", "CY3"])
    message = assert_input_error(
        path, "no channel named HER2", "(found: DAPI, CY5, CY3)", "--channels"
    )
    assert "--channels HER2=CY5" in message


# -- pixel size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "expected"), [(500.0, "nm", 0.5), (0.00065, "mm", 0.65), (0.325, "um", 0.325)]
)
def test_ome_pixel_size_units_are_converted(tmp_path, value, unit, expected):
    path = write_ome(
        tmp_path / "u.ome.tif",
        random_image(2, 32, 32),
        ["DAPI", "HER2"],
        pixel_size_um=value,
        unit=unit,
    )
    assert open_slide(path).pixel_size_um == pytest.approx(expected)


def test_tiff_resolution_in_inches_gives_the_pixel_size(tmp_path):
    path = tmp_path / "inch.tif"
    tifffile.imwrite(
        path,
        random_image(2, 32, 32),
        photometric="minisblack",
        resolution=(25400 / 0.4, 25400 / 0.4),
        resolutionunit="INCH",
    )
    assert open_slide(path, channels="DAPI,HER2").pixel_size_um == pytest.approx(0.4)


def test_pixel_size_argument_overrides_the_metadata(generated, tmp_path):
    assert open_slide(generated, pixel_size_um=0.25).pixel_size_um == 0.25
    path = write_ome(
        tmp_path / "nopx.ome.tif", random_image(2, 32, 32), ["DAPI", "HER2"], pixel_size_um=None
    )
    assert open_slide(path, pixel_size_um=0.325).pixel_size_um == 0.325


def test_missing_pixel_size_asks_for_the_option(tmp_path):
    path = write_ome(
        tmp_path / "nopx.ome.tif", random_image(2, 32, 32), ["DAPI", "HER2"], pixel_size_um=None
    )
    assert_input_error(path, "no pixel size", "--pixel-size-um")
    plain = tmp_path / "plain.tif"  # default resolution: 1 pixel per (no) unit
    tifffile.imwrite(plain, random_image(2, 32, 32), photometric="minisblack")
    assert_input_error(plain, "no pixel size", "--pixel-size-um", channels="DAPI,HER2")


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), "abc"])
def test_a_bad_pixel_size_argument_is_refused(generated, bad):
    assert_input_error(generated, "--pixel-size-um", pixel_size_um=bad)


# -- bad files -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "nope.ome.tif", "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ome.tif"
    path.write_bytes(b"")
    assert_input_error(path, "empty")


def test_png_renamed_tif(tmp_path):
    import imagecodecs

    path = tmp_path / "picture.tif"
    path.write_bytes(imagecodecs.png_encode(np.zeros((8, 8), np.uint8)))
    assert_input_error(path, "not a TIFF", "PNG", "OME-TIFF")


def test_text_file_renamed_tif(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("slide list\nlung1\n")
    assert_input_error(path, "not a TIFF", "text file")


def test_folder_that_is_not_ome_zarr(tmp_path):
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert_input_error(empty, "OME-Zarr")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w").create_array("0", data=random_image(2, 16, 16))
    assert_input_error(plain, "multiscales")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_ome_tiff_is_refused_at_open(generated, tmp_path, keep):
    path = tmp_path / "cut.ome.tif"
    path.write_bytes(generated.read_bytes())
    os.truncate(path, int(path.stat().st_size * keep))
    assert_input_error(path, "truncated")


def test_corrupt_tile_is_found_at_first_read_not_at_open(generated, tmp_path):
    path = tmp_path / "badtile.ome.tif"
    path.write_bytes(generated.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].pages[1]  # HER2, level 0
        offset, count = page.dataoffsets[1], page.databytecounts[1]  # tile y 0, x 512:1024
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    slide = open_slide(path)  # lazy: the bad tile is not read
    np.testing.assert_array_equal(
        slide.read_region(0, 600, 700, 0, 100), tifffile.imread(generated)[:, 600:700, :100]
    )
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        slide.read_region(0, 0, 10, 600, 610)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match="truncated or corrupt"):
        slide.levels[0][:, :10, 600:610].compute()


def test_z_stack_is_refused(tmp_path):
    path = write_ome(
        tmp_path / "z.ome.tif",
        random_image(10, 32, 32).reshape(5, 2, 32, 32),
        ["DAPI", "HER2"],
        axes="ZCYX",
    )
    assert_input_error(path, "Z stack", "5 planes")


def test_time_series_is_refused(tmp_path):
    path = write_ome(
        tmp_path / "t.ome.tif",
        random_image(8, 32, 32).reshape(4, 2, 32, 32),
        ["DAPI", "HER2"],
        axes="TCYX",
    )
    assert_input_error(path, "time series", "4 time points")


def test_single_plane_z_and_t_axes_are_accepted(tmp_path):
    image = random_image(2, 32, 32)
    path = write_ome(
        tmp_path / "tz.ome.tif", image.reshape(1, 1, 2, 32, 32), ["DAPI", "HER2"], axes="TZCYX"
    )
    np.testing.assert_array_equal(open_slide(path).read_region(0, 0, 32, 0, 32), image)


def test_two_dimensional_single_channel_image_is_refused(tmp_path):
    path = tmp_path / "gray.tif"
    tifffile.imwrite(
        path, random_image(1, 64, 64)[0], resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    assert_input_error(path, "single-channel", "DAPI and a HER2")


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("a/lung_1.ome.tif", "lung_1"),
        ("lung.OME.TIFF", "lung"),
        ("lung.tif", "lung"),
        ("scan.svs", "scan"),
        ("scan.ndpi", "scan"),
        ("/d/slide.ome.zarr", "slide"),
        ("slide.zarr", "slide"),
        ("slide.v2.png", "slide.v2"),
    ],
)
def test_slide_name_strips_slide_suffixes(path, name):
    assert slide_name(path) == name
    assert slide_stem(path) == name


# -- pyramid levels that hold block means ------------------------------------------------------


NAMES = ["DAPI", "HER2", "Ki67"]


def _lumpy_image(h: int, w: int, dtype=np.uint16) -> np.ndarray:
    """Three channels of noisy blobs: pixels differ within every 2 x 2 block."""
    from scipy import ndimage as ndi

    base = ndi.gaussian_filter(RNG.random((3, h, w)), (0, 6, 6)) * 40000
    img = base + RNG.normal(0, 30, base.shape)
    return np.clip(img, 0, 65000).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_a_pyramid_of_block_means_is_found_for_the_models_factor(tmp_path, dtype):
    img = _lumpy_image(1024, 1024, dtype)
    levels = [img, downsample_mean(img, 2), downsample_mean(downsample_mean(img, 2), 2)]
    path = write_ome_tiff(tmp_path / "s.ome.tif", levels, channel_names=NAMES, pixel_size_um=0.25)
    slide = open_slide(path)
    regions = [(100, 612, 200, 712), (500, 1024, 0, 512)]
    assert binned_level(slide, 4, regions) == 2  # each 2x level built from the rounded one
    assert binned_level(slide, 2, regions) == 1
    assert binned_level(slide, 1, regions) == 0
    assert binned_level(slide, 3, regions) == 0  # no level divides it
    assert binned_level(slide, 4, []) == 0  # nothing to check on


def test_a_subsampled_or_flat_pyramid_is_not_read_for_block_means(tmp_path):
    img = _lumpy_image(1024, 1024)
    sub_levels = [img, img[:, ::2, ::2].copy()]
    sub = write_ome_tiff(
        tmp_path / "sub.ome.tif", sub_levels, channel_names=NAMES, pixel_size_um=0.5
    )
    regions = [(0, 512, 0, 512), (512, 1024, 512, 1024)]
    assert binned_level(open_slide(sub), 2, regions) == 0
    # Glass-like flat pixels: a subsampled level would look the same, so it cannot be told.
    flat = np.full((3, 1024, 1024), 100, np.uint16)
    flat_levels = [flat, flat[:, ::2, ::2].copy()]
    flat_path = write_ome_tiff(
        tmp_path / "flat.ome.tif", flat_levels, channel_names=NAMES, pixel_size_um=0.5
    )
    assert binned_level(open_slide(flat_path), 2, regions) == 0
