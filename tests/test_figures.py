"""Published figures: every measured number the README and the model card quote is written by
`tests/benchmarks/run_all.py` from what a benchmark wrote, and agrees with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
import run_all  # noqa: E402

DOCUMENTS = run_all.DOCUMENTS

#: What a measured figure looks like in prose: a duration, a size in bytes, a score with two or
#: more decimals (F1, precision), a signed percentage (a count error) or a decimal fold change.
MEASURED = {
    "duration": r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|s|sec|seconds?|min|minutes?|h|hours?)\b",
    "size": r"(?<![\w.])\d+(?:\.\d+)?\s?[KMGT]i?B\b",
    "score": r"(?<![\w.-])(?:0\.\d{2,}|1\.0+)(?![\d.-]|\s?(?:µm|um|x))",
    "count error": r"(?<![\w.])[+-]\d+(?:\.\d+)?%",
    "fold change": r"(?<![\w.-])\d+\.\d+x\b(?!-)",
}

#: Numbers of those shapes that are settings, not measurements (each says why).
SETTINGS = [
    "at most 1.1x",  # the autofluorescence check's default ratio
    "p < 0.05",  # the significance level the cohort test asks for
    "It was 0.95",  # the operating point's former value
]


def _prose(text: str) -> str:
    """`text` without code (fenced blocks, inline spans), quoted regions and settings."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"<!-- figure:([a-z0-9_]+) -->.*?<!-- /figure:\1 -->", "", text, flags=re.S)
    for setting in SETTINGS:
        text = text.replace(setting, "")
    return text


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_every_measured_figure_is_in_a_region_run_all_writes(doc):
    found = [
        f"{kind}: {m.group()!r} in {line.strip()[:100]!r}"
        for line in _prose(doc.read_text()).splitlines()
        for kind, pattern in MEASURED.items()
        for m in re.finditer(pattern, line)
    ]
    assert not found, (
        f"{doc.name} quotes measured figures outside <!-- figure:KEY --> regions (give each a "
        "quote in tests/benchmarks/run_all.py, or reword it):\n" + "\n".join(found)
    )


def test_the_detector_of_measured_figures_finds_them():
    """The check above cannot pass by seeing nothing: each shape is found in plain prose."""
    prose = _prose(
        "runs in 16.9 s at 1.47 GB; cell F1 0.998, count -2.5%, 7.6x more cells; `0.999 in code`"
    )
    kinds = {k for k, p in MEASURED.items() if re.search(p, prose)}
    assert kinds == set(MEASURED)
    assert not re.search(MEASURED["score"], _prose("pixels of 0.65 um, 0.25-1.0 µm, 0.05-5x"))


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_quoted_figures_agree_with_the_published_benchmarks(doc):
    """Rendering every quote from the committed BENCHMARKS.md and model JSON changes nothing:
    the README says what the benchmarks measured, not what someone typed."""
    text = doc.read_text()
    keys = [k for k, _ in run_all.regions(text)]
    assert keys, f"{doc.name} has no quoted figures"
    assert set(keys) <= set(run_all.QUOTES)
    figures = run_all.Figures(ROOT / "BENCHMARKS.md")
    rendered = run_all.render(text, figures)
    stale = [
        f"{k}: {old!r} -> {new!r}"
        for (k, old), (_, new) in zip(run_all.regions(text), run_all.regions(rendered), strict=True)
        if old != new
    ]
    assert not stale, "run `python3 tests/benchmarks/run_all.py --quotes-only`:\n" + "\n".join(
        stale
    )


def test_every_quote_is_used_and_every_published_section_has_its_benchmark():
    used = {k for doc in DOCUMENTS for k, _ in run_all.regions(doc.read_text())}
    assert used == set(run_all.QUOTES)
    published = set(re.findall(r"<!-- (\w+):start -->", (ROOT / "BENCHMARKS.md").read_text()))
    written = {key for b in run_all.BENCHES for key in b.sections}
    # Sections no script of run_all writes would be figures nobody can regenerate.
    assert published <= written, sorted(published - written)
    scripts = {b.script for b in run_all.BENCHES}
    for path in (ROOT / "tests" / "benchmarks").glob("*.py"):
        if "write_section(" in path.read_text() and path.name != "_common.py":
            assert path.name in scripts, f"{path.name} writes BENCHMARKS.md but run_all skips it"


def test_tables_are_read_as_written():
    text = "intro\n\n| a | b (s) |\n| --- | ---: |\n| x | 1.5 |\n| y | +2.0% |\n\nafter\n"
    assert run_all.tables(text) == [[{"a": "x", "b (s)": "1.5"}, {"a": "y", "b (s)": "+2.0%"}]]
    assert run_all._num("+2.0%") == 2.0
    assert run_all._num("12,345 cells") == 12345


def test_quick_run_writes_copies_and_leaves_the_published_files_alone(tmp_path):
    """run_all in a fresh process: the generator benchmark at its quick size into copies."""
    published = {p: p.read_bytes() for p in [ROOT / "BENCHMARKS.md", *DOCUMENTS]}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "benchmarks" / "run_all.py"),
            "--quick",
            "--only",
            "synth",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in published} == published
    section = run_all.section((tmp_path / "BENCHMARKS.md").read_text(), "bench_synth")
    assert "--sizes 2048x1536" in section
    rows = run_all.tables(section)[0]
    assert [r["size (px)"] for r in rows] == ["2048x1536", "2048x1536"]
    assert all(float(r["wall time (s)"]) > 0 for r in rows)
    readme = (tmp_path / "README.md").read_text()
    (synth,) = [t for k, t in run_all.regions(readme) if k == "synth"]
    assert synth.startswith("A 2048 x 1536 section takes about ")
    assert f"{float(rows[0]['wall time (s)']):.0f} s" in synth
