"""Leave-family-out accuracy: the detectors on appearance families they were not trained on.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_generalisation.py \
        --models v5=default,v1=models/weights/lungmets_unet_v1.pt --methods classical [--write]

The shipped network (v5, like v4 and v2 before it) is itself the leave-family-out model: it was
trained with every family held out, entirely (HER2 pattern, dynamic range, tissue layout) or
beyond a middle range (the others); its recipe is in models/weights/MODEL_CARD.md. Any other
model can be scored the same way (``--models NAME=PATH``; ``lungmets train ...
--exclude-families ...`` makes one; ``NAME=PATH:her2=auto`` runs it with ``--her2-threshold
auto``; ``NAME=PATH:af=0`` without the autofluorescence check; ``NAME=PATH:runtime=int8`` with
its 8-bit export, ``--runtime int8``).

Every held-out case of `histo.synthetic._appearance.FAMILIES` (and the default style, for
reference) is drawn on infected sections (``--sections N``, 2 by default: IAV 15 and 28 dpi,
then 9, 60, 21 and 12 dpi; seeds 91000+, never used in training), 1024 x 768 um each whatever
the pixel size. Cells match within 5 um; lesions match
by centroid (6 um, half the radius for large foci) *and class* (strict F1 per class). The
figure to read is the worst case of each column, printed last, not a pooled mean.
Results are cached per case and detector in ``--data`` (keyed by the model's SHA-256 and the
lungmets version), so detectors can be added to the table later; ``--force`` recomputes (after
a change of the code).
``--write`` puts the table into BENCHMARKS.md between the ``bench_generalisation`` markers
(``bench_generalisation_sN`` with ``--sections N`` other than 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from histo.config import AnalysisConfig
from histo.evaluate import CLASSES, evaluate_cells, evaluate_lesions, precision_recall_f1
from histo.pipeline import analyze_slide
from histo.synthetic import generate_slide, load_truth, slide_is_current
from histo.synthetic._appearance import Appearance, held_out_cases

sys.path.insert(0, str(Path(__file__).parent))
from _common import PREVIOUS, SHIPPED, machine_line, write_section  # noqa: E402

#: The infected sections drawn per case, in order; ``--sections N`` takes the first N (the
#: first two have kept their seeds since the table began; more sections give the lesion
#: classes, clusters above all, enough lesions for one error not to be the figure). Beyond
#: the sixth, the same six days again, each with its own seed (up to 24 sections).
_DAYS = [("IAV", 15), ("IAV", 28), ("IAV", 9), ("IAV", 60), ("IAV", 21), ("IAV", 12)]
SECTIONS = [_DAYS[j % len(_DAYS)] for j in range(24)]
#: Resamples of the sections for the 95% intervals of the worst-case figures.
BOOTSTRAP = 2000
_AF_DEFAULT = AnalysisConfig().her2_min_over_autofluorescence
SEED = 91000
FIELD_UM = (1024, 768)


def case_name(family: str, app: Appearance, px: float) -> str:
    """A short label: the family and the fields that differ from the default style."""
    parts = app.changes()
    if px != 0.5:
        parts.append(f"{px} um/px")
    return f"{family}: " + (", ".join(parts) if parts else "default")


def section_seed(index: int, j: int) -> int:
    """The seed of section `j` of case `index` (the first six as the table always had)."""
    if j < 2:
        return SEED + 2 * index + j
    return SEED + 1000 + 10 * index + j if j < 6 else SEED + 20000 + 100 * index + j


def case_slides(
    data: Path, index: int, app: Appearance, px: float, n_sections: int = 2
) -> list[Path]:
    """The first `n_sections` sections of one case (generated once into `data`)."""
    paths = []
    for j, (group, dpi) in enumerate(SECTIONS[:n_sections]):
        path = data / f"case{index:02d}_{j}.ome.tif"
        if not slide_is_current(path, appearance=app, pixel_size_um=px):
            generate_slide(
                path,
                size_px=(int(round(FIELD_UM[0] / px)), int(round(FIELD_UM[1] / px))),
                group=group,
                dpi=dpi,
                seed=section_seed(index, j),
                pixel_size_um=px,
                appearance=app,
                labels=False,
            )
        paths.append(path)
    return paths


def _detector_key(config: AnalysisConfig) -> str:
    """What a cached result depends on: the method, the model's SHA-256, the lungmets version
    (after a change of the code, rerun with ``--force``)."""
    from histo._version import ANALYSIS_REVISION, __version__

    key = config.method
    if config.method == "unet":
        import hashlib

        from models import model_identity

        ident = model_identity(config.model_path)
        # The tensors' SHA-256 and the operating point in the JSON beside them.
        key += "-" + ident["sha256"][:12]
        key += "-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    if config.her2_min_over_autofluorescence != _AF_DEFAULT:
        key += f"-af{config.her2_min_over_autofluorescence:g}"
    if config.her2_threshold != "off":
        key += f"-her2{config.her2_threshold}"
    if config.runtime == "int8":
        key += "-int8"
    return f"{key}-{__version__}-r{ANALYSIS_REVISION}"


def score(results_truths) -> dict:
    """Pooled cell and strict lesion figures of (result, truth) pairs.

    Each section's counts are kept too (``"sections"``: cells tp, predicted, true, then the
    same for each lesion class), for `interval`.
    """
    rows = []
    for r, t in results_truths:
        ce = evaluate_cells(r.cells, t.cells)
        le = evaluate_lesions(r.lesions, t.lesions)
        row = [ce["tp"], len(r.cells), len(t.cells)]
        for c in CLASSES:
            row += le.loc[c, ["tp", "n_pred", "n_truth"]].to_numpy(float).tolist()
        rows.append([float(v) for v in row])
    out = _figures(np.sum(rows, axis=0))
    out["sections"] = rows
    return out


def _figures(total) -> dict:
    """The table's figures from summed section counts (see `score`)."""
    prf = precision_recall_f1(*total[:3])
    p, r, f = prf["precision"], prf["recall"], prf["f1"]
    n_pred, n_truth = total[1], total[2]
    out = {"P": p, "R": r, "F1": f, "count": (n_pred - n_truth) / max(n_truth, 1), "n": n_truth}
    for i, c in enumerate(CLASSES):
        tp, npred, ntruth = total[3 + 3 * i : 6 + 3 * i]
        out[c] = precision_recall_f1(tp, npred, ntruth)["f1"]
        out[f"n_{c}"] = int(ntruth)
    return out


