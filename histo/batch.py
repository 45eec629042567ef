"""Runs over many slides: resumable, in parallel where memory allows, failures not fatal.

Each slide is analysed and written on its own (`histo.outputs.write_results`). A slide whose
results already exist for the same input (SHA-256), analysis parameters, model and software
version is skipped, so an interrupted batch is simply run again; ``force=True`` redoes it.
A slide that fails is reported in its `SlideOutcome` and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._threads import iter_in_thread
from ._version import ANALYSIS_REVISION
from .config import AnalysisConfig
from .errors import Cancelled, InputError

log = logging.getLogger(__name__)

#: Settings that change how fast an analysis runs, not what it finds: not part of the run key
#: (but ``runtime="int8"`` is: its cells may differ near the operating point).
EXECUTION_ONLY = (
    "device",
    "batch_size",
    "torch_threads",
    "runtime",
    "precision",
    "chunk_size_px",
)

#: Rough peak memory of one chunk task (2048-px chunk), in bytes, measured on 8k slides
#: (BENCHMARKS.md): the classical detector and the screened network ~0.75 GB, dense network
#: ~1.9 GB.
_TASK_BYTES = {"classical": 0.75e9, "unet": 0.75e9, "unet-dense": 1.9e9}


@dataclass
class SlideOutcome:
    """How one slide of a batch went. ``status`` is ``"ok"``, ``"skipped"`` or ``"failed"``."""

    slide: str
    ok: bool
    out_dir: Path | None = None
    message: str = ""
    her2_cells: int | None = None
    lesions: int | None = None
    seconds: float = 0.0
    status: str = ""
    #: What ran otherwise than asked (summary.json "fallbacks"): GPU -> CPU, a memory guess.
    fallbacks: list = field(default_factory=list)

    def __post_init__(self):
        if not self.status:
            self.status = "ok" if self.ok else "failed"


@dataclass
class BatchEvent:
    """Progress of a batch: ``kind`` is ``"slide"``, ``"overview"`` (the coarse view of a
    giant slide without a pyramid being read), ``"chunks"`` or ``"done"``."""

    kind: str
    slide_index: int
    n_slides: int
    done: int = 0
    total: int = 0
    outcome: SlideOutcome | None = None
    slide: str = ""


def run_key(
    checksum: str,
    config: AnalysisConfig,
    *,
    channels=None,
    pixel_size_um: float | None = None,
) -> str:
    """The identity of an analysis: SHA-256 over everything that changes its results.

    The input's checksum, the analysis parameters (except `EXECUTION_ONLY` ones), the
    channel mapping and pixel-size override, the model's SHA-256 and operating point (the
    settings in its JSON that change what it finds: `models.OPERATING_POINT`), the lungmets
    version and its `ANALYSIS_REVISION`.
    """
    from ._version import __version__

    params = {k: v for k, v in config.to_dict().items() if k not in EXECUTION_ONLY}
    if config.method == "unet" and config.runtime == "int8":  # not quite the same cells
        params["runtime"] = "int8"
    model = None
    if config.method == "unet":
        from models import model_identity

        model = model_identity(config.model_path)
    ident = {
        "input_sha256": checksum,
        "parameters": params,
        "channels": _jsonable_channels(channels),
        "pixel_size_um": pixel_size_um,
        "model_sha256": model,
        "lungmets": __version__,
        "analysis_revision": ANALYSIS_REVISION,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable_channels(channels):
    return channels if channels is None or isinstance(channels, str) else list(channels)


def finished_outcome(folder: Path, key: str) -> SlideOutcome | None:
    """The outcome of a finished analysis in `folder` with run key `key`, else None."""
    summary = folder / "summary.json"
    if not (summary.is_file() and (folder / "cells.csv").is_file()):
        return None
    if not (folder / "lesions.csv").is_file():
        return None
    try:
        s = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    if s.get("run_key") != key:
        return None
    counts = s.get("counts", {})
    return SlideOutcome(
        s.get("slide", folder.name),
        True,
        folder,
        "already done (same input, parameters and model); --force redoes it",
        counts.get("her2_cells"),
        counts.get("lesions"),
        0.0,
        status="skipped",
        fallbacks=list(s.get("fallbacks", [])),
    )


def max_parallel_slides(
    config: AnalysisConfig, threads_per_slide: int, available_bytes: float | None = None
) -> int:
    """How many slides fit in memory at once (estimate from the available memory, read
    with `available_memory` unless given)."""
    avail = available_bytes if available_bytes is not None else available_memory()
    avail = ASSUMED_MEMORY_BYTES if avail is None else avail
    kind = "unet-dense" if config.method == "unet" and not config.screen else config.method
    per_task = _TASK_BYTES[kind] * (config.chunk_size_px / 2048) ** 2
    per_slide = 0.4e9 + threads_per_slide * per_task
    return max(1, int(0.7 * avail // per_slide))


#: What `iter_run_batch` assumes when the free memory cannot be read (and says so).
ASSUMED_MEMORY_BYTES = 4e9


def available_memory() -> float | None:
    """Memory available to new work (bytes), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _run_one(
    i, path, out_dir, config, force, kwargs, *, emit, labels_zarr=False, cancel=None, notes=()
) -> SlideOutcome:
    """Analyse and write one slide; every error becomes a failed outcome. Once `cancel` (a
    `threading.Event`) is set, no further chunk starts and nothing is written."""
    from .io import slide_name
    from .outputs import write_results
    from .pipeline import file_checksum, iter_analyze_slide

    name = str(path)
    t0 = time.perf_counter()
    if cancel is not None and cancel.is_set():
        return SlideOutcome(name, False, message=f"{name}: cancelled before it started")
    try:
        if not Path(path).exists():
            raise InputError(f"{path}: no such file or folder; check the path")
        checksum = file_checksum(path)
        key = run_key(
            checksum,
            config or AnalysisConfig(),
            channels=kwargs.get("channels"),
            pixel_size_um=kwargs.get("pixel_size_um"),
        )
        folder = Path(out_dir) / slide_name(path)
        if not force:
            done = finished_outcome(folder, key)
            if done is not None and labels_zarr:
                done = None if not _labels_exist(folder, path) else done
            if done is not None:
                done.slide = name
                return done
        gen = iter_analyze_slide(path, config, checksum=checksum, cancel=cancel, **kwargs)
        while True:
            try:
                done_n, total, step = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            # "chunks", or "overview" (a giant slide without a pyramid, read first)
            emit(BatchEvent(step, i, 0, done=done_n, total=total, slide=name))
        result.summary["fallbacks"] = [*notes, *result.summary.get("fallbacks", [])]
        result.summary["run_key"] = key
        # What else the key was made of, so that `lungmets rethreshold` can renew it.
        result.summary["run_key_inputs"] = {
            "parameters": (config or AnalysisConfig()).to_dict(),
            "channels": _jsonable_channels(kwargs.get("channels")),
            "pixel_size_um": kwargs.get("pixel_size_um"),
            "analysis_revision": ANALYSIS_REVISION,
        }
        try:
            folder = write_results(result, out_dir)
        except OSError as exc:  # disk full, quota, permissions changed under the run
            raise InputError(
                f"{folder}: results not written: {exc.strerror or exc}; free space there or "
                "choose another --out (no summary.json was written: the slide counts as not "
                "done and is analysed again next time)"
            ) from exc
        if labels_zarr:
            from .exports import write_lesion_labels

            write_lesion_labels(folder, path)
        return SlideOutcome(
            name,
            True,
            folder,
            "ok",
            len(result.cells),
            len(result.lesions),
            time.perf_counter() - t0,
            fallbacks=result.summary["fallbacks"],
        )
    except InputError as exc:
        return SlideOutcome(name, False, message=str(exc), seconds=time.perf_counter() - t0)
    except Cancelled:
        return SlideOutcome(
            name,
            False,
            message=f"{name}: cancelled; nothing written",
            seconds=time.perf_counter() - t0,
        )
    except Exception as exc:  # a failed slide must not stop the batch
        if cancel is not None and cancel.is_set():
            # Torn down under a cancelled run (Ctrl-C ends the interpreter while a chunk is
            # still being computed here): a consequence of stopping, not an error to report.
            return SlideOutcome(
                name,
                False,
                message=f"{name}: cancelled; nothing written",
                seconds=time.perf_counter() - t0,
            )
        log.exception("unexpected error on %s", name)
        return SlideOutcome(
            name,
            False,
            message=f"{name}: {type(exc).__name__}: {exc}",
            seconds=time.perf_counter() - t0,
        )


