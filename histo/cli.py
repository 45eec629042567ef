"""The ``lungmets`` command line: argument parsing only.

Each subcommand calls one library function. Heavy modules (NumPy, pandas, Dask, torch) are
imported inside the handlers, never at the top of this module, so that ``lungmets --help``
answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from histo._version import __version__
from histo.config import KI67_MEASURES, METHODS, PRECISIONS, RUNTIMES, AnalysisConfig
from histo.demo import DemoSettings
from histo.errors import InputError

_DEFAULTS = AnalysisConfig()  # the one source of default settings (histo.config is light)

__all__ = ["build_parser", "main"]

PROG = "lungmets"

ProgressCallback = Callable[[int, int, str], None]


# --- argument types ---------------------------------------------------------------------------


def _size_px(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (pixels) into ``(width, height)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT in pixels, e.g. 8192x6144; got {text!r}"
        )
    width, height = int(match[1]), int(match[2])
    if width == 0 or height == 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive; got {text!r}")
    return width, height


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1; got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0; got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of non-negative integers, e.g. ``3,9,15,28``."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items):
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, e.g. 3,9,15,28; got {text!r}"
        )
    return tuple(int(item) for item in items)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number of at least 0; got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number greater than 0; got {text!r}")
    return value


def _range(text: str) -> tuple[float, float]:
    """Parse ``LO-HI`` (or a single number) into ``(lo, hi)``."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(?:[-,:]\s*([\d.]+))?\s*", text)
    try:
        lo = float(match[1])
        hi = float(match[2]) if match[2] else lo
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected LO-HI, e.g. 12-18; got {text!r}") from None
    if hi < lo:
        raise argparse.ArgumentTypeError(f"expected LO-HI with LO <= HI; got {text!r}")
    return lo, hi


def _add_appearance_options(parser: argparse.ArgumentParser) -> None:
    """How a synthetic slide looks: the generator's appearance families (`Appearance`)."""
    from histo.synthetic._appearance import (
        DTYPES,
        HER2_PATTERNS,
        KI67_PATTERNS,
        LAYOUTS,
        Appearance,
    )

    d = Appearance()
    g = parser.add_argument_group(
        "appearance",
        "how the slide looks (defaults: the generator's own style); used to test detectors on "
        "styles they were not trained on",
    )
    g.add_argument("--her2-pattern", choices=HER2_PATTERNS, default=d.her2_pattern)
    g.add_argument(
        "--nucleus-dapi",
        type=_positive_float,
        default=d.nucleus_dapi,
        metavar="F",
        help="cancer nuclei's DAPI relative to ordinary nuclei (default: %(default)s)",
    )
    g.add_argument("--nucleoli", action="store_true", help="DAPI-dim nucleoli in cancer nuclei")
    g.add_argument(
        "--cell-diameter-um",
        type=_range,
        default=d.cell_diameter_um,
        metavar="LO-HI",
        help="cancer-cell diameters (default: 12-18)",
    )
    g.add_argument(
        "--packing",
        type=_range,
        default=d.packing,
        metavar="LO-HI",
        help="neighbour distance / sum of radii; < 1: flattened, shared membranes "
        "(default: 0.86-1)",
    )
    g.add_argument(
        "--ki67-dapi",
        type=_positive_float,
        default=d.ki67_dapi,
        metavar="F",
        help="DAPI of Ki67+ cancer nuclei is multiplied by F (0.3: Ki67 masks DAPI)",
    )
    g.add_argument(
        "--ki67-pattern",
        choices=KI67_PATTERNS,
        default=d.ki67_pattern,
        help="Ki67 in positive cancer nuclei (default: %(default)s)",
    )
    g.add_argument(
        "--ki67-background",
        type=_non_negative_float,
        default=d.ki67_background,
        metavar="F",
        help="non-specific Ki67 in negative nuclei, as a fraction of the positive level (0-0.3)",
    )
    g.add_argument(
        "--autofluorescence",
        type=_positive_float,
        default=d.autofluorescence,
        metavar="F",
        help="tissue autofluorescence relative to the default (0.05-5)",
    )
    g.add_argument(
        "--af-unevenness",
        type=_non_negative_float,
        default=d.af_unevenness,
        metavar="F",
        help="slow variation of autofluorescence over the section (0-1)",
    )
    g.add_argument(
        "--bleed-through",
        type=_non_negative_float,
        default=d.bleed_through,
        metavar="F",
        help="fraction of DAPI seen in HER2 and of HER2 seen in Ki67",
    )
    g.add_argument(
        "--tumour-fraction",
        type=_non_negative_float,
        default=d.tumour_fraction,
        metavar="F",
        help="fraction of the tissue covered by solid tumour (0.3-0.9: tumour-dense)",
    )
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="dynamic range of the file")
    g.add_argument("--layout", choices=LAYOUTS, default=d.layout, help="tissue layout")
    g.add_argument(
        "--her2-level",
        type=_range,
        default=d.her2_level,
        metavar="LO-HI",
        help="a lesion's HER2 over the tissue's autofluorescence (default: 2-15; HER2-low: 1.2-3)",
    )


