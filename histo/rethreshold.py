"""Re-derive a finished analysis with another Ki67 threshold, from its stored intensities.

cells.csv keeps each cell's nuclear Ki67 (``ki67_mean``, and ``ki67_p90``, its brightest tenth,
where the run measured it; the call is made on the run's ``--ki67-measure``) next to its call,
so a new
threshold re-derives the calls, the lesions' Ki67 counts, dormancy and the summary in seconds,
without the slide. The result is what a fresh run with that threshold writes: the same tables,
the threshold in the parameters, the markers block and the run key.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ._version import ANALYSIS_REVISION
from .config import AnalysisConfig
from .errors import InputError
from .lesions import group_lesions
from .markers import MarkerThreshold, apply_threshold, user_threshold


def _threshold_for(value, summary: dict, folder: Path) -> MarkerThreshold:
    """The `MarkerThreshold` a ``--ki67-threshold`` value stands for on this result."""
    stored = (summary.get("markers") or {}).get("Ki67")
    if stored is None:
        raise InputError(
            f"{folder}: summary.json has no Ki67 threshold (a result without Ki67, or written "
            "before lungmets recorded its thresholds); analyse the slide again with 'lungmets run'"
        )
    run = MarkerThreshold.from_dict(stored)
    calibrated = run if run.method != "user" else None
    if calibrated is None and run.calibrated is not None:
        calibrated = MarkerThreshold.from_dict(run.calibrated)
    if isinstance(value, str):
        if calibrated is None or calibrated.threshold is None:
            raise InputError(
                f"{folder}: no calibrated Ki67 threshold stored; give a number of counts"
            )
        calibrated = MarkerThreshold.from_dict({**calibrated.to_dict(), "applied": True})
        return calibrated if value == "auto" else calibrated.not_applied()
    return user_threshold("Ki67", float(value), calibrated=calibrated, measure=run.measure)


def rethreshold(folder: str | os.PathLike, ki67_threshold: float | str) -> dict:
    """Apply another Ki67 threshold to the results in `folder` and rewrite them.

    Parameters
    ----------
    folder : path-like
        One slide's result folder (``OUT/<slide>/`` of ``lungmets run``).
    ki67_threshold : float or "auto"
        Counts above the offset, or ``"auto"``: the slide's calibrated threshold stored by the
        run.

    Returns
    -------
    dict
        The new summary (also written, after the tables).

    Raises
    ------
    InputError
        If the folder holds no complete result, or one without Ki67 intensities.
    """
    from .outputs import write_result_folder
    from .pipeline import AnalysisResult, summary_counts

    folder = Path(folder)
    t0 = time.perf_counter()
    summary_path, cells_path = folder / "summary.json", folder / "cells.csv"
    if not (summary_path.is_file() and cells_path.is_file()):
        raise InputError(
            f"{folder}: no complete result here (summary.json and cells.csv are written by "
            "'lungmets run'); give a slide's result folder"
        )
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{summary_path}: not valid JSON ({exc}); run the slide again") from None
    if ki67_threshold == "detector":
        raise InputError(
            "--ki67-threshold detector needs the detector's calls, which are not stored; "
            "run the slide again with it"
        )
    cells = pd.read_csv(cells_path)
    thr = _threshold_for(ki67_threshold, summary, folder)
    column = thr.column
    if column not in cells or cells[column].isna().all() and len(cells):
        raise InputError(f"{cells_path}: no Ki67 intensities ({column}); nothing to threshold")
    params = dict(summary.get("parameters") or {})
    params["ki67_threshold"] = ki67_threshold
    known = AnalysisConfig.__dataclass_fields__
    config = AnalysisConfig(**{k: v for k, v in params.items() if k in known})
    base = cells.drop(columns=[c for c in ("cell_id", "lesion_id") if c in cells])
    if thr.applied and thr.threshold is not None:
        base = apply_threshold(base, thr)
    else:
        base["ki67_pos"] = base["ki67_pos"].astype("boolean")
    new_cells, lesions = group_lesions(base, config)
    new_cells = new_cells[list(cells.columns)]
    tissue = float(summary.get("tissue_area_mm2") or 0.0)
    counts, dens = summary_counts(new_cells, lesions, True, tissue)
    summary["counts"], summary["densities_per_mm2"] = counts, dens
    summary["parameters"] = config.to_dict()
    summary.setdefault("markers", {})["Ki67"] = thr.to_dict()
    summary["rethresholded"] = {
        "ki67_threshold": ki67_threshold,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    summary["run_key"] = _renewed_key(summary, ki67_threshold)
    result = AnalysisResult(
        slide_path=Path(summary.get("path") or folder.name),
        cells=new_cells,
        lesions=lesions,
        summary=summary,
        tissue_mask=np.zeros((0, 0), bool),
    )
    write_result_folder(result, folder)
    return summary


def _renewed_key(summary: dict, ki67_threshold) -> str | None:
    """The run key a fresh ``lungmets run`` with this threshold would have (None where the
    result does not say what its key was made of: such a run then analyses the slide again)."""
    from .batch import run_key

    inputs = summary.get("run_key_inputs")
    checksum = (summary.get("input") or {}).get("sha256")
    if inputs is None or checksum is None or "parameters" not in inputs:
        return None
    if inputs.get("analysis_revision") != ANALYSIS_REVISION:
        return None  # measured by an older analysis: a fresh run would differ
    inputs["parameters"]["ki67_threshold"] = ki67_threshold
    known = AnalysisConfig.__dataclass_fields__
    config = AnalysisConfig(**{k: v for k, v in inputs["parameters"].items() if k in known})
    if config.method == "unet":
        from models import model_identity

        ident = model_identity(config.model_path)
        stored = summary.get("model") or {}
        if (stored.get("sha256"), stored.get("centre_threshold")) != (
            ident["sha256"],
            ident["centre_threshold"],
        ):
            return None  # found by another model: a fresh run would differ
    return run_key(
        checksum, config, channels=inputs.get("channels"), pixel_size_um=inputs.get("pixel_size_um")
    )
