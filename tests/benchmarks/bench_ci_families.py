"""The figures behind the bounds of tests/test_models/test_generalisation.py, measured.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_ci_families.py

Draws exactly the small held-out-family slides of that test (600 x 600 um, IAV 28 dpi, seed
77001, burden 4) and the tumour-dense and 8-bit slides (seed 77002), analyses them with the
shipped network and prints cell precision / recall / F1 and count error (and focus recall), so
that the test's stated minima can be checked against what the network measures.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from histo.config import AnalysisConfig
from histo.evaluate import evaluate_cells, evaluate_lesions
from histo.pipeline import analyze_slide
from histo.synthetic import Appearance, generate_slide

sys.path.insert(0, str(Path(__file__).parents[1] / "test_models"))
from test_generalisation import CASES, _name  # noqa: E402


def main() -> None:
    out = Path(tempfile.mkdtemp())
    for case in CASES:
        _, app, px = case
        side = int(round(600 / px))
        s = generate_slide(
            out / f"{_name(case)[:60]}.ome.tif",
            size_px=(side, side),
            group="IAV",
            dpi=28,
            seed=77001,
            mouse_burden=4.0,
            pixel_size_um=px,
            appearance=app,
            labels=False,
        )
        c = evaluate_cells(analyze_slide(s.path, AnalysisConfig()).cells, s.cells)
        print(
            f"{_name(case):62s} n {len(s.cells):4d} P {c['precision']:.3f} R {c['recall']:.3f} "
            f"F1 {c['f1']:.3f} count {c['count_error']:+.3f}",
            flush=True,
        )
    for app in (Appearance(tumour_fraction=0.85), Appearance(dtype="uint8")):
        s = generate_slide(
            out / "s.ome.tif", size_px=(1200, 1200), group="IAV", dpi=15, seed=77002,
            appearance=app, labels=False,
        )  # fmt: skip
        r = analyze_slide(s.path, AnalysisConfig())
        c = evaluate_cells(r.cells, s.cells)
        f = evaluate_lesions(r.lesions, s.lesions).loc["focus", "recall"]
        print(f"{app.changes()} R {c['recall']:.3f} P {c['precision']:.3f} focus recall {f:.3f}")


if __name__ == "__main__":
    main()
