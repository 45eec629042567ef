"""`lungmets run` and `lungmets cluster` as a user runs them: a real subprocess, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from histo.config import AnalysisConfig
from histo.io import write_ome_tiff
from histo.synthetic import generate_slide


def lungmets(*args, cwd=None):
    if args[0] == "run" and "--method" not in args:
        args = (*args, "--method", "classical")  # fast; the network has its own tests
    return subprocess.run(
        [sys.executable, "-m", "histo", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return generate_slide(
        d / "good.ome.tif", size_px=(1280, 1024), group="IAV", dpi=15, seed=41, labels=False
    )


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory, good):
    """One file for each kind of bad input, with the words its error message must contain."""
    d = tmp_path_factory.mktemp("bad")
    img = tifffile.imread(good.path)
    cases = {}

    p = d / "notes.tif"
    p.write_text("not an image at all")
    cases[p] = ["notes.tif", "TIFF"]

    p = d / "truncated.ome.tif"
    p.write_bytes(good.path.read_bytes()[: good.path.stat().st_size // 2])
    cases[p] = ["truncated.ome.tif", "truncated"]

    p = d / "two_dyes.ome.tif"
    write_ome_tiff(p, [img[:2]], channel_names=["CY5", "CY3"], pixel_size_um=0.5)
    cases[p] = ["two_dyes.ome.tif", "--channels"]

    p = d / "zstack.ome.tif"
    tifffile.imwrite(
        p,
        np.stack([img[:, :256, :256]] * 4),
        ome=True,
        metadata={
            "axes": "ZCYX",
            "PhysicalSizeX": 0.5,
            "PhysicalSizeY": 0.5,
            "Channel": {"Name": ["DAPI", "HER2", "Ki67"]},
        },
    )
    cases[p] = ["zstack.ome.tif", "Z"]

    p = d / "no_pixel_size.ome.tif"
    tifffile.imwrite(
        p,
        img,
        photometric="minisblack",
        ome=True,
        metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "HER2", "Ki67"]}},
    )
    cases[p] = ["no_pixel_size.ome.tif", "--pixel-size-um"]

    p = d / "glass.ome.tif"
    rng = np.random.default_rng(0)
    write_ome_tiff(
        p,
        [rng.normal(100, 3, img.shape).astype(np.uint16)],
        channel_names=["DAPI", "HER2", "Ki67"],
        pixel_size_um=0.5,
    )
    cases[p] = ["glass.ome.tif", "no tissue"]
    return cases


def test_each_bad_slide_is_reported_and_the_batch_goes_on(tmp_path, good, bad_slides):
    out = tmp_path / "results"
    proc = lungmets("run", *bad_slides, good.path, "--out", out, "--chunk-size", "1024")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lungmets: error:")]
    assert len(errors) == len(bad_slides)
    for path, words in bad_slides.items():
        line = next(e for e in errors if path.name in e)
        for w in words:
            assert w.lower() in line.lower(), (w, line)
    # The good slide is analysed; nothing is written for the bad ones.
    assert sorted(p.name for p in out.iterdir()) == ["good"]
    summary = json.loads((out / "good" / "summary.json").read_text())
    assert summary["counts"]["her2_cells"] > 0
    assert f"1 of {len(bad_slides) + 1} slides analysed" in proc.stdout


def test_channels_and_pixel_size_can_be_given_on_the_command_line(tmp_path, good):
    img = tifffile.imread(good.path)
    p = tmp_path / "anonymous.tif"
    tifffile.imwrite(p, img, photometric="minisblack", tile=(256, 256), metadata={"axes": "CYX"})
    out = tmp_path / "out"
    proc = lungmets(
        "run", p, "--out", out, "--channels", "DAPI,HER2,Ki67", "--pixel-size-um", "0.5"
    )
    assert proc.returncode == 0, proc.stderr
    ref = lungmets("run", good.path, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    a = pd.read_csv(out / "anonymous" / "lesions.csv")
    b = pd.read_csv(tmp_path / "ref" / "good" / "lesions.csv")
    pd.testing.assert_frame_equal(a, b)


def test_a_folder_of_slides_is_expanded(tmp_path, good):
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(good.path, folder / "a.ome.tif")
    os.symlink(good.path, folder / "b.ome.tif")
    proc = lungmets("run", folder, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b"]


def test_bad_settings_are_reported_without_a_traceback(tmp_path, good):
    proc = lungmets("run", good.path, "--out", tmp_path, "--chunk-size", "16")
    assert proc.returncode == 2
    assert "chunk_size_px" in proc.stderr and "Traceback" not in proc.stderr


def test_slurm_job_script_renders_without_slurm():
    pytest.importorskip("dask_jobqueue")
    proc = lungmets(
        "cluster",
        "slurm",
        "--print-job-script",
        "--cores",
        "4",
        "--memory",
        "16GB",
        "--queue",
        "short",
        "--sbatch=--gres=gpu:1",
    )
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert "#SBATCH -p short" in script
    assert "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH --gres=gpu:1" in script
    assert "--nthreads 1" in script and "--nworkers 4" in script


def test_the_int8_runtime_is_a_different_analysis_and_torch_and_float32_are_not(tmp_path, good):
    """A slide analysed with the default runtime is skipped when run again in PyTorch (the
    same cells), but analysed again with ``--runtime int8``, whose summary says so."""
    out = tmp_path / "out"
    first = lungmets("run", good.path, "--out", out, "--method", "unet")
    assert first.returncode == 0, first.stderr
    again = lungmets("run", good.path, "--out", out, "--method", "unet", "--runtime", "torch")
    assert again.returncode == 0 and "1 already done and skipped" in again.stdout, again.stdout
    # The GPU's arithmetic is a matter of speed too (BENCHMARKS.md "Network speed (GPU)": the
    # same cells as the CPU's in float16 and float32); a precision that does not exist is
    # refused by name.
    exact = lungmets("run", good.path, "--out", out, "--method", "unet", "--precision", "float32")
    assert exact.returncode == 0 and "1 already done and skipped" in exact.stdout, exact.stdout
    bad = lungmets("run", good.path, "--out", out, "--precision", "float16")
    assert bad.returncode == 2 and "--precision" in bad.stderr and "float32" in bad.stderr
    with pytest.raises(ValueError, match="precision must be one of"):
        AnalysisConfig(precision="half")
    int8 = lungmets("run", good.path, "--out", out, "--method", "unet", "--runtime", "int8")
    assert int8.returncode == 0 and "0 already done and skipped" in int8.stdout, int8.stdout
    summary = json.loads((out / "good" / "summary.json").read_text())
    assert summary["parameters"]["runtime"] == "int8"
    assert summary["counts"]["her2_cells"] == len(good.cells)


def test_a_cpu_run_through_onnx_runtime_loads_neither_torch_nor_distributed(tmp_path, good):
    """On the CPU the shipped model's ONNX export runs the network: a fresh `lungmets run`
    process then never imports PyTorch (about a second) nor dask.distributed (a fifth),
    and still finds every cell of the slide."""
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from histo.cli import main\n"
        f"rc = main(['run', {str(good.path)!r}, '--out', {str(out)!r}, '--device', 'cpu'])\n"
        "print(rc, [m for m in ('torch', 'distributed') if m in sys.modules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout
    summary = json.loads((out / "good" / "summary.json").read_text())
    assert summary["counts"]["her2_cells"] == len(good.cells)
