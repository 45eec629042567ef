"""The ``lungmets`` command line, run as a user runs it: in a separate Python process."""

import subprocess
import sys

import pytest

import histo
from histo.cli import build_parser


def run_lungmets(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m histo ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "histo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version_prints_the_package_version():
    result = run_lungmets("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lungmets {histo.__version__}"


def test_help_lists_the_subcommands():
    result = run_lungmets("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lungmets")
    assert "synth" in result.stdout

    result = run_lungmets("synth", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("slide", "cohort", "sample-data"):
        assert command in result.stdout


def test_no_subcommand_is_a_usage_error():
    result = run_lungmets()
    assert result.returncode == 2
    assert "usage: lungmets" in result.stderr


HEAVY_MODULES = ("numpy", "pandas", "dask", "distributed", "torch", "qtpy", "napari")


@pytest.mark.parametrize("module", ["histo", "histo.cli"])
def test_import_loads_no_heavy_module(module):
    code = (
        f"import sys, {module}\n"
        f"loaded = [name for name in {HEAVY_MODULES!r} if name in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "", f"import {module} loaded {result.stdout.strip()}"


@pytest.mark.parametrize("size", ["12x", "x12", "12", "12x0", "twelve"])
def test_bad_size_is_a_usage_error_naming_the_option(size, tmp_path):
    result = run_lungmets("synth", "slide", str(tmp_path / "slide.ome.tif"), "--size", size)
    assert result.returncode == 2
    assert "argument --size" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "slide.ome.tif").exists()


def test_bad_group_is_a_usage_error_naming_the_choices(tmp_path):
    result = run_lungmets("synth", "slide", str(tmp_path / "slide.ome.tif"), "--group", "mock")
    assert result.returncode == 2
    assert "argument --group" in result.stderr
    assert "IAV" in result.stderr and "PBS" in result.stderr


def test_slide_options_parse_to_the_library_types():
    args = build_parser().parse_args(
        ["synth", "slide", "out.ome.tif", "--size", "1024x768", "--group", "iav", "--no-ki67"]
    )
    assert args.size == (1024, 768)
    assert args.group == "IAV"
    assert args.no_ki67 is True
    assert (args.dpi, args.seed, args.mouse_burden, args.pixel_size_um) == (15, 0, 1.0, 0.5)


def test_slide_defaults_match_the_documented_ones():
    args = build_parser().parse_args(["synth", "slide", "out.ome.tif"])
    assert args.size == (8192, 6144)
    assert args.group == "PBS"
    assert args.no_ki67 is False


def test_cohort_dpi_list_parses_to_a_tuple_of_ints():
    parser = build_parser()
    args = parser.parse_args(["synth", "cohort", "out", "--dpi", "3, 9,28"])
    assert args.dpis == (3, 9, 28)
    defaults = parser.parse_args(["synth", "cohort", "out"])
    assert defaults.dpis == (3, 9, 15, 28)
    assert defaults.size == (4096, 3072)
    assert (defaults.mice, defaults.sections, defaults.jobs) == (4, 3, 1)


def test_bad_dpi_list_is_a_usage_error_naming_the_option(tmp_path):
    result = run_lungmets("synth", "cohort", str(tmp_path), "--dpi", "3,nine")
    assert result.returncode == 2
    assert "argument --dpi" in result.stderr


def test_train_names_an_unknown_appearance_family(tmp_path):
    result = run_lungmets("train", str(tmp_path / "m.pt"), "--exclude-families", "dtype,colour")
    assert result.returncode != 0
    assert "unknown appearance families: colour" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.pt").exists()