def _labels_exist(folder: Path, slide: str | os.PathLike) -> bool:
    return (folder / "lesion_labels.ome.zarr").exists() or (
        Path(slide) / "labels" / "lesions"
    ).exists()


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    """Raise `InputError` naming `out_dir` if it cannot hold results: a file of that name, a
    path through a file, a folder without permission to write. Creates nothing.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(
            f"{out}: --out names a file, not a folder; give a folder for the results "
            "(it is created if needed)"
        )
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(
            f"{out}: cannot create the results folder there ({existing} is a file); "
            "choose another --out"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"{out}: cannot write results there ({existing} is not writable); choose another "
            "--out or make it writable"
        )
    return out


def iter_run_batch(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: AnalysisConfig | None = None,
    *,
    force: bool = False,
    parallel: int = 1,
    labels_zarr: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    **kwargs,
) -> Generator[BatchEvent, None, list[SlideOutcome]]:
    """Analyse slides and write each one's results; skip those already done.

    Parameters
    ----------
    slides : sequence of path-like
    out_dir : path-like
        Results go to ``out_dir/<slide name>/``.
    config : AnalysisConfig, optional
    force : bool
        Redo slides whose results exist for the same input, parameters and model.
    labels_zarr : bool
        Also write the lesion label image as OME-Zarr labels (into an OME-Zarr slide's
        ``labels/`` group, else ``lesion_labels.ome.zarr`` in the slide's results); see
        `histo.exports.write_lesion_labels`.
    parallel : int
        Slides analysed at once (each with its share of the cores, or all sharing the
        cluster). Lowered, with a warning, to what the available memory holds.
    workers : int, optional
        Start one `distributed.LocalCluster` of this many processes for the whole batch.
    scheduler : str, optional
        Address of an existing Dask cluster to run on.
    **kwargs
        ``channels`` and ``pixel_size_um`` for `histo.pipeline.iter_analyze_slide`.

    Yields
    ------
    BatchEvent
        ``"slide"`` when a slide starts, ``"chunks"`` as its chunks finish, ``"done"`` with
        its `SlideOutcome`.

    Returns
    -------
    list of SlideOutcome
        In the order of `slides`.
    """
    from .io import slide_name

    config = config or AnalysisConfig()
    check_output_folder(out_dir)
    n = len(slides)
    names: dict[str, str] = {}
    for p in slides:
        other = names.setdefault(slide_name(p), str(p))
        if other != str(p):
            raise InputError(
                f"{other} and {p} would both write to {Path(out_dir) / slide_name(p)}; "
                "rename one of them or run them into different --out folders"
            )
    parallel = max(1, min(parallel, n or 1))
    cores = os.cpu_count() or 1
    distributed = bool(workers or scheduler)
    notes: list[str] = []  # fallbacks of the whole batch, recorded in each slide's summary
    if parallel > 1 and not distributed:
        avail = available_memory()
        if avail is None:
            avail = ASSUMED_MEMORY_BYTES
            notes.append(
                f"free memory could not be read: {avail / 1e9:.0f} GB assumed to choose how "
                "many slides run at once"
            )
            log.warning("%s", notes[-1])
        fit = max_parallel_slides(config, max(1, cores // parallel), available_bytes=avail)
        if fit < parallel:
            log.warning(
                "%d slides at once would not fit in the available memory; running %d",
                parallel,
                fit,
            )
            parallel = fit
    cluster = None
    if workers and not scheduler:
        from distributed import LocalCluster

        # One cluster for the whole batch, not one per slide.
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        scheduler = cluster.scheduler_address
    if scheduler:
        kwargs["scheduler"] = scheduler
    elif parallel > 1:
        kwargs["threads"] = max(1, cores // parallel)
    # Set when the consumer closes this generator (napari's Cancel, Ctrl-C): chunks not yet
    # started are not started, and nothing more is written.
    cancel = threading.Event()
    try:
        if parallel == 1:
            outcomes = []
            for i, path in enumerate(slides):
                yield BatchEvent("slide", i, n, slide=str(path))
                # Events of one slide are handed on as they come: run it in a generator.
                gen = iter_in_thread(
                    _run_one,
                    i,
                    path,
                    out_dir,
                    config,
                    force,
                    kwargs,
                    labels_zarr=labels_zarr,
                    cancel=cancel,
                    notes=notes,
                )
                try:
                    while True:
                        try:
                            ev = next(gen)
                        except StopIteration as stop:
                            outcome = stop.value
                            break
                        ev.n_slides = n
                        yield ev
                finally:
                    gen.close()
                outcomes.append(outcome)
                yield BatchEvent("done", i, n, outcome=outcome, slide=str(path))
            return outcomes
        return (
            yield from _parallel(
                slides, out_dir, config, force, kwargs, parallel, labels_zarr, cancel, notes
            )
        )
    finally:
        cancel.set()
        if cluster is not None:
            cluster.close()


def _parallel(slides, out_dir, config, force, kwargs, parallel, labels_zarr, cancel, notes):
    from concurrent.futures import ThreadPoolExecutor

    n = len(slides)
    q: queue.SimpleQueue = queue.SimpleQueue()
    outcomes: list[SlideOutcome | None] = [None] * n

    def work(i, path):
        q.put(BatchEvent("slide", i, n, slide=str(path)))
        outcome = _run_one(
            i,
            path,
            out_dir,
            config,
            force,
            kwargs,
            emit=q.put,
            labels_zarr=labels_zarr,
            cancel=cancel,
            notes=notes,
        )
        q.put(BatchEvent("done", i, n, outcome=outcome, slide=str(path)))

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="lungmets-slide") as pool:
        futures = [pool.submit(work, i, p) for i, p in enumerate(slides)]
        finished = 0
        try:
            while finished < n:
                ev = q.get()
                ev.n_slides = n
                if ev.kind == "done":
                    outcomes[ev.slide_index] = ev.outcome
                    finished += 1
                yield ev
        finally:
            if finished < n:  # closed early: stop what runs, start nothing more
                cancel.set()
                pool.shutdown(wait=False, cancel_futures=True)
        for f in futures:
            f.result()
    return outcomes


def run_batch(slides, out_dir, config=None, **kwargs) -> list[SlideOutcome]:
    """Drive `iter_run_batch` to the end; returns the outcomes."""
    gen = iter_run_batch(slides, out_dir, config, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def find_slides(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand folders into the slides they hold; keep files as given.

    Raises
    ------
    InputError
        If an input does not exist or a folder holds no slide.
    """
    from .io import SLIDE_SUFFIXES as exts

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
