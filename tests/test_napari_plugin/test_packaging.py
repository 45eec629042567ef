"""The manifest is valid, and the wheel is a complete napari plugin on its own.

The wheel is built from a copy of the sources (nothing is written into the checkout) and
installed into a fresh virtual environment that sees the running environment's packages
(napari, torch; a system Python, a venv or a conda environment alike) but gets lungmets itself
from the wheel; the checks then run from an empty folder, so neither
the checkout nor the editable install of lungmets can stand in for the wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "napari_plugin" / "napari.yaml"
#: What the wheel is built from: the packages and the files pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "histo", "models", "napari_plugin")
WEIGHTS = sorted(p.name for p in (ROOT / "models" / "weights").iterdir() if p.is_file())
QT_BINDINGS = ("pyqt5", "pyqt6", "pyside2", "pyside6")


def test_manifest_is_valid_and_names_every_contribution():
    from npe2 import PluginManifest

    mf = PluginManifest.from_file(MANIFEST)  # raises on a schema error
    c = mf.contributions
    assert mf.name == "lungmets"
    assert all(cmd.id.startswith("lungmets.") for cmd in c.commands)
    assert {w.command for w in c.writers} == {"lungmets.write_lesions"}
    assert set(c.writers[0].filename_extensions) == {".csv", ".geojson"}
    assert {s.key: s.display_name for s in c.sample_data} == {
        "infected": "Infected lung section",
        "control": "Control lung section",
    }
    assert len(c.readers) == 2
    assert [w.display_name for w in c.widgets] == [
        "Analyze slide",
        "Review lesions",
        "Compare mice",
        "Markers (Ki67 threshold)",
        "Teach (fine-tune from reviews)",
    ]


def test_every_python_name_of_the_manifest_imports():
    """What ``npe2 validate lungmets --imports`` checks."""
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", str(MANIFEST), "--imports"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """Wheel and sdist built with ``python -m build`` from a copy of the sources."""
    pytest.importorskip("build", reason="needs 'build' (pip install -e '.[test]')")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend (setuptools) comes from this environment, not from PyPI.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("lungmets-*.whl")
    (sdist,) = out.glob("lungmets-*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_twine_accepts_the_wheel_and_the_sdist(dist):
    pytest.importorskip("twine", reason="needs 'twine' (pip install -e '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_wheel_holds_the_manifest_the_weights_and_the_metadata(dist):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_plugin/napari.yaml") == MANIFEST.read_bytes()
        for name in WEIGHTS:
            packed = hashlib.sha256(zf.read(f"models/weights/{name}")).hexdigest()
            source = hashlib.sha256((ROOT / "models" / "weights" / name).read_bytes())
            assert packed == source.hexdigest(), name
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(info).decode()
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert any(n.endswith(".pt") for n in WEIGHTS) and any(n.endswith(".json") for n in WEIGHTS)
    assert "napari_plugin/_sample_data.py" in names
    assert "napari_plugin/_writer.py" in names
    assert not any(n.startswith(("tests/", "sample_data/")) for n in names)
    assert "[napari.manifest]\nlungmets = napari_plugin:napari.yaml" in entry_points
    assert "Classifier: Framework :: napari" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    assert "License-Expression: BSD-3-Clause" in metadata
    # Users bring their own Qt binding: none may be a dependency outside the test extra.
    requires = [line.lower() for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    for line in requires:
        if 'extra == "test"' not in line:
            assert not any(qt in line for qt in QT_BINDINGS), line
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert "napari_plugin/napari.yaml" in members
    assert {f"models/weights/{n}" for n in WEIGHTS} <= members


_IN_VENV = """
import json, sys
import importlib.metadata as md
import npe2

pm = npe2.PluginManager.instance()
pm.discover()
mf = pm.get_manifest("lungmets")
c = mf.contributions
layers = next(s for s in c.sample_data if s.key == "infected").open()
import histo, models, napari_plugin
print(json.dumps({
    "files": {
        "napari_plugin": napari_plugin.__file__,
        "histo": histo.__file__,
        "models": models.__file__,
        "sample_data": sys.modules["napari_plugin._sample_data"].__file__,
        "distribution": str(md.distribution("lungmets").locate_file("")),
    },
    "version": mf.package_metadata.version,
    "readers": [r.command for r in c.readers],
    "writers": [w.command for w in c.writers],
    "sample_data": [s.key for s in c.sample_data],
    "widgets": [w.display_name for w in c.widgets],
    "weights": sorted(p.name for p in models.WEIGHTS_DIR.iterdir()),
    "layers": [[k["name"], t, k["multiscale"], list(k["scale"])] for d, k, t in layers],
}))
"""


def _running_site_packages() -> list[str]:
    """The running interpreter's package folders, whatever kind of environment it is.

    A system Python, a virtual environment (with or without the system's packages) or a conda
    environment each put their site-packages on ``sys.path``; the checkout itself (an editable
    install) is left out, so that lungmets can only come from the wheel.
    """
    folders = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    folders += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    out: list[str] = []
    for f in folders:
        if Path(f).is_dir() and f not in out:
            out.append(f)
    return out


@pytest.mark.slow
def test_napari_discovers_the_plugin_installed_from_the_wheel(dist, tmp_path):
    wheel, _ = dist
    venv = tmp_path / "venv"
    # A bare venv, then a .pth file that puts the running environment's package folders on its
    # path: napari, npe2 and torch come from whatever environment runs the tests (system, venv,
    # conda). `venv --system-site-packages` would not do: from inside a venv it links the *base*
    # interpreter's packages, not the active environment's. A .pth line adds a folder without
    # running the .pth files inside it, so an editable lungmets there stays inactive.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

    def venv_path(name: str) -> Path:
        code = f"import sysconfig; print(sysconfig.get_paths()[{name!r}])"
        out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
        return Path(out.stdout.strip())

    site = venv_path("purelib")
    assert site != Path(sysconfig.get_paths()["purelib"])
    outer = _running_site_packages()
    (site / "_lungmets_test_outer_env.pth").write_text("\n".join(outer) + "\n")
    # The running environment's pip installs into the venv it runs in; --ignore-installed
    # because the running environment's lungmets (an editable install, say) would otherwise
    # count as installed.
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-compile"]
    result = subprocess.run([*pip, "-q", str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    cwd = tmp_path / "elsewhere"  # not the checkout: its packages would shadow the wheel's
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LUNGMETS_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run(
        [str(python), "-c", _IN_VENV], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    for module, file in report["files"].items():
        assert Path(file).is_relative_to(site), (module, file)
    from histo._version import __version__

    assert report["version"] == __version__
    from npe2 import PluginManifest

    c = PluginManifest.from_file(MANIFEST).contributions
    assert report["readers"] == [r.command for r in c.readers]
    assert report["writers"] == [w.command for w in c.writers] == ["lungmets.write_lesions"]
    assert report["sample_data"] == [s.key for s in c.sample_data] == ["infected", "control"]
    assert report["widgets"] == [w.display_name for w in c.widgets]
    assert len(report["readers"]) == 2 and len(report["widgets"]) == 5
    assert report["weights"] == WEIGHTS
    assert [name.split()[-1] for name, *_ in report["layers"]] == ["DAPI", "HER2", "Ki67"]
    for _, layer_type, multiscale, scale in report["layers"]:
        assert (layer_type, multiscale, scale) == ("image", True, [0.5, 0.5])
    assert (tmp_path / "cache" / "sample_data" / __version__ / "lung_IAV_d15.ome.tif").is_file()
