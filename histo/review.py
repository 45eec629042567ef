"""Review of a slide's lesions: corrections kept in an append-only journal, applied on load.

A scientist looks at every lesion and accepts it, rejects it (a false positive) or changes its
class. Each correction is appended at once to ``corrections.jsonl`` in the slide's result
folder, one JSON line (who, when, which lesion, what, before and after), flushed and synced to
disk, so a crash loses nothing. The tables written by ``lungmets run`` are never changed: the
reviewed state is the tables plus the journal, replayed by `ReviewSession`, and
``lungmets cohort`` counts from it when a journal exists.

If a slide is analysed again (``--force``, other parameters), its lesion ids may change; the
journal's entries carry the lesion's position and are then matched to the nearest new lesion
(within `MATCH_UM`); entries that match nothing are listed in `ReviewSession.unmatched`.

Review classes: ``dormant`` (single cell, Ki67−), ``single`` (single cell, Ki67+ or Ki67 not
imaged), ``cluster``, ``focus``. Status: ``unreviewed``, ``accepted``, ``corrected``,
``rejected``.

The slide's Ki67 threshold can be reviewed too (``set_ki67_threshold``, napari's Markers
widget): the journal then records it, and every lesion's Ki67+ count and dormancy follow it,
from the cells' stored ``ki67_mean``, except where a scientist set the lesion's class by hand.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

log = logging.getLogger(__name__)

JOURNAL = "corrections.jsonl"
REVIEW_CLASSES = ("dormant", "single", "cluster", "focus")
STATUSES = ("unreviewed", "accepted", "corrected", "rejected")
#: A journal entry from an earlier analysis applies to the nearest lesion within this distance.
MATCH_UM = 15.0


def initial_review_class(lesions: pd.DataFrame) -> pd.Series:
    """The review class of each lesion as the analysis called it."""
    cls = lesions["class"].astype(str).copy()
    dormant = lesions.get("dormant", pd.Series(False, index=lesions.index))
    dormant = dormant.map(lambda v: str(v).lower() in ("true", "1", "1.0"))
    cls[(cls == "single") & dormant] = "dormant"
    return cls


@dataclass
class Correction:
    """One line of the journal."""

    seq: int
    action: str  # set_class, reject, accept, set_ki67_threshold, undo
    lesion_id: int | None
    before: dict | None = None
    after: dict | None = None
    x_um: float | None = None
    y_um: float | None = None
    user: str = ""
    time_utc: str = ""
    run_key: str | None = None
    undoes: int | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return os.environ.get("USER", "unknown")


@dataclass
class ReviewSession:
    """The lesions of one result folder with the journal's corrections applied.

    Parameters
    ----------
    folder : path-like
        A slide's results (``lesions.csv``, ``summary.json``; ``corrections.jsonl`` if any).
    user : str, optional
        Recorded with each new correction (default: the login name).

    Attributes
    ----------
    lesions : pandas.DataFrame
        ``lesions.csv`` plus ``review_class`` and ``status``.
    unmatched : list of Correction
        Journal entries that match no lesion of the current tables.

    Examples
    --------
    >>> s = ReviewSession("results/lung_IAV_d15")  # doctest: +SKIP
    >>> s.set_class(12, "focus"); s.reject(3); s.undo()  # doctest: +SKIP
    >>> s.counts()["focus"]  # doctest: +SKIP
    """

    folder: Path
    user: str = field(default_factory=_user)
    lesions: pd.DataFrame = field(init=False, repr=False)
    unmatched: list = field(init=False, default_factory=list)
    _history: list = field(init=False, default_factory=list, repr=False)
    _seq: int = field(init=False, default=0)
    _run_key: str | None = field(init=False, default=None)
    _has_ki67: bool | None = field(init=False, default=None)
    _summary: dict = field(init=False, default_factory=dict, repr=False)
    _cells: pd.DataFrame | None = field(init=False, default=None, repr=False)
    _analysed: pd.DataFrame | None = field(init=False, default=None, repr=False)
    _ki67_threshold: float | None = field(init=False, default=None)

    def __post_init__(self):
        self.folder = Path(self.folder)
        path = self.folder / "lesions.csv"
        if not path.is_file():
            raise InputError(
                f"{self.folder}: not a lungmets result folder (no lesions.csv); "
                "run 'lungmets run' on the slide first"
            )
        lesions = pd.read_csv(path)
        lesions["review_class"] = initial_review_class(lesions)
        lesions["status"] = "unreviewed"
        self.lesions = lesions.set_index("lesion_id", drop=False)
        self.lesions.index.name = None
        try:
            summary = json.loads((self.folder / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        self._summary = summary
        self._analysed = lesions[["lesion_id", "n_ki67_pos", "review_class"]].copy()
        self._analysed.index = self.lesions.index
        self._run_key = summary.get("run_key")
        roles = summary.get("input", {}).get("roles")
        self._has_ki67 = None if roles is None else "Ki67" in roles
        for c in read_journal(self.folder / JOURNAL):
            self._replay(c)
            self._seq = max(self._seq, c.seq)

    # ----------------------------------------------------------------- journal replay

    def _locate(self, c: Correction):
        if c.lesion_id is None:
            return None
        if (c.run_key is None or c.run_key == self._run_key) and c.lesion_id in self.lesions.index:
            return c.lesion_id
        if c.x_um is None or len(self.lesions) == 0:
            return None
        d = np.hypot(self.lesions["x_um"] - c.x_um, self.lesions["y_um"] - c.y_um)
        i = int(np.argmin(d.to_numpy()))
        return self.lesions.index[i] if d.iloc[i] <= MATCH_UM else None

    def _replay(self, c: Correction) -> None:
        if c.action == "undo":
            for k in range(len(self._history) - 1, -1, -1):
                done, lid = self._history[k]
                if done.seq == c.undoes:
                    if done.action == "set_ki67_threshold":
                        self._apply_ki67((done.before or {}).get("ki67_threshold"))
                    else:
                        self._set(lid, done.before)
                    del self._history[k]
                    return
            return
        if c.action == "set_ki67_threshold":
            self._apply_ki67((c.after or {}).get("ki67_threshold"))
            self._history.append((c, None))
            return
        lid = self._locate(c)
        if lid is None:
            self.unmatched.append(c)
            return
        self._set(lid, c.after)
        self._history.append((c, lid))

    def _set(self, lesion_id, state: dict) -> None:
        for k, v in state.items():
            self.lesions.loc[lesion_id, k] = v

    # ----------------------------------------------------------------- corrections

    def _state(self, lesion_id) -> dict:
        row = self.lesions.loc[lesion_id]
        return {"review_class": str(row["review_class"]), "status": str(row["status"])}

    def _record(self, action: str, lesion_id, after: dict) -> Correction:
        if lesion_id not in self.lesions.index:
            raise KeyError(f"no lesion {lesion_id} in {self.folder}")
        row = self.lesions.loc[lesion_id]
        return self._commit(
            action,
            int(lesion_id),
            self._state(lesion_id),
            after,
            x_um=float(row["x_um"]),
            y_um=float(row["y_um"]),
        )

    def _commit(self, action, lesion_id, before, after, **extra) -> Correction:
        """Journal a new correction (synced to disk) and apply it."""
        self._seq += 1
        c = Correction(
            seq=self._seq,
            action=action,
            lesion_id=lesion_id,
            before=before,
            after=after,
            user=self.user,
            time_utc=datetime.now(UTC).isoformat(timespec="seconds"),
            run_key=self._run_key,
            **extra,
        )
        append_journal(self.folder / JOURNAL, c)
        self._replay(c)
        return c

    def set_class(self, lesion_id: int, review_class: str) -> Correction:
        """Give a lesion another class (``dormant``, ``single``, ``cluster``, ``focus``)."""
        if review_class not in REVIEW_CLASSES:
            raise ValueError(f"class must be one of {REVIEW_CLASSES}, got {review_class!r}")
        return self._record(
            "set_class", lesion_id, {"review_class": review_class, "status": "corrected"}
        )

    def reject(self, lesion_id: int) -> Correction:
        """Mark a lesion as a false positive: it no longer counts."""
        cls = str(self.lesions.loc[lesion_id, "review_class"])
        return self._record("reject", lesion_id, {"review_class": cls, "status": "rejected"})

    def accept(self, lesion_id: int) -> Correction:
        """Confirm a lesion as it is."""
        cls = str(self.lesions.loc[lesion_id, "review_class"])
        return self._record("accept", lesion_id, {"review_class": cls, "status": "accepted"})

    def undo(self) -> Correction | None:
        """Take back the latest correction still in force; None if there is none."""
        if not self._history:
            return None
        done, lid = self._history[-1]
        return self._commit(
            "undo",
            None if lid is None else int(lid),
            {"ki67_threshold": self._ki67_threshold} if lid is None else self._state(lid),
            dict(done.before),
            undoes=done.seq,
        )

    # ----------------------------------------------------------------- Ki67 threshold

    @property
    def run_ki67(self) -> dict | None:
        """The analysis' Ki67 threshold record (summary.json ``markers.Ki67``), or None."""
        return (self._summary.get("markers") or {}).get("Ki67")

    @property
    def ki67_threshold(self) -> float | None:
        """The Ki67 threshold in force (counts): the reviewed one, else the analysis' own
        (None where the analysis kept the detector's calls or had no Ki67)."""
        if self._ki67_threshold is not None:
            return self._ki67_threshold
        run = self.run_ki67 or {}
        if run.get("applied", True) and run.get("threshold") is not None:
            return float(run["threshold"])
        cal = run.get("calibrated") or (run if run.get("threshold") is not None else {})
        return None if cal.get("threshold") is None else float(cal["threshold"])

    @property
    def reviewed_ki67_threshold(self) -> float | None:
        """The Ki67 threshold set in review (counts), or None where the analysis' stands."""
        return self._ki67_threshold

    def ki67_histogram(self) -> dict | None:
        """The slide's Ki67 histogram stored by the analysis (``edges_log10``, ``nuclei``,
        ``cells``), or None."""
        run = self.run_ki67 or {}
        return run.get("histogram") or (run.get("calibrated") or {}).get("histogram")

    def _load_cells(self) -> pd.DataFrame:
        if self._cells is None:
            path = self.folder / "cells.csv"
            if not path.is_file():
                raise InputError(f"{self.folder}: no cells.csv; analyse the slide again")
            cells = pd.read_csv(path)
            if "ki67_mean" not in cells:
                raise InputError(f"{path}: no Ki67 intensities (ki67_mean); no Ki67 to threshold")
            self._cells = cells
        return self._cells

    def _ki67_state(self, threshold: float | None):
        """(lesions, cells) as they would be with `threshold` (None: as analysed)."""
        lesions = self.lesions.copy()
        cells = self._load_cells().copy()
        if threshold is None:
            lesions["n_ki67_pos"] = self._analysed["n_ki67_pos"]
            auto = self._analysed["review_class"]
        else:
            from .markers import apply_threshold, user_threshold

            cells = apply_threshold(cells, user_threshold("Ki67", threshold))
            n_pos = cells.groupby("lesion_id")["ki67_pos"].sum()
            lesions["n_ki67_pos"] = n_pos.reindex(lesions["lesion_id"]).fillna(0).astype(int).values
            single = lesions["n_cells"] == 1
            auto = self._analysed["review_class"].copy()
            auto[single & (lesions["n_ki67_pos"] == 0)] = "dormant"
            auto[single & (lesions["n_ki67_pos"] > 0)] = "single"
        # A class a scientist set by hand stays; the others follow the threshold.
        keep = lesions["status"] == "corrected"
        lesions.loc[~keep, "review_class"] = auto[~keep]
        return lesions, cells

    def _apply_ki67(self, threshold: float | None) -> None:
        lesions, _ = self._ki67_state(threshold)
        self.lesions["n_ki67_pos"] = lesions["n_ki67_pos"]
        self.lesions["review_class"] = lesions["review_class"]
        self._ki67_threshold = None if threshold is None else float(threshold)

    def preview_ki67_threshold(self, threshold: float | None):
        """``(lesions, cells, counts)`` as they would be with `threshold`; nothing recorded."""
        lesions, cells = self._ki67_state(threshold)
        return lesions, cells, reviewed_counts(lesions, True)

    def set_ki67_threshold(self, threshold: float | None) -> Correction:
        """Record a Ki67 threshold for this slide (counts; None: back to the analysis' own).

        Every lesion's Ki67+ count and dormancy follow it, except lesions whose class was set
        by hand. Undone like any correction.
        """
        if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"a Ki67 threshold is a number of counts >= 0, got {threshold}")
        self._load_cells()
        return self._commit(
            "set_ki67_threshold",
            None,
            {"ki67_threshold": self._ki67_threshold},
            {"ki67_threshold": None if threshold is None else float(threshold)},
        )

    # ----------------------------------------------------------------- queries

    @property
    def n_corrections(self) -> int:
        """Corrections in force (undone ones not counted)."""
        return len(self._history)

    def next_unreviewed(self, after: int | None = None) -> int | None:
        """The next unreviewed lesion after `after` (in table order, wrapping), or None."""
        ids = list(self.lesions.index[self.lesions["status"] == "unreviewed"])
        if not ids:
            return None
        if after is None:
            return ids[0]
        order = list(self.lesions.index)
        pos = order.index(after) if after in order else -1
        later = [i for i in ids if order.index(i) > pos]
        return (later or ids)[0]

    def counts(self) -> dict:
        """Counts after review (rejected lesions left out), as in summary.json."""
        return reviewed_counts(self.lesions, self._has_ki67)


