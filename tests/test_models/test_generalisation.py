"""The shipped network on every held-out appearance family (small slides, the CI version of
``tests/benchmarks/bench_generalisation.py``), at any pixel size, and on tumour-dense and 8-bit
slides.

Each case is a generated infected section in a style of `histo.synthetic._appearance.FAMILIES`
(held-out values: beyond the range of, or outside, what a leave-family-out model is trained
on), with seeds never used in training. The thresholds are below what the shipped network
measures on these very slides (BENCHMARKS.md, "Generalisation"), so a regression fails.
"""

from __future__ import annotations

import pytest

from histo.config import AnalysisConfig
from histo.evaluate import evaluate_cells, evaluate_lesions
from histo.pipeline import analyze_slide
from histo.synthetic import Appearance, generate_slide
from histo.synthetic._appearance import held_out_cases
from models import WEIGHTS_DIR

#: The network the checks after the network are tested with: v4, the shipped network before
#: v5, which takes hepatocytes and unstained nuclei of dark tissue for HER2+ cells on the
#: slides below. v5 takes fewer or none of them (each test says how many), so with it alone
#: the checks would have little or nothing to remove; each test also holds v5 to its figures.
CHECKED_MODEL = str(WEIGHTS_DIR / "lungmets_unet_v4.pt")

#: Cell F1 the shipped network reaches at least on a held-out family slide, its HER2+ count
#: error at most and its precision at least; where it is weaker, the stated minimum of that
#: family. Measured on these very slides with v2 at its operating point 0.9 (`python3
#: tests/benchmarks/bench_ci_families.py`): F1 1.000 and count 0 on every family but granular
#: HER2 (0.984, -3.1%), 9-11 um cells (0.981, -3.7%), 21-25 um cells (0.996, -0.9%) and
#: near-zero autofluorescence (0.980, -3.9%), precision 1.0 throughout. v5 calls a few cells
#: too many among the largest: on the 21-25 um slide 208 found of 204, all 204 among them
#: (precision 0.981, F1 0.990, count +2.0%; 0.978 precision and +2.2% on that case's 24
#: sections in BENCHMARKS.md, where v4 had 0.986 and +1.4%).
MIN_CELL_F1 = 0.99
MAX_COUNT_ERROR = 0.02
MIN_PRECISION = 0.99
WEAKER = {
    "her2_pattern=granular": (0.97, 0.05, MIN_PRECISION),
    "cell_diameter_um=[9.0,11.0]": (0.97, 0.05, MIN_PRECISION),
    "cell_diameter_um=[21.0,25.0]": (0.98, 0.03, 0.97),
    "autofluorescence=0.05": (0.97, 0.05, MIN_PRECISION),
}

CASES = [("default", Appearance(), 0.5), *held_out_cases()]


def _name(case) -> str:
    family, app, px = case
    return "-".join([family, *app.changes(), f"{px}um"]).replace(" ", "")


@pytest.fixture(scope="module")
def family_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    cache = {}

    def get(case):
        family, app, px = case
        key = _name(case)
        if key not in cache:
            # 600 x 600 um of an infected lung at 28 dpi with a high burden: about 100 cells.
            side = int(round(600 / px))
            cache[key] = generate_slide(
                folder / f"{key[:60]}.ome.tif",
                size_px=(side, side),
                group="IAV",
                dpi=28,
                seed=77001,
                mouse_burden=4.0,
                pixel_size_um=px,
                appearance=app,
                labels=False,
            )
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_shipped_network_finds_the_cells_of_every_held_out_family(family_slides, case):
    s = family_slides(case)
    r = analyze_slide(s.path, AnalysisConfig())
    cells = evaluate_cells(r.cells, s.cells)
    min_f1, max_error, min_precision = next(
        (v for k, v in WEAKER.items() if k in _name(case)),
        (MIN_CELL_F1, MAX_COUNT_ERROR, MIN_PRECISION),
    )
    assert len(s.cells) >= 40
    assert cells["precision"] >= min_precision, cells
    assert cells["f1"] >= min_f1, cells
    assert abs(cells["count_error"]) <= max_error, cells