def _appearance(args: argparse.Namespace):
    from histo.synthetic._appearance import Appearance

    try:
        return Appearance(
            her2_pattern=args.her2_pattern,
            nucleus_dapi=args.nucleus_dapi,
            nucleoli=args.nucleoli,
            cell_diameter_um=args.cell_diameter_um,
            packing=args.packing,
            ki67_dapi=args.ki67_dapi,
            ki67_pattern=args.ki67_pattern,
            ki67_background=args.ki67_background,
            autofluorescence=args.autofluorescence,
            af_unevenness=args.af_unevenness,
            bleed_through=args.bleed_through,
            tumour_fraction=args.tumour_fraction,
            dtype=args.dtype,
            layout=args.layout,
            her2_level=args.her2_level,
        )
    except ValueError as exc:
        raise InputError(f"bad appearance: {exc}") from None


# --- progress ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _tqdm_progress(desc: str) -> Iterator[ProgressCallback]:
    """Supply a ``progress(done, total, message)`` callback drawn as a tqdm bar on stderr.

    The bar is created on the first call and closed when ``done == total``; a later call opens a
    new bar. Leaving the ``with`` block closes any open bar, so an error message printed after
    it is not mixed into the bar.
    """
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int, message: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str(message, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


# --- handlers ---------------------------------------------------------------------------------


def _run_synth_slide(args: argparse.Namespace) -> int:
    from histo.synthetic import generate_slide

    width, height = args.size
    start = time.perf_counter()
    with _tqdm_progress("synthetic slide") as progress:
        slide = generate_slide(
            args.out,
            size_px=(width, height),
            group=args.group,
            dpi=args.dpi,
            seed=args.seed,
            ki67=not args.no_ki67,
            labels=not args.no_labels,
            mouse_burden=args.mouse_burden,
            pixel_size_um=args.pixel_size_um,
            appearance=_appearance(args),
            progress=progress,
        )
    elapsed_s = time.perf_counter() - start

    lesions = slide.lesions
    counts = lesions["class"].value_counts()
    single, cluster, focus = (int(counts.get(name, 0)) for name in ("single", "cluster", "focus"))
    dormant_singles = int((lesions["class"].eq("single") & lesions["dormant"]).sum())
    print(f"slide:   {slide.path}")
    print(f"truth:   {slide.truth_dir}")
    print(f"lesions: {single} single, {cluster} cluster, {focus} focus")
    print(f"cells:   {len(slide.cells)} HER2+, {dormant_singles} dormant singles")
    print(f"time:    {elapsed_s:.1f} s")
    return 0


def _run_synth_cohort(args: argparse.Namespace) -> int:
    from histo.synthetic import generate_cohort

    width, height = args.size
    with _tqdm_progress("synthetic cohort") as progress:
        samples = generate_cohort(
            args.outdir,
            mice=args.mice,
            sections=args.sections,
            dpis=args.dpis,
            size_px=(width, height),
            seed=args.seed,
            ki67=not args.no_ki67,
            labels=not args.no_labels,
            jobs=args.jobs,
            progress=progress,
        )
    print(f"wrote {len(samples)} slides to {args.outdir}")
    print(f"sample sheet: {args.outdir / 'samples.csv'}")
    return 0


def _analysis_config(args: argparse.Namespace) -> AnalysisConfig:
    try:
        return AnalysisConfig(
            method=args.method,
            chunk_size_px=args.chunk_size,
            device=args.device,
            runtime=args.runtime,
            precision=args.precision,
            screen=args.screen,
            read_pyramid=args.pyramid,
            model_path=None if args.model is None else str(args.model),
            ki67_threshold=args.ki67_threshold,
            ki67_measure=args.ki67_measure,
            her2_threshold=args.her2_threshold,
            her2_min_over_autofluorescence=args.her2_over_autofluorescence,
            her2_min_population_gap=args.her2_population_gap,
            her2_min_af_population_gap=args.her2_af_population_gap,
        )
    except ValueError as exc:
        raise InputError(f"bad analysis settings: {exc}") from None


def _batch_bars():
    """tqdm bars over slides and over the chunks of the slides running; returns a handler."""
    from tqdm import tqdm

    state: dict = {"bar": None, "chunks": {}, "outcomes": []}

    def handle(event) -> None:
        if state["bar"] is None:
            state["bar"] = tqdm(
                total=event.n_slides,
                desc="slides",
                unit="slide",
                file=sys.stderr,
                position=0,
                dynamic_ncols=True,
            )
        chunks = state["chunks"]
        if event.kind in ("chunks", "overview"):
            key = (event.slide_index, event.kind)
            bar = chunks.get(key)
            if bar is None:
                if event.kind == "chunks":  # the overview, if any, is read by now
                    old = chunks.pop((event.slide_index, "overview"), None)
                    if old is not None:
                        old.close()
                bar = chunks[key] = tqdm(
                    total=event.total,
                    desc=f"  {Path(event.slide).name[:28]}"
                    + (" overview" if event.kind == "overview" else ""),
                    unit="chunk" if event.kind == "chunks" else "region",
                    file=sys.stderr,
                    position=1 + len(chunks),
                    leave=False,
                    dynamic_ncols=True,
                )
            bar.update(event.done - bar.n)
        elif event.kind == "done":
            for key in [k for k in chunks if k[0] == event.slide_index]:
                chunks.pop(key).close()
            state["outcomes"].append(event.outcome)
            if not event.outcome.ok:
                tqdm.write(f"{PROG}: error: {event.outcome.message}", file=sys.stderr)
            state["bar"].update(1)

    def close() -> None:
        for bar in state["chunks"].values():
            bar.close()
        if state["bar"] is not None:
            state["bar"].close()

    return handle, close, state["outcomes"]


def _print_outcomes(outcomes, out) -> int:
    if not outcomes:
        return 0
    width = max(len(Path(o.slide).name) for o in outcomes)
    print(f"{'slide':<{width}}  status   HER2+ cells  lesions  time (s)  output")
    for o in outcomes:
        cells = "" if o.her2_cells is None else o.her2_cells
        lesions = "" if o.lesions is None else o.lesions
        print(
            f"{Path(o.slide).name:<{width}}  {o.status.upper() if not o.ok else o.status:<7}  "
            f"{cells:>11}  {lesions:>7}  {o.seconds:>8.1f}  {o.out_dir or ''}"
        )
    for o in outcomes:
        for note in o.fallbacks:
            print(f"{Path(o.slide).name}: ran otherwise than asked: {note}")
    failed = sum(not o.ok for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    ok = len(outcomes) - failed
    print(
        f"{ok} of {len(outcomes)} slides analysed ({skipped} already done and skipped), "
        f"{failed} failed; results in {out}"
    )
    return 1 if failed else 0


def _run_analysis(args: argparse.Namespace) -> int:
    from histo.batch import find_slides, iter_run_batch

    config = _analysis_config(args)
    slides = []
    if args.samples is not None:
        from histo.cohort import read_sample_sheet, resolve_slides

        slides += resolve_slides(read_sample_sheet(args.samples), args.samples)
    if args.slides:
        slides += find_slides(args.slides)
    if not slides:
        raise InputError("no slides given: name slides or folders, or pass --samples SHEET.csv")
    handle, close, outcomes = _batch_bars()
    gen = iter_run_batch(
        slides,
        args.out,
        config,
        force=args.force,
        parallel=args.parallel,
        labels_zarr=args.labels_zarr,
        channels=args.channels,
        pixel_size_um=args.pixel_size_um,
        workers=args.workers,
        scheduler=args.scheduler,
    )
    try:
        for event in gen:
            handle(event)
    finally:
        close()
        gen.close()  # on Ctrl-C: chunks not yet started are not started
    return _print_outcomes(outcomes, args.out)


def _run_rethreshold(args: argparse.Namespace) -> int:
    from histo.rethreshold import rethreshold

    folders = []
    for r in args.results:
        if (r / "summary.json").is_file():
            folders.append(r)
        elif r.is_dir():
            folders += sorted(p.parent for p in r.glob("*/summary.json"))
        if not r.exists():
            raise InputError(f"{r}: no such folder; give the --out folder of 'lungmets run'")
    if not folders:
        raise InputError(
            "no results found: give the --out folder of 'lungmets run' or slide result folders"
        )
    failed = 0
    print(f"{'slide':<32} {'Ki67 threshold':>14} {'Ki67+ cells':>11} {'dormant':>7}")
    for f in folders:
        try:
            s = rethreshold(f, args.ki67_threshold)
        except InputError as exc:
            failed += 1
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            continue
        t = s["markers"]["Ki67"]["threshold"]
        c = s["counts"]
        print(f"{f.name[:32]:<32} {t:>14.1f} {c['ki67_pos_cells']:>11} {c['dormant']:>7}")
    return 1 if failed else 0


def _run_cohort(args: argparse.Namespace) -> int:
    from histo.report import run_cohort

    result, report = run_cohort(
        args.samples,
        args.results,
        args.out,
        control=args.control,
        n_boot=args.bootstrap,
        repair_journals=args.repair,
    )
    for w in result.warnings:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    print(f"report: {report}")
    print(f"tables: {args.out / 'mice.csv'}, {args.out / 'stats.csv'}")
    print(result.review_line())
    for line in result.headline():
        print(line)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from histo.demo import headline_numbers, iter_demo

    settings = DemoSettings(
        mice=args.mice, sections=args.sections, dpis=args.dpis, size_px=args.size
    )
    config = _analysis_config(args)
    from tqdm import tqdm

    bars: dict = {}
    labels = {"generate": "generating slides", "analyse": "analysing slides", "report": "report"}
    gen = iter_demo(args.out, settings, config)
    try:
        while True:
            try:
                stage, done, total = next(gen)
            except StopIteration as stop:
                result, report, outcomes = stop.value
                break
            bar = bars.get(stage)
            if bar is None:
                bar = bars[stage] = tqdm(
                    total=total, desc=labels[stage], file=sys.stderr, dynamic_ncols=True
                )
            bar.update(done - bar.n)
    finally:
        for bar in bars.values():
            bar.close()
    skipped = sum(o.status == "skipped" for o in outcomes)
    print(
        f"study:   {args.out / 'cohort' / 'samples.csv'} ({len(outcomes)} slides, "
        f"{result.mice['mouse'].nunique()} mice)"
    )
    print(
        f"results: {args.out / 'results'}"
        + (f" ({skipped} slides already done)" if skipped else "")
    )
    print(f"report:  {report}")
    print("headline (infected vs control, mouse = unit):")
    for line in headline_numbers(result):
        print(f"  {line}")
    return 0


def _run_cluster_slurm(args: argparse.Namespace) -> int:
    from histo.cluster import slurm_cluster

    cluster = slurm_cluster(
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        job_extra_directives=args.sbatch,
    )
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        print(f"Dask scheduler: {cluster.scheduler_address}")
        print(
            f"Run, from another shell: {PROG} run SLIDES... --out DIR "
            f"--scheduler {cluster.scheduler_address}"
        )
        print("Press Ctrl-C to stop the cluster and cancel its jobs.")
        while True:
            time.sleep(3600)
    finally:
        cluster.close()


def _run_train(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, run_training

    if args.out.suffix != ".pt":
        raise InputError(
            f"{args.out}: a model is saved as a .pt file (its config goes beside "
            f"it as .json); give a name like {args.out.stem}.pt"
        )
    from histo.synthetic._appearance import FAMILIES

    exclude = tuple(f for f in (args.exclude_families or "").split(",") if f)
    unknown = sorted(set(exclude) - set(FAMILIES))
    if unknown:
        raise InputError(
            f"unknown appearance families: {', '.join(unknown)}; known: {', '.join(FAMILIES)}"
        )
    if args.operating_point_only and not args.from_reviews:
        raise InputError("--operating-point-only needs --from-reviews (reviewed slides)")
    if args.from_reviews:
        return _run_operating_point(args) if args.operating_point_only else _run_teach(args)
    if args.validate_on:
        raise InputError("--validate-on needs --from-reviews (reviewed slides to train on)")
    config = TrainConfig(
        steps=args.steps or 3000,
        seed=args.seed,
        lr=TrainConfig.lr if args.lr is None else args.lr,
        families=not args.no_families,
        exclude_families=exclude,
    )
    with _tqdm_progress("training") as progress:
        path = run_training(
            args.out,
            data_dir=args.data,
            config=config,
            slides=args.slides,
            init_model=args.from_model,
            progress=progress,
        )
    print(f"model:  {path}")
    print(f"config: {path.with_suffix('.json')}")
    print(f"use it: {PROG} run SLIDES... --method unet --model {path}")
    return 0


def _review_folders(paths) -> list[Path]:
    """Result folders from the arguments: a slide's result folder, or a results folder whose
    reviewed slides (those with a corrections.jsonl) are taken."""
    from histo.review import JOURNAL

    out = []
    for p in paths:
        p = Path(p)
        if (p / "summary.json").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(f.parent for f in p.glob(f"*/{JOURNAL}"))
            if not found:
                raise InputError(
                    f"{p}: no reviewed slide here (no */{JOURNAL}); review slides in napari "
                    "first, or give a slide's result folder"
                )
            out += found
        else:
            raise InputError(
                f"{p}: not a result folder (no summary.json); give an output of 'lungmets run'"
            )
    return out


def _run_operating_point(args: argparse.Namespace) -> int:
    from models.teach import calibrate_on_reviews

    if args.slides or args.validate_on:
        raise InputError(
            "--operating-point-only chooses a threshold on the reviewed slides and trains "
            "nothing: drop --slides and --validate-on (run the new model on other slides to "
            "check it)"
        )
    folders = _review_folders(args.from_reviews)
    with _tqdm_progress("operating point") as progress:
        cal = calibrate_on_reviews(args.out, folders, init_model=args.from_model, progress=progress)
    f1 = cal["f1"]
    print(
        f"model:  {cal['model_path']} (the same tensors; centre threshold {cal['parent']} -> "
        f"{cal['centre_threshold']}, chosen on {cal['n_reviewed']} cells in regions reviewed "
        f"completely on {len(cal['slides'])} slide(s))"
    )
    print("cell F1 (median over slides) by threshold: " + ", ".join(
        f"{t}: {v:.3f}" for t, v in f1.items()
    ))  # fmt: skip
    print(f"use it: {PROG} run SLIDES... --model {cal['model_path']}")
    return 0


def _run_teach(args: argparse.Namespace) -> int:
    from models.teach import teach

    if args.slides:
        raise InputError("give either --slides (annotated slides) or --from-reviews, not both")
    folders = _review_folders(args.from_reviews)
    validate = _review_folders(args.validate_on) if args.validate_on else []
    with _tqdm_progress("teaching") as progress:
        result = teach(
            args.out,
            folders,
            init_model=args.from_model,
            steps=args.steps or 300,
            lr=3e-4 if args.lr is None else args.lr,
            seed=args.seed,
            synthetic_share=args.synthetic_share,
            data_dir=args.data,
            validate_on=validate,
            progress=progress,
        )
    print(
        f"model:  {result.model_path} (from {result.n_corrections} corrections on "
        f"{len(folders)} slide(s), {result.seconds:.0f} s)"
    )
    print(f"config: {result.model_path.with_suffix('.json')}")
    for v in result.validation:
        b, a = v["before"], v["after"]
        print(
            f"validation {Path(v['results']).name}: cell F1 {b['f1']:.3f} -> {a['f1']:.3f}, "
            f"count {b['count_error']:+.1%} -> {a['count_error']:+.1%} "
            f"({a['n_reviewed']} reviewed cells)"
        )
    print(f"use it: {PROG} run SLIDES... --model {result.model_path}")
    return 0


def _run_synth_preview(args: argparse.Namespace) -> int:
    from histo.synthetic import render_preview

    region = None if args.region is None else tuple(args.region)
    out = render_preview(args.slide, args.out, region_px=region, size_px=args.window)
    print(out)
    return 0


def _run_synth_sample_data(args: argparse.Namespace) -> int:
    from histo.synthetic import generate_sample_data

    with _tqdm_progress("sample data") as progress:
        paths = generate_sample_data(args.outdir, progress=progress)
    for path in paths:
        print(path)
    return 0


def _add_study_options(
    parser: argparse.ArgumentParser,
    *,
    mice: int,
    sections: int,
    dpis: Sequence[int],
    size_px: tuple[int, int],
) -> None:
    """The options that shape a generated study, with their defaults."""
    parser.add_argument(
        "--mice",
        type=_positive_int,
        default=mice,
        metavar="N",
        help="mice per group and time point (default: %(default)s)",
    )
    parser.add_argument(
        "--sections",
        type=_positive_int,
        default=sections,
        metavar="N",
        help="sections per mouse (default: %(default)s)",
    )
    parser.add_argument(
        "--dpi",
        dest="dpis",
        type=_int_list,
        default=",".join(map(str, dpis)),
        metavar="D1,D2,...",
        help="time points in days post infection (default: %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=_size_px,
        default="{}x{}".format(*size_px),
        metavar="WxH",
        help="slide size in pixels at full resolution (default: %(default)s)",
    )


def _threshold(words: tuple[str, ...]):
    """argparse type: a non-negative number of counts, or one of `words`."""

    def parse(text: str):
        t = text.strip().lower()
        if t in words:
            return t
        try:
            v = float(t)
        except ValueError:
            v = -1.0
        if not v >= 0:
            raise argparse.ArgumentTypeError(
                f"expected a number of counts >= 0 or one of {', '.join(words)}, got {text!r}"
            )
        return v

    return parse


def _add_method_options(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """Options of the analysis (detector, device, chunks); with `workers`, also where it runs
    and how the slide is read."""
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=_DEFAULTS.method,
        help="cell detector: the segmentation network or the classical one (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default=_DEFAULTS.device,
        metavar="DEVICE",
        help="where the network runs: auto, cpu, cuda, cuda:N, mps (default: %(default)s; "
        "an absent GPU falls back to the CPU with a message)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=_DEFAULTS.runtime,
        help="what runs the network on the CPU: auto (ONNX Runtime where the model ships an "
        "ONNX export, else PyTorch) or torch, the same cells either way; or int8 (its 8-bit "
        "quantisation: faster, lesion tables identical on the held-out slides, but a cell "
        "near the operating point may differ) (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_DEFAULTS.precision,
        help="the network's arithmetic on a CUDA GPU: auto (float16 autocast, the fastest) or "
        "float32 (the CPU's arithmetic, for cells that match a CPU run's); the CPU always "
        "computes in float32 (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="a fine-tuned model (.pt with its .json); default: the shipped one",
    )
    parser.add_argument(
        "--screen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the network only where HER2 is above autofluorescence (default: on)",
    )
    parser.add_argument(
        "--pyramid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the network's pixels from the slide's pyramid level at its resolution when "
        "that level holds full resolution's area means (checked on the slide; default: on)",
    )
    parser.add_argument(
        "--ki67-threshold",
        type=_threshold(("auto", "detector")),
        default=_DEFAULTS.ki67_threshold,
        metavar="COUNTS|auto|detector",
        help="nuclear Ki67 above the offset (its --ki67-measure) from which a cell is Ki67+; "
        "auto: calibrated on each slide's own nuclei; detector: the detector's own call "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--ki67-measure",
        choices=KI67_MEASURES,
        default=_DEFAULTS.ki67_measure,
        help="a nucleus's Ki67: p90, the brightest tenth of its pixels (granular positives "
        "stand out of non-specific background spread evenly over the nucleus), or the mean "
        "of its pixels; keep one for a whole study (default: %(default)s)",
    )
    parser.add_argument(
        "--her2-threshold",
        type=_threshold(("auto", "off")),
        default=_DEFAULTS.her2_threshold,
        metavar="COUNTS|auto|off",
        help="mean HER2 of a detected cell above the offset below which it is not counted; "
        "auto: calibrated on each slide's ordinary cells; off: every detected cell counts "
        "(default: %(default)s; the calibrated value is reported in summary.json)",
    )
    parser.add_argument(
        "--her2-over-autofluorescence",
        type=_non_negative_float,
        default=_DEFAULTS.her2_min_over_autofluorescence,
        metavar="RATIO",
        help="a detected cell counts only when its cytoplasmic HER2 is more than RATIO times "
        "what autofluorescence gives there (predicted from its cytoplasmic Ki67 and the "
        "slide's HER2/Ki67 autofluorescence); 0: no check (default: %(default)s)",
    )
    parser.add_argument(
        "--her2-population-gap",
        type=_non_negative_float,
        default=_DEFAULTS.her2_min_population_gap,
        metavar="FOLD",
        help="detections whose HER2 is that of unstained tissue and that lie at least FOLD "
        "times below all other detections form a HER2-negative population and are not "
        "counted; 0: no check (default: %(default)s)",
    )
    parser.add_argument(
        "--her2-af-population-gap",
        type=_non_negative_float,
        default=_DEFAULTS.her2_min_af_population_gap,
        metavar="FOLD",
        help="the same in HER2 over what each cell's own autofluorescence gives: detections "
        "at most 2x their autofluorescence that lie at least FOLD times below all other "
        "detections are autofluorescent tissue and are not counted; 0: no check "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=_DEFAULTS.chunk_size_px,
        metavar="PX",
        help="chunk side in full-resolution pixels (default: %(default)s)",
    )
    if not workers:
        return
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run on a local Dask cluster of N worker processes (default: threads in this process)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run on an existing Dask cluster, e.g. tcp://10.0.0.5:8786",
    )
    parser.add_argument(
        "--channels",
        default=None,
        metavar="MAP",
        help="channel roles in file order (DAPI,HER2,Ki67) or by name/index "
        "(HER2=CY5,DAPI=0); default: from the channel names",
    )
    parser.add_argument(
        "--pixel-size-um",
        type=_positive_float,
        default=None,
        metavar="F",
        help="full-resolution pixel size in um (default: from the metadata)",
    )


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``lungmets`` command.

    Returns
    -------
    parser : argparse.ArgumentParser
        The parser; each leaf subcommand stores its handler as ``handler`` in the parsed
        namespace.

    Examples
    --------
    >>> args = build_parser().parse_args(["synth", "slide", "out.ome.tif", "--group", "iav"])
    >>> args.group, args.size
    ('IAV', (8192, 6144))
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find and measure lung metastases in whole-slide immunofluorescence images.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="analyse slides: HER2+ cells, lesions, dormant cells",
        description=(
            "Analyse whole slides chunk by chunk and write, per slide, OUT/<slide name>/ with "
            "lesions.csv, cells.csv and summary.json. A slide that fails is reported and the "
            "others go on; the exit code is 1 if any slide failed."
        ),
    )
    run.add_argument(
        "slides",
        nargs="*",
        type=Path,
        metavar="SLIDE",
        help="slides (OME-TIFF, TIFF, SVS, NDPI, OME-Zarr) or folders of slides",
    )
    run.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for the results"
    )
    run.add_argument(
        "--samples",
        type=Path,
        default=None,
        metavar="CSV",
        help="a sample sheet (slide, mouse, group, dpi, section): analyse its slides "
        "(paths relative to the sheet's folder)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="redo slides whose results exist for the same input, parameters and model "
        "(default: skip them, so an interrupted batch resumes)",
    )
    run.add_argument(
        "--parallel",
        type=_positive_int,
        default=1,
        metavar="N",
        help="slides analysed at once, sharing the cores (default: %(default)s; lowered "
        "to what the memory holds)",
    )
    run.add_argument(
        "--labels-zarr",
        action="store_true",
        help="also write lesion label images as OME-Zarr labels (into an OME-Zarr slide's "
        "labels/ group, else OUT/<slide>/lesion_labels.ome.zarr)",
    )
    _add_method_options(run)
    run.set_defaults(handler=_run_analysis)

    cohort_cmd = commands.add_parser(
        "cohort",
        help="per-mouse counts, statistics, plots and a report for a study",
        description=(
            "Join a sample sheet with the results of 'lungmets run', add up the sections of "
            "each mouse, compare each group with the control at every day post infection "
            "(mouse = unit: Mann-Whitney U, Welch's t, bootstrap fold change, Kruskal-Wallis "
            "across time points) and write tables, figures and report.html to OUT."
        ),
    )
    cohort_cmd.add_argument("samples", type=Path, metavar="SAMPLES", help="the sample sheet (CSV)")
    cohort_cmd.add_argument(
        "results", type=Path, metavar="RESULTS", help="the --out folder of 'lungmets run'"
    )
    cohort_cmd.add_argument(
        "--out", type=Path, required=True, metavar="REPORT", help="folder for the report"
    )
    cohort_cmd.add_argument(
        "--control",
        default=None,
        metavar="GROUP",
        help="the control group (default: the one named PBS, control, mock, saline ...)",
    )
    cohort_cmd.add_argument(
        "--bootstrap",
        type=_positive_int,
        default=5000,
        metavar="N",
        help="bootstrap resamples of the fold-change interval (default: %(default)s)",
    )
    cohort_cmd.add_argument(
        "--repair",
        action="store_true",
        help="drop the lines of review journals (corrections.jsonl) that are not corrections, "
        "keeping each journal as it was in a .bak-TIME copy (default: refuse such slides)",
    )
    cohort_cmd.set_defaults(handler=_run_cohort)

    rethr = commands.add_parser(
        "rethreshold",
        help="apply another Ki67 threshold to finished results, without the slides",
        description=(
            "Re-derive Ki67 calls, the lesions' Ki67 counts, dormancy and summary.json of "
            "finished results from the intensities stored in cells.csv, as a fresh 'lungmets "
            "run --ki67-threshold' would write them, in seconds. The threshold is recorded in "
            "the parameters and the run key."
        ),
    )
    rethr.add_argument(
        "results",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="the --out folder of 'lungmets run', or single slides' result folders",
    )
    rethr.add_argument(
        "--ki67-threshold",
        type=_threshold(("auto",)),
        required=True,
        metavar="COUNTS|auto",
        help="nuclear Ki67 above the offset (in the measure the run used: p90, or the mean "
        "with --ki67-measure mean) from which a cell is Ki67+; auto: each slide's calibrated "
        "threshold (stored by the run)",
    )
    rethr.set_defaults(handler=_run_rethreshold)

    demo = commands.add_parser(
        "demo",
        help="the whole job on a small generated study, with its report",
        description=(
            "Generate a small study (infected and control mice, several sections each, two "
            "time points), analyse every slide, write the cohort report and print the "
            "headline numbers. Stages already done are skipped."
        ),
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("lungmets_demo"),
        metavar="DIR",
        help="folder for the study, results and report (default: %(default)s)",
    )
    defaults = DemoSettings()
    _add_study_options(
        demo,
        mice=defaults.mice,
        sections=defaults.sections,
        dpis=defaults.dpis,
        size_px=defaults.size_px,
    )
    _add_method_options(demo, workers=False)
    demo.set_defaults(handler=_run_demo)

    train = commands.add_parser(
        "train",
        help="train (or fine-tune) the segmentation network",
        description=(
            "Train the U-Net on slides from the synthetic generator, or fine-tune a model on "
            "your own annotated slides (each with a <name>.truth/ folder holding cells.csv and "
            "labels.ome.tif, the generator's format). Writes OUT.pt and OUT.json."
        ),
    )
    train.add_argument("out", type=Path, metavar="OUT", help="the model to write (.pt)")
    train.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="optimisation steps (default: 3000; 300 with --from-reviews)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    train.add_argument(
        "--data",
        type=Path,
        default=Path("lungmets_training_data"),
        metavar="DIR",
        help="cache of generated training slides (default: %(default)s)",
    )
    train.add_argument(
        "--slides",
        nargs="+",
        type=Path,
        default=None,
        metavar="SLIDE",
        help="annotated slides to train on instead of generated ones",
    )
    train.add_argument(
        "--from-model",
        type=Path,
        default=None,
        metavar="PATH",
        help="start from this model (fine-tuning), e.g. the shipped one",
    )
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        metavar="F",
        help="peak learning rate (default: the training recipe's)",
    )
    train.add_argument(
        "--no-families",
        action="store_true",
        help="generated slides in the generator's default style only (no appearance families)",
    )
    train.add_argument(
        "--exclude-families",
        default="",
        metavar="NAMES",
        help="appearance families held out of training, e.g. her2_pattern,dtype,layout "
        "(for leave-family-out evaluation)",
    )
    train.add_argument(
        "--from-reviews",
        nargs="+",
        type=Path,
        default=None,
        metavar="RESULTS",
        help="fine-tune on the reviews (corrections.jsonl) of these result folders, or of "
        "every reviewed slide of a results folder; starts from --from-model (default: the "
        "shipped model)",
    )
    train.add_argument(
        "--validate-on",
        nargs="+",
        type=Path,
        default=None,
        metavar="RESULTS",
        help="with --from-reviews: reviewed slides NOT used for training; prints the cell F1 "
        "against their reviews before and after",
    )
    train.add_argument(
        "--operating-point-only",
        action="store_true",
        help="with --from-reviews: keep the model's tensors and choose only its operating "
        "point (the nucleus-centre threshold) on the regions reviewed completely",
    )
    train.add_argument(
        "--synthetic-share",
        type=float,
        default=0.25,
        metavar="F",
        help="with --from-reviews: share of each batch from generated slides of the house "
        "style, so the network keeps what it knew (default: %(default)s; 0 for none)",
    )
    train.set_defaults(handler=_run_train)

    cluster = commands.add_parser(
        "cluster",
        help="start a Dask cluster for `lungmets run --scheduler`",
        description="Start a Dask cluster whose workers run as batch jobs.",
    )
    cluster_commands = cluster.add_subparsers(title="commands", metavar="COMMAND", required=True)
    slurm = cluster_commands.add_parser(
        "slurm",
        help="workers as SLURM jobs (needs dask-jobqueue)",
        description=(
            "Start a Dask scheduler here and submit SLURM jobs that run its workers (one "
            "single-threaded worker per core). Prints the address for `lungmets run "
            "--scheduler`; runs until Ctrl-C."
        ),
    )
    slurm.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        metavar="N",
        help="SLURM jobs to submit (default: %(default)s)",
    )
    slurm.add_argument(
        "--cores",
        type=_positive_int,
        default=8,
        metavar="N",
        help="cores (= workers) per job (default: %(default)s)",
    )
    slurm.add_argument("--memory", default="32GB", help="memory per job (default: %(default)s)")
    slurm.add_argument(
        "--walltime", default="02:00:00", help="time limit per job (default: %(default)s)"
    )
    slurm.add_argument("--queue", default=None, help="SLURM partition")
    slurm.add_argument("--account", default=None, help="SLURM account")
    slurm.add_argument(
        "--sbatch",
        action="append",
        default=None,
        metavar="DIRECTIVE",
        help="extra #SBATCH directive, e.g. --sbatch=--gres=gpu:1 (repeatable)",
    )
    slurm.add_argument(
        "--print-job-script",
        action="store_true",
        help="print the job script that would be submitted, and exit",
    )
    slurm.set_defaults(handler=_run_cluster_slurm)

    synth = commands.add_parser(
        "synth",
        help="write synthetic slides with known ground truth",
        description="Write synthetic slides (pyramidal OME-TIFF) and their ground-truth tables.",
    )
    synth_commands = synth.add_subparsers(title="commands", metavar="COMMAND", required=True)

    slide = synth_commands.add_parser(
        "slide",
        help="write one synthetic slide and its truth",
        description="Write one synthetic slide and its ground truth (cells and lesions).",
    )
    slide.add_argument("out", type=Path, metavar="OUT", help="the slide to write (.ome.tif)")
    slide.add_argument(
        "--size",
        type=_size_px,
        default="8192x6144",
        metavar="WxH",
        help="slide size in pixels at full resolution (default: %(default)s)",
    )
    slide.add_argument(
        "--group",
        type=str.upper,
        choices=("IAV", "PBS"),
        default="PBS",
        help="treatment group, case-insensitive (default: %(default)s)",
    )
    slide.add_argument(
        "--dpi",
        type=_non_negative_int,
        default=15,
        metavar="N",
        help="days post infection (default: %(default)s)",
    )
    slide.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    slide.add_argument("--no-ki67", action="store_true", help="leave out the Ki67 channel")
    slide.add_argument(
        "--no-labels",
        action="store_true",
        help="skip the truth label masks (tables only; faster for benchmarks)",
    )
    slide.add_argument(
        "--mouse-burden",
        type=_non_negative_float,
        default=1.0,
        metavar="F",
        help="scales the number of lesions of this mouse (default: %(default)s)",
    )
    slide.add_argument(
        "--pixel-size-um",
        type=_positive_float,
        default=0.5,
        metavar="F",
        help="pixel size in micrometres (default: %(default)s)",
    )
    _add_appearance_options(slide)
    slide.set_defaults(handler=_run_synth_slide)

    cohort = synth_commands.add_parser(
        "cohort",
        help="write a synthetic cohort and its sample sheet",
        description=(
            "Write one slide per group, time point, mouse and section, and the sample sheet "
            "samples.csv (columns slide, mouse, group, dpi, section)."
        ),
    )
    cohort.add_argument("outdir", type=Path, metavar="OUTDIR", help="the folder to write into")
    _add_study_options(cohort, mice=4, sections=3, dpis=(3, 9, 15, 28), size_px=(4096, 3072))
    cohort.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    cohort.add_argument("--no-ki67", action="store_true", help="leave out the Ki67 channel")
    cohort.add_argument(
        "--no-labels",
        action="store_true",
        help="skip the truth label masks (tables only; faster)",
    )
    cohort.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="slides written in parallel (default: %(default)s)",
    )
    cohort.set_defaults(handler=_run_synth_cohort)

    preview = synth_commands.add_parser(
        "preview",
        help="draw a region of a synthetic slide beside its truth (PNG)",
        description=(
            "Draw a region of a synthetic slide (DAPI blue, HER2 green, Ki67 magenta) beside "
            "its ground-truth outlines. By default the region shows a focus, a cluster and a "
            "single cell."
        ),
    )
    preview.add_argument("slide", type=Path, metavar="SLIDE", help="a slide made by synth")
    preview.add_argument("out", type=Path, metavar="OUT", help="the PNG to write")
    preview.add_argument(
        "--region",
        type=_non_negative_int,
        nargs=3,
        metavar=("Y0", "X0", "SIZE"),
        default=None,
        help="level-0 window in pixels (default: chosen to show every lesion class)",
    )
    preview.add_argument(
        "--window",
        type=_positive_int,
        default=800,
        metavar="PX",
        help="size of the automatic window in pixels (default: %(default)s)",
    )
    preview.set_defaults(handler=_run_synth_preview)

    sample_data = synth_commands.add_parser(
        "sample-data",
        help="write the small slides used by the tutorial",
        description="Write the small synthetic slides used by the tutorial and napari.",
    )
    sample_data.add_argument(
        "outdir",
        type=Path,
        nargs="?",
        default=Path("sample_data"),
        metavar="OUTDIR",
        help="the folder to write into (default: %(default)s)",
    )
    sample_data.set_defaults(handler=_run_synth_sample_data)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lungmets`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments, without the program name; ``sys.argv[1:]`` if not given.

    Returns
    -------
    exit_code : int
        0 on success, 2 for bad input (:class:`histo.errors.InputError`, printed as
        ``lungmets: error: <message>`` without a traceback), 130 if interrupted.

    Raises
    ------
    SystemExit
        For ``--help``, ``--version`` and usage errors, as :mod:`argparse` does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        return args.handler(args)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