def reviewed_counts(lesions: pd.DataFrame, has_ki67: bool | None = None) -> dict:
    """Counts of a reviewed lesion table (columns review_class, status, n_cells, n_ki67_pos).

    `has_ki67` says whether the slide had a Ki67 channel (default: whether any lesion has a
    Ki67 count); without one the Ki67 counts are None, not 0.

    Returns
    -------
    dict
        her2_cells, lesions, single (dormant + Ki67+ singles), cluster, focus, dormant,
        ki67_pos_cells (None without Ki67), cells_in_single/cluster/focus.
    """
    kept = lesions[lesions["status"] != "rejected"]
    rc = kept["review_class"]
    n = kept["n_cells"].astype(float)
    ki67 = pd.to_numeric(kept.get("n_ki67_pos"), errors="coerce")
    if has_ki67 is None:
        has_ki67 = ki67 is not None and (len(kept) == 0 or ki67.notna().any())
    single = rc.isin(["dormant", "single"])
    return {
        "her2_cells": int(n.sum()),
        "lesions": int(len(kept)),
        "single": int(single.sum()),
        "cluster": int((rc == "cluster").sum()),
        "focus": int((rc == "focus").sum()),
        "dormant": int((rc == "dormant").sum()) if has_ki67 else None,
        "ki67_pos_cells": int(ki67.sum()) if has_ki67 else None,
        "cells_in_single": int(n[single].sum()),
        "cells_in_cluster": int(n[rc == "cluster"].sum()),
        "cells_in_focus": int(n[rc == "focus"].sum()),
    }


