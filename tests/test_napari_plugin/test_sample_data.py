"""Sample data: the two synthetic sections, generated once into the cache, as image layers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from histo._version import __version__
from histo.synthetic._api import SAMPLE_SIZE_PX, SAMPLE_SLIDES
from napari_plugin import _sample_data
from napari_plugin._sample_data import cache_dir, control_section, infected_section


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module, so each slide is generated once."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LUNGMETS_CACHE", str(root))
        yield root / "sample_data" / __version__


def test_cache_folder_follows_lungmets_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LUNGMETS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a" / "sample_data" / __version__
    monkeypatch.delenv("LUNGMETS_CACHE")
    assert cache_dir() == tmp_path / "b" / "lungmets" / "sample_data" / __version__


def test_sections_are_generated_once_and_reused(cache, monkeypatch):
    infected, control = infected_section(), control_section()
    names = [name for name, *_ in SAMPLE_SLIDES]
    assert sorted(p.name for p in cache.glob("*.ome.tif")) == sorted(names)
    assert not list(cache.glob(".*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr("histo.synthetic.generate_slide", fail)
    again = infected_section()
    assert [k["name"] for _, k, _ in again] == [k["name"] for _, k, _ in infected]
    assert [k["name"] for _, k, _ in control] == [
        f"lung_PBS_d15 {c}" for c in ("DAPI", "HER2", "Ki67")
    ]


def test_sample_slides_are_those_of_the_generator(cache):
    """Same size, channels and pixels as `lungmets synth sample-data` writes (same seeds)."""
    from histo.synthetic import generate_slide

    for name, group, dpi, seed in SAMPLE_SLIDES:
        cached = tifffile.imread(_sample_data.sample_slide_path(group))
        assert cached.shape == (3, SAMPLE_SIZE_PX[1], SAMPLE_SIZE_PX[0])
        if group == "IAV":  # one is enough to show the seeds are the generator's
            ref = cache.parent / "ref" / name
            generate_slide(ref, size_px=SAMPLE_SIZE_PX, group=group, dpi=dpi, seed=seed)
            np.testing.assert_array_equal(cached, tifffile.imread(ref))


def test_an_unknown_group_is_refused():
    with pytest.raises(ValueError, match="no sample slide"):
        _sample_data.sample_slide_path("XYZ")


@pytest.mark.napari
@pytest.mark.parametrize(
    ("key", "stem"), [("infected", "lung_IAV_d15"), ("control", "lung_PBS_d15")]
)
def test_open_sample_gives_three_multiscale_channels_in_micrometres(
    make_napari_viewer, cache, key, stem
):
    from napari.layers import Image

    viewer = make_napari_viewer()
    viewer.open_sample("lungmets", key)
    assert [layer.name for layer in viewer.layers] == [
        f"{stem} {c}" for c in ("DAPI", "HER2", "Ki67")
    ]
    assert all(isinstance(layer, Image) for layer in viewer.layers)
    assert [layer.colormap.name for layer in viewer.layers] == ["blue", "green", "magenta"]
    for layer in viewer.layers:
        assert layer.multiscale
        assert tuple(layer.scale) == (0.5, 0.5)
        assert layer.data[0].shape == (SAMPLE_SIZE_PX[1], SAMPLE_SIZE_PX[0])
