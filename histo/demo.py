"""The whole job on a small generated study: slides -> per-slide results -> cohort report.

``lungmets demo`` drives `iter_demo`. Everything lands in one folder::

    OUT/cohort/    the generated slides, samples.csv and the generator's truth
    OUT/results/   one folder per slide (lungmets run)
    OUT/report/    tables, figures and report.html (lungmets cohort)

Each stage is skipped when its output is already there for the same settings, so running the
demo again is quick.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import AnalysisConfig


@dataclass(frozen=True)
class DemoSettings:
    """The study the demo generates (defaults: about 2 minutes on 2 CPU cores)."""

    mice: int = 4
    sections: int = 3
    dpis: tuple[int, ...] = (3, 15)
    size_px: tuple[int, int] = (1024, 768)
    seed: int = 2025


def iter_demo(
    out_dir: str | os.PathLike = "lungmets_demo",
    settings: DemoSettings | None = None,
    config: AnalysisConfig | None = None,
    *,
    jobs: int | None = None,
) -> Generator[tuple[str, int, int], None, tuple]:
    """Generate a study, analyse every slide, write the cohort report.

    Parameters
    ----------
    out_dir : path-like
    settings : DemoSettings, optional
    config : AnalysisConfig, optional
        Analysis settings (default: the network, screened).
    jobs : int, optional
        Processes that generate slides (default: all cores).

    Yields
    ------
    (stage, done, total)
        ``stage`` is ``"generate"``, ``"analyse"`` or ``"report"``.

    Returns
    -------
    result : histo.cohort.CohortResult
    report : Path
    outcomes : list of histo.batch.SlideOutcome
    """
    from ._threads import iter_in_thread
    from .batch import iter_run_batch
    from .cohort import read_sample_sheet, resolve_slides
    from .errors import InputError
    from .report import run_cohort
    from .synthetic import generate_cohort

    out = Path(out_dir)
    settings = settings or DemoSettings()
    cohort_dir, results, report_dir = out / "cohort", out / "results", out / "report"
    stamp = cohort_dir / "demo_settings.json"
    wanted = json.dumps(asdict(settings), sort_keys=True)
    n = settings.mice * settings.sections * len(settings.dpis) * 2
    if not (
        stamp.is_file() and stamp.read_text() == wanted and (cohort_dir / "samples.csv").is_file()
    ):
        yield ("generate", 0, n)
        yield from iter_in_thread(
            lambda emit, **kw: generate_cohort(
                progress=lambda d, t, m: emit(("generate", d, t)), **kw
            ),
            out_dir=cohort_dir,
            mice=settings.mice,
            sections=settings.sections,
            dpis=settings.dpis,
            size_px=settings.size_px,
            seed=settings.seed,
            labels=False,
            jobs=jobs or os.cpu_count() or 1,
        )
        from .atomic import atomic_path

        with atomic_path(stamp) as tmp:
            tmp.write_text(wanted)
    yield ("generate", n, n)
    sheet_path = cohort_dir / "samples.csv"
    slides = resolve_slides(read_sample_sheet(sheet_path), sheet_path)
    gen = iter_run_batch(slides, results, config)
    done = 0
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            outcomes = stop.value
            break
        if ev.kind == "done":
            done += 1
            yield ("analyse", done, len(slides))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise InputError(
            f"{len(failed)} demo slide(s) failed: " + "; ".join(o.message for o in failed[:3])
        )
    yield ("report", 0, 1)
    result, report = run_cohort(sheet_path, results, report_dir)
    yield ("report", 1, 1)
    return result, report, outcomes


def headline_numbers(
    result, metrics: Sequence[str] = ("her2_cells_per_mm2", "dormant_per_mm2", "focus_per_mm2")
) -> list[str]:
    """The sentences the demo prints: fold changes and p-values per time point."""
    lines = []
    for m in metrics:
        lines += result.headline(m)
    return lines
