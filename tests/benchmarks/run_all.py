"""Regenerate every published figure with one command.

Run on demand (never in CI)::

    python3 tests/benchmarks/run_all.py [--quick] [--only a,b] [--skip a,b] [--list]
    python3 tests/benchmarks/run_all.py --quotes-only     # README and model card from the tables

Each benchmark of `BENCHES` runs in a fresh process with ``--write``, one after the other (the
comparisons inside a benchmark alternate or rotate their methods themselves); a benchmark that
fails is reported and the others still run. Then the quoted figures of README.md and of the
model card (``<!-- figure:KEY -->...<!-- /figure:KEY -->``) are rewritten from what the
benchmarks wrote into BENCHMARKS.md and from the shipped model's JSON (`QUOTES`): the README
quotes no figure that a script does not write (``tests/test_figures.py`` checks it).

The full run rewrites BENCHMARKS.md, README.md and the model cards (models/weights/) in place
(hours on 2 CPU cores). ``--quick`` runs every benchmark on smaller inputs (9.5 minutes on 2
cores, 2026-12-03) and writes into copies of those files in ``--out`` (default
/tmp/lungmets_figures_quick), so that quick figures never replace published ones: it checks
that every script still runs and writes what the quotes read. Benchmarks that need data from
outside (real images, see their docstrings) run only when ``--real-data DIR`` names it; the
napari one only under a display (``xvfb-run -a`` is used when there is none and it is
installed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCHMARKS_ENV, PREVIOUS, PREVIOUS_PT, ROOT, SHIPPED  # noqa: E402

HERE = Path(__file__).parent
README = ROOT / "README.md"
MODEL_CARD = ROOT / "models" / "weights" / "MODEL_CARD.md"
MODEL_CARD_V1 = ROOT / "models" / "weights" / "MODEL_CARD_v1.md"
MODEL_CARD_V2 = ROOT / "models" / "weights" / "MODEL_CARD_v2.md"
#: The documents whose quoted figures run_all writes.
DOCUMENTS = [README, MODEL_CARD, MODEL_CARD_V1, MODEL_CARD_V2]
MODEL_PT = ROOT / "models" / "weights" / f"lungmets_unet_{SHIPPED}.pt"
MODEL_JSON = MODEL_PT.with_suffix(".json")
V1_JSON = ROOT / "models" / "weights" / "lungmets_unet_v1.json"
V1_PT = "models/weights/lungmets_unet_v1.pt"
V2_JSON = ROOT / "models" / "weights" / "lungmets_unet_v2.json"
V2_PT = "models/weights/lungmets_unet_v2.pt"


@dataclass(frozen=True)
class Bench:
    """One benchmark script: its arguments for the full and the quick run."""

    name: str
    script: str
    full: list[str]
    quick: list[str]
    #: The BENCHMARKS.md sections it writes (markers ``<!-- KEY:start -->``).
    sections: tuple[str, ...]
    #: "display" (runs under Xvfb), "real-data" (needs ``--real-data``), "gpu" (needs a
    #: CUDA GPU), or None.
    needs: str | None = None
    note: str = field(default="")


_GEN_MODELS = (
    f"{SHIPPED}=default,{PREVIOUS}={PREVIOUS_PT},v2={V2_PT},v1={V1_PT},"
    f"{SHIPPED}-her2auto=default:her2=auto,{SHIPPED}-no-af-check=default:af=0"
)

#: bench_markers' sets of sections (first seed: what each is for).
MARKER_SETS = {
    94000: "six sections per style: dormant cells in the tens",
    96000: "the same styles on other sections (seeds 96000+): where the calibration's constants "
    "were chosen",
    98000: "the same styles on other sections (seeds 98000+): a check",
    99000: "the same styles on other sections (seeds 99000+): a check no rule was chosen on",
}


def _markers(seed: int, measure: str | None = None) -> Bench:
    """bench_markers on one set of sections, with the default Ki67 measure or `measure`."""
    first = seed == min(MARKER_SETS)
    args = ([] if first else ["--seed", str(seed)]) + (
        [] if measure is None else ["--ki67-measure", measure]
    )
    return Bench(
        "markers" + ("" if measure is None else f"-{measure}") + ("" if first else f"-seed{seed}"),
        "bench_markers.py",
        ["--size", "2048x2048", "--sections", "6", *args],
        ["--size", "768x768", *args],
        (
            "bench_markers"
            + ("" if first else f"_seed{seed}")
            + ("" if measure is None else f"_{measure}"),
        ),
        note=MARKER_SETS[seed]
        + (
            ""
            if measure is None
            else f"; Ki67 as each nucleus's {measure} (the default before 2026-12-04)"
        ),
    )


#: Every benchmark whose output is published, in the order run_all runs them.
BENCHES: list[Bench] = [
    Bench(
        "synth",
        "bench_synth.py",
        ["--sizes", "8192x6144,16384x12288"],
        ["--sizes", "2048x1536"],
        ("bench_synth",),
    ),
    Bench("demo", "bench_demo.py", [], [], ("bench_demo",)),
    Bench(
        "engine",
        "bench_engine.py",
        ["--sizes", "8192x6144,16384x12288"],
        ["--sizes", "2048x1536"],
        ("bench_engine",),
    ),
    Bench(
        "accuracy",
        "bench_accuracy.py",
        ["--size", "4096x3072", "--methods", "unet,classical", "--perturb", "none"],
        ["--size", "1024x768", "--methods", "unet,classical", "--perturb", "none"],
        ("bench_accuracy",),
    ),
    Bench(
        "accuracy-sample",
        "bench_accuracy.py",
        ["--sample-data", "--methods", "unet,classical", "--perturb", "none,noise2,noise3"],
        ["--sample-data", "--methods", "unet", "--perturb", "none"],
        ("bench_accuracy_sample",),
    ),
    Bench("ci-accuracy", "bench_ci_accuracy.py", [], [], ("bench_ci_accuracy",)),
    Bench(
        "network",
        "bench_network.py",
        ["--size", "8192x6144", "--repeats", "3"],
        ["--size", "2048x1536", "--held-out-size", "1024x768", "--repeats", "1"],
        ("bench_network",),
    ),
    Bench(
        "model-speed",
        "bench_model_speed.py",
        ["--models", f"v1={V1_PT},{SHIPPED}=default", "--size", "8192x6144", "--repeat", "2"],
        ["--models", f"v1={V1_PT},{SHIPPED}=default", "--size", "2048x1536", "--repeat", "1"],
        ("bench_model_speed",),
    ),
    Bench(
        "profile",
        "profile_run.py",
        ["--size", "8192x6144", "--method", "unet"],
        ["--size", "2048x1536", "--method", "unet"],
        ("profile_run",),
    ),
    Bench(
        "model-validation",
        "bench_model_validation.py",
        ["--models", f"v1,v2,{PREVIOUS},{SHIPPED}", "--record"],
        ["--models", SHIPPED, "--slides", "1"],
        ("bench_model_validation",),
        note="full: records the validation blocks of the shipped models' JSON",
    ),
    Bench(
        "reference-levels",
        "bench_reference_levels.py",
        ["--sections", "6"],
        [
            "--sections",
            "1",
            "--data",
            "/tmp/lungmets_generalisation_quick",
            "--markers-data",
            "/tmp/lungmets_markers_quick",
        ],
        ("bench_reference_levels",),
        note="the reference levels against the autofluorescence drawn",
    ),
    Bench(
        "generalisation",
        "bench_generalisation.py",
        ["--models", _GEN_MODELS, "--methods", "classical", "--sections", "2"],
        [
            "--models",
            f"{SHIPPED}=default,{SHIPPED}-no-af-check=default:af=0",
            "--methods",
            "",
            "--sections",
            "1",
            "--cases",
            "layout",
            "--data",
            "/tmp/lungmets_generalisation_quick",
        ],
        ("bench_generalisation",),
        note="quick: the two tissue-layout cases, one section each",
    ),
    Bench(
        "generalisation-6",
        "bench_generalisation.py",
        [
            "--models",
            f"{SHIPPED}=default,{SHIPPED}-int8=default:runtime=int8",
            "--methods",
            "",
            "--sections",
            "6",
        ],
        [
            "--models",
            f"{SHIPPED}=default",
            "--methods",
            "",
            "--sections",
            "6",
            "--cases",
            "membrane",
            "--data",
            "/tmp/lungmets_generalisation_quick",
        ],
        ("bench_generalisation_s6",),
        note="the shipped network on six sections per case (and its int8 runtime)",
    ),
    Bench(
        "generalisation-24",
        "bench_generalisation.py",
        [
            "--models",
            f"{SHIPPED}=default,{PREVIOUS}={PREVIOUS_PT}",
            "--methods",
            "",
            "--sections",
            "24",
        ],
        [
            "--models",
            f"{SHIPPED}=default",
            "--methods",
            "",
            "--sections",
            "24",
            "--cases",
            "autofluorescence=5.0",
            "--data",
            "/tmp/lungmets_generalisation_quick",
        ],
        ("bench_generalisation_s24",),
        note=f"{SHIPPED} and {PREVIOUS} on 24 sections per case, with intervals (an hour or two; "
        "quick: the 5x AF case)",
    ),
    *(_markers(seed) for seed in MARKER_SETS),
    *(_markers(seed, "mean") for seed in MARKER_SETS),
    *(
        Bench(
            f"screen-styles-{seed}",
            "bench_screen_cells.py",
            ["--markers-seed", str(seed)],
            ["--markers-seed", str(seed), "--markers-size", "768x768"],
            (f"bench_screen_styles_{seed}",),
            note="the screen against the dense run on bench_markers' sections",
        )
        for seed in (94000, 98000)
    ),
    Bench(
        "teach",
        "bench_teach.py",
        ["--budgets", "10", "40"],
        ["--budgets", "10", "--steps", "20", "--data", "/tmp/lungmets_teach_quick"],
        ("bench_teach",),
    ),
    Bench(
        "teach-points",
        "bench_teach.py",
        ["--no-regions", "--budgets", "10", "40"],
        ["--no-regions", "--budgets", "10", "--steps", "20", "--data", "/tmp/lungmets_teach_quick"],
        ("bench_teach_points",),
    ),
    Bench(
        "review",
        "bench_review.py",
        ["--lesions", "10000", "--slide-size", "16384x12288"],
        ["--lesions", "1000", "--repeats", "10", "--slide-size", "2048x1536"],
        ("bench_review",),
        needs="display",
    ),
    Bench(
        "real-nuclei",
        "bench_real_nuclei.py",
        ["--stardist", "{real}/stardist_data"],
        ["--stardist", "{real}/stardist_data"],
        ("bench_real_nuclei",),
        needs="real-data",
    ),
    Bench(
        "real-if",
        "bench_real_if.py",
        ["table", "--data", "{real}/real_if_data"],
        ["table", "--data", "{real}/real_if_data"],
        ("bench_real_if",),
        needs="real-data",
        note="prepare DIR/real_if_data first: bench_real_if.py prepare --data ...",
    ),
    Bench(
        "real-if-calibrated",
        "bench_real_if.py",
        ["calibrate", "--data", "{real}/real_if_data"],
        ["calibrate", "--data", "{real}/real_if_data"],
        ("bench_real_if_calibrated",),
        needs="real-data",
        note="the operating point chosen on one reviewed real field",
    ),
    Bench(
        "gpu",
        "bench_gpu.py",
        [],
        ["--size", "2048x1536", "--held-out-size", "1024x768", "--repeats", "1"],
        ("bench_gpu",),
        needs="gpu",
        note="on a machine with a CUDA GPU",
    ),
]


# --- reading what the benchmarks wrote ------------------------------------------------------


def section(text: str, key: str) -> str:
    """The text between the markers of `key` (KeyError naming the section if absent)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    if start not in text or end not in text:
        raise KeyError(f"BENCHMARKS.md has no section {key!r} (run its benchmark)")
    return text[text.index(start) + len(start) : text.index(end)]


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables of `text`, each as a list of rows (header -> cell text)."""
    out, rows, header = [], [], None
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                rows.append(dict(zip(header, cells, strict=False)))
        elif header is not None:
            out.append(rows)
            rows, header = [], None
    return out


def _num(cell: str) -> float:
    """The first number of a table cell ("+0.5%" -> 0.5, "1.49 s" -> 1.49)."""
    m = re.search(r"[-+]?\d+(?:\.\d+)?", cell.replace(",", ""))
    if m is None:
        raise ValueError(f"no number in table cell {cell!r}")
    return float(m.group())


class Figures:
    """What the quotes read: BENCHMARKS.md's sections and the shipped models' JSON."""

    def __init__(self, benchmarks_md: Path):
        self.text = Path(benchmarks_md).read_text()
        self.model = json.loads(MODEL_JSON.read_text())
        self.v1 = json.loads(V1_JSON.read_text())
        self.v2 = json.loads(V2_JSON.read_text())

    def table(self, key: str, index: int = 0) -> list[dict[str, str]]:
        found = tables(section(self.text, key))
        if len(found) <= index:
            raise KeyError(f"section {key!r} of BENCHMARKS.md has no table {index + 1}")
        return found[index]

    def row(self, key: str, first_cell: str, index: int = 0) -> dict[str, str]:
        """The row of table `index` of `key` whose first cell starts with `first_cell`."""
        for r in self.table(key, index):
            if next(iter(r.values())).startswith(first_cell):
                return r
        raise KeyError(f"section {key!r} of BENCHMARKS.md has no row {first_cell!r}")

    def cores(self, key: str) -> int:
        m = re.search(r"(\d+) cores", section(self.text, key))
        if m is None:
            raise KeyError(f"section {key!r} of BENCHMARKS.md names no machine")
        return int(m.group(1))


def _minutes(seconds: float) -> str:
    m = seconds / 60
    return f"{m:.0f} minute{'s' if round(m) != 1 else ''}" if m >= 1.5 else f"{seconds:.0f} s"


def _generalisation_cells(f: Figures, case: str, detector: str) -> list[float]:
    for r in f.table("bench_generalisation"):
        if r["case"] == case and r["detector"] == detector:
            return [float(v) for v in r["cells P / R / F1"].split("/")]
    raise KeyError(f"bench_generalisation has no row {case!r} / {detector!r}")


def _param_count() -> int:
    import torch

    state = torch.load(MODEL_PT, map_location="cpu", weights_only=True)
    return sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)


def q_demo_time(f: Figures) -> str:
    r = f.row("bench_demo", "`lungmets demo`")
    return f"about {_minutes(_num(r['wall time (s)']))} on {f.cores('bench_demo')} CPU cores"


def q_demo_fold(f: Figures) -> str:
    r = f.row("bench_demo", "15", index=1)
    return f"{_num(r['fold change']):.1f}x"


def q_sample_time(f: Figures) -> str:
    secs = [_num(r["wall time (s)"]) for r in f.table("bench_demo") if "sample" in r["step"]]
    return f"about {max(secs):.0f} s a slide"


def _pct(value: float) -> str:
    return "0" if round(value) == 0 else f"{value:+.0f}%"


def q_synth(f: Figures) -> str:
    r = f.table("bench_synth")[0]
    w, h = r["size (px)"].split("x")
    article = "An" if w.startswith(("8", "11", "18")) else "A"  # "an eight ..."
    return (
        f"{article} {w} x {h} section takes about {_num(r['wall time (s)']):.0f} s and "
        f"{_num(r['peak memory (GB)']):.1f} GB of memory on {f.cores('bench_synth')} CPU cores"
    )


def q_sample_size(f: Figures) -> str:
    sizes = [p.stat().st_size for p in (ROOT / "sample_data").glob("*.ome.tif")]
    return f"about {sum(sizes) / max(len(sizes), 1) / 1e6:.0f} MB each"


def q_screen_time(f: Figures) -> str:
    m = re.search(r"speed-up ([\d.]+)x", section(f.text, "bench_network"))
    if m is None:
        raise KeyError("bench_network names no speed-up of the screened run")
    return f"about {100 / float(m.group(1)):.0f}% of its time"


def q_int8_speed(f: Figures) -> str:
    m = re.search(r"([\d.]+)x faster than the\s+float export", section(f.text, "bench_network"))
    if m is None:
        raise KeyError("bench_network names no speed of the int8 runtime")
    return f"{float(m.group(1)):.2f}x faster"


def _liver_precision(f: Figures) -> tuple[float, float]:
    """The shipped network's cell precision on liver-like tissue without and with the
    autofluorescence check."""
    case = "layout: layout=liver"
    return (
        _generalisation_cells(f, case, f"{SHIPPED}-no-af-check")[0],
        _generalisation_cells(f, case, SHIPPED)[0],
    )


def q_liver_precision(f: Figures) -> str:
    before, after = _liver_precision(f)
    return f"from {before:.2f} to {after:.3f}"


def q_model_size(f: Figures) -> str:
    return f"{_param_count() / 1e6:.1f} M parameters, {MODEL_PT.stat().st_size / 1e6:.1f} MB"


def q_card_architecture(f: Figures) -> str:
    return f"{_param_count():,} parameters, {MODEL_PT.stat().st_size / 1e6:.1f} MB"


def q_v1_training_time(f: Figures) -> str:
    return f"{f.v1['history']['seconds'] / 60:.0f} min"


def q_card_training_time(f: Figures) -> str:
    return f"{f.model['history']['seconds'] / 60:.0f} min"


def q_card_operating_point(f: Figures) -> str:
    return _operating_point(f.model)


def q_v2_operating_point(f: Figures) -> str:
    return _operating_point(f.v2)


def q_v2_training_time(f: Figures) -> str:
    return f"{f.v2['history']['seconds'] / 60:.0f} min"


def q_v2_validation(f: Figures) -> str:
    return _validation_table(f.v2["validation"])


def _operating_point(model: dict) -> str:
    cal = model["centre_threshold_calibration"]
    t = f"{cal['centre_threshold']:g}"
    med, mean = cal["f1"], cal["f1_mean"]
    others = [k for k in med if k != t]
    near = min(others, key=lambda k: abs(float(k) - float(t)))
    low = min(others, key=float)
    others_at = f"{med[near]:.3f} at {near}" + (
        "" if low == near else f", {med[low]:.3f} at {low}"
    )  # the nearest threshold is also the lowest other when the lowest was chosen
    return (
        f"{med[t]:.3f}; {others_at}; the mean agrees: "
        f"{mean[t]:.3f} at {t}, {mean[near]:.3f} at {near}"
    )


def q_card_house_single(f: Figures) -> str:
    r = f.row("bench_accuracy", "single")
    p = float(r["unet"].split("/")[0])
    return f"single-cell precision {p:.3f} on the house style's held-out slides"


def q_card_liver(f: Figures) -> str:
    before, after = _liver_precision(f)
    return f"precision {before:.2f} without the autofluorescence check, {after:.3f} with it"


def q_card_uneven_af(f: Figures) -> str:
    r = next(
        (
            r
            for r in f.table("bench_generalisation_s24")
            if r["case"].startswith("autofluorescence: autofluorescence=5.0")
            and r["detector"] == SHIPPED
        ),
        None,
    )
    if r is None:
        raise KeyError(f"bench_generalisation_s24 has no row of {SHIPPED} on the 5x case")
    recall = float(r["cells P / R / F1"].split("/")[1])
    return (
        f"cells recall {recall:.3f}, HER2+ count {r['count']}, single-cell F1 "
        f"{_num(r['single F1 (n)']):.3f} over its 24 sections"
    )


def _validation_table(validation: dict) -> str:
    from bench_model_validation import validation_table

    return "\n" + "\n".join(validation_table(validation)) + "\n"


def q_card_validation(f: Figures) -> str:
    return _validation_table(f.model["validation"])


def q_v1_validation(f: Figures) -> str:
    return _validation_table(f.v1["validation"])


def q_cohort(f: Figures) -> str:
    r = f.row("bench_ci_accuracy", "test_cohort study", index=1)
    return (
        f"the largest error of a mouse's HER2+ cell count is "
        f"{_num(r['largest count error']):.1%} (median {_num(r['median count error']):.1%}), "
        f"of its tissue area {_num(r['largest area error']):.1%}, and the infected/control "
        f"fold change at 15 dpi is within {_num(r['fold change error']):.1%} of the true one"
    )


def q_teach(f: Figures) -> str:
    regions = f.table("bench_teach")
    points = f.table("bench_teach_points")
    before = regions[0]
    with_r = regions[1]
    last = points[-1]
    if _is_number(last["fine-tuning (s)"]):
        alone = (
            f"; or {last['corrections']} corrections and no region: F1 "
            f"{_num(last['cell F1 (mean of 4)']):.3f}, count "
            f"{_pct(_num(last['count error']))}"
        )
    else:  # the review found nothing to correct, and no region was marked
        alone = "; with no region marked and nothing to correct, there is nothing to teach"
    return (
        f"cell F1 {_num(before['cell F1 (mean of 4)']):.2f}, count "
        f"{_pct(_num(before['count error']))}): after two sections were reviewed "
        f"({with_r['corrections']} corrections, {_num(with_r['reviewed completely (mm²)']):.0f} "
        f"mm² marked complete), F1 {_num(with_r['cell F1 (mean of 4)']):.2f} and count error "
        f"{_pct(_num(with_r['count error']))} on four other sections{alone}"
    )


def _is_number(text: str) -> bool:
    try:
        _num(text)
    except ValueError:
        return False
    return True


def q_teach_time(f: Figures) -> str:
    secs = [
        _num(r["fine-tuning (s)"])
        for key in ("bench_teach", "bench_teach_points")
        for r in f.table(key)[1:]
        if _is_number(r["fine-tuning (s)"])
    ]
    steps = re.search(r"--steps (\d+)", section(f.text, "bench_teach"))
    return (
        f"{steps.group(1) if steps else '300'} steps, about {_minutes(max(secs))} on "
        f"{f.cores('bench_teach')} CPU cores"
    )


def q_review(f: Figures) -> str:
    text = section(f.text, "bench_review")
    rows = {r["action"]: _num(r["median (ms)"]) for r in f.table("bench_review")}
    n = re.search(r"\((\d+) lesions\)", text)
    edit = max(rows["set class"], rows["reject"], rows["undo"])
    out = (
        f"With {int(n.group(1)):,} lesions loaded, selecting a lesion takes about "
        f"{rows['select']:.0f} ms and changing its class, rejecting it or undoing about "
        f"{edit:.0f} ms"
    )
    m = re.search(r"Opening a (\d+) x (\d+) slide .*?: ([\d.]+) s .*?median (\d+) ms", text, re.S)
    if m:
        w, h, s, pan = m.groups()
        out += (
            f", journal write and the window's repaint included; a {w} x {h} px slide opens "
            f"in about {float(s):.1f} s and pans in about {pan} ms a step"
        )
    return out


#: Quoted figure -> function of `Figures` that writes it.
QUOTES = {
    "demo_time": q_demo_time,
    "demo_fold": q_demo_fold,
    "sample_time": q_sample_time,
    "synth": q_synth,
    "sample_size": q_sample_size,
    "screen_time": q_screen_time,
    "int8_speed": q_int8_speed,
    "liver_precision": q_liver_precision,
    "model_size": q_model_size,
    "v1_training_time": q_v1_training_time,
    "teach": q_teach,
    "teach_time": q_teach_time,
    "review": q_review,
    "card_architecture": q_card_architecture,
    "card_training_time": q_card_training_time,
    "card_operating_point": q_card_operating_point,
    "card_house_single": q_card_house_single,
    "card_liver": q_card_liver,
    "card_uneven_af": q_card_uneven_af,
    "card_validation": q_card_validation,
    "cohort": q_cohort,
    "v1_validation": q_v1_validation,
    "v2_operating_point": q_v2_operating_point,
    "v2_training_time": q_v2_training_time,
    "v2_validation": q_v2_validation,
}

_REGION = re.compile(r"<!-- figure:([a-z0-9_]+) -->(.*?)<!-- /figure:\1 -->", re.S)


def regions(text: str) -> list[tuple[str, str]]:
    """The quoted-figure regions of a document: (key, text) in order."""
    return [(m.group(1), m.group(2)) for m in _REGION.finditer(text)]


def render(text: str, figures: Figures, errors: list[str] | None = None) -> str:
    """`text` with every quoted-figure region rewritten from `figures`.

    A figure that cannot be written (its table is missing) raises, or with `errors` given is
    left as it was and its reason appended there.
    """

    def sub(m: re.Match) -> str:
        key = m.group(1)
        try:
            if key not in QUOTES:
                raise KeyError(f"unknown quoted figure {key!r} (add it to run_all.QUOTES)")
            value = QUOTES[key](figures)
        except (KeyError, ValueError) as exc:
            if errors is None:
                raise
            errors.append(f"{key}: {exc}")
            return m.group(0)
        return f"<!-- figure:{key} -->{value}<!-- /figure:{key} -->"

    return _REGION.sub(sub, text)


def write_quotes(
    benchmarks_md: Path, documents: list[Path], errors: list[str] | None = None
) -> list[str]:
    """Rewrite the quoted figures of `documents` in place; the keys that changed."""
    figures = Figures(benchmarks_md)
    changed = []
    for doc in documents:
        old = doc.read_text()
        new = render(old, figures, errors)
        changed += [k for (k, a), (_, b) in zip(regions(old), regions(new), strict=True) if a != b]
        if new != old:
            tmp = doc.with_name(doc.name + ".tmp")
            tmp.write_text(new)
            os.replace(tmp, doc)
    return changed


# --- running ----------------------------------------------------------------------------------


def _command(bench: Bench, quick: bool, real: Path | None) -> list[str] | None:
    args = [a.replace("{real}", str(real)) for a in (bench.quick if quick else bench.full)]
    cmd = [sys.executable, str(HERE / bench.script), *args, "--write"]
    if bench.needs == "display" and not os.environ.get("DISPLAY"):
        if shutil.which("xvfb-run") is None:
            return None
        cmd = ["xvfb-run", "-a", *cmd]
    if bench.needs == "real-data" and real is None:
        return None
    if bench.needs == "gpu" and not _has_cuda():
        return None
    return cmd


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, into copies in --out")
    ap.add_argument("--out", type=Path, default=Path("/tmp/lungmets_figures_quick"))
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names")
    ap.add_argument("--real-data", type=Path, default=None, help="folder of real images")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--quotes-only", action="store_true", help="only rewrite the quotes")
    args = ap.parse_args(argv)
    names = [b.name for b in BENCHES]
    for opt in (args.only, args.skip):
        unknown = set(filter(None, opt.split(","))) - set(names)
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(names)}")
    if args.list:
        for b in BENCHES:
            print(
                f"{b.name:16} {b.script} {' '.join(b.full)}"
                + (f"  [{b.needs}]" if b.needs else "")
                + (f"  ({b.note})" if b.note else "")
            )
        return 0
    if args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / "BENCHMARKS.md"
        docs = [args.out / p.name for p in DOCUMENTS]
        for src, dst in zip([ROOT / "BENCHMARKS.md", *DOCUMENTS], [target, *docs], strict=True):
            shutil.copyfile(src, dst)
        logs = args.out / "logs"
    else:
        target, docs = ROOT / "BENCHMARKS.md", DOCUMENTS
        logs = Path("/tmp/lungmets_figures_logs")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, BENCHMARKS_ENV: str(target)}
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))
    failed, skipped = [], []
    t_all = time.perf_counter()
    for bench in [] if args.quotes_only else BENCHES:
        if (only and bench.name not in only) or bench.name in skip:
            continue
        cmd = _command(bench, args.quick, args.real_data)
        if cmd is None:
            reason = {"display": "no display and no xvfb-run", "gpu": "a CUDA GPU"}.get(
                bench.needs, "--real-data"
            )
            skipped.append(f"{bench.name} (needs {reason})")
            print(f"skip  {bench.name}: needs {reason}", flush=True)
            continue
        log = logs / f"{bench.name}.log"
        t = time.perf_counter()
        with log.open("w") as fh:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
            ).returncode
        dt = time.perf_counter() - t
        print(f"{'ok' if rc == 0 else 'FAIL':5} {bench.name} ({dt:.0f} s; log {log})", flush=True)
        if rc != 0:
            failed.append(bench.name)
    errors: list[str] = []
    changed = write_quotes(target, docs, errors)
    for err in errors:
        print(f"quote not written: {err}", file=sys.stderr)
    print(
        f"quoted figures: {len(changed)} changed ({', '.join(changed) or 'none'}); "
        f"written to {', '.join(str(d) for d in [target, *docs])}"
    )
    print(f"{time.perf_counter() - t_all:.0f} s in all", end="")
    print(f"; skipped: {', '.join(skipped)}" if skipped else "")
    if failed:
        print(f"failed: {', '.join(failed)} (see the logs in {logs})", file=sys.stderr)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