@pytest.mark.slow
@pytest.mark.parametrize(
    "app",
    [Appearance(tumour_fraction=0.85), Appearance(dtype="uint8")],
    ids=["tumour-dense", "8-bit"],
)
def test_tumour_dense_and_8_bit_slides_keep_their_recall(tmp_path, app):
    s = generate_slide(
        tmp_path / "s.ome.tif",
        size_px=(1200, 1200),
        group="IAV",
        dpi=15,
        seed=77002,
        appearance=app,
        labels=False,
    )
    r = analyze_slide(s.path, AnalysisConfig())
    cells = evaluate_cells(r.cells, s.cells)
    # Measured with the shipped network: recall 0.998 tumour-dense, 1.000 8-bit; precision
    # 1.000 and every focus found on both.
    assert cells["recall"] >= 0.98, cells
    assert cells["precision"] >= 0.99, cells
    lesions = evaluate_lesions(r.lesions, s.lesions)
    # The truth's tumour lesions are the linking rule's groups (histo.synthetic), so a solid
    # tumour's foci are found as drawn.
    assert lesions.loc["focus", "recall"] >= 0.95, lesions


@pytest.mark.slow
def test_autofluorescent_hepatocytes_are_not_counted_as_her2_cells(tmp_path):
    """Liver-like tissue with few cancer cells (a control mouse): hepatocytes glow in every
    channel and the network (`CHECKED_MODEL`) takes some of them for HER2+ cells; the
    autofluorescence check (`histo.markers.her2_over_autofluorescence`) leaves most of them out
    and keeps the real ones, and the few just above it, a population of their own below an
    empty gap in HER2 over autofluorescence (`her2_min_af_population_gap`), go too."""
    s = generate_slide(
        tmp_path / "liver.ome.tif",
        size_px=(2048, 2048),
        group="PBS",
        dpi=15,
        seed=96100,
        appearance=Appearance(layout="liver"),
        labels=False,
    )
    m = CHECKED_MODEL
    checked = analyze_slide(s.path, AnalysisConfig(model_path=m))
    unchecked = analyze_slide(
        s.path, AnalysisConfig(model_path=m, her2_min_over_autofluorescence=0)
    )
    no_gap = analyze_slide(s.path, AnalysisConfig(model_path=m, her2_min_af_population_gap=0))
    with_check = evaluate_cells(checked.cells, s.cells)
    without = evaluate_cells(unchecked.cells, s.cells)
    check_only = evaluate_cells(no_gap.cells, s.cells)
    print(f"without the check: {without}\ncheck alone: {check_only}\nboth: {with_check}")
    # The shipped v5 takes even more hepatocytes without the check (108 found, precision 0.23)
    # and, with it, finds the 25 cells and nothing else (measured).
    shipped = evaluate_cells(analyze_slide(s.path, AnalysisConfig()).cells, s.cells)
    assert shipped["precision"] >= 0.95 and shipped["recall"] >= 0.95, shipped
    # Measured (v4, 25 true cells, analysis revision 11): without the check 84
    # found, precision 0.30, F1 0.46; the check alone 28 found, precision 0.89, F1 0.94; with
    # the population gap too 25, precision and recall 1.0 (gap 2.3-fold: the 3 removed at
    # 1.2-2.4x their autofluorescence, the next cell at 5.5x).
    assert len(s.cells) >= 15
    assert without["precision"] < 0.6, without
    assert check_only["precision"] >= 0.75, check_only
    assert with_check["precision"] >= 0.95, with_check
    for scored in (with_check, check_only):
        assert scored["recall"] >= without["recall"] - 0.02, (scored, without)
    af = checked.summary["markers"]["HER2"]["autofluorescence"]
    assert af["removed"] == len(unchecked.cells) - len(no_gap.cells) > 0
    assert af["population"]["removed"] == len(no_gap.cells) - len(checked.cells) > 0
    assert af["population"]["gap"] >= 2.0
    assert (checked.cells["her2_af_ratio"] > af["population"]["below"]).all()
    assert (no_gap.cells["her2_af_ratio"] > af["min_ratio"]).all()


@pytest.mark.parametrize("pixel_size_um", [0.325, 0.65, 0.8])
def test_any_pixel_size_is_analysed_not_refused(tmp_path, pixel_size_um):
    """Scans at 0.65 um/px (10x) and others that are no whole fraction of the model's 1 um/px
    are resampled to it; cells come back in the slide's own coordinates."""
    side = int(round(500 / pixel_size_um))
    s = generate_slide(
        tmp_path / "s.ome.tif",
        size_px=(side, side),
        group="IAV",
        dpi=28,
        seed=77003,
        mouse_burden=4.0,
        pixel_size_um=pixel_size_um,
        labels=False,
    )
    r = analyze_slide(s.path, AnalysisConfig())
    cells = evaluate_cells(r.cells, s.cells, distance_um=3.0)
    assert cells["f1"] >= 0.95, cells