def append_journal(path: str | os.PathLike, correction: Correction) -> None:
    """Append one correction to the journal and force it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(correction.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_journal(path: str | os.PathLike) -> list[Correction]:
    """The corrections of a journal; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for k, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(Correction(**json.loads(line)))
        except (ValueError, TypeError):
            log.warning("%s: line %d is not a correction and was skipped", path, k)
    return out


def set_study_ki67_threshold(
    sheet_path: str | os.PathLike, results_dir: str | os.PathLike, threshold: float | None
) -> list[Path]:
    """Record one Ki67 threshold (counts; None: each slide's own) in the journal of every
    slide of a sample sheet; returns the result folders written.

    Raises
    ------
    InputError
        Listing slides of the sheet without results (nothing is written then).
    """
    from .cohort import read_sample_sheet
    from .io import slide_name

    sheet = read_sample_sheet(sheet_path)
    folders = [Path(results_dir) / slide_name(s) for s in sheet["slide"]]
    missing = [str(f) for f in folders if not (f / "summary.json").is_file()]
    if missing:
        raise InputError(
            f"{len(missing)} slide(s) of {sheet_path} have no results in {results_dir}: "
            + ", ".join(missing[:5])
            + "; run 'lungmets run --samples SHEET --out RESULTS' first"
        )
    for f in folders:
        ReviewSession(f).set_ki67_threshold(threshold)
    return folders
