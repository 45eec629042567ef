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
``rejected``, ``edited`` (its cells were edited by hand).

The slide's Ki67 threshold can be reviewed too (``set_ki67_threshold``, napari's Markers
widget): the journal then records it, and every lesion's Ki67+ count and dormancy follow it,
from the cells' stored Ki67 in the run's measure (``ki67_mean``, or ``ki67_p90``),
except where a scientist set the lesion's class by hand.

And single cells: a cell the analysis missed is added (``add_cell``), a false one deleted
(``delete_cell``), a cell's Ki67 called by hand (``set_cell_ki67``), and a region marked as
reviewed completely (``mark_complete``: every cell in it is marked, nothing else is one). The
lesions a cell edit touches are re-derived from the reviewed cells by the analysis' own linking
rule (new ids, status ``edited``, their class following the cells). These journals are also
training data: ``lungmets train --from-reviews`` (`models.teach`).
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
STATUSES = ("unreviewed", "accepted", "corrected", "rejected", "edited")
#: A journal entry from an earlier analysis applies to the nearest lesion within this distance.
MATCH_UM = 15.0
#: ... and a cell's to the nearest cell within this distance (about a nucleus' radius).
CELL_MATCH_UM = 4.0
#: Journal actions on single cells.
CELL_ACTIONS = ("add_cell", "delete_cell", "set_cell_ki67")


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
    action: str  # set_class, reject, accept, set_ki67_threshold, add_cell, delete_cell,
    # set_cell_ki67, complete_region, undo
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
    """The lesions (and cells) of one result folder with the journal's corrections applied.

    Parameters
    ----------
    folder : path-like
        A slide's results (``lesions.csv``, ``cells.csv``, ``summary.json``;
        ``corrections.jsonl`` if any).
    user : str, optional
        Recorded with each new correction (default: the login name).

    Attributes
    ----------
    lesions : pandas.DataFrame
        ``lesions.csv`` plus ``review_class`` and ``status``; lesions whose cells were edited
        by hand replaced by the lesions the linking rule makes of the reviewed cells
        (status ``edited``, new ids).
    unmatched : list of Correction
        Journal entries that match no lesion (or cell) of the current tables.
    complete_regions : list of tuple
        Boxes ``(x0_um, y0_um, x1_um, y1_um)`` marked as reviewed completely: inside them,
        the cells left are confirmed and there is no other.

    Examples
    --------
    >>> s = ReviewSession("results/lung_IAV_d15")  # doctest: +SKIP
    >>> s.set_class(12, "focus"); s.reject(3); s.undo()  # doctest: +SKIP
    >>> s.add_cell(1520.0, 884.5); s.delete_cell(311)  # doctest: +SKIP
    >>> s.counts()["focus"]  # doctest: +SKIP
    """

    folder: Path
    user: str = field(default_factory=_user)
    lesions: pd.DataFrame = field(init=False, repr=False)
    unmatched: list = field(init=False, default_factory=list)
    complete_regions: list = field(init=False, default_factory=list)
    _history: list = field(init=False, default_factory=list, repr=False)
    _entries: list = field(init=False, default_factory=list, repr=False)
    _seq: int = field(init=False, default=0)
    _run_key: str | None = field(init=False, default=None)
    _has_ki67: bool | None = field(init=False, default=None)
    _summary: dict = field(init=False, default_factory=dict, repr=False)
    _base_lesions: pd.DataFrame | None = field(init=False, default=None, repr=False)
    _base_cells: pd.DataFrame | None = field(init=False, default=None, repr=False)
    _cells: pd.DataFrame | None = field(init=False, default=None, repr=False)
    _analysed: pd.DataFrame | None = field(init=False, default=None, repr=False)
    _ki67_threshold: float | None = field(init=False, default=None)
    _next_lesion_id: int = field(init=False, default=1)
    _next_cell_id: int = field(init=False, default=1)

    def __post_init__(self):
        self.folder = Path(self.folder)
        path = self.folder / "lesions.csv"
        if not path.is_file():
            raise InputError(
                f"{self.folder}: not a lungmets result folder (no lesions.csv); "
                "run 'lungmets run' on the slide first"
            )
        self._base_lesions = pd.read_csv(path)
        summary_path = self.folder / "summary.json"
        if not summary_path.is_file():
            raise InputError(
                f"{self.folder}: no summary.json: the analysis of this slide did not finish; "
                "run 'lungmets run' on it again (its corrections, if any, are kept)"
            )
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{summary_path}: unreadable ({exc}); run 'lungmets run' on the slide again "
                "with --force (its corrections, if any, are kept)"
            ) from None
        self._summary = summary
        self._run_key = summary.get("run_key")
        roles = summary.get("input", {}).get("roles")
        self._has_ki67 = None if roles is None else "Ki67" in roles
        self._entries = read_journal(self.folder / JOURNAL)
        self._seq = max((c.seq for c in self._entries), default=0)
        self._rebuild()

    # ----------------------------------------------------------------- journal replay

    def _reset(self) -> None:
        """The state as the analysis left it."""
        lesions = self._base_lesions.copy()
        lesions["review_class"] = initial_review_class(lesions)
        lesions["status"] = "unreviewed"
        self.lesions = lesions.set_index("lesion_id", drop=False)
        self.lesions.index.name = None
        self._analysed = lesions[["lesion_id", "n_ki67_pos", "review_class"]].copy()
        self._analysed.index = self.lesions.index
        self._cells = None
        self._ki67_threshold = None
        self._next_lesion_id = int(lesions["lesion_id"].max()) + 1 if len(lesions) else 1
        self._history, self.unmatched, self.complete_regions = [], [], []

    def _rebuild(self) -> None:
        """Replay the journal's corrections in force (undone ones left out) on the analysis."""
        self._reset()
        undone = {c.undoes for c in self._entries if c.action == "undo"}
        for c in self._entries:
            if c.action != "undo" and c.seq not in undone:
                self._replay(c)

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
        if c.action == "set_ki67_threshold":
            self._apply_ki67((c.after or {}).get("ki67_threshold"))
            self._history.append((c, None))
            return
        if c.action in CELL_ACTIONS:
            if self._replay_cell(c):
                self._history.append((c, None))
            else:
                self.unmatched.append(c)
            return
        if c.action == "complete_region":
            self.complete_regions.append(tuple(float(v) for v in c.after["box_um"]))
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
        self._entries.append(c)
        if action != "undo":
            self._replay(c)
        elif self._history and self._history[-1][1] is not None:
            # A lesion's class or status: put its state back (fast, for long reviews).
            done, lid = self._history.pop()
            self._set(lid, done.before)
        else:  # cells, regions, thresholds: replay the journal without it
            self._rebuild()
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
        """Take back the latest correction still in force; None if there is none.

        The session is then replayed from the journal without it, so a cell added, deleted or
        re-called, a region, a class or a threshold are all undone alike."""
        if not self._history:
            return None
        done, lid = self._history[-1]
        return self._commit(
            "undo",
            None if lid is None else int(lid),
            None if lid is None else self._state(lid),
            None if done.before is None else dict(done.before),
            undoes=done.seq,
            x_um=done.x_um,
            y_um=done.y_um,
        )

    # ----------------------------------------------------------------- cells

    @property
    def config(self):
        """The analysis' settings (`histo.config.AnalysisConfig`) that link cells to lesions."""
        from .config import AnalysisConfig

        params = self._summary.get("parameters") or {}
        keep = ("link_distance_um", "cluster_min_cells", "focus_min_cells")
        return AnalysisConfig(**{k: params[k] for k in keep if k in params})

    @property
    def cells(self) -> pd.DataFrame:
        """The reviewed cells: the analysis' cells (``cells.csv``) and those added by hand,
        with ``review`` (``analysed``, ``added`` or ``deleted``), ``ki67_by_hand`` (the
        Ki67 call was set in review) and ``ki67_pos`` as in force; deleted cells have lesion
        id 0. Indexed by cell_id."""
        return self._ensure_cells()

    def _read_cells(self) -> pd.DataFrame:
        if self._base_cells is None:
            path = self.folder / "cells.csv"
            if not path.is_file():
                raise InputError(f"{self.folder}: no cells.csv; analyse the slide again")
            self._base_cells = pd.read_csv(path)
        return self._base_cells

    def _ensure_cells(self) -> pd.DataFrame:
        if self._cells is None:
            cells = self._read_cells().copy()
            cells["ki67_analysed"] = cells["ki67_pos"].astype("boolean")
            cells["review"] = "analysed"
            cells["ki67_by_hand"] = False
            cells = cells.set_index("cell_id", drop=False)
            cells.index.name = None
            self._cells = cells
            self._next_cell_id = int(cells["cell_id"].max()) + 1 if len(cells) else 1
            self._refresh_ki67()
        return self._cells

    def _find_cell(self, c: Correction):
        """The live cell a journal entry names: by id within the same run, else the nearest
        within `CELL_MATCH_UM` of its position."""
        cells = self._ensure_cells()
        live = cells[cells["review"] != "deleted"]
        cid = (c.before or {}).get("cell_id")
        if cid in live.index and (c.run_key is None or c.run_key == self._run_key):
            return cid
        if c.x_um is None or len(live) == 0:
            return None
        d = np.hypot(live["x_um"] - c.x_um, live["y_um"] - c.y_um).to_numpy()
        i = int(np.argmin(d))
        return live.index[i] if d[i] <= CELL_MATCH_UM else None

    def _replay_cell(self, c: Correction) -> bool:
        cells = self._ensure_cells()
        if c.action == "add_cell":
            cid = self._next_cell_id
            self._next_cell_id += 1
            ki67 = pd.array([(c.after or {}).get("ki67_pos")], dtype="boolean")
            new = pd.DataFrame(
                {
                    "cell_id": [cid],
                    "lesion_id": [0],
                    "x_um": [float(c.x_um)],
                    "y_um": [float(c.y_um)],
                    "ki67_pos": ki67,
                    "ki67_analysed": ki67,
                    "review": ["added"],
                    "ki67_by_hand": [True],
                },
                index=[cid],
            )
            self._cells = pd.concat([cells, new])  # the measurements of an added cell: NaN
            self._relink([cid])
            return True
        cid = self._find_cell(c)
        if cid is None:
            return False
        if c.action == "delete_cell":
            lesion = int(cells.loc[cid, "lesion_id"])
            cells.loc[cid, "review"] = "deleted"
            cells.loc[cid, "lesion_id"] = 0
            self._relink([], lesions=[lesion])
        else:  # set_cell_ki67
            cells.loc[cid, "ki67_analysed"] = bool(c.after["ki67_pos"])
            cells.loc[cid, "ki67_by_hand"] = True
            self._refresh_ki67()
        return True

    def _relink(self, new_cells: list, lesions: list = ()) -> None:
        """Re-derive the lesions touched by a cell edit from the reviewed cells, by the
        analysis' linking rule: the lesions in `lesions` and those within the link distance
        of `new_cells` are replaced by the groups their live cells now make (new ids, status
        ``edited``; their class follows the cells)."""
        from .lesions import lesion_class, link_cells

        cells = self._cells
        cfg = self.config
        live = cells[cells["review"] != "deleted"]
        touched = {int(v) for v in lesions}
        for cid in new_cells:
            x, y = cells.loc[cid, "x_um"], cells.loc[cid, "y_um"]
            near = np.hypot(live["x_um"] - x, live["y_um"] - y).to_numpy() <= cfg.link_distance_um
            touched |= {int(v) for v in live.loc[near, "lesion_id"]}
        touched.discard(0)
        members = live[live["lesion_id"].isin(touched) | live.index.isin(new_cells)]
        self.lesions = self.lesions.drop(index=[t for t in touched if t in self.lesions.index])
        if len(members) == 0:
            self._refresh_ki67()
            return
        groups = link_cells(members, cfg.link_distance_um)
        rows = []
        for g in np.unique(groups):
            part = members[groups == g]
            lid = self._next_lesion_id
            self._next_lesion_id += 1
            cells.loc[part.index, "lesion_id"] = lid
            n = len(part)
            rows.append(
                {
                    "lesion_id": lid,
                    "x_um": float(part["x_um"].mean()),
                    "y_um": float(part["y_um"].mean()),
                    "n_cells": n,
                    "class": str(lesion_class(n, cfg.cluster_min_cells, cfg.focus_min_cells)),
                    "area_um2": float(np.nansum(part.get("cell_area_um2", np.nan))),
                    "her2_mean": float(np.nanmean(part["her2_mean"]))
                    if part["her2_mean"].notna().any()
                    else np.nan,
                    "status": "edited",
                }
            )
        new = pd.DataFrame(rows).set_index("lesion_id", drop=False)
        new.index.name = None
        if not self._ki67_imaged():
            new["n_ki67_pos"] = pd.array([pd.NA] * len(new), dtype="Int64")
            new["dormant"] = pd.array([pd.NA] * len(new), dtype="boolean")
            new["review_class"] = new["class"]
        self.lesions = pd.concat([self.lesions, new])
        self._refresh_ki67()

    def _refresh_ki67(self) -> None:
        """Cells' Ki67 in force (by hand, else the threshold in force, else the analysis'),
        and from them each lesion's Ki67+ count and, unless set by hand, its class."""
        cells = self._cells
        if cells is None:
            return
        call = cells["ki67_analysed"].astype("boolean").copy()
        column = self.ki67_column
        if self._ki67_threshold is not None and column in cells:
            v = cells[column].to_numpy(np.float64)
            by_threshold = pd.array(v >= self._ki67_threshold, dtype="boolean")
            by_threshold[np.isnan(v)] = pd.NA
            auto = ~cells["ki67_by_hand"].to_numpy(bool)
            call[auto] = by_threshold[auto]
        cells["ki67_pos"] = call
        self._derive_lesion_ki67()

    def _derive_lesion_ki67(self) -> None:
        cells, lesions = self._cells, self.lesions
        if not self._ki67_imaged():
            return
        live = cells[cells["review"] != "deleted"]
        n_pos = live.groupby("lesion_id")["ki67_pos"].sum()
        lesions["n_ki67_pos"] = n_pos.reindex(lesions.index).fillna(0).astype(int).to_numpy()
        single = lesions["n_cells"] == 1
        lesions["dormant"] = single & (lesions["n_ki67_pos"] == 0)
        auto = pd.Series(lesion_class_of(lesions, self.config), index=lesions.index, dtype=object)
        # A class a scientist set by hand stays; the others follow the cells.
        keep = lesions["status"] == "corrected"
        lesions.loc[~keep, "review_class"] = auto[~keep]

    @property
    def has_ki67(self) -> bool:
        """Whether the slide had a Ki67 channel (cells then carry a Ki67 call)."""
        return self._ki67_imaged()

    def _ki67_imaged(self) -> bool:
        if self._has_ki67 is not None:
            return self._has_ki67
        cells = self._read_cells()
        return bool(len(cells) and cells["ki67_pos"].notna().any())

    def add_cell(self, x_um: float, y_um: float, ki67_pos: bool | None = False) -> Correction:
        """Add a cell the analysis missed, at its nucleus (um), with its Ki67 status (None
        without Ki67). Lesions within the link distance join it."""
        self._ensure_cells()
        if not (np.isfinite(x_um) and np.isfinite(y_um)):
            raise ValueError(f"a cell's position must be finite, got ({x_um}, {y_um})")
        return self._commit(
            "add_cell",
            None,
            None,
            {"ki67_pos": None if ki67_pos is None else bool(ki67_pos)},
            x_um=float(x_um),
            y_um=float(y_um),
        )

    def delete_cell(self, cell_id: int) -> Correction:
        """Delete a cell (a false positive); its lesion is re-derived from the cells left
        (it may split, or go)."""
        row = self._live_cell(cell_id)
        return self._commit(
            "delete_cell",
            None,
            {"cell_id": int(cell_id), "ki67_pos": _na_to_none(row["ki67_pos"])},
            None,
            x_um=float(row["x_um"]),
            y_um=float(row["y_um"]),
        )

    def set_cell_ki67(self, cell_id: int, ki67_pos: bool) -> Correction:
        """Set a cell's Ki67 status by hand (it then stays, whatever the threshold)."""
        row = self._live_cell(cell_id)
        return self._commit(
            "set_cell_ki67",
            None,
            {"cell_id": int(cell_id), "ki67_pos": _na_to_none(row["ki67_pos"])},
            {"ki67_pos": bool(ki67_pos)},
            x_um=float(row["x_um"]),
            y_um=float(row["y_um"]),
        )

    def toggle_cell_ki67(self, cell_id: int) -> Correction:
        """Call a cell's Ki67 the other way (an unknown status becomes positive)."""
        now = self._live_cell(cell_id)["ki67_pos"]
        return self.set_cell_ki67(cell_id, not (bool(now) if not pd.isna(now) else False))

    def mark_complete(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> Correction:
        """Mark a box (um) as reviewed completely: every cell in it is confirmed, and there
        is no other (what fine-tuning takes as certain negatives)."""
        box = [min(x0_um, x1_um), min(y0_um, y1_um), max(x0_um, x1_um), max(y0_um, y1_um)]
        if not all(np.isfinite(box)) or box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            raise ValueError(f"a region needs a width and a height, got {box}")
        return self._commit(
            "complete_region",
            None,
            None,
            {"box_um": [float(v) for v in box]},
            x_um=0.5 * (box[0] + box[2]),
            y_um=0.5 * (box[1] + box[3]),
        )

    def _live_cell(self, cell_id):
        cells = self._ensure_cells()
        if cell_id not in cells.index or cells.loc[cell_id, "review"] == "deleted":
            raise KeyError(f"no cell {cell_id} in {self.folder}")
        return cells.loc[cell_id]

    def cell_at(self, x_um: float, y_um: float, within_um: float = CELL_MATCH_UM):
        """The id of the live cell nearest to a point, or None beyond `within_um`."""
        cells = self._ensure_cells()
        live = cells[cells["review"] != "deleted"]
        if len(live) == 0:
            return None
        d = np.hypot(live["x_um"] - x_um, live["y_um"] - y_um).to_numpy()
        i = int(np.argmin(d))
        return int(live.index[i]) if d[i] <= within_um else None

    def reviewed_cells(self) -> pd.DataFrame:
        """The cells that count after review (deleted ones left out, added ones in), with
        the Ki67 call in force, one row each (for a cells layer or a table)."""
        if self._cells is None:
            return self._read_cells().copy()
        cells = self._cells
        return cells[cells["review"] != "deleted"].reset_index(drop=True)

    @property
    def n_cell_edits(self) -> int:
        """Cells added, deleted or re-called in review (in force)."""
        return sum(self.cell_edit_counts().values())

    def cell_edit_counts(self) -> dict:
        """How many cells were added (``add_cell``), deleted (``delete_cell``) and given a
        Ki67 call by hand (``set_cell_ki67``) in review (in force)."""
        out = dict.fromkeys(CELL_ACTIONS, 0)
        for c, _ in self._history:
            if c.action in out:
                out[c.action] += 1
        return out

    # ----------------------------------------------------------------- Ki67 threshold

    @property
    def run_ki67(self) -> dict | None:
        """The analysis' Ki67 threshold record (summary.json ``markers.Ki67``), or None."""
        return (self._summary.get("markers") or {}).get("Ki67")

    @property
    def ki67_column(self) -> str:
        """The cells.csv column the slide's Ki67 threshold applies to (``ki67_mean``, or
        ``ki67_p90`` for a run with ``--ki67-measure p90``)."""
        return f"ki67_{(self.run_ki67 or {}).get('measure', 'mean')}"

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
        cells = self._read_cells()
        if self.ki67_column not in cells:
            raise InputError(
                f"{self.folder / 'cells.csv'}: no Ki67 intensities ({self.ki67_column}); no "
                "Ki67 to threshold"
            )
        return self._ensure_cells()

    def _ki67_state(self, threshold: float | None):
        """(lesions, cells) as they would be with `threshold` (None: as analysed)."""
        self._load_cells()
        saved = (self._ki67_threshold, self.lesions, self._cells)
        try:  # on copies: the tables in force (shown in the Review widget) stay as they are
            self.lesions, self._cells = self.lesions.copy(), self._cells.copy()
            self._ki67_threshold = None if threshold is None else float(threshold)
            self._refresh_ki67()
            lesions, cells = self.lesions, self._cells
        finally:
            self._ki67_threshold, self.lesions, self._cells = saved
        return lesions, cells[cells["review"] != "deleted"].reset_index(drop=True)

    def _apply_ki67(self, threshold: float | None) -> None:
        self._load_cells()
        self._ki67_threshold = None if threshold is None else float(threshold)
        self._refresh_ki67()

    def preview_ki67_threshold(self, threshold: float | None):
        """``(lesions, cells, counts)`` as they would be with `threshold`; nothing recorded."""
        lesions, cells = self._ki67_state(threshold)
        return lesions, cells, reviewed_counts(lesions, True)

    def set_ki67_threshold(self, threshold: float | None) -> Correction:
        """Record a Ki67 threshold for this slide (counts; None: back to the analysis' own).

        Every lesion's Ki67+ count and dormancy follow it, except lesions whose class was set
        by hand and cells whose Ki67 was. Undone like any correction.
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


def lesion_class_of(lesions: pd.DataFrame, config) -> np.ndarray:
    """The review class the analysis' rule gives each lesion: its class by size, and single
    Ki67- cells ``dormant``."""
    from .lesions import lesion_class

    n = lesions["n_cells"].to_numpy()
    cls = np.asarray(
        lesion_class(n, config.cluster_min_cells, config.focus_min_cells), dtype=object
    )
    dormant = (lesions["n_cells"].to_numpy() == 1) & (
        pd.to_numeric(lesions["n_ki67_pos"], errors="coerce").fillna(-1).to_numpy() == 0
    )
    cls[dormant] = "dormant"
    return cls


def _na_to_none(v):
    return None if pd.isna(v) else bool(v)


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
    """Append one correction to the journal and force it to disk.

    A torn last line (a crash mid-write: no line end) is cut off first, so that the new line
    does not run on from it.
    """
    path = Path(path)
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                keep = f.read().rfind(b"\n") + 1
                log.warning("%s: a torn last line (%d bytes) was cut off", path, size - keep)
                f.truncate(keep)
        f.seek(0, os.SEEK_END)
        f.write((correction.to_json() + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class JournalProblem:
    """A line of a journal that is not a correction in force: ``line`` (1-based), ``text``
    and ``why``."""

    line: int
    text: str
    why: str


def _parse_journal(path: Path) -> tuple[list[Correction], list[JournalProblem], bool]:
    """Corrections, problems (malformed lines, undos of nothing) and whether the last line is
    torn (no line end: a crash mid-write)."""
    raw = path.read_text(encoding="utf-8")
    lines = raw.splitlines()
    torn = bool(raw) and not raw.endswith("\n")
    out: list[Correction] = []
    problems = []
    lines_of: dict[int, int] = {}
    for k, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            c = Correction(**json.loads(line))
        except (ValueError, TypeError) as exc:
            if torn and k == len(lines):
                log.warning("%s: line %d is torn (a crash mid-write) and was skipped", path, k)
                continue
            problems.append(JournalProblem(k, line, f"not a correction ({exc})"))
            continue
        out.append(c)
        lines_of[id(c)] = k
    seqs = {c.seq for c in out}
    for c in out:
        if c.action == "undo" and c.undoes not in seqs:
            problems.append(
                JournalProblem(lines_of[id(c)], "", f"undoes correction {c.undoes}, not there")
            )
    return out, problems, torn


def read_journal(path: str | os.PathLike) -> list[Correction]:
    """The corrections of a journal.

    A torn last line (a crash mid-write) is skipped with a warning. Any other line that is not
    a correction, or an undo of a correction that is not there, is an `InputError` naming the
    file and line: corrections are never dropped silently (`repair_journal` drops them,
    keeping a backup).
    """
    path = Path(path)
    if not path.is_file():
        return []
    out, problems, _ = _parse_journal(path)
    if problems:
        p = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(
            f"{path}: line {p.line}: {p.why}{more}; none of this slide's corrections were "
            "used. Fix the line, or drop such lines with 'lungmets cohort ... --repair' "
            "(the journal is backed up first)"
        )
    return out


def repair_journal(path: str | os.PathLike) -> tuple[list[JournalProblem], Path | None]:
    """Rewrite a journal without the lines `read_journal` refuses (and without a torn last
    line), after copying it to ``<journal>.bak-<UTC time>``.

    Returns
    -------
    problems : list of JournalProblem
        The lines dropped (empty: nothing to repair, nothing written).
    backup : Path or None
        The copy of the journal as it was.
    """
    import shutil

    from .atomic import atomic_path

    path = Path(path)
    if not path.is_file():
        return [], None
    _, problems, torn = _parse_journal(path)
    if not problems:
        return [], None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    shutil.copy2(path, backup)
    drop = {p.line for p in problems}
    lines = path.read_text(encoding="utf-8").splitlines()
    if torn:
        drop.add(len(lines))
    kept = [line for k, line in enumerate(lines, start=1) if k not in drop and line.strip()]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    # An undo can lose its target only through a dropped line: repeat until none is left.
    more, _ = repair_journal(path)
    return problems + more, backup
