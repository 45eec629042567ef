"""What the plugin's GUI tests share: one analysed slide (classical detector, fast)."""

from __future__ import annotations

import pytest

from histo.batch import run_batch
from histo.config import AnalysisConfig
from histo.synthetic import generate_slide


@pytest.fixture(scope="session")
def analysed(tmp_path_factory):
    """``(slide path, result folder)`` of a generated infected section; tests copy the folder
    before writing journals into it."""
    d = tmp_path_factory.mktemp("plugin")
    s = generate_slide(
        d / "lung.ome.tif", size_px=(1280, 1024), group="IAV", dpi=15, seed=41, labels=False
    )
    (out,) = run_batch([s.path], d / "results", AnalysisConfig(method="classical"))
    assert out.ok
    return s.path, out.out_dir