def interval(result: dict, key: str, seed: int = 0) -> tuple[float, float]:
    """95% interval of one figure of a case over its sections (bootstrap: the sections drawn
    again with replacement, `BOOTSTRAP` times): how far another set of sections of the same
    case could move it."""
    rows = np.asarray(result["sections"])
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(rows), size=(BOOTSTRAP, len(rows)))
    values = [_figures(rows[d].sum(axis=0))[key] for d in draws]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default="shipped=default",
        help="NAME=PATH,... of networks to score ('default': the shipped weights)",
    )
    ap.add_argument("--methods", default="classical", help="other detectors to score")
    ap.add_argument("--data", type=Path, default=Path("/tmp/lungmets_generalisation"))
    ap.add_argument("--cases", default="", help="only cases whose name contains this")
    ap.add_argument("--force", action="store_true", help="recompute cached results")
    ap.add_argument(
        "--sections",
        type=int,
        default=2,
        choices=range(1, len(SECTIONS) + 1),
        metavar=f"1-{len(SECTIONS)}",
        help="infected sections per case (default 2)",
    )
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    detectors = {}
    for item in filter(None, args.models.split(",")):
        name, path = item.split("=", 1)
        path, _, runtime = path.partition(":runtime=")
        path, _, af = path.partition(":af=")
        path, _, her2 = path.partition(":her2=")
        detectors[name] = AnalysisConfig(
            model_path=None if path == "default" else path,
            her2_threshold=her2 or "off",
            her2_min_over_autofluorescence=float(af) if af else _AF_DEFAULT,
            runtime=runtime or "auto",
        )
    for m in filter(None, args.methods.split(",")):
        detectors[m] = AnalysisConfig(method=m)

    cases = [("default", Appearance(), 0.5), *held_out_cases()]
    rows = []
    for index, (family, app, px) in enumerate(cases):
        name = case_name(family, app, px)
        if args.cases and args.cases not in name:
            continue
        paths = case_slides(args.data, index, app, px, args.sections)
        truths = [load_truth(p) for p in paths]
        for det, config in detectors.items():
            n = f"s{args.sections}." if args.sections != 2 else ""
            cache = args.data / f"case{index:02d}.{n}{_detector_key(config)}.json"
            s = json.loads(cache.read_text()) if cache.exists() and not args.force else {}
            if "sections" not in s and "error" not in s:
                t0 = time.perf_counter()
                try:
                    results = [analyze_slide(p, config) for p in paths]
                    s = score(zip(results, truths, strict=True))
                except Exception as exc:  # a refused slide is a result too
                    s = {"error": f"{type(exc).__name__}: {exc}"[:80]}
                s["seconds"] = time.perf_counter() - t0
                cache.write_text(json.dumps(s))
            s.update(case=name, family=family, detector=det)
            rows.append(s)
            print(_row(s), flush=True)

    lines = [
        machine_line(),
        "Command: `python3 tests/benchmarks/bench_generalisation.py "
        f"--models {args.models} --methods {args.methods} --sections {args.sections} --write`. "
        f"{SHIPPED} (shipped), {PREVIOUS} and v2 never saw the held-out values "
        "(models/weights/MODEL_CARD.md). "
        f"{args.sections} infected sections per case (IAV "
        + ", ".join(str(d) for _, d in SECTIONS[: args.sections])
        + f" dpi, seeds {SEED}+, {FIELD_UM[0]}x{FIELD_UM[1]} um each). Cells: "
        "precision / recall / F1 and HER2+ count error; lesions: strict F1 (same class) with "
        "the number of true lesions.",
        "",
        "| case | detector | cells P / R / F1 | count | single F1 (n) | cluster F1 (n) "
        "| focus F1 (n) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(_row(r) for r in rows),
        "",
        "Worst case per detector over the held-out cases (the default style excluded)"
        + (
            "; in brackets, the 95% interval of that case's figure over its sections "
            "(bootstrap: the sections drawn again with replacement):"
            if args.sections >= 6
            else ":"
        ),
        "",
        "| detector | cells F1 | count error | single F1 | cluster F1 | focus F1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for det in detectors:
        held = [r for r in rows if r["detector"] == det and r["family"] != "default"]
        if not held:
            continue
        ok = [r for r in held if "error" not in r]
        refused = len(held) - len(ok)

        def worst(key, rows_=ok, lowest=True):
            if not rows_:
                return "-"
            r = (min if lowest else max)(rows_, key=lambda x: x[key] if lowest else abs(x[key]))
            fmt = "{:+.1%}" if key == "count" else "{:.3f}"
            text = fmt.format(r[key])
            if args.sections >= 6:  # enough sections for an interval to mean something
                text += " ({} to {})".format(*(fmt.format(v) for v in interval(r, key)))
            return text

        def worst_cls(c, ok=ok):
            with_c = [r for r in ok if r[f"n_{c}"] > 0]
            return worst(c, with_c)

        lines.append(
            f"| {det}{f' ({refused} refused)' if refused else ''} | {worst('F1')} | "
            f"{worst('count', lowest=False)} | {worst_cls('single')} | {worst_cls('cluster')} "
            f"| {worst_cls('focus')} |"
        )
    print("\n".join(lines))
    if args.write:
        if args.sections == 2:  # the table as it began, with every detector
            write_section(
                "bench_generalisation", "Generalisation: leave-family-out accuracy", lines
            )
        else:
            write_section(
                f"bench_generalisation_s{args.sections}",
                f"Generalisation on {args.sections} sections per case",
                lines,
            )


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['case']} | {r['detector']} | refused: {r['error']} | | | | |"
    cls = " | ".join(f"{r[c]:.3f} ({r[f'n_{c}']})" for c in CLASSES)
    return (
        f"| {r['case']} | {r['detector']} | {r['P']:.3f} / {r['R']:.3f} / {r['F1']:.3f} | "
        f"{r['count']:+.1%} | {cls} |"
    )


if __name__ == "__main__":
    main()
