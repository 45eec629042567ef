"""The published figures behind the accuracy bounds of tests/test_models/test_unet.py.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_ci_accuracy.py [--write]

Draws exactly the held-out slides of that test (`test_unet.HELD_OUT_SPEC`, seed 70001, and
`NO_KI67_SPEC`, seed 70002, never used in training), analyses them with the shipped network as
the tests do, and prints (with ``--write``: puts into BENCHMARKS.md, section "Accuracy on the
CI tests' slides") cell
precision, recall and F1, the HER2+ count error and the lesion F1. The test reads that
section and asserts each figure within a stated margin (`test_unet.MARGIN`), so a regression
of the network, the screen or the linking fails CI, while the figures themselves come from
this script only. The same for the generated study of tests/test_histo/test_cohort.py
(per-mouse count and tissue-area errors, fold change error), which its tests read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "test_models"))
sys.path.insert(0, str(Path(__file__).parents[1] / "test_histo"))
from _common import machine_line, write_section  # noqa: E402
from test_cohort import make_study, study_figures  # noqa: E402
from test_unet import HELD_OUT_SPEC, NO_KI67_SPEC, accuracy_figures  # noqa: E402

from histo.synthetic import generate_slide  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args(argv)
    lines = [
        machine_line(),
        "Command: `python3 tests/benchmarks/bench_ci_accuracy.py --write` (the shipped "
        "network, default settings, CPU).",
        "",
        "| slide | cell precision | cell recall | cell F1 | HER2+ count error | lesion F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in (("held_out", HELD_OUT_SPEC), ("no_ki67", NO_KI67_SPEC)):
            s = generate_slide(Path(tmp) / f"{name}.ome.tif", labels=False, **spec)
            fig = accuracy_figures(s)
            desc = ", ".join(f"{k} {v}" for k, v in spec.items())
            lines.append(
                f"| test_unet {name} ({desc}) | {fig['precision']:.3f} | {fig['recall']:.3f} | "
                f"{fig['f1']:.3f} | {fig['count_error']:+.3f} | {fig['lesion_f1']:.3f} |"
            )
        # The cohort of tests/test_histo/test_cohort.py, analysed through the CLI as there.
        study = make_study(Path(tmp) / "study")
        fig = study_figures(study)
    lines += [
        "",
        "The generated study of `tests/test_histo/test_cohort.py` (4 mice per group, 3 sections "
        "of 2048 x 1536 px, 3 and 15 dpi, seed 11; `lungmets run --samples`, then `lungmets "
        "cohort`): per-mouse relative errors against the truth, and the error of the "
        "infected/control fold change of HER2+ cells per mm² at 15 dpi.",
        "",
        "| study | largest count error | median count error | largest area error "
        "| median area error | fold change error |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| test_cohort study | {fig['max_count_error']:.3f} | {fig['median_count_error']:.3f} "
        f"| {fig['max_area_error']:.3f} | {fig['median_area_error']:.3f} "
        f"| {fig['fold_change_error']:.3f} |",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("bench_ci_accuracy", "Accuracy on the CI tests' slides", lines)


if __name__ == "__main__":
    main()
