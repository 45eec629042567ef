"""Runs over many slides: each analysed and written on its own, failures reported, not fatal."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import AnalysisConfig
from .errors import InputError

log = logging.getLogger(__name__)


@dataclass
class SlideOutcome:
    """How one slide of a batch went."""

    slide: str
    ok: bool
    out_dir: Path | None = None
    message: str = ""
    her2_cells: int | None = None
    lesions: int | None = None
    seconds: float = 0.0


@dataclass
class BatchEvent:
    """Progress of a batch: ``kind`` is ``"slide"``, ``"chunks"`` or ``"done"``."""

    kind: str
    slide_index: int
    n_slides: int
    done: int = 0
    total: int = 0
    outcome: SlideOutcome | None = None
    slide: str = ""


def iter_run_batch(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: AnalysisConfig | None = None,
    **kwargs,
) -> Generator[BatchEvent, None, list[SlideOutcome]]:
    """Analyse slides one after the other and write each one's results.

    A slide with bad input (`histo.InputError`) or any other error is reported in its
    `SlideOutcome` and the batch goes on. Keyword arguments go to
    `histo.pipeline.iter_analyze_slide` (channels, pixel_size_um, workers, scheduler).

    Yields
    ------
    BatchEvent

    Returns
    -------
    list of SlideOutcome
    """
    from .outputs import write_results
    from .pipeline import iter_analyze_slide

    outcomes = []
    n = len(slides)
    for i, path in enumerate(slides):
        name = str(path)
        yield BatchEvent("slide", i, n, slide=name)
        t0 = time.perf_counter()
        try:
            gen = iter_analyze_slide(path, config, **kwargs)
            while True:
                try:
                    done, total, _ = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                yield BatchEvent("chunks", i, n, done=done, total=total, slide=name)
            folder = write_results(result, out_dir)
            outcome = SlideOutcome(
                name,
                True,
                folder,
                "ok",
                len(result.cells),
                len(result.lesions),
                time.perf_counter() - t0,
            )
        except InputError as exc:
            outcome = SlideOutcome(name, False, message=str(exc), seconds=time.perf_counter() - t0)
        except Exception as exc:  # a failed slide must not stop the batch
            log.exception("unexpected error on %s", name)
            outcome = SlideOutcome(
                name,
                False,
                message=f"{name}: {type(exc).__name__}: {exc}",
                seconds=time.perf_counter() - t0,
            )
        outcomes.append(outcome)
        yield BatchEvent("done", i, n, outcome=outcome, slide=name)
    return outcomes


def find_slides(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand folders into the slides they hold; keep files as given.

    Raises
    ------
    InputError
        If an input does not exist or a folder holds no slide.
    """
    exts = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".svs", ".ndpi", ".ome.zarr", ".zarr")
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not p.name.lower().endswith(".zarr"):
            found = sorted(q for q in p.iterdir() if q.name.lower().endswith(exts))
            if not found:
                raise InputError(f"{p}: no slides in this folder (looked for {', '.join(exts)})")
            out.extend(found)
        elif not p.exists():
            raise InputError(f"{p}: no such file or folder; check the path")
        else:
            out.append(p)
    return out