def test_pixels_coarser_than_twice_the_model_are_refused_with_a_clear_error():
    from histo.errors import InputError
    from histo.network import model_factor

    assert model_factor(1.0, 0.5) == 2.0
    assert model_factor(1.0, 0.65) == pytest.approx(1 / 0.65)
    assert model_factor(1.0, 2.0) == 0.5
    with pytest.raises(InputError, match=r"slide\.tif: pixel size 2\.5 um is too coarse"):
        model_factor(1.0, 2.5, "slide.tif")


def _dark_section(tmp_path, size_px, seed):
    """A 9-dpi section at 0.05x autofluorescence, analysed by `CHECKED_MODEL` with and without
    the population check: the slide, both results, and each scored against the truth."""
    s = generate_slide(
        tmp_path / "dark9.ome.tif",
        size_px=size_px,
        group="IAV",
        dpi=9,
        seed=seed,
        appearance=Appearance(autofluorescence=0.05),
        labels=False,
    )
    checked = analyze_slide(s.path, AnalysisConfig(model_path=CHECKED_MODEL))
    unchecked = analyze_slide(
        s.path, AnalysisConfig(model_path=CHECKED_MODEL, her2_min_population_gap=0)
    )
    scored = [evaluate_cells(r.cells, s.cells) for r in (checked, unchecked)]
    return s, checked, unchecked, *scored


def test_a_her2_negative_population_on_dark_tissue_is_not_counted(tmp_path):
    """Autofluorescence at 0.05x, bench_generalisation's third section of that case (9 dpi,
    seed 92102): at analysis revision 6 v2 called 31 proliferating immune nuclei HER2+ (their
    HER2 that of the ordinary nuclei, 1-4x the reference) beside 20 cancer cells at 24x and
    more. With revision 7's reference levels v4 calls 2 (measured), still a population of their
    own below an empty gap (32-fold), and not counted. v5 calls none of them (measured)."""
    s, checked, unchecked, with_check, without = _dark_section(tmp_path, (2048, 1536), 92102)
    shipped = evaluate_cells(analyze_slide(s.path, AnalysisConfig()).cells, s.cells)
    assert shipped["precision"] >= 0.95 and shipped["recall"] >= 0.95, shipped
    assert len(s.cells) >= 15
    # HER2 and Ki67 autofluorescence a few counts: the pyramid's rounding would be a tenth or
    # more of the network's unit, so full resolution is read.
    assert checked.summary["chunks"]["read_level"] == 0
    assert without["precision"] < with_check["precision"], (without, with_check)
    assert with_check["precision"] >= 0.95 and with_check["recall"] >= 0.95, with_check
    population = checked.summary["markers"]["HER2"]["negative_population"]
    assert population["removed"] == len(unchecked.cells) - len(checked.cells) > 0
    assert population["gap"] >= 4.0 and population["median_ratio"] <= 2.0
    singles = evaluate_lesions(checked.lesions, s.lesions).loc["single"]
    assert singles["f1"] >= 0.95, singles


@pytest.mark.slow
def test_unstained_cells_at_the_ordinary_cells_her2_are_not_counted_on_dark_tissue(tmp_path):
    """Autofluorescence at 0.05x, bench_markers' 9-dpi section of that style on seeds 98000+
    (seed 99052): the reference is 4 counts of noise and 21 unstained nuclei the network took
    measure 1.1-9x it (4-36 counts), beside 65 cancer cells at 52x and more. Neither the
    reference nor their autofluorescence says they are unstained; the slide's ordinary cells
    do (HER2 threshold calibrated on them: 15 counts; the 21's median 10). Measured at
    analysis revision 10 (v4): 86 detections without the rule, 65 with it, all true. v5 takes
    6 of those nuclei (71 without the rule) and the rule removes them too (measured)."""
    s, checked, unchecked, with_check, without = _dark_section(tmp_path, (2048, 2048), 99052)
    shipped = analyze_slide(s.path, AnalysisConfig())
    scored = evaluate_cells(shipped.cells, s.cells)
    assert scored["precision"] >= 0.98 and scored["recall"] >= 0.98, scored
    assert without["precision"] < 0.85, without
    assert with_check["precision"] >= 0.98 and with_check["recall"] >= 0.98, with_check
    her2 = checked.summary["markers"]["HER2"]
    population = her2["negative_population"]
    assert population["removed"] == len(unchecked.cells) - len(checked.cells) > 0
    assert population["median_ratio"] > 2.0  # not the reference's rule ...
    assert population["negative_upper"] == pytest.approx(her2["threshold"], abs=0.01)
    removed = unchecked.cells.nsmallest(population["removed"], "her2_ratio")
    assert removed["her2_mean"].median() <= her2["threshold"]
